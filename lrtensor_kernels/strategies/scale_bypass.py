"""SSL's and SSB's "bypass" strategy: scale the activations instead of the weight.

``W' = d_out * W * d_in`` (``d_out = 1`` for SSL), broadcast over the other modes, so::

    op(x, W', b) = d_out * op(x * d_in, W) + b,  computed as  zb + (d_out - 1) * (zb - b),  zb = op(x * d_in, W, b)

(so that a fresh layer, ``d = 1``, computes the plain layer bit for bit) with ``d_in`` (C_in/g
entries) scaling each group's input channels and ``d_out`` the output channels; the scaling
commutes with padding of any mode. No weight gradient is needed:
``grad_xs = op^T(d_out * grad, W)`` (the frozen layer's input-gradient op), ``grad_x = d_in *
grad_xs``, ``grad_d_in`` = channel sums of ``x * grad_xs`` (summed over the groups) and
``grad_d_out`` = channel sums of ``grad * z`` with ``z = op(x * d_in, W)``, which SSB keeps from
the forward (as many bytes as the output; recomputing it would cost one more op).

Split form (bfloat16/float16): ``x * d_in`` rounds to the activation's precision, and a scale
within half an ulp of one is lost as it is in a merged ``W'``. There the update runs as its own op
on ``x * (d_in - 1)``, which keeps its relative precision: ``z = op(x, W) + op(x * (d_in - 1), W)``
and ``y = op(x, W) + b + [op(x * (d_in - 1), W) + (d_out - 1) * z]``: one more op in the forward,
the same backward.

Adapter dropout (``xd = dropout(x)``): ``op(x, W, b) + op(xd, W' - W)`` with
``op(xd, W' - W) = op(xd * (d_in - 1), W) + (d_out - 1) * op(xd * d_in, W)``, under autograd on
every backend (three ops forward; the cost model knows it).

Reference backend: these formulas under autograd. Fused backends: the op
``lrtensor::scale_bypass`` and its backward (:class:`ops.FusedOp`; saving ``x``, the scales and,
for SSB, ``z``),
whose channel sums (over every dim but the channel dim 1, the features of a 2-d linear input) are
the backend's deterministic ``channel_dot`` kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .call import AdaptedCall


def _channel_view(scale: Tensor, x: Tensor, groups: int) -> Tensor:
    """``scale`` (per input channel of a group, or per output channel) as a broadcastable view of
    ``x``'s channel dim (dim 1, or the last dim of a 2-d linear input), repeated over ``groups``."""
    if groups > 1:
        scale = scale.repeat(groups)
    return scale if x.dim() == 2 else scale.view(1, -1, *(1,) * (x.dim() - 2))


def _scales(adapter, x: Tensor, groups: int, deviation: bool) -> tuple:
    """``(d_in, d_out)`` (or ``d - 1`` with ``deviation``) as views in ``x``'s dtype; ``d_out`` None for SSL."""
    shifted = (lambda t: t - 1.0) if deviation else (lambda t: t)
    d_in = _channel_view(shifted(adapter[0]).to(x.dtype), x, groups)
    d_out = None if len(adapter) == 1 else _channel_view(shifted(adapter[1]).to(x.dtype), x, 1)
    return d_in, d_out


def splits(dtype: torch.dtype) -> bool:
    """Whether the update runs as its own op: in 16-bit dtypes (see module doc)."""
    return dtype in (torch.float16, torch.bfloat16)


def _plus_scaled(base: Tensor, dev_out: Tensor, z: Tensor) -> Tensor:
    """``base + (d_out - 1) * z``: ``base`` itself, bit for bit, where ``d_out`` is one."""
    return torch.addcmul(base, dev_out, z)


def forward(x: Tensor, dropped_x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], adapter,
            geometry: tuple, split: bool) -> tuple:
    """``(y, z)``: ``y = op(x, W', bias)`` by the formulas of the module doc; ``z = op(x * d_in, W)``
    for SSB without dropout (what ``d_out``'s gradient needs), else None. Differentiable."""
    stride, padding, dilation, groups = geometry
    weight = weight.to(x.dtype)

    def op(inp, b=None):
        return ops.base_op(inp, weight, b, stride, padding, dilation, groups)

    ssb = len(adapter) == 2
    if dropped_x is None and not split:
        d_in, _ = _scales(adapter[:1], x, groups, deviation=False)
        y = op(x * d_in, bias)
        if not ssb:
            return y, None
        z = y if bias is None else y - _channel_view(bias.to(y.dtype), y, 1)
        return _plus_scaled(y, _scales(adapter, x, groups, deviation=True)[1], z), z
    dev_in, dev_out = _scales(adapter, x, groups, deviation=True)
    if dropped_x is not None:
        z1 = op(dropped_x * dev_in)
        update = _plus_scaled(z1, dev_out, op(dropped_x) + z1) if ssb else z1
        return op(x, bias) + update, None
    frozen = op(x, bias)
    z1 = op(x * dev_in)
    if not ssb:
        return frozen + z1, None
    z = (frozen if bias is None else frozen - _channel_view(bias.to(x.dtype), x, 1)) + z1
    return frozen + _plus_scaled(z1, dev_out, z), z


def reference(call: AdaptedCall) -> Tensor:
    """The formulas under autograd (the reference backend, and dropout on every backend)."""
    return forward(call.x, call.dropped_x, call.weight, call.bias, call.adapter, call.geometry,
                   splits(call.x.dtype))[0]


# -- fused backends: custom ops ------------------------------------------------------------------


