"""Micro-benchmarks of the fused ops and of one layer's training step, per backend (pytest-benchmark).

Not part of the test run (``python3 -m pytest`` collects ``tests/`` only). Run and compare:

    python3 -m pytest bench/test_microbench.py --benchmark-only
    python3 -m pytest bench/test_microbench.py --benchmark-only --benchmark-autosave
    python3 -m pytest bench/test_microbench.py --benchmark-only --benchmark-compare
    LRTENSOR_BENCH_THREADS=2 python3 -m pytest bench/test_microbench.py --benchmark-only -k transform

Each group holds its baseline beside the backends, so one run's table gives the ratios: the weight
transform and the projection next to a clone and a ``copy_`` of the same bytes, ``channel_dot`` next
to plain PyTorch, a layer's step next to the frozen layer and full fine-tuning. On the CPU the
backends are "native" and "reference" (torch threads: ``LRTENSOR_BENCH_THREADS``, default 1); on
CUDA "triton" as well. Shapes: a Stable Diffusion 1280->1280 3x3 weight (59 MB in float32, above
the last-level cache of most CPUs) and a ResNet 512->512 3x3 weight (9.4 MB); layer steps on the
bench suite's CPU shapes.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from bench import suite
from bench.kernels import adapter_for
from bench.timing import Step
from lrtensor_kernels import backend, methods
from lrtensor_kernels.ops import kernels_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WEIGHTS = {"sd15_1280x1280x3x3": (1280, 1280, 3, 3), "resnet_512x512x3x3": (512, 512, 3, 3)}
METHODS = {"flora": "tucker:add", "liera_exp": "lora:exp", "ssb": "scales:mul"}
STEP_SHAPES = ("sd15_unet/3x3_320-320_64", "resnet50/3x3_256-256_14", "linear/4096-4096_t4096")


def fused_backends() -> list:
    names = []
    if backend.native_available() and (DEVICE.type == "cpu" or backend.native_has_cuda_kernels()):
        names.append("native")
    if DEVICE.type == "cuda" and backend.triton_available():
        names.append("triton")
    return names


@pytest.fixture(scope="module", autouse=True)
def threads():
    if DEVICE.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LRTENSOR_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


def _sync(fn):
    if DEVICE.type != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    return synced


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(shape, generator=g)).to(DEVICE)


BACKENDS = ["reference"] + fused_backends()


@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("name", ["clone", "copy_"])
def test_copy_baseline(benchmark, weight, name):
    """The same bytes as the transform moves: a clone (allocating, as the transform allocates W')
    and a copy_ into a buffer allocated once."""
    benchmark.group = f"transform {weight}"
    w = _weight(WEIGHTS[weight])
    out = torch.empty_like(w)
    benchmark(_sync(w.clone if name == "clone" else lambda: out.copy_(w)))


@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("impl", BACKENDS)
def test_transform(benchmark, weight, method, impl):
    benchmark.group = f"transform {weight}"
    key = METHODS[method]
    w = _weight(WEIGHTS[weight])
    adapter = adapter_for(key, w.shape, DEVICE)
    if impl == "reference":
        spec = methods.AdapterMath.from_key(key)
        benchmark(_sync(lambda: methods.effective_weight(w, adapter, spec, 1.0)))
    else:
        kernels = kernels_for(impl)
        benchmark(_sync(lambda: kernels.transform(w, adapter, key, 1.0)))


@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("impl", BACKENDS)
def test_projection(benchmark, weight, method, impl):
    """The adapter gradients from dL/dW' (reference: autograd through effective_weight)."""
    benchmark.group = f"projection {weight}"
    key = METHODS[method]
    w = _weight(WEIGHTS[weight])
    grad = _weight(WEIGHTS[weight], 1)
    adapter = adapter_for(key, w.shape, DEVICE)
    if impl == "reference":
        spec = methods.AdapterMath.from_key(key)
        leaves = [t.clone().requires_grad_() for t in adapter]
        benchmark(_sync(lambda: torch.autograd.grad(methods.effective_weight(w, leaves, spec, 1.0), leaves, grad)))
    else:
        kernels = kernels_for(impl)
        benchmark(_sync(lambda: kernels.project(grad, w, adapter, key, 1.0)))


CHANNEL_SHAPES = {"nchw_8x256x56x56": ((8, 256, 56, 56), 1), "tokens_4096x1024": ((4096, 1024), 1)}


@pytest.mark.parametrize("case", list(CHANNEL_SHAPES))
@pytest.mark.parametrize("impl", ["torch"] + fused_backends())
def test_channel_dot(benchmark, case, impl):
    """sum of a * b over every dim but the channels; "torch": (a * b).sum(dims)."""
    benchmark.group = f"channel_dot {case}"
    shape, dim = CHANNEL_SHAPES[case]
    a, b = _weight(shape, 2), _weight(shape, 3)
    if impl == "torch":
        dims = [d for d in range(len(shape)) if d != dim]
        benchmark(_sync(lambda: (a * b).sum(dims)))
    else:
        kernels = kernels_for(impl)
        benchmark(_sync(lambda: kernels.channel_dot(a, b, dim)))


def _step_shapes():
    shapes = suite.select_shapes(list(STEP_SHAPES), quick=False)
    shapes = [s for s in shapes if s.name in STEP_SHAPES]
    return shapes if DEVICE.type == "cuda" else [suite.scaled_for_cpu(s) for s in shapes]


STEP_PROVIDERS = ["frozen", "full_ft"] + [f"{m}_{b}" for m in ("flora", "liera", "ssb") for b in BACKENDS]


@pytest.mark.parametrize("shape", _step_shapes(), ids=lambda s: s.name)
@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_layer_step(benchmark, shape, provider):
    """One training step (forward + backward) of one layer, as bench/run.py times it."""
    benchmark.group = f"step {shape.name}"
    ctx = suite.Context(DEVICE, torch.float32)
    prepared = suite.providers_for(DEVICE)[provider](shape, ctx)
    x, grad_out = suite.make_inputs(shape, ctx)
    step = Step(prepared.forward, x, grad_out, prepared.trainable)

    def run():
        step.clear_grads()
        step.run()

    benchmark(_sync(run))
    assert math.isfinite(benchmark.stats.stats.median)
