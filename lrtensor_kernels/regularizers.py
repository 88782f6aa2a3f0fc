"""MPC regularisers of the subspace-tuning paper, as a loss term the user adds."""
from __future__ import annotations

import torch
from torch import nn

from .surgery import adapter_layers

MPC_KINDS = ("o", "d")


def _gram_penalty(gram: torch.Tensor, kind: str) -> torch.Tensor:
    """``||gram - I||_F^2`` (kind "o") or ``||gram - diag(gram)||_F^2`` (kind "d")."""
    target = torch.diag_embed(torch.diagonal(gram)) if kind == "d" else torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - target).pow(2).sum()


def mpc_loss(model: nn.Module, kind: str = "o") -> torch.Tensor:
    """Sum over adapter layers of the MPC penalty.

    LoRA-style pairs (LieRA delta "lora", A (r, n), B (m, r)): kind "o" is
    ``||A A^T - I||_F^2 + ||B^T B - I||_F^2``, kind "d" is ``||A A^T - I||_F^2 +
    ||B^T B - diag(B^T B)||_F^2``. Tucker factors (FLoRA, LieRA delta "tucker"):
    ``sum_n ||U_n^T U_n - I||_F^2`` for either kind. SSL/SSB layers have no factors and add 0.
    """
    if kind not in MPC_KINDS:
        raise ValueError(f"unknown MPC kind {kind!r}; expected one of {MPC_KINDS}")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"mpc_loss: {type(model).__name__} has no adapter layer; call inject first")
    terms = []
    for _, layer in layers:
        if hasattr(layer, "lora_A") and getattr(layer, "delta", None) == "lora":
            a, b = layer.lora_A, layer.lora_B
            terms.append(_gram_penalty(a @ a.t(), "o") + _gram_penalty(b.t() @ b, kind))
        elif hasattr(layer, "factors"):
            terms.extend(_gram_penalty(u.t() @ u, "o") for u in layer.factors)
    if not terms:
        p = next(iter(layers))[1].adapter_parameters()[0]
        return p.new_zeros(())
    return sum(terms[1:], terms[0])
