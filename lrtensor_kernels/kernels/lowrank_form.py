"""Every adapter method in one low-rank form, shared by the fused backends.

The weight is seen as a matrix ``W`` of shape ``(O, C)`` with ``O = W.shape[0]`` and
``C = prod(W.shape[1:])``, column ``c = i * K + k`` for input channel ``i`` and flattened kernel
position ``k`` (``K = 1`` for linear). The update is ``E = L @ R`` with

- lora:   ``L = scale * B`` (O, r), ``R = A`` (r, C);
- scales: ``L = d_out`` (O, 1) (ones for SSL), ``R[0, c] = d_in[c // K]``;
- tucker: ``L = scale * U_1`` (O, r_1) and ``R[a, c] = sum_b G[a, b, k] * U_2[i, b]`` with
  ``G = core x_3 U_3 ... x_N U_N`` (r_1, r_2, K). A backend either builds R tile by tile from
  ``U_2`` and ``G`` (Triton) or materialises it (:meth:`LowRankForm.right_matrix`: r_1 x C numbers,
  r_1 / O of the weight).

``W' = combine(W, E)`` as :mod:`lrtensor_kernels.methods` defines it. The small Tucker
contractions run through a :class:`~lrtensor_kernels.methods.Contractions` (torch's tensordot by
default; the native backend brings its own, deterministic at any thread count). A backend's projection
returns ``dLoss/dL`` without the scale (``H @ R^T``, ``H = dLoss/dE``) and ``dLoss/dR``
(``L^T @ H``); :func:`adapter_grads` turns them into the gradient of every adapter tensor.
"""
from __future__ import annotations

import math as pymath
from typing import Sequence

import torch

from .. import methods


class LowRankForm:
    """The (L, R) form of one weight and its adapter tensors, in the compute dtype."""

    def __init__(self, weight: torch.Tensor, adapter: Sequence[torch.Tensor], delta: str, scale: float,
                 contract: methods.Contractions = methods.TORCH_CONTRACTIONS):
        acc = methods.compute_dtype(weight.dtype)
        self.contract = contract
        self.acc = acc
        self.delta = delta
        self.out_rows = weight.shape[0]
        self.in_channels = weight.shape[1]
        self.kernel_size = pymath.prod(weight.shape[2:])
        self.cols = self.in_channels * self.kernel_size
        self.core = self.u2 = self.right = None
        adapter = [t.detach().to(acc) for t in adapter]
        if delta == "lora":
            lora_B, lora_A = adapter
            self.left = (scale * lora_B).contiguous()
            self.right = lora_A.contiguous()
            self.rank1, self.rank2 = lora_A.shape[0], 1
        elif delta == "scales":
            d_in = adapter[0]
            d_out = adapter[1] if len(adapter) == 2 else torch.ones(self.out_rows, dtype=acc, device=d_in.device)
            self.left = (scale * d_out).reshape(-1, 1).contiguous()
            self.right = d_in.repeat_interleave(self.kernel_size).reshape(1, -1).contiguous()
            self.rank1, self.rank2 = 1, 1
        elif delta == "tucker":
            core, u1, u2, *kernel_factors = adapter
            self.left = (scale * u1).contiguous()
            self.u2 = u2.contiguous()
            self.core = self.kernel_core(core, kernel_factors)
            self.rank1, self.rank2 = core.shape[0], core.shape[1]
        else:
            raise ValueError(f"unknown delta {delta!r}")

    def kernel_core(self, core, kernel_factors):
        """``core x_3 U_3 ... x_N U_N`` as (r_1, r_2, K)."""
        out = methods.tucker_product(core, kernel_factors, first_mode=2, contract=self.contract)
        return out.reshape(core.shape[0], core.shape[1], self.kernel_size).contiguous()

    def right_matrix(self) -> torch.Tensor:
        """``R`` (r_1, C), contiguous; for tucker ``R[a, i*K + k] = sum_b U_2[i, b] G[a, b, k]``."""
        if self.right is None:
            right = self.contract.mode_product(self.core, self.u2, 1)
            self.right = right.reshape(self.rank1, self.cols).contiguous()
        return self.right


def adapter_grads(form: LowRankForm, adapter, grad_left, grad_right, scale):
    """Adapter gradients from ``dLoss/dL`` (unscaled: ``grad_left`` is ``H @ R^T``) and ``dLoss/dR``."""
    if form.delta == "lora":
        return [scale * grad_left, grad_right]
    if form.delta == "scales":
        grad_in = grad_right.reshape(form.in_channels, form.kernel_size).sum(1)
        return [grad_in] if len(adapter) == 1 else [grad_in, scale * grad_left[:, 0]]
    # tucker: R[a, i, k] = sum_b U2[i, b] * G[a, b, k] with G = core x_3 U_3 ... x_N U_N.
    core, u1, u2, *kernel_factors = [t.detach().to(form.acc) for t in adapter]
    contract = form.contract
    grad_r = grad_right.reshape(form.rank1, form.in_channels, form.kernel_size)
    grad_u2 = contract.mode_gram(grad_r, form.core, 1)
    grad_g = contract.mode_product(grad_r, u2.t(), 1).reshape(core.shape[:2] + tuple(f.shape[0] for f in kernel_factors))
    grad_core, *grad_kernel = methods.tucker_product_grads(core, kernel_factors, grad_g, 2, contract)
    return [grad_core, scale * grad_left, grad_u2, *grad_kernel]


def check_operands(weight: torch.Tensor, adapter: Sequence[torch.Tensor]):
    """The checks every fused backend makes before reading the (L, R) form."""
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    for t in adapter:
        if t.device != weight.device:
            raise ValueError(f"adapter tensor on {t.device} but weight on {weight.device}")
