"""FLoRA's "bypass" strategy: the frozen op plus the Tucker chain; no full weight gradient.

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

Backward: the input gradient is one op on the materialised ``W'`` (exactly the frozen layer's
op; ``input_grad_via_weight``) or ``op^T(grad, W)`` plus the chain transposed, whichever the cost
model finds cheaper; with adapter dropout the chain's input is the dropped ``x`` and receives the
chain's part. The op takes the chain's three factors ``[U_2, K, scale * U_1]``
(:func:`chain_factors`, built from the adapter tensors under autograd) and returns their
gradients, the chain's weight gradients (ops on activations of r_1 or r_2 channels); autograd maps
them back to the core and the factors, in C++ rather than in Python. Saved for backward: ``x``,
the three factors and ``u`` when it has at most ``SAVE_U_FRACTION`` of ``x``'s elements (it is
recomputed otherwise); ``z`` is recomputed from ``u``.

One op for every backend, ``lrtensor::tucker_bypass`` and its backward (:class:`ops.FusedOp`: a
custom op under torch.compile, the same functions in a plain autograd.Function eagerly); the
backends differ only in how the backward builds ``W'`` (the reference math, or the backend's
transform kernel, on the factors as a Tucker form of their own).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import methods, ops
from .call import AdaptedCall

SAVE_U_FRACTION = 0.25


def chain_factors(adapter, scale: float, dtype: torch.dtype) -> list:
    """``[U_2, K, scale * U_1]``: the chain's three factors in the compute dtype, differentiable
    w.r.t. the adapter tensors (autograd maps their gradients back to the core and the factors):
    U_2 (C_g, r_2), the kernel core K (r_1, r_2, *k) or the core (r_1, r_2) of a linear layer,
    scale * U_1 (C_out, r_1).

    In 16-bit dtypes the three are first balanced by powers of two to the same magnitude (exact,
    their product unchanged): a core that is still small next to its factors (it starts at zero)
    would otherwise round to float16's subnormals when cast to the op's dtype."""
    core, u1, u2, *kernel_factors = adapter
    kernel = methods.tucker_product(core, kernel_factors, first_mode=2) if kernel_factors else core
    factors = [u2, kernel, scale * u1]
    if dtype in (torch.float16, torch.bfloat16):
        factors = _balanced(factors)
    return factors


def _balanced(weights: list) -> list:
    """``weights`` scaled by powers of two ``2^e_i`` (``sum e_i = 0``, so their product is unchanged)
    to about the same largest magnitude; the exponents are constants to autograd. Branch-free, so
    that torch.compile traces it whole."""
    peaks = torch.stack([w.detach().abs().amax() for w in weights])
    usable = (torch.isfinite(peaks) & (peaks > 0)).all()  # else no scaling (a zero core, say)
    logs = torch.where(usable, torch.log2(peaks), torch.zeros_like(peaks))
    exponents = torch.round(logs.mean() - logs)
    exponents = exponents - torch.nn.functional.one_hot(torch.tensor(len(weights) - 1, device=peaks.device),
                                                        len(weights)).to(peaks.dtype) * exponents.sum()
    return [w * torch.exp2(e) for w, e in zip(weights, exponents)]


def conv_weights(factors, groups: int, spatial_dims: int, dtype: torch.dtype) -> list:
    """``[w_in, w_mid, w_out]``: the chain's factors as ``ops.base_op`` weights in ``dtype``: conv
    (g r_2, C_g, 1..), (g r_1, r_2, *k), (C_out, r_1, 1..); linear U_2^T, core, scale * U_1."""
    u2, kernel, u1s = (f.to(dtype) for f in factors)
    if not spatial_dims:
        return [u2.t(), kernel, u1s]
    ones = (1,) * spatial_dims
    w_in = u2.t().reshape(u2.shape[1], u2.shape[0], *ones)
    if groups > 1:
        w_in = w_in.repeat(groups, *(1,) * (1 + spatial_dims))
        kernel = kernel.repeat(groups, *(1,) * (1 + spatial_dims))
    return [w_in, kernel, u1s.reshape(*u1s.shape, *ones)]


def factor_grads(factors, groups: int, grad_w_in: Tensor, grad_w_mid: Tensor, grad_w_out: Tensor) -> list:
    """The gradients of ``[U_2, K, scale * U_1]`` from those of :func:`conv_weights` (summed over
    the groups, which share the factors), in the factors' dtype."""
    u2, kernel, u1s = factors
    if grad_w_in.dim() == 2:
        grad_u2 = grad_w_in.t()
    else:
        grad_u2 = grad_w_in.reshape(groups, u2.shape[1], u2.shape[0])
        grad_u2 = (grad_u2[0] if groups == 1 else grad_u2.sum(0)).t()
        grad_w_mid = grad_w_mid if groups == 1 else grad_w_mid.reshape(groups, *kernel.shape).sum(0)
    return [g.reshape(f.shape).to(f.dtype) for g, f in zip((grad_u2, grad_w_mid, grad_w_out), factors)]


