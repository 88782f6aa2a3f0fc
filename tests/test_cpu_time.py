"""bench/cpu_time.py: the time model it fits is the cost model's own, the fit recovers known
constants, the rows it measures, and one measured row end to end (tiny, untimed assertions only)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from bench import cpu_time, suite
from lrtensor_kernels import strategies
from lrtensor_kernels.strategies import cost


def _workloads() -> list:
    """What the cost model sees of a few layers' calls (every applicable strategy is costed from these)."""
    layers = [(lk.FLoRAConv2d(16, 24, 3, padding=1), (2, 16, 9, 9)),
              (lk.FLoRAConv2d(32, 64, 1, stride=2), (2, 32, 8, 8)),
              (lk.SSBConv2d(12, 12, 5, padding=2, groups=12), (2, 12, 9, 9)),
              (lk.LieRALinear(40, 24, rank=4), (10, 40)),
              (lk.FLoRALinear(40, 24), (10, 40)),
              (lk.LoRAConv2d(16, 24, 3, padding=1, rank=4), (2, 16, 9, 9))]
    seen = []

    def observe(call, decision):
        seen.append(cost.Workload.of(call))

    with strategies.observing(observe), lk.use_backend("reference"):
        for layer, shape in layers:
            layer(torch.randn(shape, requires_grad=True))
    return [dataclasses.replace(w, impl=impl) for w in seen for impl in ("reference", "native")]


def test_the_fitted_formula_is_the_cost_models():
    """features_seconds (what the fit multiplies by its constants) gives Cost.seconds for every
    strategy, backend and layer kind: a term added to one and not the other fails here."""
    device = dataclasses.replace(cost.device_model("cpu"), fresh_byte_cost=2e-10, adapter_op_overhead=3e-6,
                                 matmul_flops={torch.float32: 90e9}, narrow=90e9)  # every constant non-zero
    assert all(v for k, v in dataclasses.asdict(device).items() if k != "calibrated")  # a flag, not a term
    checked = 0
    for w in _workloads():
        costs = [cost.frozen_cost(w), cost.full_fine_tuning_cost(w)] + [cost.strategy_cost(w, s) for s in
                                                                          cost.applicable(w.math)]
        costs.append(cost.fused_form(w)[1])  # strategy "fused" priced in the same terms
        for c in costs:
            want = c.seconds(device, torch.float32)
            assert cpu_time.features_seconds(cpu_time.cost_features(c), device) == pytest.approx(want, rel=1e-9)
            assert sum(c.seconds_by_part(device, torch.float32).values()) == pytest.approx(want, rel=1e-12)
            checked += 1
    assert checked > 40


def test_the_fit_recovers_known_constants():
    """Steps timed by a known device model are fitted back to its constants."""
    known = dataclasses.replace(cost.device_model("cpu"), fresh_byte_cost=2e-10)
    rows = [{"name": f"w{i}", "cells": {}} for i in range(3)]
    for i, w in enumerate(_workloads()):
        for j, strategy in enumerate(cost.applicable(w.math)):
            c = cost.strategy_cost(w, strategy)
            seconds = cpu_time.features_seconds(cpu_time.cost_features(c), known)
            rows[i % 3]["cells"][f"{i}-{j}"] = {"min_ms": seconds * 1e3, "features": cpu_time.cost_features(c)}
    fit = cpu_time.fit_constants(rows)
    assert fit["abs_log_error_median"] < 1e-6 and fit["within_25pct"] == 1.0
    # constants that the workloads pin down come back (the others are not identifiable from so few)
    assert fit["constants"]["fresh_byte_cost"] == pytest.approx(2e-10, rel=1e-3)


def test_resnet18_rows_are_its_distinct_convolutions():
    rows = cpu_time.resnet18_rows()
    assert sum(count for _, count, _ in rows) == 20  # the convolutions of ResNet-18
    assert len(rows) == 11
    stem = [shape for shape, _, input_grad in rows if not input_grad]
    assert [s.name for s in stem] == ["resnet18/conv1"] and stem[0].kernel == 7 and stem[0].size == 112


