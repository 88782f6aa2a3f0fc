"""The fused kernels against the library ops, per bench shape (``python -m bench.fused``).

Two tables, each a median over interleaved rounds on the same inputs:

- *frozen forward*: ``op(x, W, bias)`` by the library (cuDNN / cuBLAS, or the CPU's) against the
  implicit-GEMM kernel with no adapter (``kernels.fused_conv.base_op``); the issue's target is the
  kernel within 80% of the library's speed (``library / kernel >= 0.8``). The output difference
  is checked on the way (relative, against the library's).
- *training step* (forward + backward of one layer, as the main bench times it): the frozen layer,
  full fine-tuning, LoRA in plain PyTorch, and on the triton backend LieRA merged and fused, FLoRA bypass
  and fused (its form as the cost model picks it, and each form forced), as ratios to the frozen
  layer and to full fine-tuning.

``--model`` runs nothing: the cost model's bytes, FLOPs and exponentials of today's strategy on the
triton backend and of "fused" per bench row (full GPU sizes, H100 constants), and the gain it
predicts (the table of bench/NOTES.md, to be checked against the timings).

On a machine without CUDA it runs under ``TRITON_INTERPRET=1`` on the CPU shapes of the suite
(``--cpu``): a dry run of the script, not a timing. The first call of each kernel on a GPU
compiles it and, without ``--first-config``, times every launch configuration once (autotuning);
warm-up rounds absorb both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace

import torch

DEFAULT_SHAPES = ("resnet50/3x3_256-256_14", "resnet50/3x3_512-512_7", "resnet50/1x1_64-256_56",
                  "sd15_unet/3x3_1280-1280_16", "sd15_unet/3x3_320-320_64", "linear/4096-4096_t4096")
STEP_PROVIDERS = ("frozen", "full_ft", "torch_lora", "liera_triton:merged", "liera_triton:fused",
                  "flora_triton:bypass", "flora_triton:fused", "flora_triton:fused_chain",
                  "flora_triton:fused_prologue", "lora_triton:bypass", "lora_triton:fused")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated suite shape names")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per provider and round")
    parser.add_argument("--first-config", action="store_true",
                        help="launch every kernel with its first GPU configuration (no autotuning)")
    parser.add_argument("--no-steps", action="store_true", help="the frozen forward table only")
    parser.add_argument("--cpu", action="store_true", help="a dry run under TRITON_INTERPRET=1 on the CPU shapes")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--model", action="store_true", help="print the cost model's prediction per row, run nothing")
    return parser.parse_args(argv)


def _adapter_shapes(method: str, shape) -> tuple:
    """The adapter tensors' shapes of the bench's configuration of ``method`` on ``shape``."""
    from bench import suite

    weight = (shape.out_features, shape.in_features // shape.groups) + (
        (shape.kernel, shape.kernel) if shape.kind == "conv2d" else ())
    if method == "flora":
        ranks = (16, 16, 2, 2) if shape.kind == "conv2d" else (8, 8)
        ranks = tuple(min(r, d) for r, d in zip(ranks, weight))
        return (ranks, *((d, r) for d, r in zip(weight, ranks)))
    if method in ("liera", "lora"):  # B (out, r), A (r, in / groups x kernel)
        rank = suite.METHOD_OPTIONS[method]["rank"]
        columns = weight[1] * (shape.kernel ** 2 if shape.kind == "conv2d" else 1)
        return ((weight[0], rank), (rank, columns))
    return ((weight[1],), (weight[0],)) if method == "ssb" else ((weight[1],),)


def model_rows(dtype=torch.bfloat16) -> list:
    """Per bench shape and method: today's strategy on the triton backend (auto's choice) and
    "fused" (the form the cost model picks), their bytes, FLOPs, exponentials and predicted times
    with the CUDA constants, and full fine-tuning's time."""
    import lrtensor_kernels as lk
    from bench import suite
    from lrtensor_kernels.layers import LAYERS
    from lrtensor_kernels.strategies import cost
    from torch import nn

    device = cost.DEVICES["cuda"]
    rows = []
    for shape in suite.SUITE:
        weight = (shape.out_features, shape.in_features // shape.groups) + (
            (shape.kernel, shape.kernel) if shape.kind == "conv2d" else ())
        for method in suite.METHODS:
            probe = LAYERS[method][nn.Linear](2, 2, device="meta", **suite.METHOD_OPTIONS[method])
            stride, padding, dilation, groups = shape.geometry()
            w = cost.Workload(weight, shape.input_shape(), tuple(stride), tuple(padding), tuple(dilation), groups,
                              dtype, dtype, "cuda", probe.adapter_math.key, _adapter_shapes(method, shape), True,
                              False, False, True, False, "triton")
            decision = cost.decide(w, "auto")
            today, fused = decision.costs[decision.strategy], decision.costs["fused"]
            s = cost._Sizes(w)
            full = s.weight_grad_pass(cost.frozen_cost(w))
            seconds = {k: c.seconds(device, dtype) * 1e6 for k, c in
                       (("today", today), ("fused", fused), ("full_ft", full), ("frozen", cost.frozen_cost(w)))}
            rows.append(dict(shape=shape.name, method=method, today=decision.strategy,
                             fused_form=cost.fused_form(w)[0], today_mb=today.bytes / 1e6, fused_mb=fused.bytes / 1e6,
                             today_gflop=today.flops / 1e9, fused_gflop=fused.flops / 1e9,
                             fused_mexp=fused.exp_elements / 1e6, **{f"{k}_us": v for k, v in seconds.items()},
                             gain=seconds["today"] / seconds["fused"]))
    return rows


