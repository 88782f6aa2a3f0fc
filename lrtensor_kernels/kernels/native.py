"""The native backend: the entry points of a fused backend on the C++ (CPU) and CUDA C++ ops of
``csrc/`` (``torch.ops.lrtensor.lowrank_transform``, ``lowrank_project``, ``channel_dot``).

``project_transform`` (CPU only) is both in one pass, on ``lrtensor::lowrank_project_transform``.

The adapter tensors are brought to the low-rank form of
:mod:`lrtensor_kernels.kernels.lowrank_form` here (``R`` materialised: r_1 x C numbers, r_1 / O of
the weight); the ops make the weight-sized passes, and the small Tucker contractions
(``mode_product``, ``mode_gram``), so that every gradient is the same bits at any thread count. Importing this module builds the library on
first use (:mod:`lrtensor_kernels.kernels.native_build`) and raises RuntimeError with the reason
when it cannot be built.
"""
from __future__ import annotations

import collections
import threading
import weakref
from typing import Optional, Sequence

import torch

from .. import methods
from . import native_build
from .channels import channel_operands
from .lowrank_form import LowRankForm, adapter_grads, check_operands

native_build.load()
_ops = torch.ops.lrtensor

# the small Tucker contractions in C++ too: torch's tensordot goes through BLAS, whose bits may
# change with the thread count
CONTRACTIONS = methods.Contractions(
    mode_product=lambda x, u, mode: _ops.mode_product(x.contiguous(), u.contiguous(), mode),
    mode_gram=lambda x, y, mode: _ops.mode_gram(x.contiguous(), y.contiguous(), mode),
)


class _FormCache:
    """The last few low-rank forms, found again by the identity and version of their adapter tensors.

    One training step asks for the same form three times (the forward's W', the backward's W' for
    the input gradient, the projection); building it (the Tucker kernel core and ``R``) costs about
    a pass over ``R``. An entry is used only while every adapter tensor it was built from is alive
    (weak references) and unmodified (version counters), with the same scale and weight shape."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, adapter: Sequence[torch.Tensor], delta: str, scale: float) -> LowRankForm:
        try:
            versions = tuple(t._version for t in adapter)
        except RuntimeError:  # inference tensors have no version counter: nothing to validate an entry with
            return self._build(weight, adapter, delta, scale)
        key = (delta, float(scale), tuple(weight.shape), weight.dtype, weight.device, tuple(id(t) for t in adapter))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                refs, built_versions, form = entry
                if built_versions == versions and all(r() is t for r, t in zip(refs, adapter)):
                    self._entries.move_to_end(key)
                    return form
        form = self._build(weight, adapter, delta, scale)
        with self._lock:
            self._entries[key] = ([weakref.ref(t) for t in adapter], versions, form)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return form

    @staticmethod
    def _build(weight, adapter, delta, scale) -> LowRankForm:
        form = LowRankForm(weight, adapter, delta, scale, CONTRACTIONS)
        form.right_matrix()
        return form


_forms = _FormCache()


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every tensor an op writes comes from here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _form_of(weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str, scale: float) -> tuple:
    """``(spec, form)``: the checked operands' adapter math and their low-rank form (cached)."""
    check_operands(weight, adapter)
    spec = methods.AdapterMath.from_key(math)
    return spec, _forms.get(weight, adapter, spec.delta, scale)


def transform(weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str, scale: float,
              delta_only: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W'`` (or ``W' - W``) of ``weight``'s shape, in ``out``'s dtype (default: the weight's), in one pass."""
    spec, form = _form_of(weight, adapter, math, scale)
    if out is None:
        out = _new_buffer(weight.shape, weight.dtype, weight.device)
    _ops.lowrank_transform.out(weight.contiguous(), form.left, form.right_matrix(), spec.combine, delta_only, out=out)
    return out


def _projected(weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str, scale: float, run) -> list:
    """The gradient of every adapter tensor from a projection op: ``run(form, combine, right,
    grad_left, grad_right)`` writes ``dLoss/dL`` (unscaled) into ``grad_left`` and ``dLoss/dR`` into
    ``grad_right``."""
    spec, form = _form_of(weight, adapter, math, scale)
    right = form.right_matrix()
    grad_left = _new_buffer(form.left.shape, form.acc, weight.device)
    grad_right = _new_buffer(right.shape, form.acc, weight.device)
    run(form, spec.combine, right, grad_left, grad_right)
    grads = adapter_grads(form, adapter, grad_left, grad_right, scale)
    return [g.to(t.dtype) for g, t in zip(grads, adapter)]


def project(grad_weight: torch.Tensor, weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str,
            scale: float) -> list[torch.Tensor]:
    """The gradient of every adapter tensor from ``grad_weight = dLoss/dW'``, in one pass over the weight."""
    def run(form, combine, right, grad_left, grad_right):
        _ops.lowrank_project.out(grad_weight.contiguous(), weight.contiguous(), form.left, right, combine,
                                 grad_left=grad_left, grad_right=grad_right)

    return _projected(weight, adapter, math, scale, run)


def project_transform(grad_weight: torch.Tensor, weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str,
                      scale: float, delta_only: bool = False, out: Optional[torch.Tensor] = None) -> tuple:
    """``(W', adapter gradients)``: :func:`transform` and :func:`project` of the same weight in one pass
    (the same values, bit for bit); ``W'`` (or ``W' - W``) in ``out``'s dtype (default: the weight's).
    CPU tensors only (the op has no CUDA kernel: there the caller runs the two)."""
    if out is None:
        out = _new_buffer(weight.shape, weight.dtype, weight.device)

    def run(form, combine, right, grad_left, grad_right):
        _ops.lowrank_project_transform.out(grad_weight.contiguous(), weight.contiguous(), form.left, right, combine,
                                           delta_only, grad_left=grad_left, grad_right=grad_right, out=out)

    return out, _projected(weight, adapter, math, scale, run)


def channel_dot(a: torch.Tensor, b: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``(a * b).sum(every dim but channel_dim)`` without making ``a * b``: shape ``(a.shape[channel_dim],)``,
    float32 (float64 for float64 inputs), deterministic; a channels_last pair is read in place."""
    a, b, dim = channel_operands(a, b, channel_dim)
    out = _new_buffer((a.shape[dim],), methods.compute_dtype(a.dtype), a.device)
    _ops.channel_dot.out(a, b, dim, out=out)
    return out
