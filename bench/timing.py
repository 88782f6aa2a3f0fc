"""Timers and the one timing loop.

What is timed is one training step of one layer, split in two:

- forward: the call ``forward(x)`` (for the adapter layers this includes building ``W'``);
- backward: ``y.backward(grad_out)`` from a fixed output gradient, down to the input and every
  trainable tensor (gradients are cleared before each step, outside the timed region).

On CUDA the clock is a pair of ``torch.cuda.Event`` records on the current stream (GPU time); on
the CPU it is ``time.perf_counter`` (wall time, the ops being synchronous there).
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Step:
    """One training step of a layer: forward on a fixed input, backward from a fixed output gradient."""

    forward: Callable[[Tensor], Tensor]
    x: Tensor
    grad_out: Tensor
    trainable: Sequence[Tensor]

    def clear_grads(self) -> None:
        for t in (self.x, *self.trainable):
            t.grad = None

    def run(self) -> Tensor:
        """Forward and backward once; returns the (detached) output."""
        y = self.forward(self.x)
        y.backward(self.grad_out)
        return y.detach()


class CpuClock:
    """Host wall time from ``time.perf_counter``."""

    name = "time.perf_counter"

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        pass


class CudaClock:
    """GPU time between ``torch.cuda.Event`` records on the current stream."""

    name = "torch.cuda.Event"

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize()


def clock_for(device: torch.device):
    return CudaClock() if device.type == "cuda" else CpuClock()


@dataclass
class StepTimes:
    """Per-run milliseconds of the timed runs (warm-up excluded)."""

    forward_ms: list = field(default_factory=list)
    backward_ms: list = field(default_factory=list)
    step_ms: list = field(default_factory=list)

    def medians(self) -> dict:
        return {"fwd": statistics.median(self.forward_ms), "bwd": statistics.median(self.backward_ms),
                "fwd_bwd": statistics.median(self.step_ms)}


def time_step(step: Step, clock, warmup: int, repeats: int) -> StepTimes:
    """Runs ``warmup`` untimed steps, then ``repeats`` timed ones, each marked before the forward,
    between forward and backward, and after the backward. Medians are taken per phase, so the
    fwd+bwd median need not equal the sum of the two others."""
    marks = []
    for run in range(warmup + repeats):
        step.clear_grads()
        start = clock.mark()
        y = step.forward(step.x)
        middle = clock.mark()
        y.backward(step.grad_out)
        end = clock.mark()
        del y
        if run >= warmup:
            marks.append((start, middle, end))
    clock.synchronize()
    times = StepTimes()
    for start, middle, end in marks:
        times.forward_ms.append(clock.elapsed_ms(start, middle))
        times.backward_ms.append(clock.elapsed_ms(middle, end))
        times.step_ms.append(clock.elapsed_ms(start, end))
    return times


def peak_memory_mib(step: Step, device: torch.device) -> Optional[dict]:
    """CUDA only: ``torch.cuda.max_memory_allocated`` over one forward+backward after a peak reset
    (``peak``: everything allocated, inputs and weights included; ``step_extra``: the peak minus what
    was allocated just before the step). None on the CPU (not measured there)."""
    if device.type != "cuda":
        return None
    step.clear_grads()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step.run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak": peak / 2 ** 20, "step_extra": (peak - before) / 2 ** 20}


def median_ms(fn: Callable[[], object], clock, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    marks = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        marks.append((start, clock.mark()))
    clock.synchronize()
    return statistics.median(clock.elapsed_ms(s, e) for s, e in marks)


@dataclass
class KeptBytes:
    """What one forward of a step leaves alive for its backward, in bytes.

    ``saved``: the distinct storages autograd packs for the backward (``saved_tensors_hooks`` sees
    every tensor a built-in op or an ``autograd.Function`` saves with ``save_for_backward``), the
    input and the weights included; ``saved_beyond_inputs``: the part of it the forward allocated
    (not the input, the weights or any other tensor that lives anyway); ``held``: storages the
    forward allocated that are still alive after it although autograd did not pack them (kept on a
    Function's ``ctx``, in a cache), the output excluded. ``total = saved + held``."""

    saved: int
    saved_beyond_inputs: int
    held: int

    @property
    def total(self) -> int:
        return self.saved + self.held

    def mib(self) -> dict:
        """Every figure and the total, in MiB (the JSON's ``kept_mib``)."""
        return {"saved": self.saved / 2 ** 20, "saved_beyond_inputs": self.saved_beyond_inputs / 2 ** 20,
                "held": self.held / 2 ** 20, "total": self.total / 2 ** 20}


class _AllocationTracker(TorchDispatchMode):
    """Weak references to the storages that ops allocate while it is active: an op output whose
    storage is none of the op's tensor arguments' (views and ``out=`` writes allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.allocated = {}  # storage address -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        arguments = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in arguments and storage.nbytes():
                    self.allocated[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive(self) -> dict:
        """Address -> bytes of the allocated storages still alive."""
        return {ptr: nbytes for ptr, (ref, nbytes) in self.allocated.items() if not ref.expired()}


def kept_for_backward(step: Step) -> KeptBytes:
    """What one forward of ``step`` keeps for the backward (see :class:`KeptBytes`), on any device."""
    saved = {}

    def pack(t: Tensor):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    step.clear_grads()
    tracker = _AllocationTracker()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        y = step.forward(step.x)
    gc.collect()
    alive = tracker.alive()
    output = y.untyped_storage().data_ptr()
    del y
    return KeptBytes(saved=sum(saved.values()), saved_beyond_inputs=sum(n for ptr, n in saved.items() if ptr in alive),
                     held=sum(n for ptr, n in alive.items() if ptr not in saved and ptr != output))




def saved_for_backward_mib(step: Step) -> float:
    """MiB that autograd keeps from the forward for the backward beyond the input and the weights
    (which live anyway): :attr:`KeptBytes.saved_beyond_inputs`. The activation memory a layer adds
    to a training step; a weight-sized W' kept for backward shows up here."""
    return kept_for_backward(step).saved_beyond_inputs / 2 ** 20
