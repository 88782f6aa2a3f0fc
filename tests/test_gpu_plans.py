"""The Triton kernels' GPU launch plans, run on the CPU under TRITON_INTERPRET=1 against the float64 oracle.

Inside ``kernels.launch.as_on_gpu(n)`` the launchers plan as on a GPU with ``n`` multiprocessors:
the GPU's block sizes, warps, stages, several row splits and, where it moves fewer bytes, the
projection's second pass then run in the interpreter, at small shapes. bfloat16 and float16 run
with the interpreter's tf32 dots cut to tf32 as the tensor cores read them (conftest).

What the interpreter cannot check: warps (each program runs as one numpy computation), shared
memory and pipelining stages (tests/test_aot.py compiles them), races between programs (none
share an output slot), and ``tl.exp``, which is numpy's exp here and ``ex2.approx.f32`` (about
2^-22 relative) in float32 on a GPU.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from oracle import F64, assert_accuracy, rel_err
from test_fused_kernels import FLOOR, _base_weight, _oracle_grads, _plain_grads, math_key, oracle_weight

triton = pytest.importorskip("triton")
from lrtensor_kernels import methods  # noqa: E402
from lrtensor_kernels.kernels import triton_transform as tt  # noqa: E402
from lrtensor_kernels.kernels.launch import as_on_gpu, planned_multiprocessors, recording  # noqa: E402
from lrtensor_kernels.kernels.lowrank_form import LowRankForm  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run their GPU plans anyway")

# (weight shape, math, rank, multiprocessors): every padded rank class of the plans, lora up to
# 256, tucker up to 32; C without a power-of-two divisor; row counts crossing the block edges
PLANS = {
    "lora_r8_conv": ((45, 6, 3, 3), "lora:exp", 8, 2),
    "lora_r24_linear": ((70, 300), "lora:first_order", 24, 2),
    "lora_r64_linear": ((40, 300), "lora:add", 64, 2),
    "lora_r100_linear": ((37, 150), "lora:exp", 100, 1),
    "lora_r256_linear": ((19, 70), "lora:exp", 256, 2),
    "tucker_r6_conv": ((50, 7, 3, 3), "tucker:exp", 6, 2),
    "tucker_r20_conv": ((45, 20, 3, 1), "tucker:add", 20, 2),
    "tucker_r32_linear": ((40, 200), "tucker:first_order", 32, 3),
    "scales_conv": ((50, 7, 3, 3), "scales_out:mul", 1, 2),
}
# float16 gets float32's plans and products (tf32x3 above rank 32), and only its load differs: slow
DTYPES = [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow), F64]


def make_adapter(key: str, shape, rank: int, seed: int) -> list:
    """Random float32 adapter tensors of ``rank`` (tucker: ``rank`` on the first two modes)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    delta = key.split(":")[0]
    if delta == "tucker":
        ranks = [min(rank, d) for d in shape[:2]] + [min(2, d) for d in shape[2:]]
        tensors = [0.5 * rnd(*ranks)] + [rnd(d, r) / math.sqrt(r) for d, r in zip(shape, ranks)]
    elif delta == "lora":
        tensors = [rnd(shape[0], rank) * 0.3 / math.sqrt(rank), rnd(rank, math.prod(shape[1:])) * 0.3]
    else:
        tensors = [1 + 0.3 * rnd(shape[1]), 1 + 0.3 * rnd(shape[0])]
    return [t.float() for t in tensors]


def gpu_plan(key, shape, rank, dtype, multiprocessors):
    form = LowRankForm(torch.empty(shape, dtype=dtype, device="meta"),
                       [t.to("meta") for t in make_adapter(key, shape, rank, 0)], math_key(key).split(":")[0], 1.0)
    reads_weight = not key.endswith(":add")
    return form, tt.project_plan(form, dtype.itemsize, dtype.itemsize, reads_weight, multiprocessors)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(tt, "_new_buffer", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))
    return tt


def test_the_plans_cover_what_they_claim():
    """The table above reaches every tile class, several row splits, both projections, the GPU's warps."""
    seen = {"rank1": set(), "two_pass": set(), "splits": 0, "warps": set()}
    for shape, key, rank, sms in PLANS.values():
        form, plan = gpu_plan(key, shape, rank, torch.float32, sms)
        seen["rank1"].add(plan.rank1)
        seen["two_pass"].add(plan.left_grid is not None)
        seen["splits"] = max(seen["splits"], plan.grid[1])
        seen["warps"].add(plan.warps)
    assert seen["rank1"] == {16, 32, 64, 128, 256}
    assert seen["two_pass"] == {True, False}
    assert seen["splits"] >= 3 and seen["warps"] == {4, 8}


