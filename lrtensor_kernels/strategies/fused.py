"""The "fused" strategy: the adapter math inside the convolution's and the matmul's own tiles.

Runs on the triton backend only: the implicit-GEMM kernels of
:mod:`lrtensor_kernels.kernels.fused_conv` compute every op, no library convolution or matmul
touches an activation or the weight, and nothing weight-sized is written. Two forms:

- ``"prologue"`` (every method): ``y = op(x, W', bias)`` with every weight tile of ``W'`` formed
  in registers from ``W`` and the adapter (low-rank form ``E = L @ R``, ``W' = combine(W, E)``)
  as it is loaded, in the forward and in the input gradient; the weight gradient's tiles are
  turned into ``H = dL/dE`` and projected onto ``L`` and ``R`` in its epilogue. Saved for
  backward: ``x``, the frozen ``W`` (referenced) and the adapter tensors. In bfloat16/float16 a
  ``W'`` tile is formed in float32 and rounded to the op's dtype for the dot, as merged rounds.
- ``"chain"`` (FLoRA, LoRA): bypass's ``op(x, W) + P_out(op_K(P_in(x)))`` or its folded
  ``op(x, W) + P_out(op_M(x))`` (:mod:`.tucker_chain`; LoRA's chain is the folded one) on the same
  kernels, with ``P_out``'s product added in the frozen op's epilogue (one output write) and the
  input gradient through ``W'`` formed in the tiles from the chain's factors (the frozen layer's op,
  no chain transposed). The op takes the chain's factors, as bypass's does. Saved: as bypass.

The cost model picks the form (``Decision.fused_form``, and ``Decision.folded`` for the chain). With adapter dropout the prologue form
computes ``op(x, W, bias) + op(xd, W' - W)``, the second launch adding the first in its
epilogue. Custom ops ``lrtensor::fused_conv`` and ``lrtensor::fused_tucker_chain`` and their
backward ops (:class:`ops.FusedOp`), with the reference math as their composite (torch.func,
forward-mode AD, the meta device, differentiable backward); the kernel module is imported on
first use, so Triton is not imported with the package.
"""
from __future__ import annotations

import importlib
from typing import Optional

from torch import Tensor

from .. import methods, ops
from ..kernels.lowrank_form import adapter_grads
from . import tucker_bypass
from . import tucker_chain as chain
from .call import AdaptedCall

FORMS = ("prologue", "chain")


def kernels():
    """The fused kernels' module (imports Triton on first use)."""
    return importlib.import_module("lrtensor_kernels.kernels.fused_conv")


def _adapted_weight(weight: Tensor, adapter, math: str, scale: float, delta_only: bool = False) -> tuple:
    spec = methods.AdapterMath.from_key(math)
    return kernels().AdaptedWeight.of(weight, adapter, spec.delta, spec.combine, scale, delta_only)


# -- prologue form -------------------------------------------------------------------------------


def _fused_conv(x: Tensor, dropped_x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], adapter: list[Tensor],
                math: str, scale: float, stride: list[int], padding: list[int], dilation: list[int],
                groups: int) -> Tensor:
    """``op(x, W', bias)``, or with ``dropped_x`` ``op(x, W, bias) + op(dropped_x, W' - W)``.

    x, dropped_x: (N, C_in, *spatial) or (M, in); weight (C_out, C_in / groups, *k) or (out, in);
    adapter: the tensors of ``methods.AdapterMath.from_key(math).delta``."""
    with ops.autocast_off(x):
        k = kernels()
        geometry = (stride, padding, dilation, groups)
        if dropped_x is None:
            adapted, _ = _adapted_weight(weight, adapter, math, scale)
            return k.conv_forward(x, weight, bias, *geometry, adapted=adapted)
        frozen = k.conv_forward(x, weight, bias, *geometry)
        update, _ = _adapted_weight(weight, adapter, math, scale, delta_only=True)
        return k.conv_forward(dropped_x, weight, None, *geometry, adapted=update, residual=frozen)


def _fused_conv_composite(x: Tensor, dropped_x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                          adapter: list[Tensor], math: str, scale: float, stride: list[int], padding: list[int],
                          dilation: list[int], groups: int) -> Tensor:
    """:func:`_fused_conv` in differentiable PyTorch ops (the reference math)."""
    geometry = (stride, padding, dilation, groups)
    if dropped_x is None:
        return ops.reference_adapted_op(x, weight, bias, adapter, math, scale, *geometry, False)
    frozen = ops.base_op(x, weight.to(x.dtype), bias, *geometry)
    return frozen + ops.reference_adapted_op(dropped_x, weight, None, adapter, math, scale, *geometry, True)


fused_conv_op = ops.FusedOp("fused_conv", _fused_conv, list_index=4, composite=_fused_conv_composite)


@fused_conv_op.register_fake
def _(x, dropped_x, weight, bias, adapter, math, scale, stride, padding, dilation, groups):
    y = ops.base_op(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)
    return y.new_empty(y.shape)  # contiguous, as the kernels write it


