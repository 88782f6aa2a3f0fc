"""FLoRA's and LoRA's "bypass" strategy: the frozen op plus a low-rank chain; no full weight gradient.

FLoRA's update is ``dW[o, i, k] = sum_{a,b} U_1[o, a] U_2[i, b] K[a, b, k]`` with the kernel
core ``K = core x_3 U_3 ... x_N U_N`` of shape (r_1, r_2, k_1..k_n). For a convolution with
``g`` groups (C_g = C_in / g input channels per group)::

    op(x, W') = op(x, W) + P_out(op_K(P_in(x)))
    u = P_in(x)     1x1 conv, C_in -> g r_2 channels, g groups, weight U_2^T per group
    z = op_K(u)     the layer's stride, padding and dilation, kernel K, g r_2 -> g r_1, g groups
    P_out(z)        1x1 conv, g r_1 -> C_out channels, g groups, weight scale * U_1

and for a linear layer ``u = x U_2``, ``z = u core^T``, ``P_out(z) = scale * z U_1^T``. It is exact:
a 1x1 channel projection commutes with padding of any mode. Per output pixel the chain costs
``C_in r_2 (input pixels per output pixel) + g r_1 r_2 k + C_out r_1`` multiply-adds, against the
frozen op's ``C_out C_g k`` (k: kernel numel).

LoRA's update ``dW = (B A).reshape(W.shape)`` is the same chain without the input projection
(``U_2 = I``, ``u = x``) and with the kernel core ``K = A`` reshaped to (r, C_g, k_1..k_n): ``z =
op_A(x)`` runs the layer's op with weight ``A`` repeated per group (g r, C_g, k...), g groups, so
group j's r channels see only group j's inputs, as the grouped weight does; ``P_out`` maps output
channel o (in group j) from group j's r channels with ``scale * B[o]``. Per output pixel ``g r
C_g k + C_out r`` multiply-adds; A's gradient is the sum of the g copies' gradients.

Backward: the input gradient is one op on the materialised ``W'`` (exactly the frozen layer's
op; ``input_grad_via_weight``) or ``op^T(grad, W)`` plus the chain transposed, whichever the cost
model finds cheaper; with adapter dropout the chain's input is the dropped ``x`` and receives the
chain's part. The adapter gradients are the chain's weight gradients (ops on activations of
r_1 or r_2 channels), mapped back to the core and factors (or A and B). Saved for backward:
``x``, the adapter tensors and ``u`` when it has at most ``SAVE_U_FRACTION`` of ``x``'s elements
(it is recomputed otherwise; LoRA's ``u`` is ``x``); ``z`` is recomputed from ``u``.

One op for every backend, ``lrtensor::tucker_bypass`` and its backward (:class:`ops.FusedOp`: a
custom op under torch.compile, the same functions in a plain autograd.Function eagerly, the chain
under autograd for torch.func and higher-order gradients); the backends differ only in how the
backward builds ``W'`` (the reference math, or the backend's transform kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import methods, ops
from .call import AdaptedCall

SAVE_U_FRACTION = 0.25


def has_input_projection(math: str) -> bool:
    """Whether the chain of ``math`` (a ``methods.AdapterMath`` key) starts with ``P_in`` (Tucker) or
    runs its kernel on ``x`` itself (LoRA)."""
    return methods.AdapterMath.from_key(math).delta == "tucker"


def chain_weights(adapter, scale: float, groups: int, weight_shape: tuple, dtype: torch.dtype,
                  math: str = "tucker:add") -> tuple:
    """``([w_in, w_mid, w_out], exponents)``: the chain's weights in ``dtype``, as ``ops.base_op``
    weights: conv (g r_2, C_g, 1..), (g r_1, r_2, *k), (C_out, r_1, 1..); linear U_2^T, core,
    scale * U_1. LoRA: ``w_in`` None, ``w_mid`` A as (g r, C_g, *k) (linear: A), ``w_out`` scale * B
    as (C_out, r, 1..). Each is ``2^e`` times the factor it stands for (``exponents``, summing to 0).

    In 16-bit dtypes the weights are first balanced by powers of two to the same magnitude (exact):
    a core that is still small next to its factors (it starts at zero) would otherwise round to
    float16's subnormals and lose its precision."""
    spatial_dims = len(weight_shape) - 2
    ones = (1,) * spatial_dims
    if has_input_projection(math):
        core, u1, u2, *kernel_factors = adapter
        kernel = methods.tucker_product(core, kernel_factors, first_mode=2) if kernel_factors else core
        weights = [u2.t(), kernel, scale * u1]
    else:
        lora_B, lora_A = adapter
        u1 = lora_B
        weights = [lora_A.reshape(lora_A.shape[0], *weight_shape[1:]), scale * lora_B]
    exponents = None
    if dtype in (torch.float16, torch.bfloat16):
        weights, exponents = _balanced(weights)
    w_in, w_mid, w_out = weights if len(weights) == 3 else [None, *weights]
    if spatial_dims:
        if w_in is not None:
            w_in = w_in.repeat(groups, 1).reshape(groups * u2.shape[1], u2.shape[0], *ones)
        w_mid = w_mid.repeat(groups, *ones, 1)
        w_out = w_out.reshape(*u1.shape, *ones)
    return [None if w is None else w.to(dtype).contiguous() for w in (w_in, w_mid, w_out)], exponents