@pytest.mark.parametrize("name, shapes, want", [
    ("aten::mkldnn_convolution", [], "convolution"),
    ("aten::mm", [(3, 4)], "matmul"),
    ("lrtensor::lowrank_transform", [(64, 9)], "native kernels"),
    ("aten::mul", [(2, 8, 10, 10)], "activation-sized passes"),
    ("aten::mul", [(8, 8, 3, 3)], "weight-sized passes"),
    ("aten::add", [(4,)], "everything else"),
])
def test_profiled_ops_fall_in_their_category(name, shapes, want):
    assert cpu_time.categorize(name, shapes, weight_numel=576, activation_numel=1600) == want


def test_one_row_end_to_end():
    """A tiny row through the whole layer part: every provider measured, predicted where modelled,
    auto compared with the forced strategies, the summary and the Markdown written."""
    shape, count, input_grad = cpu_time.tiny_rows()[0]
    row = cpu_time.measure_row(shape, count, input_grad, suite.Context(torch.device("cpu"), torch.float32),
                               rounds=1, per_round=1, methods=("flora", "ssl"))
    cells = row["cells"]
    assert {"frozen", "full_ft", "flora_reference:hybrid", "flora_auto:auto", "ssl_native:bypass"} <= set(cells) or \
        not lk.backend.native_available()
    assert all(c["ms"] > 0 and math.isfinite(c["ms"]) for c in cells.values())
    assert all("predicted_ms" in c for n, c in cells.items() if n != "peft_lora")
    assert set(row["auto"]) == {"flora", "ssl"}
    assert cells["flora_auto:auto"]["ran_on"] in ("native", "reference")
    summary = cpu_time.layer_summary([row])
    assert summary["rows_over_1ms"] == 0
    text = cpu_time.layers_markdown([row], summary, {"cpu": "x", "torch": "y", "threads": 1, "clock": "c",
                                                     "rounds": 1, "per_round": 1, "load_average": 0, "commit": "z"})
    assert "| tiny/3x3_8-8_6 |" in text


def test_auto_against_forced_tells_noise_from_a_wrong_choice():
    """auto 20% over the fastest forced cell counts as a miss of the model only where that cell ran
    another strategy or backend; on the same path the difference is the measurement's."""
    def cell(ms, backend, strategy, ran, ran_on):
        return {"ms": ms, "method": "flora", "backend": backend, "strategy": strategy, "ran": ran, "ran_on": ran_on}

    same = {"flora_auto:auto": cell(1.2, "auto", "auto", "merged", "reference"),
            "flora_reference:merged": cell(1.0, "reference", "merged", "merged", "reference"),
            "flora_native:merged": cell(1.1, "native", "merged", "merged", "native")}
    other = dict(same, **{"flora_native:bypass": cell(0.9, "native", "bypass", "bypass", "native")})
    rows = []
    for cells in (same, other):
        verdict = cpu_time.auto_against_forced(cells, ("flora",))["flora"]
        rows.append({"cells": {"frozen": {"ms": 2.0}, **cells}, "auto": {"flora": verdict}})
    assert [r["auto"]["flora"]["same_path"] for r in rows] == [True, False]
    assert rows[1]["auto"]["flora"]["best"] == "flora_native:bypass"
    summary = cpu_time.layer_summary(rows)
    assert summary["auto_cells_within_10pct"] == "0/2" and summary["auto_misses_on_another_path"] == 1


@pytest.mark.parametrize("argv", [["--part", "both"], ["--part", "layers,resnet"], ["--rows", "resnet18/*"]])
def test_a_part_or_row_that_selects_nothing_is_an_error(argv, capsys):
    """A run that would measure nothing says so instead of writing empty results."""
    with pytest.raises(SystemExit) as exit_info:
        cpu_time.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("--part takes" if "--part" in argv else "matches no row") in err
