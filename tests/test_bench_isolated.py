"""bench/isolated.py: configurations timed in worker processes of their own."""
import os

import pytest

from bench import cpu_time, isolated


def toy_step(name: str):
    """A worker's step for these tests: None for "absent", an error for "broken"."""
    if name == "absent":
        return None
    if name == "broken":
        raise ValueError("cannot build broken")
    import torch

    def step():
        torch.ones(4096).sum()

    return step, {"pid": os.getpid(), "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def test_each_config_runs_every_round_in_a_process_of_its_own():
    info, samples, not_run = isolated.interleaved_workers(toy_step, ["a", "b", "absent"], rounds=3, per_round=2)
    assert set(info) == {"a", "b"} and not_run == ["absent"]
    assert len({info["a"]["pid"], info["b"]["pid"], os.getpid()}) == 3
    for name in ("a", "b"):
        assert len(samples[name]) == 3
        assert all(s.seconds > 0 and s.page_faults >= 0 and s.system_seconds >= 0 for s in samples[name])
    assert isolated.median(samples["a"], "seconds") == sorted(s.seconds for s in samples["a"])[1]


def test_the_allocator_setting_reaches_the_workers_only():
    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    info, _, _ = isolated.interleaved_workers(toy_step, ["a"], rounds=1, per_round=1, allocator="keep-freed")
    assert info["a"]["trim"] == isolated.ALLOCATORS["keep-freed"]["MALLOC_TRIM_THRESHOLD_"]
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == before
    info, _, _ = isolated.interleaved_workers(toy_step, ["a"], rounds=1, per_round=1)
    assert info["a"]["trim"] == before


def test_a_worker_that_fails_names_its_config_and_the_error():
    with pytest.raises(RuntimeError, match=r"(?s)'broken' failed.*cannot build broken"):
        isolated.interleaved_workers(toy_step, ["a", "broken"], rounds=1, per_round=1)


def test_an_unknown_allocator_is_refused():
    with pytest.raises(ValueError, match="allocator must be one of"):
        isolated.interleaved_workers(toy_step, ["a"], rounds=1, per_round=1, allocator="jemalloc")


def test_the_resnet_part_reports_faults_and_kernel_time():
    result = cpu_time.measure_resnet(["fc"], rounds=1, per_round=1)
    row = result["configs"]["fc"]
    assert row["x_fc"] == 1.0 and row["page_faults"] >= 0 and row["system_ms"] >= 0 and row["trainable"] == 513_000
    markdown = cpu_time.resnet_markdown(result, {"cpu": "x", "torch": "t", "threads": 1, "clock": "c", "rounds": 1,
                                                  "per_round": 1, "load_average": 0, "commit": "c"})
    assert "| fc | " in markdown and "page faults" in markdown and "'default'" in markdown