def _balanced(weights: list) -> tuple:
    """``weights`` scaled by powers of two ``2^e_i`` (``sum e_i = 0``, so their product is unchanged)
    to about the same largest magnitude; the exponents as a float tensor. Branch-free, so that
    torch.compile traces it whole."""
    peaks = torch.stack([w.detach().abs().amax() for w in weights])
    usable = (torch.isfinite(peaks) & (peaks > 0)).all()  # else no scaling (a zero core, say)
    logs = torch.where(usable, torch.log2(peaks), torch.zeros_like(peaks))
    exponents = torch.round(logs.mean() - logs)
    exponents = exponents - torch.nn.functional.one_hot(torch.tensor(len(weights) - 1, device=peaks.device),
                                                        len(weights)).to(peaks.dtype) * exponents.sum()
    return [w * torch.exp2(e) for w, e in zip(weights, exponents)], exponents


def _pointwise(spatial_dims: int) -> tuple:
    """The geometry of a 1x1 conv (stride, padding, dilation) with ``spatial_dims`` dims."""
    return [1] * spatial_dims, [0] * spatial_dims, [1] * spatial_dims


def chain_input_projection(x_chain: Tensor, weights: list, groups: int, conv=ops) -> Tensor:
    """``u = P_in(x)`` (``x`` itself for a chain without an input projection; ``conv``: the module
    whose ``base_op`` runs it)."""
    if weights[0] is None:
        return x_chain
    return conv.base_op(x_chain, weights[0], None, *_pointwise(weights[1].dim() - 2), groups)


def forward(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], adapter, scale: float,
            geometry: tuple, math: str = "tucker:add", in_place: bool = True) -> tuple:
    """``(y, u)``: ``y = op(x, W, bias) + P_out(op_K(P_in(x_chain)))`` (``x_chain`` None: ``x``).
    ``in_place``: the chain's output added into the frozen op's (not under torch.func's vmap, where
    the chain may be batched and the frozen op not)."""
    stride, padding, dilation, groups = geometry
    weights, _ = chain_weights(adapter, scale, groups, tuple(weight.shape), x.dtype, math)
    u = chain_input_projection(x if x_chain is None else x_chain, weights, groups)
    z = ops.base_op(u, weights[1], None, stride, padding, dilation, groups)
    y = ops.base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)
    update = ops.base_op(z, weights[2], None, *_pointwise(weight.dim() - 2), groups)
    return (y.add_(update) if in_place else y + update), u


def keeps_u(u: Tensor, x_chain: Tensor) -> bool:
    return u.numel() <= SAVE_U_FRACTION * x_chain.numel()