def test_as_on_gpu_is_scoped_and_checked():
    cpu = torch.device("cpu")
    assert planned_multiprocessors(cpu) is None
    with as_on_gpu(7):
        assert planned_multiprocessors(cpu) == 7
        with as_on_gpu(3):
            assert planned_multiprocessors(cpu) == 3
        assert planned_multiprocessors(cpu) == 7
    assert planned_multiprocessors(cpu) is None
    with pytest.raises(ValueError, match="multiprocessors must be at least 1"):
        with as_on_gpu(0):
            pass


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(PLANS))
def test_gpu_plan_transform_matches_oracle(case, dtype, poisoned):
    shape, key, rank, sms = PLANS[case]
    seed = zlib.crc32(f"{case}-{dtype}".encode())
    weight = _base_weight(shape, dtype, seed)
    adapter = make_adapter(key, shape, rank, seed + 1)
    scale = 1.0 if key.endswith("mul") else 0.7
    spec = methods.AdapterMath.from_key(math_key(key))
    with as_on_gpu(sms):
        for delta_only in (False, True):
            got = poisoned.transform(weight, adapter, math_key(key), scale, delta_only)
            plain = methods.effective_weight(weight, adapter, spec, scale, delta_only)
            ref = oracle_weight(key, weight, adapter, scale, delta_only)
            assert_accuracy(f"W' {case} {dtype} delta_only={delta_only}", got, plain, ref, FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(PLANS))
def test_gpu_plan_project_matches_oracle(case, dtype, poisoned):
    shape, key, rank, sms = PLANS[case]
    seed = zlib.crc32(f"{case}-{dtype}-grad".encode())
    weight, grad = _base_weight(shape, dtype, seed), _base_weight(shape, dtype, seed + 2)
    adapter = make_adapter(key, shape, rank, seed + 1)
    scale = 1.0 if key.endswith("mul") else 0.7
    with as_on_gpu(sms):
        got = poisoned.project(grad, weight, adapter, math_key(key), scale)
    ref = _oracle_grads(key, weight, adapter, scale, grad)
    plain = _plain_grads(key, weight, adapter, scale, grad)
    magnitude = _oracle_grads(key, weight.abs(), [t.abs() for t in adapter], scale, grad.abs())
    for i, (g, p, r, m, t) in enumerate(zip(got, plain, ref, magnitude, adapter)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_accuracy(f"grad[{i}] {case} {dtype}", g, p, r, FLOOR[dtype], m)


def test_gpu_plan_projection_is_bitwise_deterministic():
    shape, key, rank, sms = PLANS["lora_r64_linear"]
    weight, grad = _base_weight(shape, torch.float32, 1), _base_weight(shape, torch.float32, 2)
    adapter = make_adapter(key, shape, rank, 3)
    with as_on_gpu(sms):
        first = tt.project(grad, weight, adapter, key, 0.5)
        again = tt.project(grad, weight, adapter, key, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_one_and_two_pass_projections_agree():
    """The same gradients (up to float32 rounding) whichever pass makes dLoss/dL."""
    shape, key, rank, sms = PLANS["lora_r64_linear"]
    weight, grad = _base_weight(shape, torch.float32, 4), _base_weight(shape, torch.float32, 5)
    adapter = make_adapter(key, shape, rank, 6)
    form, plan = gpu_plan(key, shape, rank, torch.float32, sms)
    assert plan.left_grid is not None
    with as_on_gpu(sms):
        two = tt.project(grad, weight, adapter, key, 0.5)
    one = tt.project(grad, weight, adapter, key, 0.5)  # the interpreter's plan: one pass
    for a, b in zip(one, two):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype,exact,low,high", [(torch.bfloat16, 1e-6, 1e-4, 3e-3),
                                                  (torch.float32, 2e-7, 2.5e-7, 2e-6)], ids=["tf32", "tf32x3"])
def test_interpreted_tensor_core_dots_are_rounded(dtype, exact, low, high):
    """Above rank 32 the kernels' dots run on the tensor cores: tf32 for bfloat16 weights, tf32x3 for
    float32. Their error shows against the float64 oracle (here 7e-4 and 3.6e-7 relative, where
    the interpreter's own exact products give 1.3e-7); at rank 16 (exact products) it does not."""
    shape, key = (40, 64), "lora:first_order"
    weight, grad = _base_weight(shape, dtype, 7), _base_weight(shape, dtype, 8)
    errors = {}
    for rank in (16, 64):
        adapter = make_adapter(key, shape, rank, 9)
        got = tt.project(grad, weight, adapter, key, 0.5)
        errors[rank] = rel_err(got[0], _oracle_grads(key, weight, adapter, 0.5, grad)[0])
    assert tt.dot_precision(dtype, 16) == "ieee" and errors[16] < exact
    assert low < errors[64] < high, errors


def test_recording_launches_nothing_and_lists_the_gpu_plan():
    shape, key, rank, sms = PLANS["lora_r64_linear"]
    weight = torch.empty(shape, device="meta")
    adapter = [t.to("meta") for t in make_adapter(key, shape, rank, 0)]
    with recording(sms) as recorded:
        tt.project(weight, weight, adapter, key, 0.5)
    _, plan = gpu_plan(key, shape, rank, torch.float32, sms)
    assert [c.kernel.__name__ for c in recorded] == ["_project_kernel", "_project_left_kernel"]
    first = recorded[0]
    assert first.num_warps == plan.warps and first.num_stages == plan.stages
    assert first.constexprs["BLOCK_C"] == plan.block_c and first.constexprs["LEFT"] is False
