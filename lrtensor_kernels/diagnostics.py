"""Opt-in check of non-finite forward outputs: a global forward hook while on, nothing while off."""
from __future__ import annotations

import contextlib
import threading

import torch

from .errors import NonFiniteError
from .adapter_layer import AdapterLayer
from .validation import count_nonfinite

_nonfinite_hook = None
_lock = threading.Lock()


def set_detect_nonfinite(mode: bool) -> None:
    """Turn on (or off) the check that raises NonFiniteError naming the adapter layer whose forward
    output holds inf or NaN. Process-wide (every thread's forwards are checked; calls from several
    threads are serialised); off by default; costs nothing while off."""
    with _lock:
        _set(mode)


def _set(mode: bool) -> None:
    global _nonfinite_hook
    if mode and _nonfinite_hook is None:
        def check(module, inputs, output):
            if isinstance(module, AdapterLayer) and isinstance(output, torch.Tensor) \
                    and not torch.isfinite(output).all():
                x = inputs[0] if inputs else None
                cause = ("its input already held non-finite values" if isinstance(x, torch.Tensor)
                         and not torch.isfinite(x).all() else "its input was finite")
                raise NonFiniteError(f"{module._label()}: forward output holds {count_nonfinite(output)} "
                                     f"non-finite values of {output.numel()}; {cause}")

        _nonfinite_hook = torch.nn.modules.module.register_module_forward_hook(check)
    elif not mode and _nonfinite_hook is not None:
        _nonfinite_hook.remove()
        _nonfinite_hook = None


def is_detect_nonfinite_enabled() -> bool:
    return _nonfinite_hook is not None


@contextlib.contextmanager
def detect_nonfinite(mode: bool = True):
    """Context manager form of :func:`set_detect_nonfinite`; restores the setting it found on entry
    (process-wide: with blocks in several threads at once, the last to leave decides)."""
    previous = is_detect_nonfinite_enabled()
    set_detect_nonfinite(mode)
    try:
        yield
    finally:
        set_detect_nonfinite(previous)