def backward(grad_y: Tensor, x: Tensor, x_chain: Optional[Tensor], weight: Tensor, adapter, u: Optional[Tensor],
             scale: float, geometry: tuple, input_grad_via_weight: bool, effective_weight, need_input: bool,
             need_chain_input: bool, need_weight: bool, need_bias: bool, need_adapter: bool,
             math: str = "tucker:add", conv=ops) -> tuple:
    """``(grad_x, grad_x_chain, grad_weight, grad_bias, adapter_grads)``, None for what is not needed.

    ``effective_weight()`` returns ``W'`` in ``x``'s dtype; it is called only when the input
    gradient goes through it (``input_grad_via_weight`` and no separate chain input). ``conv``: the
    module whose ``base_op`` and ``op_backward`` run the ops (:mod:`lrtensor_kernels.ops`, or the
    fused kernels of strategy "fused")."""
    stride, padding, dilation, groups = geometry
    n = weight.dim() - 2
    pointwise = _pointwise(n)
    chain_in = x if x_chain is None else x_chain
    via_weight = input_grad_via_weight and x_chain is None
    chain_input_grad = need_chain_input if x_chain is not None else need_input and not via_weight
    base_weight = effective_weight() if need_input and via_weight else weight.to(x.dtype)
    grad_x, grad_w, grad_b = conv.op_backward(grad_y, x, base_weight, stride, padding, dilation, groups,
                                              need_input, need_weight, need_bias)
    grad_chain_x, adapter_grads = None, None
    if need_adapter or chain_input_grad:
        weights, exponents = chain_weights(adapter, scale, groups, tuple(weight.shape), x.dtype, math)
        w_in, w_mid, w_out = weights
        if u is None:
            u = chain_input_projection(chain_in, weights, groups, conv)
        z = conv.base_op(u, w_mid, None, stride, padding, dilation, groups)
        grad_z, grad_w_out, _ = conv.op_backward(grad_y, z, w_out, *pointwise, groups, True, need_adapter)
        grad_u, grad_w_mid, _ = conv.op_backward(grad_z, u, w_mid, stride, padding, dilation, groups,
                                                 w_in is not None or chain_input_grad, need_adapter)
        if w_in is None:
            grad_chain_x, grad_w_in = (grad_u if chain_input_grad else None), None
        else:
            grad_chain_x, grad_w_in, _ = conv.op_backward(grad_u, chain_in, w_in, *pointwise, groups,
                                                          chain_input_grad, need_adapter)
        if need_adapter:
            adapter_grads = _adapter_grads(adapter, scale, groups, (grad_w_in, grad_w_mid, grad_w_out), exponents)
    if x_chain is None:
        if grad_chain_x is not None:
            grad_x = grad_x + grad_chain_x
        grad_chain_x = None
    return grad_x, grad_chain_x, grad_w, grad_b, adapter_grads


def _adapter_grads(adapter, scale: float, groups: int, chain_grads, exponents) -> list:
    """Gradients of ``[core, U_1, U_2, U_3...]`` (or ``[B, A]``) from those of the chain weights
    (which stand for their factors times ``2^exponents``)."""
    acc = adapter[0].dtype
    chain_grads = [g for g in chain_grads if g is not None]
    chain_grads = [g.to(acc) for g in chain_grads]
    if exponents is not None:
        chain_grads = [g * torch.exp2(e).to(acc) for g, e in zip(chain_grads, exponents)]
    if len(chain_grads) == 2:  # LoRA: no input projection
        (lora_B, lora_A), (grad_mid, grad_out) = adapter, chain_grads
        grad_a = grad_mid.reshape(groups, *lora_A.shape).sum(0) if groups > 1 else grad_mid.reshape(lora_A.shape)
        return [(scale * grad_out.reshape(lora_B.shape)).contiguous(), grad_a.contiguous()]
    core, u1, u2, *kernel_factors = adapter
    grad_in, grad_mid, grad_out = chain_grads
    grad_u1 = scale * grad_out.reshape(u1.shape)
    if grad_in.dim() == 2:
        grad_u2, grad_kernel = grad_in.t(), grad_mid
    else:
        grad_u2 = grad_in.reshape(groups, u2.shape[1], u2.shape[0]).sum(0).t()
        grad_kernel = grad_mid.reshape(groups, core.shape[0], *grad_mid.shape[1:]).sum(0)
    if kernel_factors:
        factors = [f.detach() for f in kernel_factors]
        grad_core, *grad_kernel_factors = methods.tucker_product_grads(core.detach(), factors, grad_kernel, 2)
    else:
        grad_core, grad_kernel_factors = grad_kernel, []
    return [g.contiguous() for g in (grad_core, grad_u1, grad_u2, *grad_kernel_factors)]


# -- the op, on every backend --------------------------------------------------------------------


def _tucker_bypass(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                   adapter: list[Tensor], math: str, scale: float, stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, input_grad_via_weight: bool, impl: str) -> tuple[Tensor, Tensor]:
    """``(y, u)`` of :func:`forward`; ``u`` is returned only for the backward to keep."""
    with ops.autocast_off(x):
        y, u = forward(x, x_chain, weight, bias, adapter, scale, (stride, padding, dilation, groups), math)
    if not has_input_projection(math):
        return y, x.new_empty(0)  # u is the chain's input itself, which the backward has
    return y, u.contiguous()  # as the fake promises


