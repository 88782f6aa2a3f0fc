"""The adapted linear/convolution op and its dispatch to a backend.

``adapted_op(x, W, bias, adapter) = op(x, W', bias)`` where ``op`` is ``F.linear`` for a
weight of order 2 and an N-d convolution otherwise, and ``W' = combine(W, scale * delta)``
as :mod:`lrtensor_kernels.methods` defines it (``W' - W`` when ``delta_only``).

The fused path is the custom op ``lrtensor::adapted_op``. Its forward makes ``W'`` in one
kernel launch and hands it to cuDNN/cuBLAS; its backward saves only ``x`` and the adapter
tensors (the frozen ``W`` is referenced, not copied), recomputes ``W'`` for the input
gradient, asks cuDNN/cuBLAS for the weight gradient only when an adapter tensor needs a
gradient, and turns it into every adapter gradient in one projection pass. A base weight that
requires grad (not the adapter use case) gets ``grad W' * dW'/dW`` at the cost of one more
weight-sized pass.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, methods

_KERNEL_MODULES = {"triton": "lrtensor_kernels.kernels.triton_transform", "native": "lrtensor_kernels.kernels.native"}


def kernels_for(impl: str):
    """The module implementing ``transform``, ``project`` and ``channel_dot`` for a fused backend
    (imported on first use)."""
    try:
        return importlib.import_module(_KERNEL_MODULES[impl])
    except KeyError:
        raise ValueError(f"no fused kernels for backend {impl!r}; expected one of {tuple(_KERNEL_MODULES)}") from None


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def base_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """``F.linear(x, W, bias)`` for a weight of order 2, else ``F.convNd`` with the given geometry."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return _CONV[weight.dim()](x, weight, bias, stride, padding, dilation, groups)


@torch.library.custom_op("lrtensor::adapted_op", mutates_args=())
def adapted_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    adapter: list[Tensor],
    math: str,
    scale: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    delta_only: bool,
    impl: str,
) -> Tensor:
    """``op(x, W', bias)`` with ``W'`` from the fused transform of backend ``impl``.

    x: (N, C_in, *spatial) for convolutions, (M, in) for linear. weight: (out, in/groups, *k) or
    (out, in). adapter: the tensors of ``methods.AdapterMath.from_key(math).delta``.
    """
    with _autocast_off(x):
        w_eff = _transform(kernels_for(impl), weight, adapter, math, scale, delta_only, x.dtype)
        return base_op(x, w_eff, bias, stride, padding, dilation, groups)


def _autocast_off(x: Tensor):
    """The op bodies choose their dtypes themselves (``W'`` in the input's dtype); autocast, which
    is also on while a backward runs inside an autocast region, must not recast their tensors."""
    return torch.autocast(x.device.type, enabled=False)


def _transform(kernels, weight, adapter, math, scale, delta_only, dtype):
    """``W'`` stored in ``dtype`` (the input's: under autocast it differs from the weight's)."""
    out = None if dtype == weight.dtype else torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return kernels.transform(weight, adapter, math, scale, delta_only, out=out)


@adapted_op.register_fake
def _(x, weight, bias, adapter, math, scale, stride, padding, dilation, groups, delta_only, impl):
    return base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)


@torch.library.custom_op("lrtensor::adapted_op_backward", mutates_args=())
def adapted_op_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    adapter: list[Tensor],
    math: str,
    scale: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    delta_only: bool,
    impl: str,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    need_adapter: bool,
) -> list[Tensor]:
    """Gradients of ``adapted_op``: ``[grad_x if need_input] + [grad_weight if need_weight] +
    [grad_bias if need_bias] + (one gradient per adapter tensor if need_adapter)``."""
    with _autocast_off(x):
        kernels = kernels_for(impl)
        w_eff = _transform(kernels, weight, adapter, math, scale, delta_only, x.dtype) if need_input else None
        need_grad_w_eff = need_adapter or need_weight
        grad_x = grad_w_eff = grad_b = None
        if weight.dim() == 2:
            if need_input:
                grad_x = grad_out @ w_eff
            if need_grad_w_eff:
                grad_w_eff = grad_out.t() @ x
            if need_bias:
                grad_b = grad_out.sum(0)
        elif need_input or need_grad_w_eff or need_bias:
            n = weight.dim() - 2
            grad_x, grad_w_eff, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x, w_eff if w_eff is not None else weight.to(x.dtype), [weight.shape[0]],
                stride, padding, dilation, False, [0] * n, groups, [need_input, need_grad_w_eff, need_bias],
            )
        out = []
        if need_input:
            out.append(grad_x)
        if need_weight:
            out.append(_base_weight_grad(kernels, grad_w_eff, weight, adapter, math, scale, delta_only))
        if need_bias:
            out.append(grad_b)
        if need_adapter:
            out.extend(kernels.project(grad_w_eff, weight, adapter, math, scale))
        return out


