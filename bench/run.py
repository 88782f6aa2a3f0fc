"""Benchmark of the lrtensor_kernels adapter layers against plain and LoRA baselines.

Run from the repository root: ``python -m bench.run`` (or ``python bench/run.py``); ``--help``
lists the options, bench/README.md explains the columns.

Exit status: 0 on success; 1 if ``--verify`` found a mismatch; 2 if nothing ran (no timing row and
no verify check succeeded).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrtensor_kernels as lk
from lrtensor_kernels.backend import native_available
from bench import external, plot, report, suite, summary, timing, verify

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "results.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (warmup, repeats) per mode; --quick uses the second pair
RUNS = {"cpu": ((3, 10), (1, 5)), "cuda": ((10, 20), (5, 20))}
INTERPRETED_TRITON_SHAPES = 3  # on the CPU with TRITON_INTERPRET=1, the triton check runs on this many smallest shapes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="comma-separated substrings; run the shapes whose name contains any")
    parser.add_argument("--providers", help="comma-separated substrings; run the providers whose name contains "
                        "any (frozen always runs: every ratio is to it)")
    parser.add_argument("--strategies", default=",".join(lk.STRATEGIES),
                        help="comma-separated strategies to run the adapter providers with (default: all; "
                        "auto runs as <method>_<route>, a forced one as <method>_<route>:<strategy>)")
    parser.add_argument("--quick", action="store_true", help="one shape per family and fewer runs")
    parser.add_argument("--verify", action="store_true", help="check every provider against its oracle, then time")
    parser.add_argument("--verify-only", action="store_true", help="check, do not time")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available, else the CPU with scaled-down shapes")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of weights and inputs")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing (default: by mode)")
    parser.add_argument("--repeats", type=int, help="timed steps; the median is reported (default: by mode)")
    parser.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads (default 1: steadier "
                        "timings than OpenMP threads competing with other processes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file; the plot goes next to it (.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument("--rows", action="store_true", help="print every row and every check as it is measured "
                        "(default: one line per shape; every row is in the JSON and Markdown files either way)")
    parser.add_argument("--lora-baseline", metavar="PROVIDER", help="the provider the summary's x LoRA column "
                        f"divides by (default: the first of {', '.join(suite.LORA_BASELINES)} that ran on every shape)")
    parser.add_argument("--list", action="store_true", help="list the selected shapes and providers, then exit")
    args = parser.parse_args(argv)
    unknown = set(_patterns(args.strategies) or ()) - set(lk.STRATEGIES)
    if unknown:
        parser.error(f"--strategies: unknown {sorted(unknown)}; expected some of {lk.STRATEGIES}")
    if args.warmup is not None and args.warmup < 0 or args.repeats is not None and args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def _patterns(text):
    return [p for p in text.split(",") if p] if text else None


def choose_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def opening_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"Running on CUDA ({torch.cuda.get_device_name(device)}): full-size shapes."
    reason = "No CUDA device" if not torch.cuda.is_available() else "--device cpu"
    return (f"{reason}: running the CPU paths (reference and native) with scaled-down shapes "
            f"({suite.CPU_SCALING_NOTE}); these are CPU timings of small layers, not a prediction of GPU times.")


def _package_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def warn_if_busy() -> None:
    """Prints a note when other processes already load the CPUs (timings will be noisy)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores - torch.get_num_threads() + 0.5:
        print(f"note: the machine is busy (1-minute load average {load:.1f} on {cores} cores); "
              "CPU timings will be noisy.")


