"""bench/gpu_rerun.py: the ids it reruns are the first device run's failures, split between the
Triton and the native stage as that run counted them; its sample keeps every file; the probe of the
native ops' argument errors names each call and gets each error on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_rerun

REPO = Path(__file__).resolve().parents[1]


def test_failed_ids_are_the_first_runs_failures_by_stage():
    ids = gpu_rerun.read_ids(gpu_rerun.FAILED_IDS)
    assert len(ids) == len(set(ids)) == 380  # 175 in the correctness stage, 205 in the native one
    native = [i for i in ids if gpu_rerun.is_native(i)]
    assert len(native) == 205 and len(ids) - len(native) == 175
    assert sum(i.startswith("tests/test_native_ops.py::") for i in ids) == 4


def test_sample_spreads_over_the_ids_and_keeps_every_file():
    ids = [f"tests/test_a.py::t[{i}]" for i in range(50)] + ["tests/test_b.py::only"]
    picked = gpu_rerun.sample(ids, 5)
    assert "tests/test_b.py::only" in picked and len(picked) <= 6
    assert picked == [i for i in ids if i in picked]  # in their order
    assert gpu_rerun.sample(ids, 100) == ids


def test_native_error_probe_names_each_call_and_gets_its_error():
    from fused import fused_kernels

    fused_kernels("native")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                          "from bench.gpu_rerun import probe_native_errors; probe_native_errors()"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    probes = [i for i, line in enumerate(lines) if line.startswith("probe cpu: ")]
    assert len(probes) == 5
    assert all(lines[i + 1].startswith("  RuntimeError: ") for i in probes), run.stdout
    assert sum("lrtensor::" in lines[i + 1] for i in probes) == 4
