"""CPU step time against the cost model: per layer, strategy and backend, and a whole ResNet-18.

Two parts, each one command, each writing JSON and Markdown next to ``--out``:

- ``layers``: one training step (forward + backward, input requiring grad, as inside a network) of
  every bench row (the suite's CPU-scaled layers) and of every distinct convolution of a
  ResNet-18 on an 8x3x112x112 batch, for the frozen layer, full fine-tuning, real PEFT LoRA r8
  (where ``peft`` imports) and every method on every CPU backend under every strategy, forced and
  under ``auto``. Each cell: the measured time, the cost model's prediction for what ran, and
  their ratio; per row, ``auto``'s choice (strategy and backend) against the fastest forced one.
  ``--profile`` adds where the time went (torch.profiler, one provider per method).
- ``resnet18``: one training step (AdamW, cross entropy) of a ResNet-18 (torchvision's where it
  imports, else the same convolutions written out in tests/models.py) on 8x3x112x112, every
  convolution adapted and the classifier trained in full, against training the classifier alone:
  full fine-tuning, PEFT LoRA r8, this package's LoRA (r8, PEFT's defaults), FLoRA (auto, default
  ranks and at LoRA r8's parameter budget, and merged), LieRA r8, SSL, SSB; with the FLOPs of each at 224x224, batch 2.
  Each config runs in a worker process of its own (bench/isolated.py: in one process the configs
  would share the C library's heap, and which of them pays for page faults would depend on the
  order), with its page faults and kernel time per step; ``--allocator keep-freed`` runs the
  workers with glibc's trimming off.

The clock: with one thread (the default) the calling thread's CPU time (``time.thread_time``),
which other processes on a shared machine do not inflate by preempting it; with more threads the
wall clock. Every provider of a row (every config of the model) runs its steps in turn in each of
``--rounds`` interleaved rounds; a cell is the median over rounds.

Run: ``python -m bench.cpu_time`` (both parts), ``--part layers --rows resnet18`` and so on.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import lrtensor_kernels as lk
from bench import isolated, suite, timing
from lrtensor_kernels import strategies
from lrtensor_kernels.strategies import cost

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "cpu_time.json"
BACKENDS = ("reference", "native")
LORA_RANK = 8
RESNET_BATCH, RESNET_SIZE = 8, 112
BIG_ROW_MS = 1.0  # the model's accuracy target applies to rows whose frozen step takes longer


# ---------------------------------------------------------------------------------------------
# rows: the suite's CPU-scaled layers and ResNet-18's convolutions
# ---------------------------------------------------------------------------------------------


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 where it imports, else the same layers written out (tests/models.py)."""
    torch.manual_seed(0)
    try:
        import torchvision

        return torchvision.models.resnet18(num_classes=num_classes)
    except ImportError:
        spec = importlib.util.spec_from_file_location("_lk_test_models", BENCH_DIR.parent / "tests" / "models.py")
        models = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(models)
        return models.ResNet18(num_classes)


def resnet18_source() -> str:
    return "torchvision" if importlib.util.find_spec("torchvision") else "tests/models.py (torchvision's layers)"