def _base_weight_grad(kernels, grad_w_eff, weight, adapter, math, scale, delta_only):
    """``grad W' * dW'/dW``: 1 (or 0 for ``W' - W``) for add; ``f(E)``, the transform of a weight
    of ones, for the multiplicative rules ``W' = W * f(E)``."""
    if methods.AdapterMath.from_key(math).combine == "add":
        return torch.zeros_like(grad_w_eff) if delta_only else grad_w_eff
    return grad_w_eff * kernels.transform(torch.ones_like(weight), adapter, math, scale, delta_only)


@adapted_op_backward.register_fake
def _(grad_out, x, weight, adapter, math, scale, stride, padding, dilation, groups, delta_only, impl,
      need_input, need_weight, need_bias, need_adapter):
    out = []
    if need_input:
        out.append(torch.empty_like(x))
    if need_weight:
        out.append(torch.empty_like(weight))
    if need_bias:
        out.append(grad_out.new_empty(weight.shape[0]))
    if need_adapter:
        out.extend(torch.empty_like(t) for t in adapter)
    return out


def _setup_context(ctx, inputs, output):
    x, weight, bias, adapter, math, scale, stride, padding, dilation, groups, delta_only, impl = inputs
    ctx.save_for_backward(x, weight, *adapter)
    ctx.config = (math, scale, stride, padding, dilation, groups, delta_only, impl)


def _backward(ctx, grad_out):
    x, weight, *adapter = ctx.saved_tensors
    need_x, need_w, need_b, need_adapter = ctx.needs_input_grad[:4]
    need_adapter = any(need_adapter)
    grads = adapted_op_backward(grad_out, x, weight, adapter, *ctx.config, need_x, need_w, need_b, need_adapter)
    grads = iter(grads)
    grad_x = next(grads) if need_x else None
    grad_w = next(grads) if need_w else None
    grad_b = next(grads) if need_b else None
    grad_adapter = list(grads) if need_adapter else [None] * len(adapter)
    # the structure must mirror the inputs', where an empty int list counts as an empty list
    no_grad_lists = [[] if len(v) == 0 else None for v in ctx.config[2:5]]
    return (grad_x, grad_w, grad_b, grad_adapter, None, None, *no_grad_lists, None, None, None)


adapted_op.register_autograd(_backward, setup_context=_setup_context)


def adapted_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    adapter: Sequence[Tensor],
    math: methods.AdapterMath,
    scale: float,
    geometry: tuple = ((), (), (), 1),
    dropped_x: Optional[Tensor] = None,
) -> Tensor:
    """The adapted layer's output on the backend in force.

    ``op(x, W', bias)``; or, given ``dropped_x`` (adapter dropout applied to the input),
    ``op(x, W, bias) + op(dropped_x, W' - W)``. ``geometry`` is ``(stride, padding, dilation,
    groups)`` of a convolution (ignored for linear); ``x`` has its batch dimension (conv) or is
    2-D (linear), and is already padded as the layer's padding mode asks.

    Under autocast, the adapter math still runs in float32; ``W'`` is stored in the autocast
    dtype and the conv/matmul runs in it, as autocast would run the plain layer.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        with torch.autocast(device_type, enabled=False):
            return adapted_forward(cast(x), weight, cast(bias), adapter, math, scale, geometry, cast(dropped_x))
    stride, padding, dilation, groups = geometry
    impl = backend.resolve(weight.device)

    def adapted(inp, b, delta_only):
        if impl == "reference":
            w_eff = methods.effective_weight(weight, adapter, math, scale, delta_only).to(inp.dtype)
            return base_op(inp, w_eff, b, stride, padding, dilation, groups)
        return adapted_op(inp, weight, b, list(adapter), math.key, float(scale), list(stride), list(padding),
                          list(dilation), groups, delta_only, impl)

    if dropped_x is not None:
        frozen = base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)
        return frozen + adapted(dropped_x, None, True)
    return adapted(x, bias, False)
