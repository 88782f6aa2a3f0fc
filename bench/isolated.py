"""Training steps of several configurations timed in interleaved rounds, each configuration in a
worker process of its own.

In one process, configurations share the C library's heap: the blocks one frees serve the next
one's allocations, and whether a step faults pages in depends on what ran before it. glibc hands
the top of its heap back to the system once the free space there passes a threshold (twice the
largest block it has mmapped, by default), and every page of it is faulted in again when the heap
grows: about 2 us per 4 KiB page on the 2-core CI machine, a tenth to a quarter of a ResNet-18
training step there (bench/NOTES.md). A worker per configuration reaches the steady state that a
training run of that configuration alone reaches, so each configuration pays its own faults.

Each round asks every worker in turn for ``per_round`` steps (so that load which comes and goes
spreads over all of them alike) and records, per step, the time (the worker's thread CPU time with
one torch thread, else wall time), the minor page faults and the kernel time of the worker process.

``allocator="keep-freed"`` starts the workers with glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set high: large blocks come from the heap and freed memory stays with the
process, so steps fault (almost) nothing in; the difference to ``"default"`` is what the faults cost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import resource
import statistics
import time
import traceback
from typing import Callable, Optional

# glibc's variables (other C libraries ignore them): the mmap threshold must be raised too, since
# setting the trim threshold alone fixes the mmap threshold at its 128 KiB default
ALLOCATORS = {
    "default": {},
    "keep-freed": {"MALLOC_MMAP_THRESHOLD_": str(10 ** 9), "MALLOC_TRIM_THRESHOLD_": str(10 ** 11)},
}


@dataclasses.dataclass
class Sample:
    """One round of one configuration, per step."""

    seconds: float
    page_faults: float
    system_seconds: float


@contextlib.contextmanager
def _environment(variables: dict):
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def clock() -> Callable[[], float]:
    """The calling thread's CPU time with one torch thread (robust to preemption), else wall time."""
    import torch

    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _serve(make_step: Callable, name: str, threads: int, warmup: int, conn) -> None:
    """A worker: builds ``make_step(name)`` (``(step, info)`` or None), runs ``warmup`` steps, sends
    ``("ready", info)``, then answers each step count it receives with a :class:`Sample` until it
    receives None."""
    try:
        import torch

        torch.set_num_threads(threads)
        built = make_step(name)
        if built is None:
            conn.send(("not_run", None))
            return
        step, info = built
        now = clock()
        for _ in range(warmup):
            step()
        conn.send(("ready", info))
        while (count := conn.recv()) is not None:
            before, start = resource.getrusage(resource.RUSAGE_SELF), now()
            for _ in range(count):
                step()
            seconds = now() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(Sample(seconds / count, (after.ru_minflt - before.ru_minflt) / count,
                             (after.ru_stime - before.ru_stime) / count))
    except EOFError:  # the parent gave up (another worker failed)
        return
    except Exception:
        conn.send(("error", traceback.format_exc()))


def interleaved_workers(make_step: Callable, names: list, rounds: int, per_round: int, threads: int = 1,
                        allocator: str = "default", warmup: int = 2) -> tuple:
    """``(info, samples, not_run)``: ``info[name]`` as ``make_step`` gave it, ``samples[name]`` a
    :class:`Sample` per round, ``not_run`` the names whose ``make_step`` returned None.

    ``make_step(name)`` runs in the worker and must be importable by name (a module-level function):
    it returns ``(step, info)``, ``step`` a callable running one training step, ``info`` anything
    picklable; or None where the configuration cannot be built here."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {tuple(ALLOCATORS)}, got {allocator!r}")
    context = multiprocessing.get_context("spawn")
    workers = {}
    try:
        with _environment(ALLOCATORS[allocator]):
            for name in names:
                ours, theirs = context.Pipe()
                process = context.Process(target=_serve, args=(make_step, name, threads, warmup, theirs), daemon=True)
                process.start()
                workers[name] = (process, ours)
        info, not_run = {}, []
        for name, (_, conn) in workers.items():
            status, value = _receive(conn, name)
            if status == "not_run":
                not_run.append(name)
            else:
                info[name] = value
        samples = {name: [] for name in info}
        for _ in range(rounds):
            for name in info:
                workers[name][1].send(per_round)
                samples[name].append(_receive(workers[name][1], name))
        for name in info:
            workers[name][1].send(None)
        return info, samples, not_run
    finally:
        for process, conn in workers.values():
            conn.close()
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


def _receive(conn, name: str):
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError(f"the worker of {name!r} ended without answering") from None
    if isinstance(message, tuple) and message[0] == "error":
        raise RuntimeError(f"the worker of {name!r} failed:\n{message[1]}")
    return message


def median(samples: list, field: str) -> Optional[float]:
    """The median of one :class:`Sample` field over rounds."""
    return statistics.median(getattr(s, field) for s in samples) if samples else None