def resnet18_rows(batch: int = RESNET_BATCH, size: int = RESNET_SIZE) -> list:
    """``(shape, count, input_grad)`` of every distinct convolution of ResNet-18 on a ``batch`` x 3 x
    ``size`` x ``size`` input, as bench shapes named ``resnet18/<first layer>`` (``count``: how many
    layers share it; ``input_grad``: False for the stem, whose input, the image, needs none)."""
    model, seen = resnet18(), {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(mod, args, name=name):
                x = args[0]
                shape = suite.conv(f"resnet18/{name}", mod.in_channels, mod.out_channels, x.shape[-1], x.shape[0],
                                   kernel=mod.kernel_size[0], stride=mod.stride[0], padding=mod.padding[0])
                key = dataclasses.replace(shape, name="")
                seen.setdefault(key, [shape, 0])[1] += 1
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.eval()(torch.zeros(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return [(shape, count, shape.in_features != 3) for shape, count in seen.values()]


def suite_rows() -> list:
    """The bench suite's layers, CPU-scaled, with their input requiring grad (as the bench runs them)."""
    return [(suite.scaled_for_cpu(shape), 1, True) for shape in suite.SUITE]


def tiny_rows() -> list:
    """Layers so small that a step is its fixed costs: they calibrate the per-call constants."""
    return [(suite.conv("tiny/3x3_8-8_6", 8, 8, 6, 2), 1, True),
            (suite.conv("tiny/1x1_8-8_6", 8, 8, 6, 2, kernel=1), 1, True),
            (suite.linear("tiny/linear_16-16_t8", 16, 16, 8), 1, True)]


def select_rows(patterns: Optional[list]) -> list:
    rows = tiny_rows() + suite_rows() + resnet18_rows()
    if patterns:
        rows = [row for row in rows if any(p in row[0].name for p in patterns)]
    return rows


# ---------------------------------------------------------------------------------------------
# providers of the layer part
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Provider:
    """One way to train one row's layer: what to time, and what the cost model is asked about."""

    name: str
    forward: Callable
    trainable: list
    method: str = ""
    backend: str = ""  # "reference", "native" or "auto" (the cost model's choice)
    strategy: str = ""  # as set on the layer; "auto" for the cost model's choice
    layer: Optional[nn.Module] = None


def _adapter_provider(shape, ctx, method: str, backend: str, strategy: str) -> Provider:
    layer = suite.adapter_layer(shape, ctx, method, strategy)
    return Provider(f"{method}_{backend}:{strategy}", suite.on_backend(layer, backend), layer.adapter_parameters(),
                    method, backend, strategy, layer)


def _peft_provider(shape, ctx) -> Optional[Provider]:
    """PEFT's LoRA (rank 8, alpha 8) on the frozen layer, A and B randomised; None without peft."""
    if importlib.util.find_spec("peft") is None:
        return None
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Sequential(suite.freeze(suite.base_module(shape, ctx)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed + 3)
        try:
            holder = inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["0"]),
                                             holder)
        except ValueError:  # PEFT refuses grouped convolutions whose groups do not divide the rank
            return None
    trainable = [p for n, p in holder.named_parameters() if "lora_" in n]
    suite.perturb(trainable, ctx)
    return Provider("peft_lora", holder, trainable)


def providers(shape: suite.Shape, ctx: suite.Context, methods=suite.METHODS, backends=BACKENDS) -> list:
    """frozen, full_ft, peft_lora (where installed), then every method on every backend under every
    strategy it can run, and under auto on the "auto" backend (the cost model's choice of both)."""
    frozen, full = suite.setup_frozen(shape, ctx), suite.setup_full_ft(shape, ctx)
    out = [Provider("frozen", frozen.forward, frozen.trainable), Provider("full_ft", full.forward, full.trainable)]
    peft = _peft_provider(shape, ctx)
    if peft is not None:
        out.append(peft)
    for method in methods:
        for backend in backends:
            for strategy in suite.method_strategies(method):
                out.append(_adapter_provider(shape, ctx, method, backend, strategy))
        out.append(_adapter_provider(shape, ctx, method, "auto", "auto"))
    return out


def what_runs(provider: Provider, x: torch.Tensor) -> tuple:
    """``(workload, decision)`` of the provider's layer on ``x`` (one forward, observed)."""
    seen = []

    def observe(call, decision):
        seen.append((cost.Workload.of(call), decision))

    with strategies.observing(observe):
        provider.forward(x)
    return seen[0]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def interleaved(steps: dict, rounds: int, per_round: int, warmup: int = 2) -> dict:
    """``{name: [seconds per step, one per round]}``: every step runs ``per_round`` times in turn in
    each round (after ``warmup`` untimed runs each), so that load that comes and goes spreads over
    all of them alike."""
    now = isolated.clock()
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples = defaultdict(list)
    for _ in range(rounds):
        for name, step in steps.items():
            start = now()
            for _ in range(per_round):
                step()
            samples[name].append((now() - start) / per_round)
    return dict(samples)


def layer_step(forward, x: torch.Tensor, grad_out: torch.Tensor, trainable: list) -> Callable[[], None]:
    """One step: forward, and the backward from ``grad_out`` where anything needs a gradient (a
    frozen layer whose input needs none has no backward)."""
    step = timing.Step(forward, x, grad_out, trainable)

    def run():
        step.clear_grads()
        y = forward(x)
        if y.requires_grad:
            y.backward(grad_out)

    return run


# ---------------------------------------------------------------------------------------------
# where the time went: torch.profiler self times by category
# ---------------------------------------------------------------------------------------------

CATEGORIES = ("convolution", "matmul", "native kernels", "weight-sized passes", "activation-sized passes",
              "everything else")


def categorize(name: str, shapes: list, weight_numel: int, activation_numel: int) -> str:
    """The category of one profiled op: by name for convolutions, matmuls and the native kernels;
    elementwise ops by the size of their largest input (an activation's, a weight's, or less)."""
    if "conv" in name:
        return "convolution"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"):
        return "matmul"
    if name.startswith("lrtensor::"):
        return "native kernels"
    largest = max((math.prod(s) for s in shapes if s), default=0)
    if activation_numel and largest >= 0.5 * activation_numel:
        return "activation-sized passes"
    if weight_numel and largest >= 0.5 * weight_numel:
        return "weight-sized passes"
    return "everything else"


def profile_step(run: Callable[[], None], weight_numel: int, activation_numel: int, steps: int = 3) -> dict:
    """Milliseconds per step by category (profiled self CPU time; the profiler's own per-op cost
    inflates small ops)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            run()
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if event.self_cpu_time_total <= 0:
            continue
        shapes = [tuple(s) for s in (event.input_shapes or []) if isinstance(s, (list, tuple))]
        kind = categorize(event.name, shapes, weight_numel, activation_numel)
        totals[kind] += event.self_cpu_time_total / 1e3 / steps
    return totals


# ---------------------------------------------------------------------------------------------
# the layer part
# ---------------------------------------------------------------------------------------------


def predicted_seconds(work: cost.Workload, strategy: str) -> float:
    return cost.strategy_cost(work, strategy).seconds(cost.device_model(work.device_type), work.dtype)


def cost_features(c: cost.Cost) -> dict:
    """What the time model multiplies by its constants, for one estimate (see cost.Cost.seconds)."""
    return {"dense_flops": (c.flops - c.grouped_flops - c.grouped_weight_grad_flops - c.matmul_flops
                            - c.narrow_flops),
            "matmul_flops": c.matmul_flops, "narrow_flops": c.narrow_flops, "grouped_flops": c.grouped_flops,
            "grouped_weight_grad_flops": c.grouped_weight_grad_flops, "bytes": c.bytes, "ops": c.ops,
            "conv_calls": c.conv_calls, "spatial_conv_calls": c.spatial_conv_calls, "exp_elements": c.exp_elements,
            "fresh_bytes": c.fresh_bytes,
            "call": f"{c.kind}/{'fused' if c.fused else 'reference'}"}


def cell_cost(cell_name: str, work: cost.Workload, strategy: Optional[str]) -> cost.Cost:
    if cell_name == "frozen":
        return cost.frozen_cost(work)
    if cell_name == "full_ft":
        return cost.full_fine_tuning_cost(work)
    return cost.strategy_cost(work, strategy)


def measure_row(shape: suite.Shape, count: int, input_grad: bool, ctx: suite.Context, rounds: int,
                per_round: int, methods=suite.METHODS, profile_methods=()) -> dict:
    """Every provider on one row: measured and predicted ms, what ran; auto against the best forced."""
    x, grad_out = suite.make_inputs(shape, ctx)
    x.requires_grad_(input_grad)
    provs = providers(shape, ctx, methods)
    facts = {}
    for p in provs:
        if p.layer is not None:
            work, decision = what_runs(p, x)
            facts[p.name] = (work, decision)
    steps = {p.name: layer_step(p.forward, x, grad_out, p.trainable) for p in provs}
    samples = interleaved(steps, rounds, per_round)
    any_work = next(iter(facts.values()))[0]
    plain_work = dataclasses.replace(any_work, impl="reference")
    cells = {}
    device = cost.device_model("cpu")
    for p in provs:
        ms = statistics.median(samples[p.name]) * 1e3
        cell = {"ms": ms, "min_ms": min(samples[p.name]) * 1e3, "samples_ms": [s * 1e3 for s in samples[p.name]]}
        estimate = None
        if p.name in facts:
            work, decision = facts[p.name]
            cell.update(method=p.method, backend=p.backend, strategy=p.strategy, ran=decision.strategy,
                        ran_on=work_backend(work))
            estimate = cell_cost(p.name, work, decision.strategy)
        elif p.name in ("frozen", "full_ft"):
            estimate = cell_cost(p.name, plain_work, None)
        if estimate is not None:
            cell["predicted_ms"] = estimate.seconds(device, torch.float32) * 1e3
            cell["predicted_parts_ms"] = {k: v * 1e3 for k, v in estimate.seconds_by_part(device, torch.float32).items()}
            cell["features"] = cost_features(estimate)
        cells[p.name] = cell
    row = {"name": shape.name, "description": shape.describe(), "count": count, "input_grad": input_grad,
           "cells": cells,
           "auto": auto_against_forced(cells, methods)}
    if profile_methods:
        weight_numel = shape.weight_numel()
        activation_numel = min(math.prod(shape.input_shape()), math.prod(shape.output_shape()))
        row["profile_ms"] = {p.name: profile_step(steps[p.name], weight_numel, activation_numel)
                             for p in provs if p.name in ("frozen", "full_ft") or (
                                 p.method in profile_methods and p.backend == "auto")}
    return row


def work_backend(work: cost.Workload) -> str:
    return "native" if work.fused else "reference"


def auto_against_forced(cells: dict, methods) -> dict:
    """Per method: auto's time over the fastest forced backend x strategy in the same run, and
    whether that cell ran what auto ran (``same_path``: the same strategy on the same backend, so
    that their difference is the measurement's noise, not a wrong choice)."""
    out = {}
    for method in methods:
        forced = {n: c["ms"] for n, c in cells.items() if c.get("method") == method and c["backend"] != "auto"}
        auto = cells.get(f"{method}_auto:auto")
        if not forced or auto is None:
            continue
        best = min(forced, key=forced.get)
        same = (cells[best]["ran"], cells[best]["ran_on"]) == (auto["ran"], auto["ran_on"])
        out[method] = {"auto_ms": auto["ms"], "auto_ran": f"{auto['ran']} on {auto['ran_on']}", "best": best,
                       "best_ms": forced[best], "ratio": auto["ms"] / forced[best], "same_path": same}
    return out


def layer_summary(rows: list) -> dict:
    """Prediction error and auto's excess over the rows whose frozen step is over BIG_ROW_MS: the
    error of every cell's prediction against its median and its minimum over the rounds (the
    minimum is the least disturbed by other processes), and auto's time over the fastest forced
    backend x strategy of the same method, in medians."""
    big = [r for r in rows if r["cells"]["frozen"]["ms"] > BIG_ROW_MS]
    out = {"rows_over_1ms": len(big)}
    for statistic in ("ms", "min_ms"):
        ratios = [c["predicted_ms"] / c[statistic] for r in big for c in r["cells"].values() if "predicted_ms" in c]
        within = sum(abs(math.log(q)) <= math.log(1.25) for q in ratios)
        label = "median" if statistic == "ms" else "min"
        out[f"predicted_over_measured_{label}"] = statistics.median(ratios) if ratios else None
        out[f"abs_log_error_{label}"] = statistics.median(abs(math.log(q)) for q in ratios) if ratios else None
        out[f"cells_within_25pct_{label}"] = f"{within}/{len(ratios)}"
    chosen = [a for r in big for a in r["auto"].values()]
    autos = [a["ratio"] for a in chosen]
    out.update(auto_over_best_geomean=math.exp(statistics.fmean(math.log(a) for a in autos)) if autos else None,
               auto_over_best_max=max(autos) if autos else None,
               auto_cells_within_10pct=f"{sum(a <= 1.10 for a in autos)}/{len(autos)}",
               auto_misses_on_another_path=sum(a["ratio"] > 1.10 and not a.get("same_path", False) for a in chosen))
    return out


def layers_markdown(rows: list, summary: dict, meta: dict) -> str:
    lines = [f"# CPU step time per layer: measured against the cost model", "", _meta_line(meta), "",
             "Per row and method: auto's choice (strategy, backend), its measured ms, the fastest forced "
             "backend x strategy, auto / fastest (\"same path\": the fastest forced cell ran auto's strategy "
             "on auto's backend); then every cell as measured ms / predicted ms.", ""]
    lines += ["| row | frozen ms (pred) | method | auto ran | auto ms | fastest forced | ms | auto / fastest |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frozen = r["cells"]["frozen"]
        for method, a in r["auto"].items():
            lines.append(f"| {r['name']} | {frozen['ms']:.2f} ({frozen['predicted_ms']:.2f}) | {method} | "
                         f"{a['auto_ran']} | {a['auto_ms']:.2f} | {a['best'].split('_', 1)[1]} | {a['best_ms']:.2f} | "
                         f"{a['ratio']:.2f}{' (same path)' if a.get('same_path') else ''} |")
    lines += ["", "Every cell: measured ms / predicted ms.", ""]
    names = list(dict.fromkeys(n for r in rows for n in r["cells"]))
    lines += ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            c = r["cells"].get(n)
            if c is None:
                cells.append("-")
            elif "predicted_ms" in c:
                cells.append(f"{c['ms']:.2f} / {c['predicted_ms']:.2f}")
            else:
                cells.append(f"{c['ms']:.2f}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Summary (rows whose frozen step is over 1 ms): " + ", ".join(f"{k} {_fmt(v)}" for k, v in
                                                                              summary.items())]
    profiled = [r for r in rows if "profile_ms" in r]
    if profiled:
        lines += ["", "Where the time went (profiled self CPU ms per step, by category):", "",
                  "| row | provider | " + " | ".join(CATEGORIES) + " |", "|---|---|" + "---|" * len(CATEGORIES)]
        for r in profiled:
            for name, cats in r["profile_ms"].items():
                lines.append(f"| {r['name']} | {name} | " + " | ".join(f"{cats[c]:.2f}" for c in CATEGORIES) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# fitting the CPU constants of the time model
# ---------------------------------------------------------------------------------------------

FIT_TERMS = ("dense_flops", "matmul_flops", "narrow_flops", "grouped_flops", "grouped_weight_grad_flops", "bytes",
             "ops", "conv_calls", "spatial_conv_calls", "exp_elements", "fresh_bytes")
CONSTANT_OF_TERM = {"dense_flops": "1 / flops[float32]", "matmul_flops": "1 / matmul", "narrow_flops": "1 / narrow",
                    "grouped_flops": "1 / grouped",
                    "grouped_weight_grad_flops": "1 / grouped_weight_grad", "bytes": "1 / bandwidth",
                    "ops": "op_overhead", "conv_calls": "conv_overhead", "spatial_conv_calls": "spatial_conv_overhead",
                    "exp_elements": "1 / exp_rate", "fresh_bytes": "fresh_byte_cost"}


def features_seconds(features: dict, device: cost.DeviceModel, dtype: torch.dtype = torch.float32) -> float:
    """The time model on stored features (what :meth:`cost.Cost.seconds` computes), so that a saved
    run can be predicted again with other constants."""
    dense = device.flop_rate(dtype)
    grouped = min(device.grouped or dense, dense)
    grouped_wg = min(device.grouped_weight_grad or dense, dense)
    matmul = device.matmul_rate(dtype)
    kind, _, backend = features["call"].partition("/")
    adapter_ops = 0.0 if kind in cost._PLAIN_KINDS else features["ops"] * device.adapter_op_overhead
    return (features["dense_flops"] / dense + features.get("matmul_flops", 0.0) / matmul + adapter_ops
            + features.get("narrow_flops", 0.0) / device.narrow_rate(dtype)
            + features["grouped_flops"] / grouped
            + features["grouped_weight_grad_flops"] / grouped_wg + features["bytes"] / device.bandwidth
            + features["ops"] * device.op_overhead + features["conv_calls"] * device.conv_overhead
            + features["spatial_conv_calls"] * device.spatial_conv_overhead
            + (features["exp_elements"] / device.exp_rate if device.exp_rate else 0.0)
            + features.get("fresh_bytes", 0.0) * device.fresh_byte_cost
            + device.call_overhead.get((kind, backend == "fused"), 0.0))


def repredict(rows: list, device: Optional[cost.DeviceModel] = None) -> list:
    """``rows`` with every cell's ``predicted_ms`` recomputed from its features by ``device`` (the
    CPU constants in force by default)."""
    device = device or cost.device_model("cpu")
    for row in rows:
        for cell in row["cells"].values():
            if "features" in cell:
                cell["predicted_ms"] = features_seconds(cell["features"], device) * 1e3
    return rows


def fit_constants(rows: list, statistic: str = "min_ms", fixed: Optional[dict] = None) -> dict:
    """Non-negative least squares of the measured step times (``statistic`` of each cell) on the
    time model's terms, in relative error (every cell weighs alike), with one fixed per-call
    constant per strategy path and backend. Returns the constants and the fit's error; with
    ``fixed`` (the ``coefficients`` of another fit) only the error of those on ``rows``."""
    import numpy as np
    from scipy.optimize import nnls

    cells = [c for r in rows for c in r["cells"].values() if "features" in c]
    calls = sorted({c["features"]["call"] for c in cells})
    columns = list(FIT_TERMS) + [f"call_overhead[{k}]" for k in calls]
    a = np.array([[c["features"].get(t, 0.0) for t in FIT_TERMS] + [float(c["features"]["call"] == k) for k in calls]
                  for c in cells])
    b = np.array([c[statistic] / 1e3 for c in cells])
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    if fixed is None:
        solution, _ = nnls(a / scale / b[:, None], np.ones_like(b))
        coefficients = solution / scale
    else:
        coefficients = np.array([fixed.get(name, 0.0) for name in columns])
    predicted = a @ coefficients
    errors = np.abs(np.log(predicted / b))
    constants = {}
    for name, value in zip(columns, coefficients):
        key = CONSTANT_OF_TERM.get(name, name)
        constants[key] = (1 / value if value > 0 else None) if key.startswith("1 / ") else value
    return {"constants": constants, "coefficients": dict(zip(columns, coefficients.tolist())), "cells": len(cells),
            "abs_log_error_median": float(np.median(errors)),
            "within_25pct": float(np.mean(errors <= np.log(1.25))), "statistic": statistic}


# ---------------------------------------------------------------------------------------------
# the ResNet-18 part
# ---------------------------------------------------------------------------------------------

PARTS = ("layers", "resnet18")
RESNET_CONFIGS = ("fc", "full_ft", "peft_lora", "lora", "flora", "flora_budget", "flora_merged", "liera", "ssl",
                  "ssb")


def conv_names(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resnet_config(name: str) -> Optional[nn.Module]:
    """ResNet-18 set up for ``name`` (every conv adapted, fc trained in full), or None where the
    config cannot be built here (peft not installed)."""
    model = resnet18()
    convs = conv_names(model)
    if name == "full_ft":
        return model
    model.requires_grad_(False)
    if name == "fc":
        model.fc.requires_grad_(True)
        return model
    if name == "peft_lora":
        if importlib.util.find_spec("peft") is None:
            return None
        from peft import LoraConfig, inject_adapter_in_model

        model = inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=convs), model)
        model.fc.requires_grad_(True)
        return model
    method, _, variant = name.partition("_")
    kwargs = dict(target_modules=convs, trainable_modules=["fc"])
    if variant == "budget":
        plan = lk.ranks_for_budget(model, method, match_lora_rank=LORA_RANK, **kwargs)
        kwargs.update(plan.kwargs)
    elif variant:
        kwargs["strategy"] = variant
    if method == "liera":
        kwargs.update(rank=LORA_RANK, alpha=LORA_RANK)
    lk.inject(model, method, **kwargs)
    return model


def resnet_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()

    return run


def resnet_flops(model: nn.Module) -> int:
    """FLOPs of one training step at 224x224, batch 2 (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def resnet_worker_step(name: str):
    """``(step, info)`` of the ResNet-18 config ``name`` (see :func:`resnet_config`), for
    :func:`bench.isolated.interleaved_workers`; None where the config cannot be built here."""
    torch.manual_seed(1)
    x, labels = torch.randn(RESNET_BATCH, 3, RESNET_SIZE, RESNET_SIZE), torch.randint(0, 1000, (RESNET_BATCH,))
    model = resnet_config(name)
    if model is None:
        return None
    info = {"flops": resnet_flops(model), "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return resnet_step(model, x, labels), info


def measure_resnet(configs, rounds: int, per_round: int, allocator: str = "default") -> dict:
    """Every config in a worker process of its own (bench/isolated.py), in interleaved rounds."""
    info, samples, missing = isolated.interleaved_workers(resnet_worker_step, configs, rounds, per_round,
                                                          torch.get_num_threads(), allocator)
    base = isolated.median(samples["fc"], "seconds")
    full = isolated.median(samples["full_ft"], "seconds") if "full_ft" in samples else None
    table = {}
    for c in info:
        med = isolated.median(samples[c], "seconds")
        table[c] = {"ms": med * 1e3, "x_fc": med / base, "x_full_ft": med / full if full else None,
                    "flops_x_fc": info[c]["flops"] / info["fc"]["flops"],
                    "samples_ms": [s.seconds * 1e3 for s in samples[c]], "trainable": info[c]["trainable"],
                    "page_faults": isolated.median(samples[c], "page_faults"),
                    "system_ms": isolated.median(samples[c], "system_seconds") * 1e3}
    return {"configs": table, "not_run": missing, "model": resnet18_source(), "allocator": allocator,
            "input": f"{RESNET_BATCH}x3x{RESNET_SIZE}x{RESNET_SIZE}"}


def resnet_markdown(result: dict, meta: dict) -> str:
    lines = ["# ResNet-18: one training step per method", "", _meta_line(meta), "",
             f"Model: {result['model']}; input {result['input']}; AdamW; every convolution adapted, the "
             "classifier trained in full. Each config in a worker process of its own, allocator "
             f"{result['allocator']!r} (bench/isolated.py). Time and FLOPs (224x224, batch 2) relative to "
             "training the classifier alone; page faults and kernel time per step of the worker.", "",
             "| config | ms | x fc | x full_ft | FLOPs x fc | trainable | page faults | kernel ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in result["configs"].items():
        full = "-" if c["x_full_ft"] is None else f"{c['x_full_ft']:.2f}"
        lines.append(f"| {name} | {c['ms']:.1f} | {c['x_fc']:.2f} | {full} | {c['flops_x_fc']:.2f} | "
                     f"{c['trainable']:,} | {c['page_faults']:,.0f} | {c['system_ms']:.1f} |")
    if result["not_run"]:
        lines += ["", f"Not run (not installed): {', '.join(result['not_run'])}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _meta_line(meta: dict) -> str:
    return (f"{meta['cpu']}, torch {meta['torch']}, {meta['threads']} thread(s), clock {meta['clock']}, "
            f"{meta['rounds']} interleaved rounds of {meta['per_round']} steps, load average at start "
            f"{meta['load_average']}, commit {meta['commit']}")


def environment(args) -> dict:
    from bench.run import _cpu_name, _git_state

    git = _git_state()
    return {"cpu": _cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "clock": "thread CPU time" if torch.get_num_threads() == 1 else "wall time",
            "rounds": args.rounds, "per_round": args.per_round, "load_average": round(os.getloadavg()[0], 2),
            "commit": (git["commit"] or "?")[:10] + ("+dirty" if git["dirty"] else ""),
            "native": lk.backend.native_available(), "command": sys.argv}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="layers,resnet18", help="layers, resnet18 or both: layers,resnet18")
    parser.add_argument("--rows", help="comma-separated substrings of the layer rows to run")
    parser.add_argument("--methods", default=",".join(suite.METHODS))
    parser.add_argument("--configs", default=",".join(RESNET_CONFIGS), help="ResNet-18 configs (fc always runs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=3, help="steps per provider per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allocator", choices=tuple(isolated.ALLOCATORS), default="default",
                        help="the ResNet-18 workers' glibc settings (bench/isolated.py)")
    parser.add_argument("--profile", action="store_true", help="add the profiled categories per row")
    parser.add_argument("--fit", type=Path, help="fit the CPU constants of the cost model to the layer part of "
                        "this JSON (from an earlier run) and print them; nothing is measured")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = set(args.part.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--part takes {', '.join(PARTS)} (comma-separated), got {', '.join(sorted(unknown))}")
    if args.rows and not select_rows([p for p in args.rows.split(",") if p]):
        parser.error(f"--rows {args.rows!r} matches no row (substrings of names such as resnet18/layer1.0.conv1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fit:
        rows = json.loads(args.fit.read_text())["layers"]
        print(json.dumps(fit_constants(rows), indent=1))
        held_out = fit_constants(rows[0::2])
        print("fitted on every other row, the error on the rest:", json.dumps(
            {k: v for k, v in fit_constants(rows[1::2], fixed=held_out["coefficients"]).items()
             if k not in ("constants", "coefficients")}))
        print("with the constants in force:", json.dumps(layer_summary(repredict(rows))))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    meta = environment(args)
    parts = set(args.part.split(","))
    result = {"meta": meta}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    methods = tuple(m for m in args.methods.split(",") if m)

    def save():
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(result, indent=1))

    markdown = []
    if "resnet18" in parts:
        configs = ["fc"] + [c for c in args.configs.split(",") if c and c != "fc"]
        result["resnet18"] = measure_resnet(configs, args.rounds, args.per_round, args.allocator)
        markdown.append(resnet_markdown(result["resnet18"], meta))
        print(markdown[-1], flush=True)
        save()
    if "layers" in parts:
        ctx = suite.Context(torch.device("cpu"), torch.float32)
        rows = []
        for shape, count, input_grad in select_rows([p for p in (args.rows or "").split(",") if p]):
            rows.append(measure_row(shape, count, input_grad, ctx, args.rounds, args.per_round, methods,
                                    methods if args.profile else ()))
            print(f"{shape.name}: " + ", ".join(f"{m} {a['ratio']:.2f}" for m, a in rows[-1]["auto"].items()),
                  flush=True)
            result["layers"] = rows
            save()
        result["layer_summary"] = layer_summary(rows)
        markdown.append(layers_markdown(rows, result["layer_summary"], meta))
        print(json.dumps(result["layer_summary"]))
    save()
    args.out.with_suffix(".md").write_text("\n".join(markdown))
    print(f"{args.out} and {args.out.with_suffix('.md')}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
