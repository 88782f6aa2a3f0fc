"""The device check: one command on a CUDA machine (an H100 or H200), about 8 minutes in all.

Run ``bash bench/gpu_check.sh`` from the repository root (``--dry-run``: every stage on tiny shapes
on the CPU, Triton under the interpreter; CI runs it). Stages, in order of value; each runs as its
own process within the time left of the run's budget, and writes ``$OUT/<stage>.json`` (status,
seconds, headline numbers, the last lines of its output and its tool's data) the moment it ends,
with its output appended to ``$OUT/gpu_check.log`` as it runs: a run cut off still reports every
stage that finished. ``$OUT/summary.json`` and the table printed at the end list them all.

Stages, each with its estimate on an H200 and how it was made (none has been measured there yet):

- ``correctness``: every op and strategy of the Triton backend on CUDA against the float64 oracle
  and the reference (pytest on the fused kernel, layer and property tests, 8 workers). 150 s:
  about 200 kernel specialisations at 2-4 s of Triton compile each over 8 processes, plus the tests.
  Then strategy "fused" (the implicit-GEMM kernels) on four layers in float32 and bfloat16 and every
  GPU tile in float32, against the oracle: 40 s more, about 100 specialisations (the autotuner
  compiles 2-4 tiles per op and shape) over 8 processes.
- ``native``: the native backend's CUDA build (started in the background at the beginning, ninja
  on 8 jobs) and its tests on CUDA. 90 s: 4 .cu and 6 .cpp files, the slowest .cu about a minute.
- ``layers``: per-layer step times in bfloat16 of frozen, full fine-tuning, PEFT-style LoRA and
  every method on the Triton backend under auto (``bench.run --quick --verify``). 60 s: 4 shapes x
  9 providers, 25 steps each, plus compiles.
- ``kernels``: achieved bandwidth of the transform and projection against a device copy
  (``bench.kernels``, bfloat16). 45 s: 6 weights x 4 methods, 50 timed runs each.
- ``models``: one training step of ResNet-50 and ConvNeXt-T as a linear probe, with full
  fine-tuning, PEFT LoRA and each method (``bench.models``). 60 s: 2 x 7 rows of 13 steps, plus
  compiles.

Setup (the import checks, wheels from ``.whl/`` installed into a temporary directory when a
package is missing: the device machine has no network) takes about 15 s; the estimates add up to
about 7.5 minutes, inside the 8 of the budget (``--budget``). Each estimate counts the kernels to
compile or the steps to time; none has been measured on the device yet.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 60


@dataclasses.dataclass
class Stage:
    """One stage: its commands on CUDA and in the dry run, its estimate and its hard limit (seconds)."""

    name: str
    estimate_s: float
    limit_s: float
    needs: tuple = ()  # Python packages without which it is skipped


def _pytest(files: list, select: Optional[str], junit: Path, workers: int) -> list:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    if select:
        command += ["-k", select]
    if workers > 1:
        command += ["-n", str(workers)]
    return command


STAGES = (
    Stage("correctness", 190, 280, needs=("pytest", "triton", "hypothesis")),
    Stage("native", 90, 180, needs=("pytest", "ninja")),
    Stage("layers", 60, 120),
    Stage("kernels", 45, 90, needs=("triton",)),
    Stage("models", 60, 120),
)
CORRECTNESS_FILES = ["tests/test_fused_kernels.py", "tests/test_fused_layers.py", "tests/test_fused_properties.py",
                     "tests/test_triton_expm1.py", "tests/test_gpu_plans.py"]
# strategy "fused": four layers (conv with groups and stride, reflect padding, LoRA linear, SSB
# linear) in every form, float32 and bfloat16, and each GPU tile list
FUSED_FILES = ["tests/test_fused_strategy.py"]
FUSED_SELECT = ("fused_matches_the_oracle and (float32 or bfloat16) and (flora_conv2d_groups_stride or "
                "liera_exp_conv2d_reflect or lora_linear or ssb_linear) or every_gpu_launch_plan and float32")
NATIVE_FILES = ["tests/test_fused_kernels.py", "tests/test_fused_layers.py", "tests/test_native_ops.py"]


def commands(stage: str, dry_run: bool, work: Path, workers: int) -> list:
    """The commands of ``stage`` (run in order; the stage fails at the first that fails)."""
    if stage == "correctness":
        select = "not native" if not dry_run else "triton and float32 and (linear or lora_r8) and not large"
        fused = FUSED_SELECT if not dry_run else "fused_matches_the_oracle and lora_linear-prologue-float32"
        return [_pytest(CORRECTNESS_FILES, select, work / "correctness.xml", workers),
                _pytest(FUSED_FILES, fused, work / "correctness_fused.xml", workers)]
    if stage == "native":
        build = [sys.executable, "-c", "from lrtensor_kernels.kernels import native_build as nb; nb.load(); "
                 "print('native library:', nb.load(), 'CUDA kernels:', nb.has_cuda_kernels())"]
        select = "native" if not dry_run else "native and float32 and linear and lora:exp"
        return [build, _pytest(NATIVE_FILES, select, work / "native.xml", workers)]
    if stage == "layers":
        command = [sys.executable, "-m", "bench.run", "--verify", "--quick", "--no-plot", "--strategies", "auto",
                   "--out", str(work / "layers.json")]
        if dry_run:
            return [command + ["--device", "cpu", "--shapes", "resnet50", "--providers", "frozen,full_ft,torch_lora,flora",
                               "--warmup", "0", "--repeats", "1"]]
        return [command + ["--dtype", "bfloat16", "--providers", "frozen,full_ft,torch_lora,peft,lycoris,triton"]]
    if stage == "kernels":
        command = [sys.executable, "-m", "bench.kernels", "--out", str(work / "kernels.json")]
        if dry_run:
            return [command + ["--backend", "triton", "--small", "--weights", "resnet50", "--repeats", "1"]]
        return [command + ["--dtype", "bfloat16"]]
    if stage == "models":
        command = [sys.executable, "-m", "bench.models", "--out", str(work / "models.json")]
        return [command + (["--tiny", "--warmup", "0", "--repeats", "1"] if dry_run else [])]
    raise ValueError(stage)


def _junit_counts(path: Path) -> dict:
    """Test counts and the failed tests' ids from a pytest junit XML file."""
    import xml.etree.ElementTree as ElementTree

    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s
              if case.find("failure") is not None or case.find("error") is not None]
    return dict(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                failed=failed[:50])


