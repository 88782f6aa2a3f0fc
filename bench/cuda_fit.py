"""How far the cost model's CUDA predictions were from a device run's layer rows, before and after calibration.

From a device run's committed JSON (``bench/gpu_check.py``'s ``layers.json`` and ``calibrate.json``),
each row's :class:`~lrtensor_kernels.strategies.cost.Workload` is built as the layer builds it (the
shape from :data:`bench.suite.SUITE`, the method's options from :data:`bench.suite.METHOD_OPTIONS`,
one forward on the meta device: nothing runs), and one training step of the row's provider is
predicted with two device models:

- ``before``: the constants the run was made with (:data:`BEFORE`, the H100 data sheet's);
- ``after``: ``cost.DEVICES["cuda"]``, which :func:`calibrated_device` derives from the same files:
  the rates, bandwidth and per-call costs that ``bench/calibrate.py`` measured, plus the adapter
  ops' host cost, ``adapter_op_overhead`` = the median over this package's rows of
  ``(measured - predicted device time) / ops``.

Predicted per provider: ``frozen`` = the frozen layer's cost; ``full_ft`` = that plus the weight
gradient; ``torch_lora``/``peft_lora`` = LoRA's chain beside the frozen op in plain PyTorch (the
chain's cost without this package's host cost; on a grouped layer not modelled: their ``A`` is a
dense convolution, this package's a grouped one); ``<method>_triton`` = the strategy the row ran (the
row's ``strategy``, auto's choice on the device). LyCORIS's rows are not modelled (its own code
path). ``python -m bench.cuda_fit [--run DIR] [--out FILE]`` prints the Markdown report
(``bench/results/h200_28b8496/calibration.md`` is its output on that run).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import warnings
from pathlib import Path
from typing import Optional

import torch

import lrtensor_kernels as lk
from lrtensor_kernels.strategies import cost, observing

from . import suite

RUN = Path(__file__).resolve().parent / "results" / "h200_28b8496"

# The CUDA constants before calibration (commit 28b8496): an H100 SXM's data sheet, derated.
BEFORE = cost.DeviceModel(flops={torch.float32: 50e12, torch.float64: 50e12, torch.bfloat16: 450e12,
                                 torch.float16: 450e12}, bandwidth=2.6e12, op_overhead=6e-6, exp_rate=3.7e12)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PLAIN_LORA = ("torch_lora", "peft_lora")


def load(run: Path) -> tuple:
    """``(layers, calibration)``: the layer stage's data and calibrate.json of a device run."""
    layers = json.loads((run / "layers.json").read_text())["data"]
    calibration = json.loads((run / "calibrate.json").read_text())
    return layers, calibration


def measured_device(calibration: dict) -> cost.DeviceModel:
    """The device model of what ``bench/calibrate.py`` measured (no adapter host cost yet), rounded to
    three significant figures; float64's rate and the exponential rate of strategy "fused" stay
    :data:`BEFORE`'s (not measured)."""

    def r3(value: float) -> float:
        return float(f"{value:.3g}")

    flops = {DTYPES[name]: r3(rate) for name, rate in calibration["flops"].items()}
    flops[torch.float64] = BEFORE.flops[torch.float64]
    matmul = {DTYPES[name]: r3(rate) for name, rate in calibration["matmul_rates"].items()}
    return cost.DeviceModel(flops=flops, bandwidth=r3(calibration["bandwidth"]),
                            op_overhead=r3(calibration["op_overhead"]), grouped=r3(calibration["grouped"]),
                            grouped_weight_grad=r3(calibration["grouped_weight_grad"]),
                            conv_overhead=r3(calibration["conv_overhead"]), matmul_flops=matmul,
                            exp_rate=BEFORE.exp_rate)


