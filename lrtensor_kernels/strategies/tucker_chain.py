"""FLoRA's update as a chain of small ops, shared by the "bypass" and "hybrid" strategies.

FLoRA's update is ``dW[o, i, k] = sum_{a,b} U_1[o, a] U_2[i, b] K[a, b, k]`` with the kernel
core ``K = core x_3 U_3 ... x_N U_N`` of shape (r_1, r_2, k_1..k_n). For a convolution with
``g`` groups (C_g = C_in / g input channels per group), ``op(x, dW)`` is the chain::

    u = P_in(x)     1x1 conv, C_in -> g r_2 channels, g groups, weight U_2^T per group
    z = op_K(u)     the layer's stride, padding and dilation, kernel K, g r_2 -> g r_1, g groups
    P_out(z)        1x1 conv, g r_1 -> C_out channels, g groups, weight scale * U_1

(linear: ``u = x U_2``, ``z = u core^T``, ``P_out(z) = scale * z U_1^T``), exact because a 1x1
channel projection commutes with padding of any mode. Per output pixel it costs
``C_in r_2 (input pixels per output pixel) + g r_1 r_2 k + C_out r_1`` multiply-adds.

**Folded** (two ops): ``z = op_M(x)`` with ``M = K x_2 U_2`` (r_1, C_g, *k), the layer's
geometry, then ``P_out``: ``C_g g r_1 k + C_out r_1`` multiply-adds per output pixel, one op (and
one backward op) fewer. Cheaper where the kernel is 1x1 (and for linear layers), or where there
are few input channels; the cost model chooses (``strategies.cost``).

LoRA's update ``dW = (B A).reshape(W.shape)`` is this chain already folded, with ``M = A`` reshaped
to (r, C_g, *k) and ``scale * B`` for ``scale * U_1``: ``z = op_A(x)`` runs the layer's op with A
repeated per group (g r, C_g, *k), so group j's r channels see only group j's inputs, as the
grouped weight does, and ``P_out`` maps output channel o (in group j) from group j's r channels.
Per output pixel ``g r C_g k + C_out r`` multiply-adds; A's gradient is the sum of the g copies'.

The chain's *factors* are ``[U_2, K, scale * U_1]`` (three ops) or ``[M, scale * U_1]`` (folded;
LoRA's ``[A, scale * B]``), built from the adapter tensors under autograd (:func:`chain_factors`):
an op that takes them returns their gradients, and autograd maps those to the core and the
factors (or A and B) in C++.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import methods, ops
from ..kernels import workspace

# the chain's activations u and z are saved for backward while they have at most this fraction of
# the chain input's elements (u first, then z), else recomputed (kept_for_backward)
SAVE_FRACTION = 0.25
TUCKER_ADD = methods.AdapterMath("tucker", "add")
LORA_ADD = methods.AdapterMath("lora", "add")


def chain_factors(adapter, scale: float, dtype: torch.dtype, folded: bool = False, delta: str = "tucker",
                  weight_shape: Optional[tuple] = None) -> list:
    """``[U_2, K, scale * U_1]``, or ``[M, scale * U_1]`` with ``folded``: the chain's factors in the
    compute dtype, differentiable w.r.t. the adapter tensors. U_2 (C_g, r_2); K (r_1, r_2, *k), the
    core (r_1, r_2) of a linear layer; M = K x_2 U_2 (r_1, C_g, *k); scale * U_1 (C_out, r_1).
    ``delta="lora"`` (adapter ``[B, A]``, always folded): ``[A.reshape(r, *weight_shape[1:]), scale * B]``.

    In 16-bit dtypes the factors are first balanced by powers of two to the same magnitude (exact,
    their product unchanged): a core that is still small next to its factors (it starts at zero)
    would otherwise round to float16's subnormals when cast to the op's dtype."""
    if delta == "lora":
        lora_b, lora_a = adapter
        factors = [lora_a.reshape(lora_a.shape[0], *weight_shape[1:]), scale * lora_b]
    else:
        core, u1, u2, *kernel_factors = adapter
        kernel = methods.tucker_product(core, kernel_factors, first_mode=2) if kernel_factors else core
        factors = [methods.mode_product(kernel, u2, 1), scale * u1] if folded else [u2, kernel, scale * u1]
    if dtype in (torch.float16, torch.bfloat16):
        factors = _balanced(factors)
    return factors


def factors_of_call(call, folded: bool = False) -> list:
    """:func:`chain_factors` of an adapted call (``strategies.call.AdaptedCall``); LoRA's always folded."""
    return chain_factors(call.adapter, call.scale, call.x.dtype, folded, call.math.delta, tuple(call.weight.shape))


