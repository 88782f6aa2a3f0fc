"""Timers and the one timing loop.

What is timed is one training step of one layer, split in two:

- forward: the call ``forward(x)`` (for the adapter layers this includes building ``W'``);
- backward: ``y.backward(grad_out)`` from a fixed output gradient, down to the input and every
  trainable tensor (gradients are cleared before each step, outside the timed region).

On CUDA the clock is a pair of ``torch.cuda.Event`` records on the current stream (GPU time); on
the CPU it is ``time.perf_counter`` (wall time, the ops being synchronous there).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


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


def saved_for_backward_mib(step: Step) -> float:
    """MiB that autograd keeps from the forward for the backward, on any device: the distinct
    storages packed by ``saved_tensors_hooks``, less the input and parameters (which live anyway).
    This is the activation memory a layer adds to a training step; a weight-sized W' kept for
    backward shows up here."""
    storages = {}

    def pack(t: Tensor):
        if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr() != step.x.untyped_storage().data_ptr():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    step.clear_grads()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step.forward(step.x)
    del y
    return sum(storages.values()) / 2 ** 20
