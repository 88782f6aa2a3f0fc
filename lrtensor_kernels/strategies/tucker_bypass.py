"""FLoRA's and LoRA's "bypass" strategy: the frozen op plus a low-rank chain; no full weight gradient.

    op(x, W') = op(x, W) + P_out(op_K(P_in(x)))      (or P_out(op_M(x)), folded)

with the chain of :mod:`.tucker_chain` (LoRA's: ``P_out(op_A(x))``, the folded form). Backward:
the input gradient is one op on the materialised ``W'`` (exactly the frozen layer's op;
``input_grad_via_weight``) or ``op^T(grad, W)`` plus the chain transposed, whichever the cost
model finds cheaper; with adapter dropout the chain's input is the dropped ``x`` and receives the
chain's part. The op takes the chain's factors and returns their gradients, the chain's weight
gradients (ops on activations of r_1 or r_2 channels). Saved for backward: ``x``, the factors
and, while they have together at most ``tucker_chain.SAVE_FRACTION`` of ``x``'s elements, ``u``
and then ``z`` (recomputed otherwise: a narrow layer keeps u alone, a wide one both, so that its
backward runs no op of the forward again).

One op for every backend, ``lrtensor::tucker_bypass`` and its backward (:class:`ops.FusedOp`: a
custom op under torch.compile, the same functions in a plain autograd.Function eagerly, the chain
under autograd for torch.func and higher-order gradients); the backends differ only in how the
backward builds ``W'`` (the reference math, or the backend's transform kernel, on the factors as a
low-rank form of their own). Where the op would keep both ``u`` and ``z`` and run the input
gradient through the chain, an eager call runs :func:`forward` under plain autograd instead
(``under_autograd``, the cost model's choice): the same ops and saved tensors, less Python.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from . import tucker_chain as chain
from .call import AdaptedCall


def forward(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], factors,
            geometry: tuple, in_place: bool = True) -> tuple:
    """``(y, u, z)``: ``y = op(x, W, bias) + P_out(z)``, ``(u, z)`` the chain's activations on
    ``x_chain`` (None: ``x``; u None when folded). ``in_place``: the chain's output added into the
    frozen op's (not under torch.func's vmap, where the chain may be batched and the frozen op not)."""
    weights = chain.conv_weights(factors, geometry[3], weight.dim() - 2, x.dtype)
    u, z = chain.chain_to_z(x if x_chain is None else x_chain, weights, geometry)
    y = ops.base_op(x, weight.to(x.dtype), bias, *geometry)
    update = ops.base_op(z, weights[-1], None, *chain.pointwise(weight.dim() - 2), geometry[3])
    return (y.add_(update) if in_place else y + update), u, z


def backward(grad_y: Tensor, x: Tensor, x_chain: Optional[Tensor], weight: Tensor, factors, u: Optional[Tensor],
             z: Optional[Tensor], geometry: tuple, input_grad_via_weight: bool, impl: str, need_input: bool,
             need_chain_input: bool, need_weight: bool, need_bias: bool, need_factors: bool) -> tuple:
    """``(grad_x, grad_x_chain, grad_weight, grad_bias, factor_grads)``, None for what is not needed.

    The input gradient goes through ``W'`` (built from the factors, in a scratch tensor) when
    ``input_grad_via_weight`` and there is no separate chain input, else through ``W`` and the chain."""
    chain_in = x if x_chain is None else x_chain
    via_weight = input_grad_via_weight and x_chain is None
    chain_input_grad = need_chain_input if x_chain is not None else need_input and not via_weight
    if need_input and via_weight:
        with chain.borrowed_weight(weight, x.dtype) as scratch:
            grad_x, grad_w, grad_b = ops.op_backward(grad_y, x, chain.effective_weight(weight, factors, impl, x.dtype,
                                                                                       scratch),
                                                     *geometry, need_input, need_weight, need_bias)
    else:
        grad_x, grad_w, grad_b = ops.op_backward(grad_y, x, weight.to(x.dtype), *geometry, need_input, need_weight,
                                                 need_bias)
    grad_chain_x, grads = None, None
    if need_factors or chain_input_grad:
        grad_chain_x, grads = chain.chain_backward(grad_y, chain_in, factors, u, z, geometry, chain_input_grad,
                                                   need_factors)
    if x_chain is None:
        if grad_chain_x is not None:
            grad_x = grad_x + grad_chain_x
        grad_chain_x = None
    return grad_x, grad_chain_x, grad_w, grad_b, grads


# -- the op, on every backend --------------------------------------------------------------------


def _tucker_bypass(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                   factors: list[Tensor], stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   input_grad_via_weight: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, u, z)`` of :func:`forward` (u empty when folded); u and z are returned only for the
    backward to keep."""
    with ops.autocast_off(x):
        y, u, z = forward(x, x_chain, weight, bias, factors, (stride, padding, dilation, groups))
    return y, (x.new_empty(0) if u is None else u.contiguous()), z.contiguous()  # as the fake promises