def is_folded(factors) -> bool:
    return len(factors) == 2


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


def _grouped(t: Tensor, groups: int) -> Tensor:
    """A conv weight shared by the groups, repeated along its output channels."""
    return t if groups == 1 else t.repeat(groups, *(1,) * (t.dim() - 1))


def conv_weights(factors, groups: int, spatial_dims: int, dtype: torch.dtype) -> list:
    """The factors as ``ops.base_op`` weights in ``dtype``, the chain's ops in order: conv (g r_2,
    C_g, 1..), (g r_1, r_2, *k), (C_out, r_1, 1..), folded (g r_1, C_g, *k), (C_out, r_1, 1..);
    linear U_2^T, core, scale * U_1, folded M, scale * U_1."""
    *inner, u1s = (f.to(dtype) for f in factors)
    ones = (1,) * spatial_dims
    w_out = u1s.reshape(*u1s.shape, *ones)
    if is_folded(factors):
        return [_grouped(inner[0], groups), w_out]
    u2, kernel = inner
    if not spatial_dims:
        return [u2.t(), kernel, u1s]
    return [_grouped(u2.t().reshape(u2.shape[1], u2.shape[0], *ones), groups), _grouped(kernel, groups), w_out]


def factor_grads(factors, groups: int, weight_grads: list) -> list:
    """The gradients of the factors from those of :func:`conv_weights` (summed over the groups,
    which share the factors), in the factors' dtype."""
    def ungrouped(g: Tensor, shape) -> Tensor:
        return g if groups == 1 else g.reshape(groups, *shape).sum(0)

    if is_folded(factors):
        grads = [ungrouped(weight_grads[0], factors[0].shape), weight_grads[1]]
    else:
        u2, kernel, _ = factors
        grad_in, grad_mid, grad_out = weight_grads
        grad_u2 = ungrouped(grad_in.reshape(groups * u2.shape[1], u2.shape[0]), (u2.shape[1], u2.shape[0])).t()
        grads = [grad_u2, ungrouped(grad_mid, kernel.shape), grad_out]
    return [g.reshape(f.shape).to(f.dtype) for g, f in zip(grads, factors)]


def pointwise(spatial_dims: int) -> tuple:
    """The geometry of a 1x1 conv (stride, padding, dilation) with ``spatial_dims`` dims."""
    return [1] * spatial_dims, [0] * spatial_dims, [1] * spatial_dims


def chain_to_z(x_chain: Tensor, weights: list, geometry: tuple, conv=ops) -> tuple:
    """``(u, z)``: ``u = P_in(x)`` and ``z = op_K(u)``, or folded ``(None, op_M(x))``. ``conv``: the
    module whose ``base_op`` runs the ops (:mod:`lrtensor_kernels.ops`, or strategy "fused"'s kernels)."""
    stride, padding, dilation, groups = geometry
    if len(weights) == 2:
        return None, conv.base_op(x_chain, weights[0], None, stride, padding, dilation, groups)
    u = conv.base_op(x_chain, weights[0], None, *pointwise(weights[1].dim() - 2), groups)
    return u, conv.base_op(u, weights[1], None, stride, padding, dilation, groups)


