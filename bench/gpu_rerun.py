"""Reruns, on a CUDA machine, exactly what failed on the first device run (about 3 minutes on an H200).

Run ``bash bench/gpu_rerun.sh`` from the repository root (``--dry-run``: on the CPU, Triton under the
interpreter, a sample of the ids). It runs

1. the layer check that mismatched: ``bench.run --verify-only`` on convnext_t/dw7x7_96_56 (depthwise
   7x7, 96 channels, 56x56, bfloat16) for SSL and SSB on the Triton route under auto;
2. the test ids of ``bench/results/h200_28b8496/failed_tests.txt`` (the FAILED lines of that run's
   log) of the Triton backend, while the native backend's CUDA build runs beside these two steps;
3. a probe of the native ops' argument errors (each bad call named before it runs, on the CPU and
   on CUDA: the four tests of those errors died of a segmentation fault on CUDA);
4. the ids of the native backend; pytest with 8 workers where pytest-xdist is installed.

Each step gets at most what is left of ``--budget`` (default 240 s), and ``summary.json`` is
rewritten after each.

Results under ``$OUT`` (default bench/out/gpu_rerun), five files: ``triton.xml`` and ``native.xml``
(junit), ``layers.json`` (the check), ``gpu_rerun.log`` (every command's output) and
``summary.json``. An id that this checkout does not collect (the CPU lacks the CUDA-only ones, or a
test was renamed) is listed under ``missing`` in the summary, not run; on CUDA it counts as a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu_check import _junit_counts, stage_environment

REPO = Path(__file__).resolve().parents[1]
FAILED_IDS = REPO / "bench" / "results" / "h200_28b8496" / "failed_tests.txt"
LAYER_CHECK = ["--verify-only", "--no-plot", "--strategies", "auto", "--shapes", "convnext_t/dw7x7_96_56",
               "--providers", "ssl_triton,ssb_triton", "--dtype", "bfloat16"]
DRY_RUN_SAMPLE = 16
BUILD = ("from lrtensor_kernels.kernels import native_build as nb; nb.load(); "
         "print('native library:', nb.load(), 'CUDA kernels:', nb.has_cuda_kernels())")


def read_ids(path: Path) -> list:
    """The test ids of ``path``: one a line; blank lines and ``#`` comments skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def sample(ids: list, count: int) -> list:
    """``count`` ids spread evenly over ``ids`` (every file keeps at least one), in their order."""
    if count >= len(ids):
        return list(ids)
    step = len(ids) / count
    picked = {ids[int(i * step)] for i in range(count)}
    by_file = {}
    for test_id in ids:
        by_file.setdefault(test_id.split("::")[0], test_id)
    return [i for i in ids if i in picked or i in by_file.values()]


def is_native(test_id: str) -> bool:
    """Whether ``test_id`` ran in the native stage (``-k native``) of the first run."""
    return "native" in test_id


def probe_native_errors() -> None:
    """Calls the native ops with bad operands, on the CPU and then on CUDA, each call named (and
    flushed) before it runs: the four tests of these errors took their processes down with a
    segmentation fault on the first run (CUDA tensors; the checks come before any memory access, and
    the same calls raise their errors on the CPU), so where the process dies the last line names
    the call and the device."""
    import torch

    from lrtensor_kernels.kernels import native_build

    print("native library:", native_build.load(), "CUDA kernels:", native_build.has_cuda_kernels(),
          "TORCH_SHOW_CPP_STACKTRACES:", os.environ.get("TORCH_SHOW_CPP_STACKTRACES"), flush=True)
    ops = torch.ops.lrtensor
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        x, a = torch.randn(4, 5, 6, device=device), torch.randn(2, 3, 4, device=device)
        w, left, right = (torch.randn(20, 45, device=device), torch.randn(20, 3, device=device),
                          torch.randn(3, 45, device=device))
        cases = {
            "torch's own check (aten::mm)": lambda: torch.mm(x[0], x[0]),
            "mode_product, functional (its check before allocating)": lambda: ops.mode_product(
                x, torch.randn(7, 4, device=device), 1),
            "channel_dot.out (the device kernel's check)": lambda: ops.channel_dot.out(
                a, a[:, :, :3], 1, out=torch.zeros(3, device=device)),
            "lowrank_transform.out, bad combine (parse_combine)": lambda: ops.lowrank_transform.out(
                w, left, right, "tanh", out=torch.empty_like(w)),
            "lowrank_transform.out, bad right": lambda: ops.lowrank_transform.out(
                w, left, right[:, :-1], "add", out=torch.empty_like(w)),
        }
        for name, call in cases.items():
            print(f"probe {device}: {name}", flush=True)
            try:
                call()
                print("  no error", flush=True)
            except RuntimeError as exc:
                print(f"  RuntimeError: {str(exc).splitlines()[0]}", flush=True)


def collected(ids: list, env: dict, log, timeout: float) -> set:
    """The ids among ``ids`` that pytest collects in this checkout."""
    files = sorted({i.split("::")[0] for i in ids})
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
    result = _run(command, env, log, timeout=timeout)
    found = {line.strip() for line in result.stdout.splitlines() if "::" in line}
    return {i for i in ids if i in found}


