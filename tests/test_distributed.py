"""DDP and FSDP2 (fully_shard) with gloo, two processes on the CPU, training an injected model
(tests/distributed_worker.py is one rank). Marked slow: each test starts two Python processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
WORLD = 2
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, out_dir) -> list:
    """Starts every rank, waits for all, returns their reports; fails with their output on an error."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(r), str(WORLD), port, str(out_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(WORLD)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} of {scenario} exited with {p.returncode}:\n{text}"
        assert "Warning" not in text, f"rank {r} of {scenario} printed a warning:\n{text}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_ddp_gloo_two_processes(tmp_path):
    reports = run_ranks("ddp", tmp_path)
    for r, report in enumerate(reports):
        assert report["warnings"] == [], f"rank {r}: {report['warnings']}"
        assert report["layout_mismatches"] == []  # every gradient in its parameter's layout (DDP's bucket views)
        assert max(report["grad_scale"]) > 1e-3  # gradients that are not all zero
        assert report["grad_rank_spread"] == [0.0] * 3  # synced: every rank holds the same gradient
        # and it is the gradient of the whole batch computed in one process
        assert max(report["grad_vs_single"]) <= 1e-6 * max(report["grad_scale"])
        assert report["replica_spread"] == 0.0  # identical replicas after three steps
        assert report["params_vs_single"] <= 1e-6
        assert report["base_unchanged"]


def test_fsdp2_fully_shard_gloo_two_processes(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP in this torch")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no fully_shard (FSDP2)")
    reports = run_ranks("fsdp2", tmp_path)
    for r, report in enumerate(reports):
        assert report["warnings"] == [], f"rank {r}: {report['warnings']}"
        # adapters are sharded with the frozen base: every parameter is a DTensor split along dim 0
        assert all(report["sharded"].values())
        assert report["local_rows"]["2.weight"] == 64 and report["local_rows"]["2.factors.0"] == 64
        assert report["local_rows"]["2.core"] == 8  # the (16, 16, 1, 1) core, half of its rows per rank
        assert report["round_trip_diff"] == 0.0  # full state dict -> fresh sharded model: same outputs
    first = reports[0]
    assert first["state_keys_match"]  # the full state dict has the plain model's keys
    assert first["trained_moved"] > 1e-3  # the step changed the trained tensors
    assert first["trained_vs_reference"] <= 1e-6  # as one process training on the same batches
    assert first["plain_vs_sharded"] == 0.0  # the full state dict loads into an unsharded model
