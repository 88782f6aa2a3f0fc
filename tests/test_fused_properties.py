"""Property tests: the fused transform and projection on random weight shapes, ranks and methods."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fused import FUSED_BACKENDS, fused_kernels
from lrtensor_kernels import methods
from oracle import F64, assert_accuracy
from test_fused_kernels import DEVICE, FLOOR, _oracle_grads, _plain_grads, oracle_weight

KEYS = ["tucker:add", "tucker:exp", "tucker:first_order", "lora:exp", "lora:first_order", "scales:mul",
        "scales_out:mul"]


@st.composite
def cases(draw):
    order = draw(st.integers(2, 5))
    shape = tuple(draw(st.integers(1, 40 if i < 2 else 4)) for i in range(order))
    key = draw(st.sampled_from(KEYS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    delta = key.split(":")[0]
    if delta == "tucker":
        ranks = [draw(st.integers(1, d)) for d in shape]
        adapter = [0.5 * rnd(*ranks)] + [rnd(d, r) / math.sqrt(r) for d, r in zip(shape, ranks)]
    elif delta == "lora":
        r = draw(st.integers(1, 20))
        adapter = [0.3 * rnd(shape[0], r), 0.3 * rnd(r, math.prod(shape[1:])) / math.sqrt(r)]
    else:
        adapter = [1 + 0.3 * rnd(shape[1])] + ([1 + 0.3 * rnd(shape[0])] if delta == "scales_out" else [])
    weight = 0.5 * rnd(*shape)
    grad = rnd(*shape)
    scale = 1.0 if key.endswith("mul") else draw(st.floats(0.1, 2.0))
    return key, weight, [t.float().to(DEVICE) for t in adapter], grad, scale


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_transform_and_projection_match_oracle_on_any_shape(backend, case, dtype):
    kernels = fused_kernels(backend)
    key, weight, adapter, grad, scale = case
    math_key = key.replace("scales_out", "scales")
    weight, grad = weight.to(dtype).to(DEVICE), grad.to(dtype).to(DEVICE)
    spec = methods.AdapterMath.from_key(math_key)
    # a W' the dtype cannot hold (exp of a heavy-tailed product) tests nothing about the kernel
    assume(oracle_weight(key, weight, adapter, scale).abs().max() < torch.finfo(dtype).max / 4)
    for delta_only in (False, True):
        got = kernels.transform(weight, adapter, math_key, scale, delta_only)
        plain = methods.effective_weight(weight, adapter, spec, scale, delta_only)
        ref = oracle_weight(key, weight, adapter, scale, delta_only)
        assert_accuracy(f"W' {key} {tuple(weight.shape)}", got, plain, ref, FLOOR[dtype])
    got = kernels.project(grad, weight, adapter, math_key, scale)
    ref = _oracle_grads(key, weight, adapter, scale, grad)
    plain = _plain_grads(key, weight, adapter, scale, grad)
    magnitude = _oracle_grads(key, weight.abs(), [t.abs() for t in adapter], scale, grad.abs())
    for i, (g, p, r, m) in enumerate(zip(got, plain, ref, magnitude)):
        assert_accuracy(f"grad[{i}] {key} {tuple(weight.shape)}", g, p, r, FLOOR[dtype], m)
