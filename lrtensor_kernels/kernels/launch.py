"""How the Triton launchers plan for a device, and how they launch.

**Planning.** A launcher asks :func:`planned_multiprocessors` what it plans for: the number of
streaming multiprocessors of the GPU its tensors are on, or None for the interpreter (CPU tensors
under ``TRITON_INTERPRET=1``), which gets the smallest plan (one program per column block, small
blocks, one warp). Inside ``with as_on_gpu(multiprocessors):`` every launcher of this thread plans
as on a GPU with that many multiprocessors, whatever the tensors' device:

- under ``TRITON_INTERPRET=1`` the GPU plan then *runs on the CPU*: its block sizes, warps, stages
  and row splits, at small shapes (a small count such as 2 gives several row splits on a small
  weight); this is how the tests check the GPU plans against the float64 oracle;
- on meta tensors inside :func:`recording`, nothing runs and every launch is recorded: this is how
  a module's ``aot_cases()`` lists the specialisations its launchers produce on a GPU, from the
  launchers' own code.

A launcher uses it as ``sms = planned_multiprocessors(tensor.device)`` and plans for the GPU when
``sms`` is not None.

**Launching.** :func:`launch` is ``kernel[grid](*args, **kwargs)``, except inside
:func:`recording`, where it records one :class:`~lrtensor_kernels.kernels.aot.AotCase` per
configuration the kernel can run with (each ``triton.autotune`` config, after the kernel's own
pruning; ``triton.heuristics`` values computed from the arguments) and launches nothing.
``small_pointers`` names the pointer arguments whose tensors always stay far below 2^31 elements;
the ahead-of-time check lets their addresses be computed in 32 bits (every other pointer's
address products must be 64-bit).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional, Sequence

import torch

_state = threading.local()


def planned_multiprocessors(device: torch.device) -> Optional[int]:
    """The multiprocessor count to plan for, or None to plan for the interpreter (see the module doc)."""
    forced = getattr(_state, "multiprocessors", None)
    if forced is not None:
        return forced
    from ..backend import triton_interpreted

    if device.type != "cuda" or triton_interpreted():
        return None
    return _device_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@contextlib.contextmanager
def as_on_gpu(multiprocessors: int = 132):
    """Every Triton launcher of this thread plans as on a GPU with ``multiprocessors`` multiprocessors
    (132: an H100 SXM or H200; 108: an A100) while the block runs."""
    if int(multiprocessors) < 1:
        raise ValueError(f"as_on_gpu: multiprocessors must be at least 1, got {multiprocessors}")
    previous = getattr(_state, "multiprocessors", None)
    _state.multiprocessors = int(multiprocessors)
    try:
        yield
    finally:
        _state.multiprocessors = previous


@contextlib.contextmanager
def recording(multiprocessors: int = 132):
    """Records the launches made in the block (launching nothing), planned as on a GPU with
    ``multiprocessors`` multiprocessors; yields the list the :class:`AotCase` records are appended to.
    Call the launchers on meta tensors: they need shapes and dtypes, no data."""
    previous = getattr(_state, "recorded", None)
    _state.recorded = recorded = []
    try:
        with as_on_gpu(multiprocessors):
            yield recorded
    finally:
        _state.recorded = previous


def launch(kernel, grid, *args, small_pointers: Sequence[str] = (), **kwargs):
    """``kernel[grid](*args, **kwargs)``; inside :func:`recording`, records it instead (module doc)."""
    recorded = getattr(_state, "recorded", None)
    if recorded is None:
        return kernel[grid](*args, **kwargs)
    from .aot import cases_of_launch

    recorded.extend(cases_of_launch(kernel, grid, args, kwargs, tuple(small_pointers)))
    return None