def print_model(rows: list) -> None:
    print("| shape | method | today | MB today / fused | GFLOP today / fused | M exp fused | us today / fused "
          "(full FT) | predicted gain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['method']} | {r['today']} | {r['today_mb']:.0f} / {r['fused_mb']:.0f} | "
              f"{r['today_gflop']:.1f} / {r['fused_gflop']:.1f} | {r['fused_mexp']:.0f} | {r['today_us']:.0f} / "
              f"{r['fused_us']:.0f} ({r['full_ft_us']:.0f}) | {r['gain']:.2f} ({r['fused_form']}) |")


def _forced_form(form: str):
    """The cost model's choice of the fused form replaced by ``form`` (for the forced-form rows)."""
    from lrtensor_kernels.strategies import cost

    real = cost.fused_form

    def forced(w):
        return (form, cost.fused_chain_cost(w) if form == "chain" else cost.fused_prologue_cost(w))

    def enter():
        cost.fused_form = forced
        cost._decision_cached.cache_clear()

    def leave():
        cost.fused_form = real
        cost._decision_cached.cache_clear()

    return enter, leave


def _step_setup(name: str, suite):
    """(setup, enter, leave): the provider's setup and what to do around each of its calls."""
    nothing = (lambda: None, lambda: None)
    if name in suite.BASELINE_PROVIDERS:
        return (suite.BASELINE_PROVIDERS[name], *nothing)
    head, _, strategy = name.partition(":")
    method = head.split("_")[0]
    form = None
    if strategy.startswith("fused_"):
        strategy, form = "fused", strategy.split("_")[1]
    setup = lambda shape, ctx: suite.setup_triton(shape, ctx, method=method, strategy=strategy)  # noqa: E731
    return (setup, *(_forced_form(form) if form else nothing))


def _median_rounds(fns: dict, clock, rounds: int, repeats: int) -> dict:
    """Median over ``rounds`` interleaved rounds of each callable's median over ``repeats`` calls."""
    from bench.timing import median_ms

    samples = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: compiles, autotunes
        median_ms(fn, clock, 2, 1)
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(median_ms(fn, clock, 1, repeats))
    return {name: statistics.median(v) for name, v in samples.items()}


