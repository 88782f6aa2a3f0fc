"""The base op and the fused backends' custom op for an adapted linear/convolution.

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

import contextlib
import functools
import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import methods
from .kernels import workspace

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


def op_backward(grad_out: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                need_input: bool, need_weight: bool, need_bias: bool = False) -> tuple:
    """``(grad_x, grad_weight, grad_bias)`` of ``base_op(x, weight, bias)``, None for what is not needed.

    ``x`` is read only for the weight gradient (its shape is all the input gradient needs)."""
    if weight.dim() == 2:
        return (grad_out @ weight if need_input else None, grad_out.t() @ x if need_weight else None,
                grad_out.sum(0) if need_bias else None)
    if not (need_input or need_weight or need_bias):
        return None, None, None
    n = weight.dim() - 2
    mask = [need_input, need_weight, need_bias]
    grads = torch.ops.aten.convolution_backward(grad_out, x, weight, [weight.shape[0]], stride, padding, dilation,
                                                False, [0] * n, groups, mask)
    # some CPU kernels (grouped convolutions) return a gradient the mask did not ask for
    return tuple(g if need else None for g, need in zip(grads, mask))


class _OpCtx:
    """A Function's ctx as a custom op's autograd functions see it: ``needs_input_grad`` in the op's
    own input structure (its list input regrouped), and ``save_for_backward``/``saved_tensors``
    holding what the op saves (the Function saves the op's inputs beside them, see
    :func:`_eager_function`); everything else is the Function's ctx."""

    def __init__(self, ctx, needs_input_grad):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "needs_input_grad", needs_input_grad)

    def save_for_backward(self, *tensors):
        self._ctx.op_saved = tensors

    @property
    def saved_tensors(self):
        return self._ctx.saved_tensors[:self._ctx.op_saved_count]

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_ctx"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_ctx"), name, value)


def _regroup(flat, at: int, length: int) -> tuple:
    return (*flat[:at], list(flat[at:at + length]), *flat[at + length:])