def environment(device: torch.device, args, warmup: int, repeats: int) -> dict:
    """What the JSON records about the machine, the software and the run's settings."""
    meta = {
        "mode": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "lrtensor_kernels": lk.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "dtype": args.dtype,
        "timer": timing.clock_for(device).name,
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median",
        "shape_scaling": "none (full size)" if device.type == "cuda" else suite.CPU_SCALING_NOTE,
        "memory": ("torch.cuda.max_memory_allocated over one fwd+bwd after reset_peak_memory_stats"
                   if device.type == "cuda" else "not measured on the CPU"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "git": _git_state(),
        "command": sys.argv,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        meta.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32})
    return meta


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def measure(shape: suite.Shape, name: str, setup, ctx: suite.Context, inputs: tuple, warmup: int,
            repeats: int) -> report.Row:
    """Times one provider on one shape; any exception becomes the row's error (or skip) note."""
    row = report.Row(shape.name, name)
    failure = ("error", "")
    try:
        prepared = setup(shape, ctx)
        failure = prepared.failure
        if prepared.strategy_of is not None:
            row.strategy = prepared.strategy_of(inputs[0])
        step = timing.Step(prepared.forward, *inputs, prepared.trainable)
        times = timing.time_step(step, timing.clock_for(ctx.device), warmup, repeats)
        row.ms, row.samples_ms = times.medians(), asdict(times)
        row.memory_mib = timing.peak_memory_mib(step, ctx.device)
        row.kept_mib = timing.kept_for_backward(step).mib()
        row.trainable_params = sum(t.numel() for t in prepared.trainable)
    except suite.ProviderUnavailable as exc:
        row.status, row.note = "skipped", str(exc)
    except Exception as exc:  # one provider failing on one shape must not stop the run
        row.status, row.note = failure[0], failure[1] + _error_text(exc)
        row.traceback = traceback.format_exc()
        row.ms = {}
    finally:
        prepared = step = None  # drop the layer before freeing memory for the next provider
        release_memory(ctx.device)
    return row


def check(shape: suite.Shape, name: str, setup, ctx: suite.Context, inputs: tuple) -> verify.Check:
    """Verifies one provider on one shape; an exception becomes the check's error (or skip) note."""
    failure = ("error", "")
    try:
        prepared = setup(shape, ctx)
        failure = prepared.failure
        with verify.exact_float32(ctx.device):
            return verify.check_provider(shape.name, name, prepared, *inputs, ctx.dtype)
    except suite.ProviderUnavailable as exc:
        return verify.Check(shape.name, name, "-", "skipped", note=str(exc))
    except Exception as exc:
        return verify.Check(shape.name, name, "-", failure[0], note=failure[1] + _error_text(exc))
    finally:
        prepared = None
        release_memory(ctx.device)


def verify_plan(shapes: list, providers: dict, device: torch.device) -> list:
    """(shape, providers) pairs to verify: every selected provider on every shape; on the CPU under
    TRITON_INTERPRET=1 also the triton providers, on the smallest shapes only."""
    plan = [(shape, providers) for shape in shapes]
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            smallest = sorted(shapes, key=suite.Shape.weight_numel)[:INTERPRETED_TRITON_SHAPES]
            print(f"TRITON_INTERPRET=1: the triton providers are checked (not timed) on the "
                  f"{len(smallest)} smallest shapes.")
            plan = [(shape, {**p, **suite.triton_providers()} if shape in smallest else p) for shape, p in plan]
        else:
            print("The triton providers are not run on the CPU (set TRITON_INTERPRET=1 to check them "
                  "on the smallest shapes).")
    return plan


def _progress(index: int, count: int, shape: suite.Shape) -> str:
    return f"[{index:>{len(str(count))}}/{count}] {shape.name} ({shape.describe()})"


def run_verify(shapes: list, providers: dict, ctx: suite.Context, every_check: bool) -> list:
    """Every provider against its oracle on every shape: one line per shape (a line per check with
    ``every_check``; a check that is not ok always gets its line)."""
    print("\n== verify: every provider against its oracle (relative errors of output and gradients) ==")
    checks = []
    plan = verify_plan(shapes, providers, ctx.device)
    for index, (shape, shape_providers) in enumerate(plan, 1):
        inputs = suite.make_inputs(shape, ctx)
        shape_checks = [check(shape, name, setup, ctx, inputs) for name, setup in shape_providers.items()]
        checks += shape_checks
        counts = {s: sum(c.status == s for c in shape_checks) for s in ("ok", "MISMATCH", "error", "skipped")}
        print(f"{_progress(index, len(plan), shape)}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
              flush=True)
        for c in shape_checks:
            if every_check or c.status in ("MISMATCH", "error"):
                print("    " + verify.format_check(c), flush=True)
    mismatches, skipped = (sum(c.status == s for c in checks) for s in ("MISMATCH", "skipped"))
    print(f"verify: {sum(c.status == 'ok' for c in checks)} ok, {mismatches} mismatches, "
          f"{sum(c.status == 'error' for c in checks)} errors, {skipped} skipped"
          + (" (the provider cannot run that layer; why: the JSON and the Markdown file)" if skipped else ""))
    return checks