@functools.lru_cache(maxsize=None)
def workload(shape: suite.Shape, method: str, dtype: torch.dtype, impl: str = "triton") -> cost.Workload:
    """The Workload of one training step of ``method``'s layer on ``shape`` (input requiring grad, adapter
    trained, base frozen) as it runs on CUDA on backend ``impl``; built on the meta device."""
    ctx = suite.Context(torch.device("meta"), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the oversized-adapter warning of tiny probes
        layer = suite.adapter_layer(shape, ctx, method)
    x = torch.empty(shape.input_shape(), device="meta", dtype=dtype, requires_grad=True)
    calls = []
    with observing(lambda call, decision: calls.append(call)), lk.use_backend("reference"):
        layer(x)
    return dataclasses.replace(cost.Workload.of(dataclasses.replace(calls[0], impl=impl)), device_type="cuda")


def step_cost(w: cost.Workload, provider: str, strategy: str) -> Optional[cost.Cost]:
    """The model's cost of one step of ``provider`` on ``w`` (None: not modelled; module doc)."""
    if provider == suite.FLOOR:
        return cost.frozen_cost(w)
    if provider == suite.FULL_FINE_TUNING:
        s = cost._Sizes(w)
        return s.weight_grad_pass(cost.frozen_cost(w))
    if provider in PLAIN_LORA:
        return cost.strategy_cost(w, "bypass") if w.groups == 1 else None
    if suite.adapter_provider_parts(provider) is not None:
        return cost.strategy_cost(w, strategy)
    return None


def predict(layers: dict, after: cost.DeviceModel) -> list:
    """One dict per timed row: shape, provider, strategy, ops, measured ms, and the predicted ms
    ``before``/``after`` (None where not modelled); adapter rows also carry ``device_ms``, the after
    model's time without the adapter host cost, and ``auto_after``, auto's choice under ``after``."""
    shapes = {s.name: s for s in suite.SUITE}
    dtype = DTYPES[layers["meta"]["dtype"]]
    out = []
    for row in layers["results"]:
        if row["status"] != "ok":
            continue
        shape, provider = shapes[row["shape"]], row["provider"]
        parts = suite.adapter_provider_parts(provider)
        method = parts[0] if parts else ("lora" if provider in PLAIN_LORA else "flora")
        impl = "reference" if provider in PLAIN_LORA else "triton"
        w = workload(shape, method, dtype, impl)
        step = step_cost(w, provider, row["strategy"] or "auto")
        no_host = dataclasses.replace(after, adapter_op_overhead=0.0)
        plain = no_host if provider in PLAIN_LORA else after  # plain PyTorch: no adapter host cost
        entry = dict(shape=shape.name, provider=provider, strategy=row["strategy"] or "-",
                     measured_ms=row["ms"]["fwd_bwd"], ops=step.ops if step else None,
                     before_ms=step.seconds(BEFORE, dtype) * 1e3 if step else None,
                     after_ms=step.seconds(plain, dtype) * 1e3 if step else None)
        if parts is not None:
            entry["device_ms"] = step.seconds(no_host, dtype) * 1e3
            entry["auto_after"] = _decide(w, after).strategy
        out.append(entry)
    return out


def _decide(w: cost.Workload, device: cost.DeviceModel) -> cost.Decision:
    """auto's decision for ``w`` on ``device`` (instead of ``cost.DEVICES``'s)."""
    saved = cost.DEVICES["cuda"]
    cost.DEVICES["cuda"] = device
    try:
        return cost.decide(w, "auto")  # the cost model itself, not the memo of its decisions
    finally:
        cost.DEVICES["cuda"] = saved


def fit_adapter_op_overhead(rows: list) -> float:
    """The median over the adapter rows of (measured - device time) / ops, in seconds, to 2 figures."""
    per_op = [(r["measured_ms"] - r["device_ms"]) / r["ops"] * 1e-3 for r in rows if "device_ms" in r]
    return float(f"{statistics.median(per_op):.2g}")


def calibrated_device(layers: dict, calibration: dict) -> cost.DeviceModel:
    """The device model :data:`cost.DEVICES` ``["cuda"]`` should hold: the measured constants plus the
    fitted adapter host cost."""
    measured = measured_device(calibration)
    return dataclasses.replace(measured, adapter_op_overhead=fit_adapter_op_overhead(predict(layers, measured)))


def _geomean_factor(ratios: list) -> float:
    """exp(mean |log r|): the typical factor a prediction is off by, either way."""
    return math.exp(sum(abs(math.log(r)) for r in ratios) / len(ratios))


def report(run: Path = RUN) -> str:
    """The Markdown report of measured vs predicted steps, before and after calibration."""
    layers, calibration = load(run)
    device = calibrated_device(layers, calibration)
    rows = predict(layers, device)
    meta = layers["meta"]
    lines = [f"# Cost model vs the layer rows: {meta['device']} (`{run.name}`)", "",
             f"Measured: one training step (forward + backward, median of {meta['repeats']} after "
             f"{meta['warmup']} warm-up runs, {meta['timer']}), {meta['dtype']}, torch {meta['torch']}, "
             f"triton {meta.get('triton', '?')}. Predicted by `python -m bench.cuda_fit` (bench/cuda_fit.py) "
             "from the same shapes: `before` with the H100 data-sheet constants the run used, `after` with "
             "the calibrated `cost.DEVICES[\"cuda\"]`. ratio = predicted / measured (1.00 = exact). "
             "`device` = the after model without the adapter ops' host cost. "
             "`auto after`: the strategy auto picks under the calibrated constants.", "",
             f"Calibrated constants: {_describe(device)}.", "",
             "| shape | provider | strategy run | ops | measured ms | before ms | ratio | after ms | ratio "
             "| device ms | auto after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["before_ms"] is None:
            lines.append(f"| {r['shape']} | {r['provider']} | {r['strategy']} | - | {r['measured_ms']:.3f} "
                         "| not modelled | | | | | |")
            continue
        device_ms = f"{r['device_ms']:.3f}" if "device_ms" in r else ""
        lines.append(f"| {r['shape']} | {r['provider']} | {r['strategy']} | {r['ops']} | {r['measured_ms']:.3f} "
                     f"| {r['before_ms']:.3f} | {r['before_ms'] / r['measured_ms']:.2f} | {r['after_ms']:.3f} "
                     f"| {r['after_ms'] / r['measured_ms']:.2f} | {device_ms} | {r.get('auto_after', '')} |")
    lines += ["", "Typical factor off, exp(mean |log(predicted / measured)|) (1.00 = exact):", "",
              "| rows | count | before | after |", "|---|---|---|---|"]
    groups = {"baselines (frozen, full_ft, plain LoRA)": [r for r in rows if "device_ms" not in r],
              "this package's layers (triton, auto)": [r for r in rows if "device_ms" in r]}
    groups["all modelled"] = groups["baselines (frozen, full_ft, plain LoRA)"] + groups[
        "this package's layers (triton, auto)"]
    for name, group in groups.items():
        group = [r for r in group if r["before_ms"] is not None]
        before = _geomean_factor([r["before_ms"] / r["measured_ms"] for r in group])
        after = _geomean_factor([r["after_ms"] / r["measured_ms"] for r in group])
        lines.append(f"| {name} | {len(group)} | {before:.2f} | {after:.2f} |")
    changed = [r for r in rows if "auto_after" in r and r["auto_after"] != r["strategy"]]
    lines += ["", "Rows where auto's choice changes under the calibrated constants: " + (
        ", ".join(f"{r['shape']} {r['provider']} ({r['strategy']} -> {r['auto_after']})" for r in changed)
        or "none") + "."]
    return "\n".join(lines) + "\n"


def _describe(d: cost.DeviceModel) -> str:
    def rates(table: dict) -> str:
        return ", ".join(f"{str(k).replace('torch.', '')} {v:.3g}" for k, v in table.items())

    return (f"conv FLOP/s {rates(d.flops)}; matmul FLOP/s {rates(d.matmul_flops)}; bandwidth {d.bandwidth:.3g} B/s; "
            f"depthwise {d.grouped:.3g} (forward, input gradient) and {d.grouped_weight_grad:.3g} (weight gradient) "
            f"FLOP/s; op_overhead {d.op_overhead * 1e6:.3g} us; conv_overhead {d.conv_overhead * 1e6:.3g} us; "
            f"adapter_op_overhead {d.adapter_op_overhead * 1e6:.3g} us")


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=RUN, help="a device run's results folder")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    text = report(args.run)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