class FusedOp:
    """A custom op ``lrtensor::<name>`` on the Python function ``impl``, callable three ways with one
    implementation and one autograd formula:

    - under torch.compile (and for export, opcheck, ``torch.ops.lrtensor.<name>``): the custom op,
      which graphs see through its fake implementation;
    - eagerly: ``impl`` itself, under a plain autograd.Function running the same ``setup_context``
      and ``backward`` (the custom op's dispatch and pytree handling cost about 0.1 ms a call, more
      than a small layer's convolution on a CPU);
    - under a torch.func transform (grad, vmap, jvp, jacrev, ...), forward-mode AD and on the meta
      device: ``composite``, the same math in differentiable PyTorch ops, which every transform
      composes with (neither the custom op nor the kernels have batching or forward-mode rules).

    A backward that must itself be differentiable (``create_graph=True``: gradient penalties,
    Hessian-vector products) differentiates ``composite`` on the saved inputs, so that gradients
    of every order are exact; the fused backward runs otherwise.

    ``list_index``: the position of the op's one ``list[Tensor]`` input (the adapter tensors), which
    the Function receives flattened. ``composite`` takes the op's arguments and returns its outputs.
    """

    def __init__(self, name: str, impl, list_index: Optional[int] = None, composite=None):
        self.impl = impl
        self.op = torch.library.custom_op(f"lrtensor::{name}", mutates_args=())(impl)
        self.list_index = list_index
        self.composite = composite
        self._function = None

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(self, backward, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        self._function = _eager_function(self.impl, backward, setup_context, self.list_index, self.composite)

    def __call__(self, *args):
        route = _route(args)
        if route == "op":
            return self.op(*args)
        if route == "composite" and self.composite is not None:
            return self.composite(*args)
        if self._function is None:  # no autograd of its own (a backward op)
            return self.impl(*args)
        at = self.list_index
        return self._function.apply(len(args[at]), *args[:at], *args[at], *args[at + 1:])


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


@functools.lru_cache(maxsize=None)
def _tracing_modes() -> tuple:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

    return FakeTensorMode, FunctionalTensorMode, ProxyTorchDispatchMode


def transformed() -> bool:
    """Whether a torch.func transform or forward-mode AD (``torch.autograd.forward_ad.dual_level``) is on."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def _route(args) -> str:
    """How a call runs (see :class:`FusedOp`): ``"composite"`` under a torch.func transform, with
    forward-mode AD on (``torch.autograd.forward_ad.dual_level``) or on the meta device; ``"op"``
    under torch.compile, a tracing torch_dispatch mode (fake tensors, functionalisation, make_fx)
    or with a tensor subclass among the arguments, which the custom op understands; else
    ``"eager"``. A mode that observes aten ops (FlopCounterMode, a memory tracker, a debug mode)
    gets the eager path, so it sees the convolutions and matmuls the op runs."""
    if torch.compiler.is_compiling():
        return "op"
    tensors = [t for arg in args for t in (arg if isinstance(arg, (list, tuple)) else (arg,))
               if isinstance(t, Tensor)]
    if transformed() or any(t.device.type == "meta" for t in tensors):
        return "composite"
    if torch._C._len_torch_dispatch_stack() > 0:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        if any(isinstance(mode, _tracing_modes()) for mode in _get_current_dispatch_mode_stack()):
            return "op"
    if any(type(t) not in _PLAIN_TENSORS for t in tensors):
        return "op"
    return "eager"


def runs_eagerly(args) -> bool:
    """Whether an op called on ``args`` now would run eagerly (no torch.compile, torch.func
    transform, tracing mode or tensor subclass): where plain PyTorch ops under autograd may stand in
    for it."""
    return _route(args) == "eager"


def _eager_function(impl, backward, setup_context, at: int, composite):
    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, length, *flat):
            inputs = _regroup(flat, at, length)
            output = impl(*inputs)
            ctx.list_length = length
            setup_context(_OpCtx(ctx, None), inputs, output)
            # the op's own saved tensors, then its tensor inputs (for a differentiable backward; an
            # input the op saves already costs nothing more)
            op_saved = getattr(ctx, "op_saved", ())
            ctx.op_saved_count = len(op_saved)
            ctx.args = [None if isinstance(a, Tensor) else a for a in flat]
            ctx.tensor_positions = [i for i, a in enumerate(flat) if isinstance(a, Tensor)]
            ctx.save_for_backward(*op_saved, *(a for a in flat if isinstance(a, Tensor)))
            ctx.op_saved = None
            # the outputs after the first are kept for the backward, never differentiated: no
            # activation-sized zeros for their gradients
            ctx.set_materialize_grads(False)
            return output

        @staticmethod
        def backward(ctx, *grads):
            if grads[0] is None:  # only an output kept for the backward was used: nothing flows back
                return (None,) * len(ctx.needs_input_grad)
            if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable too
                return (None, *_differentiable_backward(ctx, composite, at, grads))
            needs = _regroup(ctx.needs_input_grad[1:], at, ctx.list_length)
            out = backward(_OpCtx(ctx, needs), *grads)
            flat = (*out[:at], *out[at], *out[at + 1:])
            return (None, *(g if g is None or isinstance(g, Tensor) else None for g in flat))

    return EagerOp


def _differentiable_backward(ctx, composite, at: int, grads) -> list:
    """The gradients of the op's flat inputs as differentiable functions of the inputs and ``grads``:
    ``composite`` rerun on the saved inputs under autograd, and differentiated with ``create_graph``."""
    flat = list(ctx.args)
    for i, t in zip(ctx.tensor_positions, ctx.saved_tensors[ctx.op_saved_count:]):
        flat[i] = t
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
    with torch.enable_grad():
        outputs = composite(*_regroup(flat, at, ctx.list_length))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    result = [None] * len(flat)
    if pairs and wanted:
        found = torch.autograd.grad([o for o, _ in pairs], [flat[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
        for i, g in zip(wanted, found):
            result[i] = g
    return result


def _adapted_op(
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
    with autocast_off(x), workspace.borrowed(weight.shape, x.dtype, weight.device) as scratch:
        w_eff = transform_to(kernels_for(impl), weight, adapter, math, scale, delta_only, x.dtype, scratch)
        return base_op(x, w_eff, bias, stride, padding, dilation, groups)


def reference_adapted_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapter: list[Tensor], math: str,
                         scale: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                         delta_only: bool, impl: str = "reference") -> Tensor:
    """``adapted_op`` in differentiable PyTorch ops: ``W'`` (or ``W' - W``) by
    :func:`methods.effective_weight`, then the op (the reference backend, and every backend's
    composite; ``impl`` is not used)."""
    with autocast_off(x):
        w_eff = methods.effective_weight(weight, adapter, methods.AdapterMath.from_key(math), scale, delta_only)
        return base_op(x, w_eff.to(x.dtype), bias, stride, padding, dilation, groups)


adapted_op = FusedOp("adapted_op", _adapted_op, list_index=3, composite=reference_adapted_op)


def autocast_off(x: Tensor):
    """The op bodies choose their dtypes themselves (``W'`` in the input's dtype); autocast, which
    is also on while a backward runs inside an autocast region, must not recast their tensors.
    (No autocast exists on some devices, the meta device among them: nothing to turn off there.)"""
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def w_eff_buffer(weight: Tensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Optional[Tensor]:
    """Where a backend writes ``W'`` stored in ``dtype``: ``out`` when given (a scratch tensor of the
    weight's shape and that dtype), a new tensor where ``dtype`` is not the weight's, else None (the
    backend allocates it in the weight's dtype)."""
    if out is None and dtype != weight.dtype:
        return torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return out


def transform_to(kernels, weight, adapter, math, scale, delta_only, dtype, out: Optional[Tensor] = None):
    """``W'`` stored in ``dtype`` (the input's: under autocast it differs from the weight's), in
    ``out`` when given (a scratch tensor of the weight's shape and that dtype)."""
    return kernels.transform(weight, adapter, math, scale, delta_only, out=w_eff_buffer(weight, dtype, out))


@adapted_op.register_fake
def _(x, weight, bias, adapter, math, scale, stride, padding, dilation, groups, delta_only, impl):
    return base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)


