"""The adapter math, defined once, in plain PyTorch.

Every adapter method turns the frozen base weight ``W`` into an effective weight
``W'`` in two steps: a *delta* ``D`` of the weight's shape built from the small
adapter tensors, and a *combine* rule that applies ``E = scale * D`` to ``W``.

Deltas (weight of order N, modes in PyTorch's order (out, in/groups, k_1..k_n)):

- ``"tucker"``: adapter tensors ``(core, U_1, ..., U_N)`` with ``core`` of shape
  ``(r_1..r_N)`` and ``U_n`` of shape ``(d_n, r_n)``;
  ``D = core x_1 U_1 x_2 U_2 ... x_N U_N``.
- ``"lora"``: adapter tensors ``(B, A)`` with ``B`` of shape ``(out, r)`` and
  ``A`` of shape ``(r, prod(W.shape[1:]))``; ``D = (B @ A).reshape(W.shape)``.
- ``"scales"``: adapter tensors ``(d_in,)`` or ``(d_in, d_out)`` with ``d_in`` of
  shape ``(W.shape[1],)`` and ``d_out`` of shape ``(W.shape[0],)``;
  ``D[o, i, ...] = d_out[o] * d_in[i]`` (``d_out`` = 1 when absent).

Combine rules, elementwise:

- ``"add"`` (FLoRA): ``W' = W + E``
- ``"exp"`` (LieRA, the paper): ``W' = W * exp(E)``
- ``"first_order"`` (LieRA, the official code): ``W' = W * (1 + E)``
- ``"mul"`` (SSL, SSB): ``W' = W * E``

The functions here are differentiable, run on any device and dtype, compute in
float32 (float64 for float64 weights) and return the weight's dtype. They are the
``reference`` backend and the oracle every kernel is tested against.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

DELTAS = ("tucker", "lora", "scales")
COMBINES = ("add", "exp", "first_order", "mul")


@dataclass(frozen=True)
class AdapterMath:
    """Which delta and which combine rule a method uses."""

    delta: str
    combine: str

    def __post_init__(self):
        if self.delta not in DELTAS:
            raise ValueError(f"unknown delta {self.delta!r}; expected one of {DELTAS}")
        if self.combine not in COMBINES:
            raise ValueError(f"unknown combine {self.combine!r}; expected one of {COMBINES}")

    @property
    def key(self) -> str:
        return f"{self.delta}:{self.combine}"

    @classmethod
    def from_key(cls, key: str) -> "AdapterMath":
        delta, _, combine = key.partition(":")
        return cls(delta, combine)


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapter math runs in float32, or float64 for float64 weights."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def mode_product(x: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """``x x_mode u``: ``out[..., j, ...] = sum_m u[j, m] * x[..., m, ...]``, u (J, x.shape[mode])."""
    return torch.tensordot(u, x, dims=([1], [mode])).movedim(0, mode)


def mode_gram(x: torch.Tensor, y: torch.Tensor, mode: int) -> torch.Tensor:
    """``out[j, m] = sum over every index but the mode's of x[..., j, ...] * y[..., m, ...]``: the
    gradient ``d<x, y x_mode u>/du``; x and y agree in every dim but ``mode``."""
    others = [d for d in range(x.dim()) if d != mode]
    return torch.tensordot(x, y, dims=(others, others))


@dataclass(frozen=True)
class Contractions:
    """The two contractions the Tucker math is made of (a backend may bring its own)."""

    mode_product: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = mode_product
    mode_gram: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = mode_gram


TORCH_CONTRACTIONS = Contractions()


# the trailing modes contracted first are contracted together, as one matrix product with the
# Kronecker product of their factors, while it has at most this many entries (a convolution's
# kernel modes: 9 x 4 for 3x3 at ranks 2): one op under autograd where there were two a mode
KRONECKER_LIMIT = 4096


def tucker_product(core: torch.Tensor, factors: Sequence[torch.Tensor], first_mode: int = 0,
                   contract: Contractions = TORCH_CONTRACTIONS) -> torch.Tensor:
    """``core x_m U_m`` for the modes ``m = first_mode, first_mode + 1, ...`` that ``factors``
    cover; with ``first_mode=0`` and one factor per mode: core (r_1..r_N), U_n (d_n, r_n) -> (d_1..d_N)."""
    # modes that grow the tensor least go first, so the intermediates stay small and the last
    # (usually the output-channel mode) is one matrix product
    order = sorted(range(len(factors)), key=lambda n: factors[n].shape[0] / factors[n].shape[1])
    out = core
    together = _trailing_run(core, factors, first_mode, order) if contract is TORCH_CONTRACTIONS else 0
    if together:
        last = factors[len(factors) - together:]
        kron = functools.reduce(_kronecker, last)
        lead = core.shape[:core.dim() - together]
        out = (core.reshape(-1, kron.shape[1]) @ kron.t()).reshape(*lead, *(u.shape[0] for u in last))
    for n in order[together:]:
        out = contract.mode_product(out, factors[n], first_mode + n)
    return out


def _kronecker(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (x) b``, (a0 b0, a1 b1), for matrices of any strides (``torch.kron`` cannot view some
    transposed ones with a size-1 mode)."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def _trailing_run(core: torch.Tensor, factors, first_mode: int, order: list) -> int:
    """How many of the first modes in ``order`` are the core's last modes with a Kronecker product
    of at most KRONECKER_LIMIT entries (0: none)."""
    if first_mode + len(factors) != core.dim():
        return 0
    run, entries = 0, 1
    for i, n in enumerate(order):
        entries *= factors[n].numel()
        if entries > KRONECKER_LIMIT:
            break
        if set(order[:i + 1]) == set(range(len(factors) - i - 1, len(factors))):
            run = i + 1
    return run


def tucker_product_grads(core: torch.Tensor, factors: Sequence[torch.Tensor], grad: torch.Tensor,
                         first_mode: int = 0, contract: Contractions = TORCH_CONTRACTIONS) -> list:
    """Gradients ``[d core, d U_m...]`` of ``<grad, tucker_product(core, factors, first_mode)>``."""
    modes = range(first_mode, first_mode + len(factors))
    grad_core = tucker_product(grad, [u.t() for u in factors], first_mode, contract)
    grads = [grad_core]
    for mode in modes:
        # all modes but `mode` brought to full size, then contracted with grad over them
        partial = core
        for m, factor in zip(modes, factors):
            if m != mode:
                partial = contract.mode_product(partial, factor, m)
        grads.append(contract.mode_gram(grad, partial, mode))
    return grads


def delta(kind: str, adapter: Sequence[torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    """The delta ``D`` of shape ``weight_shape`` from the adapter tensors (see module doc)."""
    if kind == "tucker":
        return tucker_product(adapter[0], adapter[1:])
    if kind == "lora":
        lora_B, lora_A = adapter
        return (lora_B @ lora_A).reshape(weight_shape)
    if kind == "scales":
        view = (1, -1) + (1,) * (len(weight_shape) - 2)
        out = adapter[0].reshape(view)
        if len(adapter) == 2:
            out = adapter[1].reshape((-1,) + (1,) * (len(weight_shape) - 1)) * out
        return out.expand(weight_shape)
    raise ValueError(f"unknown delta {kind!r}; expected one of {DELTAS}")


def combine(kind: str, weight: torch.Tensor, update: torch.Tensor, delta_only: bool = False) -> torch.Tensor:
    """``W'`` from ``W`` and ``E = scale * D``; with ``delta_only``, ``W' - W`` computed without cancellation where possible."""
    if kind == "add":
        return update if delta_only else weight + update
    if kind == "exp":
        return weight * torch.expm1(update) if delta_only else weight * torch.exp(update)
    if kind == "first_order":
        return weight * update if delta_only else weight * (1 + update)
    if kind == "mul":
        return weight * (update - 1) if delta_only else weight * update
    raise ValueError(f"unknown combine {kind!r}; expected one of {COMBINES}")


def effective_weight(
    weight: torch.Tensor,
    adapter: Sequence[torch.Tensor],
    math: AdapterMath,
    scale: float,
    delta_only: bool = False,
) -> torch.Tensor:
    """``W' = combine(W, scale * delta(adapter))`` (or ``W' - W``), in the weight's dtype.

    weight: the frozen base weight, any shape of order >= 2.
    adapter: the method's adapter tensors, in the order the module doc gives.
    Autocast, if on, is suspended: the adapter math keeps its own precision.
    """
    device_type = weight.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return effective_weight(weight, adapter, math, scale, delta_only)
    acc = compute_dtype(weight.dtype)
    d = delta(math.delta, [t.to(acc) for t in adapter], weight.shape)
    out = combine(math.combine, weight.to(acc), scale * d, delta_only)
    return out.to(weight.dtype)