def _fused_conv_backward(grad_y: Tensor, x: Tensor, dropped_x: Optional[Tensor], weight: Tensor,
                         adapter: list[Tensor], math: str, scale: float, stride: list[int], padding: list[int],
                         dilation: list[int], groups: int, need_input: bool, need_dropped: bool, need_weight: bool,
                         need_bias: bool, need_adapter: bool) -> list[Tensor]:
    """The gradients of ``fused_conv`` that are needed, in input order."""
    with ops.autocast_off(x):
        k = kernels()
        geometry = (stride, padding, dilation, groups)
        dropout = dropped_x is not None
        update_input = dropped_x if dropout else x
        adapted, form = _adapted_weight(weight, adapter, math, scale, delta_only=dropout)
        grad_x = grad_dropped = grad_w = grad_b = None
        if need_input:
            grad_x = k.conv_input_grad(grad_y, x.shape, weight, *geometry, adapted=None if dropout else adapted)
        if need_dropped and dropout:
            grad_dropped = k.conv_input_grad(grad_y, dropped_x.shape, weight, *geometry, adapted=adapted)
        if need_weight:
            grad_w = _base_weight_grad(k, grad_y, x, dropped_x, weight, adapter, math, scale, geometry)
        if need_bias:
            grad_b = k.bias_grad(grad_y)
        grad_adapter = []
        if need_adapter:
            grad_left, grad_right = k.conv_weight_grad_projection(update_input, grad_y, weight, *geometry, adapted)
            grad_adapter = [g.to(t.dtype) for g, t in zip(adapter_grads(form, adapter, grad_left, grad_right, scale),
                                                           adapter)]
        return ops.gradients_as_promised([(grad_x, x), (grad_dropped, dropped_x), (grad_w, weight), (grad_b, grad_b),
                                          *zip(grad_adapter, adapter)])


def _base_weight_grad(k, grad_y, x, dropped_x, weight, adapter, math, scale, geometry):
    """A trainable base weight's gradient: ``grad W' * dW'/dW`` (with dropout the frozen branch's
    gradient plus the update branch's ``* d(W' - W)/dW``). Not the adapter use case: it writes the
    weight-sized gradients a trainable weight needs."""
    transform = ops.kernels_for("triton")
    if dropped_x is None:
        return ops._base_weight_grad(transform, k.conv_weight_grad(x, grad_y, weight, *geometry), weight, adapter,
                                     math, scale, False)
    update = ops._base_weight_grad(transform, k.conv_weight_grad(dropped_x, grad_y, weight, *geometry), weight,
                                   adapter, math, scale, True)
    return k.conv_weight_grad(x, grad_y, weight, *geometry) + update


fused_conv_backward_op = ops.FusedOp("fused_conv_backward", _fused_conv_backward)


@fused_conv_backward_op.register_fake
def _(grad_y, x, dropped_x, weight, adapter, math, scale, stride, padding, dilation, groups, need_input, need_dropped,
      need_weight, need_bias, need_adapter):
    return ops.fake_gradients([(need_input, x), (need_dropped and dropped_x is not None, dropped_x),
                               (need_weight, weight), (need_bias, grad_y.new_empty(weight.shape[0]))],
                              adapter, need_adapter)


def _setup_context(ctx, inputs, output):
    x, dropped_x, weight, bias, adapter, *config = inputs
    ctx.save_for_backward(x, dropped_x, weight, *adapter)
    ctx.config = config  # math, scale, stride, padding, dilation, groups


def _backward(ctx, grad_y):
    x, dropped_x, weight, *adapter = ctx.saved_tensors
    need_x, need_dropped, need_w, need_b, need_adapter = ctx.needs_input_grad[:5]
    need_dropped = need_dropped and dropped_x is not None
    need_adapter = any(need_adapter)
    grads = iter(fused_conv_backward_op(grad_y, x, dropped_x, weight, adapter, *ctx.config, need_x, need_dropped,
                                        need_w, need_b, need_adapter))
    picked = [next(grads) if need else None for need in (need_x, need_dropped, need_w, need_b)]
    grad_adapter = list(grads) if need_adapter else [None] * len(adapter)
    return (*picked, grad_adapter, None, None, *ops.no_grad_for_lists(ctx.config[2:5]), None)


fused_conv_op.register_autograd(_backward, setup_context=_setup_context)


# -- chain form (FLoRA, LoRA) -------------------------------------------------------------------