def _adapted_op_backward(
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
    with autocast_off(x), workspace.borrowed(weight.shape, x.dtype, weight.device) as scratch:
        kernels = kernels_for(impl)
        geometry = (stride, padding, dilation, groups)
        fused = getattr(kernels, "project_transform", None)
        if fused is not None and need_input and need_adapter and weight.device.type == "cpu":
            # dL/dW' first (it does not read W'), then W' and the projection in one pass, then the
            # input gradient through W'
            _, grad_w_eff, grad_b = op_backward(grad_out, x, weight.to(x.dtype), *geometry, False, True, need_bias)
            w_eff, grad_adapter = fused(grad_w_eff, weight, adapter, math, scale, delta_only,
                                        out=w_eff_buffer(weight, x.dtype, scratch))
            grad_x = op_backward(grad_out, x, w_eff, *geometry, True, False)[0]
        else:
            w_eff = transform_to(kernels, weight, adapter, math, scale, delta_only, x.dtype, scratch) \
                if need_input else weight.to(x.dtype)
            grad_x, grad_w_eff, grad_b = op_backward(grad_out, x, w_eff, *geometry, need_input,
                                                     need_adapter or need_weight, need_bias)
            grad_adapter = kernels.project(grad_w_eff, weight, adapter, math, scale) if need_adapter else []
        grad_w = _base_weight_grad(kernels, grad_w_eff, weight, adapter, math, scale, delta_only) if need_weight \
            else None
        grads = gradients_as_promised([(grad_x if need_input else None, x), (grad_w, weight), (grad_b, grad_b),
                                       *zip(grad_adapter, adapter)])
    if grad_w_eff is not None and not need_weight:
        workspace.keep(grad_w_eff)  # dL/dW' is no one else's (a base weight's gradient may be it)
    return grads


adapted_op_backward = FusedOp("adapted_op_backward", _adapted_op_backward)


def in_layout(t: Tensor, shape, stride) -> Tensor:
    """``t`` with exactly ``stride`` (copied only where its strides differ, size-1 modes included)."""
    if t is None or t.stride() == tuple(stride):
        return t
    return torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def like(grad: Tensor, tensor: Tensor) -> Tensor:
    """``grad`` in the layout ``torch.empty_like(tensor)`` has (``tensor``'s own strides when it is
    dense, else contiguous): the real op's outputs must have the strides its fake implementation
    promises, or compiled graphs that trust them break."""
    if grad is not None and grad.stride() == tensor.stride() and tensor.is_contiguous():
        return grad  # the common case, without making a meta tensor to ask for its strides
    return in_layout(grad, tensor.shape, torch.empty_like(tensor, device="meta").stride())


def _base_weight_grad(kernels, grad_w_eff, weight, adapter, math, scale, delta_only):
    """``grad W' * dW'/dW``: 1 (or 0 for ``W' - W``) for add; ``f(E)``, the transform of a weight
    of ones, for the multiplicative rules ``W' = W * f(E)``."""
    if methods.AdapterMath.from_key(math).combine == "add":
        return torch.zeros_like(grad_w_eff) if delta_only else grad_w_eff
    return grad_w_eff * kernels.transform(torch.ones_like(weight), adapter, math, scale, delta_only)


def gradients_as_promised(pairs) -> list:
    """A backward op's outputs: the gradient of every ``(grad, tensor)`` pair whose ``grad`` is not
    None, in the layout of ``empty_like(tensor)`` (as :func:`fake_gradients` promises)."""
    return [like(g, t) for g, t in pairs if g is not None]


def fake_gradients(needed: list, adapter, need_adapter: bool) -> list:
    """A backward op's fake outputs: ``empty_like(t)`` for every ``(need, t)`` of ``needed`` that is
    needed, then one per adapter tensor if ``need_adapter``."""
    return [torch.empty_like(t) for need, t in needed if need] + (
        [torch.empty_like(t) for t in adapter] if need_adapter else [])


@adapted_op_backward.register_fake
def _(grad_out, x, weight, adapter, math, scale, stride, padding, dilation, groups, delta_only, impl,
      need_input, need_weight, need_bias, need_adapter):
    return fake_gradients([(need_input, x), (need_weight, weight), (need_bias, grad_out.new_empty(weight.shape[0]))],
                          adapter, need_adapter)


def no_grad_for_lists(int_lists) -> list:
    """The "no gradient" entries of int-list inputs of a custom op: a backward's structure must
    mirror the inputs', where an empty list counts as a list."""
    return [[] if len(v) == 0 else None for v in int_lists]


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
    return (grad_x, grad_w, grad_b, grad_adapter, None, None, *no_grad_for_lists(ctx.config[2:5]), None, None, None)


adapted_op.register_autograd(_backward, setup_context=_setup_context)