def _run(command: list, env: dict, log, timeout: float) -> subprocess.CompletedProcess:
    log.write(f"\n$ {' '.join(command[:12])}{' ...' if len(command) > 12 else ''}\n")
    log.flush()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        result = subprocess.CompletedProcess(command, 124, output)
        output += f"\n(stopped after {timeout:.0f} s)\n"
    log.write(result.stdout)
    log.flush()
    return result


def pytest_ids(ids: list, junit: Path, workers: int, env: dict, log, timeout: float) -> dict:
    """Runs ``ids``; their counts from the junit file (and the exit status)."""
    if not ids:
        return dict(tests=0, status="nothing to run")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if workers > 1:
        command += ["-n", str(workers)]
    started = time.time()
    result = _run(command + ids, env, log, timeout)
    counts = _junit_counts(junit)
    status = "ok" if result.returncode == 0 else ("cut off" if result.returncode == 124 else "failed")
    return dict(counts, status=status, exit_status=result.returncode, seconds=round(time.time() - started, 1))


def layer_check(dry_run: bool, work: Path, out: Path, env: dict, log, timeout: float) -> dict:
    data = work / "layers.json"
    command = [sys.executable, "-m", "bench.run", *LAYER_CHECK, "--out", str(data)]
    if dry_run:
        command += ["--device", "cpu"]
    started = time.time()
    result = _run(command, env, log, timeout)
    record = dict(status="failed", exit_status=result.returncode, seconds=round(time.time() - started, 1))
    if data.is_file():
        shutil.copy(data, out / "layers.json")
        checks = json.loads(data.read_text()).get("verify", [])
        record.update(checks=[{k: c.get(k) for k in ("shape", "provider", "status", "output", "grad_input",
                                                      "grad_params", "tolerance")} for c in checks])
        if checks and all(c.get("status") in ("ok", "skipped") for c in checks):
            record["status"] = "ok"
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, a sample of the ids")
    parser.add_argument("--ids", type=Path, default=FAILED_IDS, help="file of test ids (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=None,
                        help=f"run this many of the ids, spread evenly (default: all; {DRY_RUN_SAMPLE} in a dry run)")
    parser.add_argument("--budget", type=float, default=240,
                        help="seconds for the whole run (default %(default)s); each step gets what is left")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench" / "out" / "gpu_rerun"))
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU check of this script")
        return 2
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_rerun_"))
    env, workers = stage_environment(args.dry_run)
    ids = read_ids(args.ids)
    count = args.sample if args.sample is not None else (DRY_RUN_SAMPLE if args.dry_run else len(ids))
    ids = sample(ids, count)
    summary = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   dry_run=args.dry_run, ids_file=str(args.ids), ids=len(ids))
    deadline = started + args.budget
    left = lambda limit: max(5.0, min(limit, deadline - time.time()))  # noqa: E731

    def save():  # after every step: a run cut off from outside still leaves what it found
        summary["seconds"] = round(time.time() - started, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    with open(args.out / "gpu_rerun.log", "a") as log:
        log.write(f"\n# gpu_rerun {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(summary)}\n")
        build_log = work / "native_build.log"
        with open(build_log, "w") as build_output:  # a minute or more of nvcc: beside the Triton steps
            build = subprocess.Popen([sys.executable, "-c", BUILD], cwd=REPO, env=env, stdout=build_output,
                                     stderr=subprocess.STDOUT)
        summary["layers"] = layer_check(args.dry_run, work, args.out, env, log, timeout=left(150))
        save()
        present = collected(ids, env, log, timeout=left(120))
        summary["missing"] = [i for i in ids if i not in present]
        runnable = [i for i in ids if i in present]
        summary["triton"] = pytest_ids([i for i in runnable if not is_native(i)], args.out / "triton.xml", workers,
                                       env, log, timeout=left(240))
        save()
        try:
            build.wait(timeout=left(300))
        except subprocess.TimeoutExpired:
            build.kill()
            build.wait()
        build_output = build_log.read_text()
        log.write(f"\n$ native build\n{build_output}")
        summary["native_build"] = dict(exit_status=build.returncode, output=build_output.strip().splitlines()[-3:])
        probe = _run([sys.executable, "-X", "faulthandler", "-c",
                      "from bench.gpu_rerun import probe_native_errors; probe_native_errors()"], env, log,
                     timeout=left(60))
        summary["native_probe"] = dict(exit_status=probe.returncode, output=probe.stdout.strip().splitlines()[-40:])
        save()
        summary["native"] = pytest_ids([i for i in runnable if is_native(i)], args.out / "native.xml", workers, env,
                                       log, timeout=left(240))
        save()
    for part in ("triton", "native"):
        r = summary[part]
        print(f"{part:7} {r['status']:14} {r.get('passed', 0)} passed, {r.get('failures', 0) + r.get('errors', 0)} "
              f"failed, {r.get('skipped', 0)} skipped of {r.get('tests', 0)}; {r.get('seconds', 0)} s")
    for check in summary["layers"].get("checks", []):
        print(f"layers  {check['provider']:14} {check['status']:9} grad_params {check['grad_params']}")
    status = summary["native_probe"]["exit_status"]
    print(f"probe   exit status {status}" + (f": killed by signal {-status}" if status < 0 else ""))
    print(f"missing {len(summary['missing'])} ids not collected here; total {summary['seconds']} s; "
          f"results in {args.out}")
    ok = all(summary[p]["status"] in ("ok", "nothing to run") for p in ("triton", "native"))
    ok = ok and summary["layers"]["status"] == "ok" and (args.dry_run or not summary["missing"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