def _progress_counts(lines: list) -> dict:
    """Test counts from pytest's progress lines (``..F.s [ 40%]``), for a run stopped before its report."""
    progress = re.compile(r"[.FEsxX]+(\s+\[\s*\d+%\])?")
    marks = "".join(line.split("[")[0].strip() for line in lines if progress.fullmatch(line.strip()))
    failed = marks.count("F") + marks.count("E")
    return dict(tests=len(marks), passed=marks.count("."), failures=failed, errors=0, skipped=marks.count("s"),
                failed=[], partial=True) if marks else {}


def headline(stage: str, work: Path, output: str = "") -> dict:
    """The few numbers of a stage the summary shows, and its tool's data."""
    if stage == "correctness":  # the Triton backend's tests, then strategy fused's
        counts = [c for c in (_junit_counts(work / f"{stage}{part}.xml") for part in ("", "_fused")) if c]
        if not counts:
            return _progress_counts(output.splitlines())
        return {k: [f for c in counts for f in c[k]] if k == "failed" else sum(c[k] for c in counts)
                for k in counts[0]}
    if stage == "native":
        return _junit_counts(work / f"{stage}.xml") or _progress_counts(output.splitlines())
    data_file = work / f"{stage}.json"
    if not data_file.is_file():
        return {}
    data = json.loads(data_file.read_text())
    if stage == "layers":
        checks, rows = data.get("verify", []), data.get("results", [])
        for row in rows:
            row.pop("samples_ms", None)
        ratios = {f"{r['shape']} {r['provider']}": round(r["ratio_to_frozen"]["fwd_bwd"], 2) for r in rows
                  if r.get("status") == "ok" and r.get("ratio_to_frozen", {}).get("fwd_bwd") is not None}
        return dict(verified_ok=sum(c.get("status") == "ok" for c in checks),
                    mismatches=sum(c.get("status") == "MISMATCH" for c in checks),
                    errors=sum(r.get("status") == "error" for r in rows), fwd_bwd_over_frozen=ratios, data=data)
    if stage == "kernels":
        rows = data.get("rows", [])
        share = lambda key: sorted(round(r[key], 2) for r in rows if r.get(key) is not None)  # noqa: E731
        return dict(copy_bandwidth_TBps=(data.get("copy_bandwidth") or 0) / 1e12, fwd_of_copy=share("fwd_of_copy"),
                    bwd_of_copy=share("bwd_of_copy"), data=data)
    if stage == "models":
        rows = data.get("rows", [])
        ok = [r for r in rows if r.get("status") == "ok"]
        return dict(steps_ms={f"{r['model']} {r['provider']}": round(r["ms"], 2) for r in ok},
                    not_finite=[f"{r['model']} {r['provider']}" for r in ok if not r["finite"]],
                    errors=[f"{r['model']} {r['provider']}: {r.get('note')}" for r in rows
                            if r.get("status") == "error"], data=data)
    return {}


