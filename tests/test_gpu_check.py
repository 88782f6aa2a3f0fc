"""The device script (bench/gpu_check.sh, bench/gpu_check.py): its dry run, every stage on tiny shapes
on the CPU, passes; a run cut off by its budget still writes every stage's report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["correctness", "native", "layers", "kernels", "models"]


def _gpu_check(out: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")])}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _reports(out: Path) -> dict:
    return {stage: json.loads((out / f"{stage}.json").read_text()) for stage in STAGES
            if (out / f"{stage}.json").is_file()}


@pytest.mark.slow
def test_dry_run_passes_every_stage(tmp_path):
    run = _gpu_check(tmp_path, "--dry-run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in summary["stages"]), summary
    reports = _reports(tmp_path)
    assert reports["correctness"]["passed"] > 0 and reports["correctness"]["failures"] == 0
    assert reports["native"]["passed"] > 0
    assert reports["layers"]["verified_ok"] > 0 and reports["layers"]["mismatches"] == 0
    assert reports["kernels"]["data"]["rows"] and reports["models"]["steps_ms"]
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    assert "stage        status" in run.stdout  # the summary table at the end


def test_a_run_cut_off_by_its_budget_reports_every_stage(tmp_path, monkeypatch):
    """Every stage's command outlasts the budget: the first is killed at the deadline, the others are
    not started, and each still writes its report (stages stand in for slow ones, so that how fast
    this machine runs the real dry run cannot decide the outcome)."""
    sys.path.insert(0, str(REPO))
    try:
        from bench import gpu_check
    finally:
        sys.path.remove(str(REPO))
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    monkeypatch.setattr(gpu_check, "commands", lambda *args, **kwargs: [sleeper])
    monkeypatch.setattr(gpu_check, "missing_packages", lambda names: [])
    assert gpu_check.main(["--dry-run", "--budget", "7", "--out", str(tmp_path)]) == 1
    reports = _reports(tmp_path)
    assert list(reports) == STAGES
    assert reports["correctness"]["status"] == "cut off" and "stopped after" in reports["correctness"]["note"]
    assert all(r["status"] == "cut off" for r in reports.values()), {s: r["status"] for s, r in reports.items()}
    assert all("no time left" in r["note"] for s, r in reports.items() if s != "correctness")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["stages"]) == len(STAGES) and (tmp_path / "gpu_check.log").is_file()