def _fused_backward(kernels, grad_y, x, weight, adapter, z, geometry, need_input, need_weight, need_bias,
                    need_adapter) -> list:
    stride, padding, dilation, groups = geometry
    weight = weight.to(x.dtype)
    split = splits(x.dtype)
    d_in, d_out = _scales(adapter, x, groups, deviation=split)

    def scaled(t, d):  # t * d, or t + t * (d - 1) where d - 1 keeps its precision (16-bit)
        return t if d is None else (torch.addcmul(t, t, d) if split else t * d)

    grad_scaled = scaled(grad_y, d_out)
    grad_xs = ops.op_backward(grad_scaled, x, weight, stride, padding, dilation, groups, True, False)[0] \
        if need_input or need_adapter else None
    grad_x = scaled(grad_xs, d_in) if need_input else None
    grad_w = ops.op_backward(grad_scaled, scaled(x, d_in), weight, stride, padding, dilation, groups, False,
                             True)[1] if need_weight else None
    grad_b = grad_y.sum([d for d in range(grad_y.dim()) if d != 1]) if need_bias else None
    grad_adapter = []
    if need_adapter:
        grad_adapter.append(kernels.channel_dot(x, grad_xs, 1).reshape(groups, -1).sum(0).to(adapter[0].dtype))
        if d_out is not None:
            grad_adapter.append(kernels.channel_dot(grad_y, z, 1).to(adapter[1].dtype))
    return ops.gradients_as_promised([(grad_x, x), (grad_w, weight), (grad_b, grad_b), *zip(grad_adapter, adapter)])


def _scale_bypass(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter: list[Tensor], stride: list[int],
                    padding: list[int], dilation: list[int], groups: int, split: bool, impl: str) -> tuple[Tensor, Tensor]:
    """``(y, z)``: ``y = d_out * op(x * d_in, W) + b``; ``z = op(x * d_in, W)`` for SSB (kept for
    ``d_out``'s gradient), an empty tensor for SSL."""
    with ops.autocast_off(x):
        y, z = forward(x, None, weight, bias, adapter, (stride, padding, dilation, groups), split)
    return y, (x.new_empty(0) if z is None else ops.like(z, y))


def _scale_bypass_composite(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter: list[Tensor],
                            stride: list[int], padding: list[int], dilation: list[int], groups: int, split: bool,
                            impl: str) -> tuple:
    """:func:`_scale_bypass` in differentiable PyTorch ops (torch.func, higher-order gradients)."""
    with ops.autocast_off(x):
        y, z = forward(x, None, weight, bias, adapter, (stride, padding, dilation, groups), split)
    return y, (x.new_empty(0) if z is None else z)


scale_bypass_op = ops.FusedOp("scale_bypass", _scale_bypass, list_index=3, composite=_scale_bypass_composite)


@scale_bypass_op.register_fake
def _(x, weight, bias, adapter, stride, padding, dilation, groups, split, impl):
    y = ops.base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)
    return y, (torch.empty_like(y) if len(adapter) == 2 else x.new_empty(0))


def _scale_bypass_backward(grad_y: Tensor, x: Tensor, weight: Tensor, adapter: list[Tensor], z: Tensor,
                             stride: list[int], padding: list[int], dilation: list[int], groups: int, impl: str,
                             need_input: bool, need_weight: bool, need_bias: bool, need_adapter: bool) -> list[Tensor]:
    """The gradients of ``scale_bypass`` that are needed, in input order."""
    with ops.autocast_off(x):
        return _fused_backward(ops.kernels_for(impl), grad_y, x, weight, adapter, z,
                               (stride, padding, dilation, groups), need_input, need_weight, need_bias, need_adapter)


scale_bypass_backward_op = ops.FusedOp("scale_bypass_backward", _scale_bypass_backward)


@scale_bypass_backward_op.register_fake
def _(grad_y, x, weight, adapter, z, stride, padding, dilation, groups, impl, need_input, need_weight, need_bias,
      need_adapter):
    return ops.fake_gradients([(need_input, x), (need_weight, weight), (need_bias, grad_y.new_empty(weight.shape[0]))],
                              adapter, need_adapter)


def _setup_context(ctx, inputs, output):
    x, weight, bias, adapter, stride, padding, dilation, groups, split, impl = inputs
    ctx.save_for_backward(x, weight, output[1], *adapter)
    ctx.config = (stride, padding, dilation, groups, impl)


def _backward(ctx, grad_y, _grad_z):
    x, weight, z, *adapter = ctx.saved_tensors
    need_x, need_w, need_b, need_adapter = ctx.needs_input_grad[:4]
    need_adapter = any(need_adapter)
    grads = iter(scale_bypass_backward_op(grad_y, x, weight, adapter, z, *ctx.config, need_x, need_w, need_b,
                                          need_adapter))
    picked = [next(grads) if need else None for need in (need_x, need_w, need_b)]
    grad_adapter = list(grads) if need_adapter else [None] * len(adapter)
    return (*picked, grad_adapter, *ops.no_grad_for_lists(ctx.config[:3]), None, None, None)


scale_bypass_op.register_autograd(_backward, setup_context=_setup_context)


def run(call: AdaptedCall) -> Tensor:
    if call.impl == "reference" or call.dropped_x is not None:
        return reference(call)
    y, _ = scale_bypass_op(call.x, call.weight, call.bias, list(call.adapter), list(call.stride), list(call.padding),
                           list(call.dilation), call.groups, splits(call.x.dtype), call.impl)
    return y