def stage_environment(dry_run: bool) -> tuple:
    """``(env, pytest workers)`` of the commands: the checkout first on PYTHONPATH, Triton under the
    interpreter in a dry run and compiled otherwise, 8 build jobs, 8 workers where pytest-xdist is
    installed (1 in a dry run)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONUNBUFFERED="1", MAX_JOBS=os.environ.get("MAX_JOBS", "8"))
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env, 1 if dry_run or importlib.util.find_spec("xdist") is None else 8


def missing_packages(names) -> list:
    return [n for n in names if importlib.util.find_spec(n) is None]


def run_stage(stage: Stage, dry_run: bool, work: Path, env: dict, deadline: float, workers: int, log) -> dict:
    started = time.time()
    record = dict(stage=stage.name, estimate_s=stage.estimate_s, dry_run=dry_run)
    missing = missing_packages(stage.needs)
    if missing:
        return dict(record, status="skipped", seconds=0.0, note=f"missing packages: {', '.join(missing)}")
    tail, output = [], ""
    status, note = "ok", ""
    for command in commands(stage.name, dry_run, work, workers):
        left = min(stage.limit_s - (time.time() - started), deadline - time.time())
        if left < 5:
            status, note = "cut off", "no time left in the run's budget"
            break
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            output, _ = process.communicate()
            status, note = "cut off", f"stopped after {left:.0f} s (its limit or the run's budget)"
        log.write(output)
        log.flush()
        tail = output.splitlines()[-LOG_TAIL_LINES:]
        if status != "ok":
            break
        if process.returncode != 0:
            status, note = "failed", f"exit status {process.returncode}: {' '.join(command[1:4])}"
            break
    record.update(status=status, note=note, seconds=round(time.time() - started, 1), log_tail=tail,
                  **headline(stage.name, work, output))
    return record


def summary_table(records: list) -> str:
    lines = [f"{'stage':12} {'status':8} {'seconds':>8} {'estimate':>8}  headline"]
    for r in records:
        if r["stage"] in ("correctness", "native") and "tests" in r:
            head = f"{r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"
        elif r["stage"] == "layers" and "mismatches" in r:
            head = f"verify {r['verified_ok']} ok, {r['mismatches']} mismatches; {r['errors']} rows with errors"
        elif r["stage"] == "kernels" and "fwd_of_copy" in r:
            f, b = r["fwd_of_copy"], r["bwd_of_copy"]
            head = (f"of copy: fwd {f[0]}-{f[-1]}, bwd {b[0]}-{b[-1]}" if f and b else "no rows")
        elif r["stage"] == "models" and "steps_ms" in r:
            head = f"{len(r['steps_ms'])} rows, {len(r['not_finite'])} not finite, {len(r['errors'])} errors"
        else:
            head = r.get("note", "")
        lines.append(f"{r['stage']:12} {r['status']:8} {r.get('seconds', 0):8.1f} {r['estimate_s']:8.0f}  {head}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help=f"stages to run (default: all of {[s.name for s in STAGES]})")
    parser.add_argument("--dry-run", action="store_true", help="every stage on tiny shapes on the CPU")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench" / "out" / "gpu_check"))
    args = parser.parse_args(argv)
    unknown = set(args.stages) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    import torch

    started = time.time()
    deadline = started + args.budget
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU check of this script")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env, workers = stage_environment(args.dry_run)
    environment = dict(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
                       device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       missing=missing_packages(("triton", "pytest", "hypothesis", "ninja", "xdist", "peft",
                                                 "torchvision", "timm", "safetensors")))
    if importlib.util.find_spec("triton") is not None:
        import triton

        environment["triton"] = triton.__version__
    print(json.dumps(environment))
    selected = [s for s in STAGES if not args.stages or s.name in args.stages]
    records = []
    prebuild = None
    with open(args.out / "gpu_check.log", "a") as log:
        log.write(f"\n# gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(environment)}\n")
        if not args.dry_run and any(s.name == "native" for s in selected):
            # the native CUDA build takes a minute or more: start it now, beside the first stage
            prebuild = subprocess.Popen(commands("native", False, work, workers)[0], cwd=REPO, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for stage in selected:
            if stage.name == "native" and prebuild is not None:
                prebuild.wait(timeout=max(1.0, min(stage.limit_s, deadline - time.time())))
            record = run_stage(stage, args.dry_run, work, env, deadline, workers, log)
            records.append(record)
            (args.out / f"{stage.name}.json").write_text(json.dumps(record, indent=1, default=str))
            summary = dict(environment=environment, seconds=round(time.time() - started, 1), budget_s=args.budget,
                           stages=[{k: v for k, v in r.items() if k not in ("log_tail", "data")} for r in records])
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            print(f"[{time.time() - started:5.0f} s] {stage.name}: {record['status']} in {record['seconds']} s "
                  f"{record.get('note', '')}", flush=True)
    print()
    print(summary_table(records))
    print(f"total {time.time() - started:.0f} s of a {args.budget:.0f} s budget; results in {args.out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