def frozen_forward(shape, ctx, args, suite, fused_conv, clock) -> dict:
    base = suite.freeze(suite.base_module(shape, ctx))
    x, _ = suite.make_inputs(shape, ctx)
    x = x.detach()
    geometry = shape.geometry()
    with torch.no_grad():
        library = lambda: suite.base_op(x, base.weight, base.bias, *geometry)  # noqa: E731
        kernel = lambda: fused_conv.base_op(x, base.weight, base.bias, *geometry)  # noqa: E731
        difference = ((kernel().float() - library().float()).norm() / library().float().norm()).item()
        times = _median_rounds({"library": library, "kernel": kernel}, clock, args.rounds, args.repeats)
    return {"shape": shape.name, "library_ms": times["library"], "kernel_ms": times["kernel"],
            "library_over_kernel": times["library"] / times["kernel"], "relative_difference": difference}


def training_steps(shape, ctx, args, suite, clock) -> dict:
    from bench.timing import Step

    x, grad_out = suite.make_inputs(shape, ctx)
    steps, around = {}, {}
    for name in STEP_PROVIDERS:
        setup, enter, leave = _step_setup(name, suite)
        enter()
        try:
            prepared = setup(shape, ctx)
        finally:
            leave()
        step = Step(prepared.forward, x, grad_out, prepared.trainable)

        def run(step=step, enter=enter, leave=leave):
            step.clear_grads()
            enter()
            try:
                step.run()
            finally:
                leave()

        steps[name], around[name] = run, (enter, leave)
    times = _median_rounds(steps, clock, args.rounds, max(1, args.repeats // 2))
    frozen, full = times["frozen"], times["full_ft"]
    return {"shape": shape.name, "ms": times, "x_frozen": {k: v / frozen for k, v in times.items()},
            "x_full_ft": {k: v / full for k, v in times.items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model:
        print_model(model_rows(getattr(torch, args.dtype)))
        return 0
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench import suite
    from bench.timing import clock_for
    from lrtensor_kernels.kernels import conv_plan, fused_conv

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.cpu:
        print("no CUDA device: pass --cpu for a dry run under the Triton interpreter", file=sys.stderr)
        return 2
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.dtype)
    ctx = suite.Context(device, dtype)
    names = [n for n in args.shapes.split(",") if n]
    shapes = [s for s in suite.SUITE if s.name in names]
    if device.type == "cpu":
        shapes = [replace(suite.scaled_for_cpu(s), batch=1) for s in shapes]
    clock = clock_for(device)
    forced = {}
    if args.first_config:
        width = dtype.itemsize
        forced = {kind: conv_plan.gpu_tiles(kind, width)[0] for kind in conv_plan.KINDS}
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
               "torch": torch.__version__, "dtype": str(dtype), "first_config": args.first_config,
               "forward": [], "steps": []}
    import triton

    results["triton"] = triton.__version__
    with conv_plan.forced(**forced):
        for shape in shapes:
            row = frozen_forward(shape, ctx, args, suite, fused_conv, clock)
            results["forward"].append(row)
            print(f"forward {shape.name}: library {row['library_ms']:.3f} ms, kernel {row['kernel_ms']:.3f} ms, "
                  f"library/kernel {row['library_over_kernel']:.2f}, difference {row['relative_difference']:.1e}",
                  flush=True)
            if args.out:
                _save(args.out, results)
        if not args.no_steps:
            for shape in shapes:
                row = training_steps(shape, ctx, args, suite, clock)
                results["steps"].append(row)
                cells = ", ".join(f"{k} {v:.2f}" for k, v in row["x_full_ft"].items())
                print(f"step {shape.name} (x full fine-tuning): {cells}", flush=True)
                if args.out:
                    _save(args.out, results)
    results["autotuned"] = {str(k[:2]): v.label() for k, v in fused_conv.AUTOTUNER.chosen().items()}
    if args.out:
        _save(args.out, results)
    return 0


def _save(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