def _tucker_bypass_composite(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                             adapter: list[Tensor], math: str, scale: float, stride: list[int], padding: list[int],
                             dilation: list[int], groups: int, input_grad_via_weight: bool, impl: str) -> tuple:
    """:func:`_tucker_bypass` in differentiable PyTorch ops (torch.func, higher-order gradients)."""
    with ops.autocast_off(x):
        y, u = forward(x, x_chain, weight, bias, adapter, scale, (stride, padding, dilation, groups), math,
                       in_place=False)
    return y, (u if has_input_projection(math) else x.new_empty(0))


tucker_bypass_op = ops.FusedOp("tucker_bypass", _tucker_bypass, list_index=4, composite=_tucker_bypass_composite)


@tucker_bypass_op.register_fake
def _(x, x_chain, weight, bias, adapter, math, scale, stride, padding, dilation, groups, input_grad_via_weight,
      impl):
    y = ops.base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)
    if not has_input_projection(math):
        return y, x.new_empty(0)
    u_channels = groups * adapter[2].shape[1]
    u = x.new_empty((x.shape[0], u_channels, *x.shape[2:]))
    return y, u


def _tucker_bypass_backward(grad_y: Tensor, x: Tensor, x_chain: Optional[Tensor], weight: Tensor,
                              adapter: list[Tensor], u: Optional[Tensor], math: str, scale: float, stride: list[int],
                              padding: list[int], dilation: list[int], groups: int, input_grad_via_weight: bool,
                              impl: str, need_input: bool, need_chain_input: bool, need_weight: bool,
                              need_bias: bool, need_adapter: bool) -> list[Tensor]:
    """The gradients of ``tucker_bypass`` that are needed, in input order."""
    with ops.autocast_off(x):
        def effective_weight():
            if impl == "reference":
                return methods.effective_weight(weight, adapter, methods.AdapterMath.from_key(math), scale).to(x.dtype)
            return ops.transform_to(ops.kernels_for(impl), weight, adapter, math, scale, False, x.dtype)

        grad_x, grad_chain, grad_w, grad_b, grads = backward(
            grad_y, x, x_chain, weight, adapter, u, scale, (stride, padding, dilation, groups),
            input_grad_via_weight, effective_weight, need_input, need_chain_input, need_weight, need_bias,
            need_adapter, math)
    return ops.gradients_as_promised([(grad_x, x), (grad_chain, x_chain), (grad_w, weight), (grad_b, grad_b),
                                      *zip(grads or [], adapter)])


tucker_bypass_backward_op = ops.FusedOp("tucker_bypass_backward", _tucker_bypass_backward)


@tucker_bypass_backward_op.register_fake
def _(grad_y, x, x_chain, weight, adapter, u, math, scale, stride, padding, dilation, groups, input_grad_via_weight,
      impl, need_input, need_chain_input, need_weight, need_bias, need_adapter):
    return ops.fake_gradients([(need_input, x), (need_chain_input, x_chain), (need_weight, weight),
                               (need_bias, grad_y.new_empty(weight.shape[0]))], adapter, need_adapter)


def _setup_context(ctx, inputs, output):
    x, x_chain, weight, bias, adapter, *config = inputs
    u = output[1]
    kept_u = u if u.numel() and keeps_u(u, x if x_chain is None else x_chain) else None
    ctx.save_for_backward(x, x_chain, weight, kept_u, *adapter)
    ctx.config = config  # math, scale, stride, padding, dilation, groups, input_grad_via_weight, impl


def _backward(ctx, grad_y, _grad_u):
    x, x_chain, weight, u, *adapter = ctx.saved_tensors
    need_x, need_chain, need_w, need_b, need_adapter = ctx.needs_input_grad[:5]
    need_chain = need_chain and x_chain is not None
    need_adapter = any(need_adapter)
    grads = iter(tucker_bypass_backward_op(grad_y, x, x_chain, weight, adapter, u, *ctx.config, need_x, need_chain,
                                           need_w, need_b, need_adapter))
    picked = [next(grads) if need else None for need in (need_x, need_chain, need_w, need_b)]
    grad_adapter = list(grads) if need_adapter else [None] * len(adapter)
    return (*picked, grad_adapter, None, None, *ops.no_grad_for_lists(ctx.config[2:5]), None, None, None)


tucker_bypass_op.register_autograd(_backward, setup_context=_setup_context)


def run(call: AdaptedCall, input_grad_via_weight: bool) -> Tensor:
    y, _ = tucker_bypass_op(call.x, call.dropped_x, call.weight, call.bias, list(call.adapter), call.math.key,
                            float(call.scale), list(call.stride), list(call.padding), list(call.dilation),
                            call.groups, input_grad_via_weight, call.impl)
    return y
