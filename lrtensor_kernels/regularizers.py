"""Regularisers of the adapter factors, as loss terms the user adds.

``mpc_loss``: the MPC regularisers of the subspace-tuning paper (arXiv 2407.05417), defined there
on LoRA's two factors. In the paper's notation (W of shape n x m acting on row vectors,
``dW = A B``, A (n, r), B (r, m))::

    MPC_o = ||A^T A - I_r||_F^2 + ||B B^T - I_r||_F^2              (Eq. 25)
    MPC_d = ||A^T A - I_r||_F^2 + ||B B^T - diag(B B^T)||_F^2      (Eq. 26)

The paper's A is LoRA's down projection and its B LoRA's up projection: here ``dW =
(lora_B @ lora_A).reshape(W.shape)`` acts on column vectors, so the paper's ``A = lora_A^T``
(prod(W.shape[1:]), r) and ``B = lora_B^T`` (r, out), and ``A^T A = lora_A lora_A^T``,
``B B^T = lora_B^T lora_B``. MPC_d asks only that the up projection's r directions be
orthogonal, leaving their lengths free, which fits LoRA's up projection starting at zero. The
paper applies MPC to LoRA, TriLoRA and AdaLoRA; here it applies to every layer with LoRA's
factors: ``"lora"`` layers and LieRA layers with delta "lora". MPC_n (a nonlinearity between
A and B) is not provided: the paper names no function, and the update would no longer be a
weight (nothing to merge; only a bypass ``op(x, W) + B sigma(A x)`` could run it).

``tucker_orthogonality_loss``: this package's extension to Tucker factors (FLoRA, LieRA with
delta "tucker"), ``sum_n ||U_n^T U_n - I||_F^2`` over every factor, which the paper does not
define. ``mpc_loss`` adds it only when asked (``tucker_factors=True``; kind "o" only: the paper
defines no diagonal form for Tucker factors and neither does this package); on a model holding
Tucker factors it asks for that choice (``True`` adds the extension, ``False`` leaves the Tucker
layers out) rather than add terms the paper does not define, or skip layers, without a word.

Both read the active adapter of each layer (inactive named adapters are frozen).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import AdapterConfigError, AdapterTypeError
from .surgery import adapter_layers

MPC_KINDS = ("o", "d")


def gram_penalty(gram: torch.Tensor, diagonal_free: bool = False) -> torch.Tensor:
    """``||gram - I||_F^2``, or ``||gram - diag(gram)||_F^2`` with ``diagonal_free``."""
    target = torch.diag_embed(torch.diagonal(gram)) if diagonal_free else torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - target).pow(2).sum()


def _has_lora_factors(layer) -> bool:
    return layer.active_adapter is not None and layer.adapter_math.delta == "lora"


def _has_tucker_factors(layer) -> bool:
    return layer.active_adapter is not None and layer.adapter_math.delta == "tucker"


def _adapted(model: nn.Module, what: str) -> list:
    layers = adapter_layers(model)
    if not layers:
        raise AdapterConfigError(f"{what}: {type(model).__name__} has no adapter layer; call inject first")
    return [layer for _, layer in layers]


def _total(terms: list, layers: list) -> torch.Tensor:
    if terms:
        return sum(terms[1:], terms[0])
    return torch.zeros((), device=layers[0].weight.device)


def mpc_loss(model: nn.Module, kind: str = "o", tucker_factors: Optional[bool] = None) -> torch.Tensor:
    """The paper's MPC summed over the layers with LoRA's factors (see the module doc): kind "o"
    is ``||lora_A lora_A^T - I||_F^2 + ||lora_B^T lora_B - I||_F^2`` (Eq. 25), kind "d" is
    ``||lora_A lora_A^T - I||_F^2 + ||lora_B^T lora_B - diag(lora_B^T lora_B)||_F^2`` (Eq. 26).

    tucker_factors: True adds this package's extension to Tucker factors (FLoRA, LieRA-tucker),
    :func:`tucker_orthogonality_loss`, which the paper does not define; kind "o" only (kind "d"
    with Tucker factors present is refused). False: the paper's MPC alone, Tucker layers left out.
    None (default): the paper's MPC, and an AdapterConfigError asking for the choice if the model
    holds Tucker factors. SSL/SSB layers have no factors and add nothing. Returns a scalar tensor
    (zero when nothing applies).
    """
    if not isinstance(kind, str) or kind not in MPC_KINDS:
        raise AdapterConfigError(f"mpc_loss: unknown MPC kind {kind!r}; expected one of {MPC_KINDS}")
    if tucker_factors is not None and not isinstance(tucker_factors, bool):
        raise AdapterTypeError(f"mpc_loss: tucker_factors must be True, False or None, got {tucker_factors!r}")
    layers = _adapted(model, "mpc_loss")
    if tucker_factors is None:
        held = [layer for layer in layers if _has_tucker_factors(layer)]
        if held:
            raise AdapterConfigError(
                f"mpc_loss: {held[0]._label()} has Tucker factors, on which the paper does not define MPC (it defines "
                "it on LoRA's A and B); pass tucker_factors=True to add this package's extension "
                "(sum ||U^T U - I||^2 over the factors, lk.tucker_orthogonality_loss) or tucker_factors=False to leave "
                "the Tucker layers out")
    tucker = [layer for layer in layers if _has_tucker_factors(layer)] if tucker_factors else []
    if tucker and kind == "d":
        raise AdapterConfigError(
            f"mpc_loss: kind 'd' on {tucker[0]._label()}, whose Tucker factors have no diagonal form of MPC (the "
            "paper defines MPC_d on LoRA's A and B; this package's Tucker extension is the orthonormality of every "
            "factor, kind 'o'); pass tucker_factors=False to leave Tucker factors out, and add "
            "lk.tucker_orthogonality_loss(model) for them if wanted")
    terms = [gram_penalty(layer.lora_A @ layer.lora_A.t())
             + gram_penalty(layer.lora_B.t() @ layer.lora_B, diagonal_free=kind == "d")
             for layer in layers if _has_lora_factors(layer)]
    terms += [_tucker_penalty(layer) for layer in tucker]
    return _total(terms, layers)


def _tucker_penalty(layer) -> torch.Tensor:
    return sum(gram_penalty(u.t() @ u) for u in layer.factors)


def tucker_orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """``sum_n ||U_n^T U_n - I||_F^2`` over every factor of every layer with a Tucker delta
    (FLoRA; LieRA with delta "tucker"): this package's extension of MPC_o to Tucker factors (the
    paper does not define one). Other layers add nothing; returns a scalar tensor."""
    layers = _adapted(model, "tucker_orthogonality_loss")
    return _total([_tucker_penalty(layer) for layer in layers if _has_tucker_factors(layer)], layers)