def kept_for_backward(u: Optional[Tensor], z: Tensor, x_chain: Tensor) -> tuple:
    """``(u, z)`` as saved for backward (None: recomputed): u when it has at most SAVE_FRACTION of
    the chain input's elements, z too when u and z together have (folded: z alone)."""
    budget = SAVE_FRACTION * x_chain.numel()
    if u is None:
        return None, (z if z.numel() <= budget else None)
    if u.numel() > budget:
        return None, None
    return u, (z if u.numel() + z.numel() <= budget else None)


def chain_backward(grad_y: Tensor, x_chain: Tensor, factors, u: Optional[Tensor], z: Optional[Tensor],
                   geometry: tuple, need_chain_input: bool, need_factors: bool, conv=ops) -> tuple:
    """``(grad_x_chain, factor_grads)`` of ``P_out(chain(x_chain))`` (None for what is not needed);
    ``u``, ``z``: what the forward kept (None: recomputed); ``conv``: the module whose ``base_op``
    and ``op_backward`` run the ops."""
    stride, padding, dilation, groups = geometry
    weights = conv_weights(factors, groups, x_chain.dim() - 2 if x_chain.dim() > 2 else 0, x_chain.dtype)
    folded = len(weights) == 2
    spatial = pointwise(weights[-1].dim() - 2)
    if folded and z is None:
        z = conv.base_op(x_chain, weights[0], None, stride, padding, dilation, groups)
    if not folded:
        if u is None:
            u = conv.base_op(x_chain, weights[0], None, *spatial, groups)
        if z is None:
            z = conv.base_op(u, weights[1], None, stride, padding, dilation, groups)
    grad_z, grad_w_out, _ = conv.op_backward(grad_y, z, weights[-1], *spatial, groups, True, need_factors)
    if folded:
        grad_x, grad_w_m, _ = conv.op_backward(grad_z, x_chain, weights[0], stride, padding, dilation, groups,
                                               need_chain_input, need_factors)
        weight_grads = [grad_w_m, grad_w_out]
    else:
        grad_u, grad_w_mid, _ = conv.op_backward(grad_z, u, weights[1], stride, padding, dilation, groups, True,
                                                 need_factors)
        grad_x, grad_w_in, _ = conv.op_backward(grad_u, x_chain, weights[0], *spatial, groups, need_chain_input,
                                                need_factors)
        weight_grads = [grad_w_in, grad_w_mid, grad_w_out]
    return grad_x, (factor_grads(factors, groups, weight_grads) if need_factors else None)


def compact_form(factors) -> tuple:
    """``(delta, tensors)``: the factors as an additive update of their own at scale 1, Tucker
    ``[K, scale U_1, U_2]`` (``K x_1 (scale U_1) x_2 U_2``) or, folded, LoRA ``[scale U_1, M]``
    (``(scale U_1) @ M`` with M flattened to (r_1, C_g k))."""
    if is_folded(factors):
        m, u1s = factors
        return "lora", [u1s, m.reshape(m.shape[0], -1)]
    u2, kernel, u1s = factors
    return "tucker", [kernel, u1s, u2]


def effective_weight(weight: Tensor, factors, impl: str, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """``W' = W + dW`` in ``dtype`` (into ``out`` on a fused backend, when given) from the chain's
    factors, which are a Tucker form of their own: ``K x_1 (scale U_1) x_2 U_2``, or the lora form
    ``(scale U_1) @ M`` when folded."""
    delta, compact = compact_form(factors)
    math = LORA_ADD if delta == "lora" else TUCKER_ADD
    if impl == "reference":
        return methods.effective_weight(weight, compact, math, 1.0).to(dtype)
    return ops.transform_to(ops.kernels_for(impl), weight, compact, math.key, 1.0, False, dtype, out)


def borrowed_weight(weight: Tensor, dtype: torch.dtype):
    """A scratch tensor for a transient ``W'`` (``workspace.borrowed``)."""
    return workspace.borrowed(weight.shape, dtype, weight.device)