def run_timing(shapes: list, providers: dict, ctx: suite.Context, warmup: int, repeats: int, save,
               every_row: bool) -> list:
    """Every provider on every shape, one row each; prints one line per shape (every row with
    ``every_row``; a row that failed always gets its line); ``save(rows)`` after each shape."""
    print(f"\n== timing: median of {repeats} runs after {warmup} warm-up runs ==")
    if every_row:
        print(report.table_header())
    rows = []
    for index, shape in enumerate(shapes, 1):
        started = time.perf_counter()
        inputs = suite.make_inputs(shape, ctx)
        floor, shape_rows = None, []
        for name, setup in providers.items():
            row = measure(shape, name, setup, ctx, inputs, warmup, repeats)
            floor = row if name == suite.FLOOR else floor
            row.set_ratios(floor)
            shape_rows.append(row)
            if every_row:
                print(report.format_row(row), flush=True)
        rows += shape_rows
        inputs = None
        release_memory(ctx.device)
        save(rows)
        if not every_row:
            frozen = f"frozen {floor.ms['fwd_bwd']:.3f} ms" if floor is not None and floor.status == "ok" else "frozen -"
            counts = {s: sum(r.status == s for r in shape_rows) for s in ("ok", "error", "skipped")}
            print(f"{_progress(index, len(shapes), shape)}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                  + f"; {frozen}; {time.perf_counter() - started:.1f} s", flush=True)
            for row in shape_rows:
                if row.status == "error":
                    print("    " + report.format_row(row), flush=True)
    return rows


def prepare_native(providers: dict) -> Optional[dict]:
    """Loads (on first use: builds) the native library before anything is timed, when a native
    provider is selected: ``{"s": seconds it took, "available": bool, "reason": why not}``, None
    when no native provider runs."""
    if not any("_native" in name for name in providers):
        return None
    started = time.perf_counter()
    available = native_available()
    state = {"s": round(time.perf_counter() - started, 1), "available": available}
    if not available:
        from lrtensor_kernels.kernels import native_build

        state["reason"] = native_build.unavailable_reason()
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    device = choose_device(args.device)
    print(opening_line(device), flush=True)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        warn_if_busy()
    started = time.perf_counter()
    ctx = suite.Context(device, DTYPES[args.dtype])
    full_shapes = suite.select_shapes(_patterns(args.shapes), args.quick)
    shapes = full_shapes if device.type == "cuda" else [suite.scaled_for_cpu(s) for s in full_shapes]
    providers = suite.select_providers(
        suite.providers_for(device, tuple(_patterns(args.strategies) or ()), external.providers()),
        _patterns(args.providers))
    warmup, repeats = RUNS[device.type][args.quick]
    warmup = warmup if args.warmup is None else args.warmup
    repeats = repeats if args.repeats is None else args.repeats
    if args.list:
        for shape in shapes:
            print(f"{shape.name:<34} {shape.describe()}")
        print("providers:", ", ".join(providers))
        return 0
    if not shapes:
        print("no shape matches --shapes")
        return 2
    if args.lora_baseline is not None and args.lora_baseline not in providers:
        print(f"--lora-baseline {args.lora_baseline}: not among the selected providers ({', '.join(providers)})")
        return 2
    if external.missing():
        print(f"not installed, not measured: {', '.join(external.missing())} (the real PEFT and LyCORIS layers; "
              f'pip install -e ".[{external.EXTRA}]")')
    print(f"{len(shapes)} shapes x {len(providers)} providers; every row: the JSON and Markdown files "
          "(--rows prints them as they are measured)", flush=True)

    meta = environment(device, args, warmup, repeats)
    meta["native_library"] = prepare_native(providers)
    external.import_packages(providers)
    # Every row frees its layer with gc.collect(); the objects alive now (torch, the imported
    # packages: hundreds of thousands) stay, and walking them took ~0.2 s a collection, most of a
    # small row's time. Frozen, they are not walked; unfrozen again at the end.
    gc.freeze()
    try:
        return measure_all(args, ctx, full_shapes, shapes, providers, warmup, repeats, meta, started)
    finally:
        gc.unfreeze()


def measure_all(args, ctx, full_shapes, shapes, providers, warmup, repeats, meta, started) -> int:
    """The verify pass and the timing of ``main``, then :func:`finish`."""
    shape_records = [{"name": s.name, "full_size": asdict(f), "measured": asdict(s), "description": s.describe()}
                     for f, s in zip(full_shapes, shapes)]
    checks, rows = [], []

    def save(current_rows, summary_data=None):
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        report.write_json(args.out, meta, shape_records, current_rows, checks, summary_data)

    if args.verify or args.verify_only:
        phase = time.perf_counter()
        checks = run_verify(shapes, providers, ctx, args.rows)
        meta["verify_s"] = round(time.perf_counter() - phase, 1)
        save(rows)
    if not args.verify_only:
        phase = time.perf_counter()
        rows = run_timing(shapes, providers, ctx, warmup, repeats, save, args.rows)
        meta["timing_s"] = round(time.perf_counter() - phase, 1)
    meta["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return finish(args, meta, rows, checks, save)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def time_note(meta: dict) -> str:
    """How long the run took and what that depended on."""
    parts = [f"{_duration(meta['wall_s'])} in all"]
    parts += [f"{name} {_duration(meta[key])}" for name, key in (("verify", "verify_s"), ("timing", "timing_s"))
              if meta.get(key) is not None]
    native = meta.get("native_library")
    if native is not None and native["available"]:
        parts.append(f"native library ready in {native['s']:.0f} s (a first build takes half a minute to minutes, "
                     "then it is cached)")
    elif native is not None:
        parts.append(f"native library unavailable ({native['reason']}; its rows are skipped)")
    load = (f"load average {meta['load_average_at_start']:.1f} at the start, {meta['load_average_at_end']:.1f} at "
            f"the end, on {os.cpu_count()} cores")
    return (f"time: {'; '.join(parts)}; {load}. It depends on the cores and what else runs on them, the threads "
            "(--threads), the shapes and providers selected, --warmup/--repeats and the native build.")


def finish(args, meta: dict, rows: list, checks: list, save) -> int:
    """The summary (printed and written beside the JSON), the Markdown report, the plot, the exit status."""
    lora = summary.lora_baseline(summary.Rows(rows), args.lora_baseline) if rows else None
    outputs = [args.out]
    if rows:
        print("\n== summary ==")
        print(report.summary_text(rows, lora, markdown=False))
        save(rows, summary.as_dict(summary.Rows(rows), lora))
        summary_path = args.out.with_name(args.out.stem + "_summary.md")
        summary_path.write_text(report.summary_markdown(rows, meta, lora))
        markdown = args.out.with_suffix(".md")
        markdown.write_text(report.markdown_report(rows, meta, checks, lora))
        outputs += [summary_path, markdown]
        if not args.no_plot:
            drawn = plot.plot_run(rows, args.out.with_suffix(".png"), meta, lora)
            outputs += [drawn] if drawn else []
    else:
        save(rows)
    counts = {status: sum(r.status == status for r in rows) for status in ("ok", "error", "skipped")}
    measured = "timing skipped (--verify-only)" if args.verify_only else (
        f"{counts['ok']} rows measured, {counts['error']} errors, {counts['skipped']} skipped")
    print(f"\n{measured}.\nfiles: {', '.join(map(str, outputs))}\n{time_note(meta)}")
    if any(c.status == "MISMATCH" for c in checks):
        print("verify found a mismatch")
        return 1
    if counts["ok"] == 0 and not any(c.status == "ok" for c in checks):
        print("nothing ran")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