def _pointwise(spatial_dims: int) -> tuple:
    """The geometry of a 1x1 conv (stride, padding, dilation) with ``spatial_dims`` dims."""
    return [1] * spatial_dims, [0] * spatial_dims, [1] * spatial_dims


def chain_input_projection(x_chain: Tensor, weights: list, groups: int) -> Tensor:
    """``u = P_in(x)``."""
    return ops.base_op(x_chain, weights[0], None, *_pointwise(weights[1].dim() - 2), groups)


def forward(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], factors,
            geometry: tuple) -> tuple:
    """``(y, u)``: ``y = op(x, W, bias) + P_out(op_K(P_in(x_chain)))`` (``x_chain`` None: ``x``)."""
    stride, padding, dilation, groups = geometry
    weights = conv_weights(factors, groups, weight.dim() - 2, x.dtype)
    u = chain_input_projection(x if x_chain is None else x_chain, weights, groups)
    z = ops.base_op(u, weights[1], None, stride, padding, dilation, groups)
    y = ops.base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)
    y += ops.base_op(z, weights[2], None, *_pointwise(weight.dim() - 2), groups)
    return y, u


def keeps_u(u: Tensor, x_chain: Tensor) -> bool:
    return u.numel() <= SAVE_U_FRACTION * x_chain.numel()


def backward(grad_y: Tensor, x: Tensor, x_chain: Optional[Tensor], weight: Tensor, factors, u: Optional[Tensor],
             geometry: tuple, input_grad_via_weight: bool, effective_weight, need_input: bool,
             need_chain_input: bool, need_weight: bool, need_bias: bool, need_factors: bool) -> tuple:
    """``(grad_x, grad_x_chain, grad_weight, grad_bias, factor_grads)``, None for what is not needed.

    ``effective_weight()`` returns ``W'`` in ``x``'s dtype; it is called only when the input
    gradient goes through it (``input_grad_via_weight`` and no separate chain input)."""
    stride, padding, dilation, groups = geometry
    n = weight.dim() - 2
    pointwise = _pointwise(n)
    chain_in = x if x_chain is None else x_chain
    via_weight = input_grad_via_weight and x_chain is None
    chain_input_grad = need_chain_input if x_chain is not None else need_input and not via_weight
    base_weight = effective_weight() if need_input and via_weight else weight.to(x.dtype)
    grad_x, grad_w, grad_b = ops.op_backward(grad_y, x, base_weight, stride, padding, dilation, groups,
                                             need_input, need_weight, need_bias)
    grad_chain_x, grads = None, None
    if need_factors or chain_input_grad:
        w_in, w_mid, w_out = conv_weights(factors, groups, n, x.dtype)
        if u is None:
            u = chain_input_projection(chain_in, (w_in, w_mid), groups)
        z = ops.base_op(u, w_mid, None, stride, padding, dilation, groups)
        grad_z, grad_w_out, _ = ops.op_backward(grad_y, z, w_out, *pointwise, groups, True, need_factors)
        grad_u, grad_w_mid, _ = ops.op_backward(grad_z, u, w_mid, stride, padding, dilation, groups, True,
                                                need_factors)
        grad_chain_x, grad_w_in, _ = ops.op_backward(grad_u, chain_in, w_in, *pointwise, groups, chain_input_grad,
                                                     need_factors)
        if need_factors:
            grads = factor_grads(factors, groups, grad_w_in, grad_w_mid, grad_w_out)
    if x_chain is None:
        if grad_chain_x is not None:
            grad_x = grad_x + grad_chain_x
        grad_chain_x = None
    return grad_x, grad_chain_x, grad_w, grad_b, grads


# -- the op, on every backend --------------------------------------------------------------------


TUCKER_ADD = methods.AdapterMath("tucker", "add")