def _fused_tucker_chain(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                        factors: list[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                        groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, u, z)``: ``y = op(x, W, bias) + P_out(z)`` with ``(u, z)`` the chain's activations on
    ``x_chain`` (None: ``x``; u empty when folded) and ``P_out``'s product added in the frozen op's
    epilogue; ``factors``: the chain's (``tucker_chain.chain_factors``). u and z are returned only
    for the backward to keep."""
    with ops.autocast_off(x):
        k = kernels()
        geometry = (stride, padding, dilation, groups)
        weights = chain.conv_weights(factors, groups, weight.dim() - 2, x.dtype)
        u, z = chain.chain_to_z(x if x_chain is None else x_chain, weights, geometry, k)
        up = weights[-1].reshape(weights[-1].shape[0], -1)
        y = k.conv_forward(x, weight, bias, stride, padding, dilation, groups, up=(up, z))
    return y, (x.new_empty(0) if u is None else u.contiguous()), z.contiguous()


def _fused_tucker_chain_composite(x: Tensor, x_chain: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                                  factors: list[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                                  groups: int) -> tuple:
    """:func:`_fused_tucker_chain` in differentiable PyTorch ops (bypass's own composite)."""
    return tucker_bypass._tucker_bypass_composite(x, x_chain, weight, bias, factors, stride, padding, dilation,
                                                  groups, False, "reference")


fused_tucker_chain_op = ops.FusedOp("fused_tucker_chain", _fused_tucker_chain, list_index=4,
                                    composite=_fused_tucker_chain_composite)


@fused_tucker_chain_op.register_fake
def _(x, x_chain, weight, bias, factors, stride, padding, dilation, groups):
    y, u, z = tucker_bypass.forward(x, x_chain, weight, bias, factors, (stride, padding, dilation, groups))
    return y, (x.new_empty(0) if u is None else u.contiguous()), z.contiguous()


def _fused_tucker_chain_backward(grad_y: Tensor, x: Tensor, x_chain: Optional[Tensor], weight: Tensor,
                                 factors: list[Tensor], u: Optional[Tensor], z: Optional[Tensor], stride: list[int],
                                 padding: list[int], dilation: list[int], groups: int, need_input: bool,
                                 need_chain_input: bool, need_weight: bool, need_bias: bool,
                                 need_factors: bool) -> list[Tensor]:
    """The gradients of ``fused_tucker_chain`` that are needed, in input order: the frozen op's and
    the chain's backward (``tucker_chain.chain_backward``) on the fused kernels; without dropout the
    input gradient through ``W'`` formed in the tiles from the factors (a low-rank form of their own,
    ``tucker_chain.compact_form``), no chain transposed."""
    with ops.autocast_off(x):
        k = kernels()
        geometry = (stride, padding, dilation, groups)
        grad_x = None
        if need_input and x_chain is None:
            delta, compact = chain.compact_form(factors)
            adapted, _ = k.AdaptedWeight.of(weight, compact, delta, "add", 1.0)
            grad_x = k.conv_input_grad(grad_y, x.shape, weight, *geometry, adapted=adapted)
        frozen_input = need_input and x_chain is not None
        grad_frozen, grad_w, grad_b = k.op_backward(grad_y, x, weight.to(x.dtype), *geometry, frozen_input,
                                                    need_weight, need_bias)
        grad_x = grad_frozen if frozen_input else grad_x
        grad_chain, grads = None, None
        chain_input_grad = need_chain_input and x_chain is not None
        if need_factors or chain_input_grad:
            grad_chain, grads = chain.chain_backward(grad_y, x if x_chain is None else x_chain, factors, u, z,
                                                     geometry, chain_input_grad, need_factors, conv=k)
    return ops.gradients_as_promised([(grad_x, x), (grad_chain, x_chain), (grad_w, weight), (grad_b, grad_b),
                                      *zip(grads or [], factors)])


fused_tucker_chain_backward_op = ops.FusedOp("fused_tucker_chain_backward", _fused_tucker_chain_backward)


@fused_tucker_chain_backward_op.register_fake
def _(grad_y, x, x_chain, weight, factors, u, z, stride, padding, dilation, groups, need_input, need_chain_input,
      need_weight, need_bias, need_factors):
    return tucker_bypass.fake_backward(grad_y, x, x_chain, weight, factors, need_input, need_chain_input, need_weight,
                                       need_bias, need_factors)


fused_tucker_chain_op.register_autograd(tucker_bypass.backward_by(fused_tucker_chain_backward_op),
                                        setup_context=tucker_bypass.setup_context)


def run(call: AdaptedCall, form: str, folded: bool = False) -> Tensor:
    """The adapted layer's output by strategy "fused" in ``form`` ("prologue" or "chain"; the chain
    ``folded`` or not, as ``tucker_chain`` says)."""
    if form == "chain":
        factors = chain.factors_of_call(call, folded)
        return fused_tucker_chain_op(call.x, call.dropped_x, call.weight, call.bias, factors, list(call.stride),
                                     list(call.padding), list(call.dilation), call.groups)[0]
    args = (call.x, call.dropped_x, call.weight, call.bias, list(call.adapter), call.math.key, float(call.scale),
            list(call.stride), list(call.padding), list(call.dilation), call.groups)
    return fused_conv_op(*args)
