"""Which backend computes the adapted layers.

- ``"reference"``: the plain-PyTorch math of :mod:`lrtensor_kernels.methods` under autograd.
- ``"triton"``: fused Triton kernels for the weight transform and its backward projection,
  behind the ``lrtensor::adapted_op`` custom op; needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before the first use.
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton can be imported, else
  ``"reference"``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

BACKENDS = ("auto", "reference", "triton")
_state = threading.local()


def _current() -> str:
    return getattr(_state, "name", "auto")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend name in force in this thread (``"auto"`` unless set)."""
    return _current()


def set_backend(name: str) -> None:
    """Set the backend for this thread: one of ``"auto"``, ``"reference"``, ``"triton"``."""
    _state.name = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager that sets the backend for the enclosed block and restores it after."""
    previous = _current()
    set_backend(name)
    try:
        yield
    finally:
        _state.name = previous


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(device: torch.device) -> str:
    """The concrete backend (``"reference"`` or ``"triton"``) for tensors on ``device``."""
    name = _current()
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was selected but the triton package is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set "
                f"before first use); got tensors on {device}"
            )
    return name