def _tucker_bypass(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                   factors: list[Tensor], stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   input_grad_via_weight: bool, impl: str) -> tuple[Tensor, Tensor]:
    """``(y, u)`` of :func:`forward`; ``u`` is returned only for the backward to keep."""
    with ops.autocast_off(x):
        y, u = forward(x, x_chain, weight, bias, factors, (stride, padding, dilation, groups))
    return y, u.contiguous()  # as the fake promises


tucker_bypass_op = ops.FusedOp("tucker_bypass", _tucker_bypass, list_index=4)


@tucker_bypass_op.register_fake
def _(x, x_chain, weight, bias, factors, stride, padding, dilation, groups, input_grad_via_weight, impl):
    y = ops.base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)
    u_channels = groups * factors[0].shape[1]
    u = x.new_empty((x.shape[0], u_channels, *x.shape[2:]))
    return y, u


def _tucker_bypass_backward(grad_y: Tensor, x: Tensor, x_chain: Optional[Tensor], weight: Tensor,
                              factors: list[Tensor], u: Optional[Tensor], stride: list[int], padding: list[int],
                              dilation: list[int], groups: int, input_grad_via_weight: bool, impl: str,
                              need_input: bool, need_chain_input: bool, need_weight: bool, need_bias: bool,
                              need_factors: bool) -> list[Tensor]:
    """The gradients of ``tucker_bypass`` that are needed, in input order."""
    with ops.autocast_off(x):
        def effective_weight():
            # W' = W + K x_1 (scale U_1) x_2 U_2: the factors are a Tucker form of their own
            compact = [factors[1], factors[2], factors[0]]
            if impl == "reference":
                return methods.effective_weight(weight, compact, TUCKER_ADD, 1.0).to(x.dtype)
            return ops.transform_to(ops.kernels_for(impl), weight, compact, TUCKER_ADD.key, 1.0, False, x.dtype)

        grad_x, grad_chain, grad_w, grad_b, grads = backward(
            grad_y, x, x_chain, weight, factors, u, (stride, padding, dilation, groups), input_grad_via_weight,
            effective_weight, need_input, need_chain_input, need_weight, need_bias, need_factors)
    return ops.gradients_as_promised([(grad_x, x), (grad_chain, x_chain), (grad_w, weight), (grad_b, grad_b),
                                      *zip(grads or [], factors)])


tucker_bypass_backward_op = ops.FusedOp("tucker_bypass_backward", _tucker_bypass_backward)


@tucker_bypass_backward_op.register_fake
def _(grad_y, x, x_chain, weight, factors, u, stride, padding, dilation, groups, input_grad_via_weight, impl,
      need_input, need_chain_input, need_weight, need_bias, need_factors):
    return ops.fake_gradients([(need_input, x), (need_chain_input, x_chain), (need_weight, weight),
                               (need_bias, grad_y.new_empty(weight.shape[0]))], factors, need_factors)


def _setup_context(ctx, inputs, output):
    x, x_chain, weight, bias, factors, *config = inputs
    u = output[1]
    kept_u = u if keeps_u(u, x if x_chain is None else x_chain) else None
    ctx.save_for_backward(x, x_chain, weight, kept_u, *factors)
    ctx.config = config  # stride, padding, dilation, groups, input_grad_via_weight, impl


def _backward(ctx, grad_y, _grad_u):
    x, x_chain, weight, u, *factors = ctx.saved_tensors
    need_x, need_chain, need_w, need_b, need_factors = ctx.needs_input_grad[:5]
    need_chain = need_chain and x_chain is not None
    need_factors = any(need_factors)
    grads = iter(tucker_bypass_backward_op(grad_y, x, x_chain, weight, factors, u, *ctx.config, need_x, need_chain,
                                           need_w, need_b, need_factors))
    picked = [next(grads) if need else None for need in (need_x, need_chain, need_w, need_b)]
    grad_factors = list(grads) if need_factors else [None] * len(factors)
    return (*picked, grad_factors, *ops.no_grad_for_lists(ctx.config[:3]), None, None, None)


tucker_bypass_op.register_autograd(_backward, setup_context=_setup_context)


def run(call: AdaptedCall, input_grad_via_weight: bool) -> Tensor:
    factors = chain_factors(call.adapter, call.scale, call.x.dtype)
    y, _ = tucker_bypass_op(call.x, call.dropped_x, call.weight, call.bias, factors, list(call.stride),
                            list(call.padding), list(call.dilation), call.groups, input_grad_via_weight, call.impl)
    return y