def _tucker_bypass_composite(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                             factors: list[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                             groups: int, input_grad_via_weight: bool, impl: str) -> tuple:
    """:func:`_tucker_bypass` in differentiable PyTorch ops (torch.func, higher-order gradients)."""
    with ops.autocast_off(x):
        y, u, z = forward(x, x_chain, weight, bias, factors, (stride, padding, dilation, groups), in_place=False)
    return y, (x.new_empty(0) if u is None else u), z


tucker_bypass_op = ops.FusedOp("tucker_bypass", _tucker_bypass, list_index=4, composite=_tucker_bypass_composite)


@tucker_bypass_op.register_fake
def _(x, x_chain, weight, bias, factors, stride, padding, dilation, groups, input_grad_via_weight, impl):
    y, u, z = forward(x, x_chain, weight, bias, factors, (stride, padding, dilation, groups))
    return y, (x.new_empty(0) if u is None else u.contiguous()), z.contiguous()


def _tucker_bypass_backward(grad_y: Tensor, x: Tensor, x_chain: Optional[Tensor], weight: Tensor,
                            factors: list[Tensor], u: Optional[Tensor], z: Optional[Tensor], stride: list[int],
                            padding: list[int], dilation: list[int], groups: int, input_grad_via_weight: bool,
                            impl: str, need_input: bool, need_chain_input: bool, need_weight: bool, need_bias: bool,
                            need_factors: bool) -> list[Tensor]:
    """The gradients of ``tucker_bypass`` that are needed, in input order (also ``tucker_hybrid``'s:
    its backward is this one's, with no chain input and nothing kept)."""
    with ops.autocast_off(x):
        grad_x, grad_chain, grad_w, grad_b, grads = backward(
            grad_y, x, x_chain, weight, factors, u, z, (stride, padding, dilation, groups), input_grad_via_weight,
            impl, need_input, need_chain_input, need_weight, need_bias, need_factors)
    return ops.gradients_as_promised([(grad_x, x), (grad_chain, x_chain), (grad_w, weight), (grad_b, grad_b),
                                      *zip(grads or [], factors)])


tucker_bypass_backward_op = ops.FusedOp("tucker_bypass_backward", _tucker_bypass_backward)


def fake_backward(grad_y, x, x_chain, weight, factors, need_input, need_chain_input, need_weight, need_bias,
                  need_factors) -> list:
    """What a chain op's backward returns, as the fake implementations promise it (this op's and
    strategy fused's chain)."""
    return ops.fake_gradients([(need_input, x), (need_chain_input, x_chain), (need_weight, weight),
                               (need_bias, grad_y.new_empty(weight.shape[0]))], factors, need_factors)


@tucker_bypass_backward_op.register_fake
def _(grad_y, x, x_chain, weight, factors, u, z, stride, padding, dilation, groups, input_grad_via_weight, impl,
      need_input, need_chain_input, need_weight, need_bias, need_factors):
    return fake_backward(grad_y, x, x_chain, weight, factors, need_input, need_chain_input, need_weight, need_bias,
                         need_factors)


def setup_context(ctx, inputs, output):
    """A chain op's autograd context (this op's and strategy fused's chain): ``x``, ``x_chain``, the
    weight, what of ``u`` and ``z`` is kept, the factors; the op's configuration after them."""
    x, x_chain, weight, bias, factors, *config = inputs
    _, u, z = output
    u, z = chain.kept_for_backward(u if u.numel() else None, z, x if x_chain is None else x_chain)
    ctx.save_for_backward(x, x_chain, weight, u, z, *factors)
    ctx.config = config


def backward_by(backward_op):
    """The autograd backward of a chain op (this one, strategy fused's chain) whose gradients
    ``backward_op`` computes from :func:`setup_context`'s context: the gradients asked for, none for
    the configuration (stride, padding and dilation as lists, then the rest)."""
    def backward(ctx, grad_y, _grad_u, _grad_z):
        x, x_chain, weight, u, z, *factors = ctx.saved_tensors
        need_x, need_chain, need_w, need_b, need_factors = ctx.needs_input_grad[:5]
        need_chain = need_chain and x_chain is not None
        need_factors = any(need_factors)
        grads = iter(backward_op(grad_y, x, x_chain, weight, factors, u, z, *ctx.config, need_x, need_chain, need_w,
                                 need_b, need_factors))
        picked = [next(grads) if need else None for need in (need_x, need_chain, need_w, need_b)]
        grad_factors = list(grads) if need_factors else [None] * len(factors)
        return (*picked, grad_factors, *ops.no_grad_for_lists(ctx.config[:3]), *[None] * (len(ctx.config) - 3))

    return backward


tucker_bypass_op.register_autograd(backward_by(tucker_bypass_backward_op), setup_context=setup_context)


def run(call: AdaptedCall, input_grad_via_weight: bool, folded: bool = False,
        under_autograd: bool = False) -> Tensor:
    """``op(x, W')`` by the bypass. ``under_autograd`` (the cost model's choice where the op would keep
    ``u`` and ``z`` and run the input gradient through the chain): when running eagerly, the same
    ops as the op's forward under plain autograd, whose backward then runs the same ops as the
    op's backward and keeps the same tensors, without the op's Python around them."""
    factors = chain.factors_of_call(call, folded)
    args = (call.x, call.dropped_x, call.weight, call.bias, factors, list(call.stride), list(call.padding),
            list(call.dilation), call.groups, input_grad_via_weight, call.impl)
    if under_autograd and ops.runs_eagerly(args):
        return forward(call.x, call.dropped_x, call.weight, call.bias, factors, call.geometry)[0]
    return tucker_bypass_op(*args)[0]
