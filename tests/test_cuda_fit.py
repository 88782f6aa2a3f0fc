"""bench/cuda_fit.py: the CUDA constants are what the committed device run says, its report reproduces
the committed Markdown, the fit recovers a known host cost, and the model's two new terms (a linear
layer's matmul rate, the adapter ops' host cost) act where they should and nowhere else."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from bench import cuda_fit, suite
from lrtensor_kernels.strategies import cost


@pytest.fixture(scope="module")
def run():
    return cuda_fit.load(cuda_fit.RUN)


def test_cuda_constants_are_the_committed_runs(run):
    assert cost.DEVICES["cuda"] == cuda_fit.calibrated_device(*run)


def test_report_reproduces_the_committed_markdown():
    assert cuda_fit.report() == (cuda_fit.RUN / "calibration.md").read_text()


def test_calibration_brings_the_predictions_closer(run):
    layers, calibration = run
    rows = [r for r in cuda_fit.predict(layers, cuda_fit.calibrated_device(*run)) if r["before_ms"] is not None]
    assert len(rows) >= 30
    before = cuda_fit._geomean_factor([r["before_ms"] / r["measured_ms"] for r in rows])
    after = cuda_fit._geomean_factor([r["after_ms"] / r["measured_ms"] for r in rows])
    assert after < 0.5 * before


def test_fit_recovers_a_known_host_cost(run):
    layers, calibration = run
    device = cuda_fit.measured_device(calibration)
    planted = copy.deepcopy(layers)
    known = 120e-6  # two figures, as the fit rounds
    predicted = {(r["shape"], r["provider"]): r for r in cuda_fit.predict(layers, device)}
    for row in planted["results"]:
        r = predicted.get((row["shape"], row["provider"]))
        if r is not None and "device_ms" in r:
            row["ms"]["fwd_bwd"] = r["device_ms"] + r["ops"] * known * 1e3
    assert cuda_fit.fit_adapter_op_overhead(cuda_fit.predict(planted, device)) == pytest.approx(known)
    assert cuda_fit.calibrated_device(planted, calibration).adapter_op_overhead == pytest.approx(known)


def _linear_workload(method: str = "flora") -> cost.Workload:
    return cuda_fit.workload(suite.linear("t", 256, 256, 64), method, torch.bfloat16)


def test_adapter_host_cost_is_charged_per_adapter_op_and_never_to_the_frozen_layer():
    w = _linear_workload()
    plain = dataclasses.replace(cost.DEVICES["cuda"], adapter_op_overhead=0.0)
    host = dataclasses.replace(plain, adapter_op_overhead=1e-3)
    frozen = cost.frozen_cost(w)
    assert frozen.seconds(host, w.dtype) == frozen.seconds(plain, w.dtype)
    for strategy in cost.applicable(w.math):
        c = cost.strategy_cost(w, strategy)
        assert c.seconds(host, w.dtype) - c.seconds(plain, w.dtype) == pytest.approx(c.ops * 1e-3)


def test_a_linear_layers_matmuls_run_at_the_matmul_rate():
    w = _linear_workload()
    frozen = cost.frozen_cost(w)
    assert frozen.matmul_flops == frozen.flops > 0
    slow = dataclasses.replace(cost.DEVICES["cuda"], matmul_flops=None)
    fast = dataclasses.replace(cost.DEVICES["cuda"], matmul_flops={torch.bfloat16: 2 * slow.flop_rate(torch.bfloat16)})
    saved = frozen.flops / slow.flop_rate(torch.bfloat16) / 2
    assert frozen.seconds(slow, w.dtype) - frozen.seconds(fast, w.dtype) == pytest.approx(saved)
    conv = cuda_fit.workload(suite.conv("c", 8, 8, 8, 2), "flora", torch.bfloat16)
    assert cost.frozen_cost(conv).matmul_flops == 0.0
