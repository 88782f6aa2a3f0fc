"""FLoRA's and LoRA's "hybrid" strategy: the forward and the input gradient through ``W'`` as merged does, the
adapter gradients through the low-rank chain as bypass does; no full weight gradient.

    forward      y = op(x, W', bias), W' = W + dW built in one weight-sized pass (a scratch tensor)
    backward     grad_x = op^T(grad_y, W') (W' built again), the factors' gradients by the chain of
                 :mod:`.tucker_chain` run on x (u and z recomputed, nothing kept but x)

Against bypass it trades the forward's chain (two or three small ops and an output-sized add) for
two weight-sized passes: cheaper where the weight is small next to the activations (early CNN
layers, large images), dearer where it is large. It keeps for backward what the frozen layer
keeps (x), less than bypass. Like merged it rounds ``W'`` to the op's dtype in the forward, so
``auto`` runs it in float32 and float64 only; with adapter dropout (the update acting on the
dropped input) it runs bypass.

One op for every backend, ``lrtensor::tucker_hybrid`` (:class:`ops.FusedOp`), whose backward is
bypass's backward op with no chain input and nothing kept; under torch.func and for higher-order
gradients, ``op(x, W')`` with ``W'`` by the reference math under autograd.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import ops
from . import tucker_bypass
from . import tucker_chain as chain
from .call import AdaptedCall


def _tucker_hybrid(x: Tensor, weight: Tensor, bias: Optional[Tensor], factors: list[Tensor], stride: list[int],
                   padding: list[int], dilation: list[int], groups: int, impl: str) -> Tensor:
    """``op(x, W', bias)`` with ``W'`` from the chain's factors."""
    with ops.autocast_off(x), chain.borrowed_weight(weight, x.dtype) as scratch:
        w_eff = chain.effective_weight(weight, factors, impl, x.dtype, scratch)
        return ops.base_op(x, w_eff, bias, stride, padding, dilation, groups)


def _tucker_hybrid_composite(x: Tensor, weight: Tensor, bias: Optional[Tensor], factors: list[Tensor],
                             stride: list[int], padding: list[int], dilation: list[int], groups: int,
                             impl: str) -> Tensor:
    """:func:`_tucker_hybrid` in differentiable PyTorch ops (torch.func, higher-order gradients)."""
    with ops.autocast_off(x):
        w_eff = chain.effective_weight(weight, factors, "reference", x.dtype)
        return ops.base_op(x, w_eff, bias, stride, padding, dilation, groups)


tucker_hybrid_op = ops.FusedOp("tucker_hybrid", _tucker_hybrid, list_index=3, composite=_tucker_hybrid_composite)


@tucker_hybrid_op.register_fake
def _(x, weight, bias, factors, stride, padding, dilation, groups, impl):
    return ops.base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)


def _setup_context(ctx, inputs, output):
    x, weight, bias, factors, *config = inputs
    ctx.save_for_backward(x, weight, *factors)
    ctx.config = config  # stride, padding, dilation, groups, impl


def _backward(ctx, grad_y):
    x, weight, *factors = ctx.saved_tensors
    need_x, need_w, need_b, need_factors = ctx.needs_input_grad[:4]
    need_factors = any(need_factors)
    stride, padding, dilation, groups, impl = ctx.config
    grads = iter(tucker_bypass.tucker_bypass_backward_op(grad_y, x, None, weight, factors, None, None, stride,
                                                         padding, dilation, groups, True, impl, need_x, False, need_w,
                                                         need_b, need_factors))
    picked = [next(grads) if need else None for need in (need_x, need_w, need_b)]
    grad_factors = list(grads) if need_factors else [None] * len(factors)
    return (*picked, grad_factors, *ops.no_grad_for_lists(ctx.config[:3]), None, None)


tucker_hybrid_op.register_autograd(_backward, setup_context=_setup_context)


def run(call: AdaptedCall, folded: bool = False) -> Tensor:
    factors = chain.factors_of_call(call, folded)
    return tucker_hybrid_op(call.x, call.weight, call.bias, factors, list(call.stride), list(call.padding),
                            list(call.dilation), call.groups, call.impl)
