"""Which backend computes the adapted layers.

- ``"reference"``: the plain-PyTorch math of :mod:`lrtensor_kernels.methods` under autograd.
- ``"triton"``: fused Triton kernels for the weight transform and its backward projection,
  behind the ``lrtensor::adapted_op`` custom op; needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before the first use.
- ``"native"``: the C++ (CPU) and CUDA C++ kernels of ``csrc/`` behind the same custom op,
  compiled on first use (:mod:`lrtensor_kernels.kernels.native_build`).
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton can be imported; on the CPU
  ``"native"`` or ``"reference"`` per layer, whichever the cost model estimates faster for the
  layer's call (:func:`candidates`; the native library is built on the first CPU call, and
  without it ``"reference"``, with one warning that says why).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "reference", "triton", "native")
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
    """Set the backend for this thread: one of ``"auto"``, ``"reference"``, ``"triton"``, ``"native"``."""
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


@torch.compiler.assume_constant_result  # torch.compile reads it once instead of tracing the build's lock
def native_available() -> bool:
    """Whether the native library is loaded; the first call builds it (about a minute, then cached)."""
    from .kernels import native_build

    return native_build.available()


@torch.compiler.assume_constant_result
def native_has_cuda_kernels() -> bool:
    from .kernels import native_build

    return native_build.has_cuda_kernels()


_warned_native = False
_warned_native_lock = threading.Lock()


@torch.compiler.assume_constant_result  # torch.compile runs it while tracing: its lock and warning stay out of graphs
def _auto_cpu() -> str:
    global _warned_native
    if native_available():
        return "native"
    with _warned_native_lock:
        first, _warned_native = not _warned_native, True
    if first:
        from .kernels import native_build

        warnings.warn(f"lrtensor_kernels: the native CPU backend is unavailable ({native_build.unavailable_reason()}); "
                      "'auto' uses the 'reference' backend on the CPU ('triton' stays available on CUDA)",
                      RuntimeWarning, stacklevel=3)
    return "reference"


def candidates(device: torch.device) -> tuple:
    """The concrete backends that may run a call on ``device``, the default first: under ``"auto"``
    on the CPU ``("native", "reference")`` when the native library is available (the cost model
    picks per call), else the one :func:`resolve` names."""
    if _current() == "auto" and device.type == "cpu" and _auto_cpu() == "native":
        return ("native", "reference")
    return (resolve(device),)


def resolve(device: torch.device) -> str:
    """The concrete backend (``"reference"``, ``"triton"`` or ``"native"``) for tensors on ``device``."""
    name = _current()
    if device.type == "meta":  # shapes only: every backend computes them with its differentiable reference math
        return "reference" if name == "auto" else name
    if name == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "reference"
        return _auto_cpu() if device.type == "cpu" else "reference"
    if name == "native":
        if not native_available():
            from .kernels import native_build

            raise RuntimeError(f"backend 'native' was selected but the native backend is unavailable "
                               f"({native_build.unavailable_reason()}); the 'reference' backend runs without it")
        if device.type not in ("cpu", "cuda") or device.type == "cuda" and not native_has_cuda_kernels():
            raise RuntimeError(f"backend 'native' has no kernels for tensors on {device} (CPU always; CUDA when "
                               f"torch has CUDA and nvcc was found at build time)")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was selected but the triton package is not installed (CUDA builds "
                               "of torch on Linux bring it; else pip install 'lrtensor_kernels[triton]' or "
                               "pip install triton); the 'reference' and 'native' backends run without it")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set "
                f"before first use); got tensors on {device}"
            )
    return name
