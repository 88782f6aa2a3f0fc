"""save_adapters is all or nothing across its two files, saves into one directory wait for each other,
loads read a consistent pair whatever a save does meanwhile, and files get the umask's permissions.

Every saved model here is recognisable from its tensors alone: model ``k`` has LieRA rank ``k``
(another shape for every k, so a config from one save with the tensors of another cannot load) and
every adapter tensor filled with ``k`` (and ``-k``)."""
from __future__ import annotations

import json
import multiprocessing
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lrtensor_kernels as lk
from lrtensor_kernels import adapter_files
from test_serialization import CONFIG, tensors_file

pytestmark = pytest.mark.usefixtures("reference_backend")


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def model_k(k: int) -> nn.Module:
    model = base()
    lk.inject(model, "liera", rank=k)
    with torch.no_grad():
        for _, layer in lk.adapter_layers(model):
            layer.lora_A.fill_(k)
            layer.lora_B.fill_(-k)
    return model


def loaded_k(directory) -> int:
    """Which model the directory holds, checked to be one model's tensors under its own config."""
    model = base()
    lk.load_adapters(model, str(directory))
    ranks = {layer.rank for _, layer in lk.adapter_layers(model)}
    assert len(ranks) == 1, ranks
    k = ranks.pop()
    for _, layer in lk.adapter_layers(model):
        assert torch.equal(layer.lora_A, torch.full_like(layer.lora_A, k))
        assert torch.equal(layer.lora_B, torch.full_like(layer.lora_B, -k))
    return k


def files_of(directory) -> dict:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def make_format_2(directory) -> None:
    """Turns a saved directory into what format 2 wrote: one fixed tensors file name, no "files"."""
    config = json.loads((directory / CONFIG).read_text())
    tensors_file(directory).rename(directory / adapter_files.LEGACY_TENSORS_FILE)
    del config["files"]
    config["format_version"] = 2
    (directory / CONFIG).write_text(json.dumps(config))


# ----------------------------------------------------------------------------------------------
# a failed save changes nothing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fails", ["config-write", "tensors-write", "interrupt-after-tensors"])
@pytest.mark.parametrize("start", ["format-3", "format-2"])
def test_a_failed_save_leaves_the_old_pair(tmp_path, monkeypatch, fails, start):
    lk.save_adapters(model_k(2), str(tmp_path))
    if start == "format-2":
        make_format_2(tmp_path)
    before = files_of(tmp_path)
    real_put = adapter_files._put

    def put(directory, name, content):
        if (fails == "config-write") == (name == CONFIG) and fails != "interrupt-after-tensors":
            raise OSError(28, "No space left on device")
        real_put(directory, name, content)

    def interrupt(step):
        if step == "tensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(adapter_files, "_put", put)
    monkeypatch.setattr(adapter_files, "_after_step", interrupt if fails == "interrupt-after-tensors" else None)
    with pytest.raises(KeyboardInterrupt if fails == "interrupt-after-tensors" else OSError):
        lk.save_adapters(model_k(3), str(tmp_path))
    assert files_of(tmp_path) == before
    assert loaded_k(tmp_path) == 2


def test_a_failure_inside_a_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    lk.save_adapters(model_k(2), str(tmp_path))
    before = files_of(tmp_path)
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:  # the config's bytes, after the tensors file went in place
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space"):
        lk.save_adapters(model_k(3), str(tmp_path))
    monkeypatch.setattr(os, "write", real_write)
    assert files_of(tmp_path) == before
    assert loaded_k(tmp_path) == 2


def test_saving_again_replaces_the_pair_and_removes_the_old_tensors(tmp_path):
    lk.save_adapters(model_k(2), str(tmp_path))
    make_format_2(tmp_path)
    assert loaded_k(tmp_path) == 2  # format 2 still loads
    lk.save_adapters(model_k(3), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG, tensors_file(tmp_path).name])
    first = files_of(tmp_path)
    lk.save_adapters(model_k(3), str(tmp_path))  # the same content: the same names and bytes
    assert files_of(tmp_path) == first
    assert loaded_k(tmp_path) == 3


# ----------------------------------------------------------------------------------------------
# loads during a save: every order of a save's steps, a reader's two reads and an interruption
# ----------------------------------------------------------------------------------------------
STEPS = ("start", "tensors", "config", "cleanup")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from(["empty", "format-2", "format-3"]),
       readers=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)).map(sorted), max_size=3),
       crash=st.sampled_from([None, "tensors", "config", "cleanup"]))
def test_loads_see_the_old_or_the_new_pair_in_every_order(tmp_path_factory, monkeypatch, start, readers, crash):
    """A reader reads the config when the save has made ``a`` of its steps and opens the tensors file
    it names after ``b >= a`` steps; the save may be interrupted after one of its steps. Every load
    gives the old model or the new one, never a mix, and afterwards the directory holds one pair."""
    directory = tmp_path_factory.mktemp("pair")
    old = None
    if start != "empty":
        lk.save_adapters(model_k(2), str(directory))
        old = 2
        if start == "format-2":
            make_format_2(directory)
    real_read = adapter_files._read_bytes
    stale = {}  # reader index -> the config bytes it read

    def read_as(i):
        first = [stale[i]]
        return lambda path: first.pop() if first and path.endswith(CONFIG) else real_read(path)

    def at(step):
        index = STEPS.index(step)
        for i, (a, b) in enumerate(readers):
            if a == index:
                config = directory / CONFIG
                stale[i] = config.read_bytes() if config.exists() else None
            if b == index:
                if stale[i] is None:  # nothing was there when it looked: it finds nothing to load
                    continue
                monkeypatch.setattr(adapter_files, "_read_bytes", read_as(i))
                try:
                    got = loaded_k(directory)
                finally:
                    monkeypatch.setattr(adapter_files, "_read_bytes", real_read)
                assert got in (old, 3)
        if step == crash:
            raise KeyboardInterrupt

    at("start")
    monkeypatch.setattr(adapter_files, "_after_step", at)
    try:
        lk.save_adapters(model_k(3), str(directory))
    except KeyboardInterrupt:
        assert crash is not None
    monkeypatch.setattr(adapter_files, "_after_step", None)
    switched = crash in (None, "config", "cleanup")
    if switched or old is not None:
        assert loaded_k(directory) == (3 if switched else old)
    names = os.listdir(directory)
    assert not [n for n in names if n.endswith(".tmp")], names
    lk.save_adapters(model_k(4), str(directory))  # a later save leaves exactly one pair
    assert sorted(os.listdir(directory)) == sorted([CONFIG, tensors_file(directory).name])
    assert loaded_k(directory) == 4


# ----------------------------------------------------------------------------------------------
# concurrent saves and loads with real threads and processes
# ----------------------------------------------------------------------------------------------
def test_concurrent_saves_and_loads_in_threads(tmp_path):
    lk.save_adapters(model_k(1), str(tmp_path))
    models = {k: model_k(k) for k in range(1, 5)}
    failures, seen = [], set()
    stop = threading.Event()

    def writer(k):
        try:
            for _ in range(15):
                lk.save_adapters(models[k], str(tmp_path))
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(f"save {k}: {type(err).__name__}: {err}")

    def reader():
        try:
            while not stop.is_set():
                seen.add(loaded_k(tmp_path))
        except BaseException as err:  # noqa: BLE001
            failures.append(f"load: {type(err).__name__}: {err}")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in models]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not failures, failures[:3]
    assert seen and seen <= set(models)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG, tensors_file(tmp_path).name])
    assert loaded_k(tmp_path) in models


def _save_repeatedly(directory: str, k: int, times: int, failures) -> None:
    torch.set_num_threads(1)
    try:
        model = model_k(k)
        for _ in range(times):
            lk.save_adapters(model, directory)
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        failures.put(f"save {k}: {type(err).__name__}: {err}")


@pytest.mark.slow
def test_concurrent_saves_and_loads_in_processes(tmp_path):
    """Two processes save into one directory while this one loads from it (``flock`` serialises
    the saves across processes)."""
    lk.save_adapters(model_k(1), str(tmp_path))
    context = multiprocessing.get_context("spawn")
    failures = context.Queue()
    writers = [context.Process(target=_save_repeatedly, args=(str(tmp_path), k, 40, failures)) for k in (2, 3)]
    for p in writers:
        p.start()
    seen = set()
    while any(p.is_alive() for p in writers):
        seen.add(loaded_k(tmp_path))
    for p in writers:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert failures.empty(), failures.get()
    assert seen <= {1, 2, 3} and loaded_k(tmp_path) in (2, 3)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG, tensors_file(tmp_path).name])


def test_saves_into_one_directory_wait_for_each_other(tmp_path, monkeypatch):
    """While one save holds the directory between its steps, another blocks until it is done."""
    lk.save_adapters(model_k(1), str(tmp_path))
    inside, release, order = threading.Event(), threading.Event(), []

    def pause(step):
        if step == "tensors" and threading.current_thread().name == "first":
            inside.set()
            release.wait(10)

    monkeypatch.setattr(adapter_files, "_after_step", pause)
    first = threading.Thread(target=lambda: (lk.save_adapters(model_k(2), str(tmp_path)), order.append(2)),
                             name="first")
    second = threading.Thread(target=lambda: (lk.save_adapters(model_k(3), str(tmp_path)), order.append(3)),
                              name="second")
    first.start()
    assert inside.wait(10)
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second save did not wait for the first"
    release.set()
    first.join(10)
    second.join(10)
    assert order == [2, 3] and loaded_k(tmp_path) == 3


# ----------------------------------------------------------------------------------------------
# permissions
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        lk.save_adapters(model_k(2), str(tmp_path / "d"))
        probe = tmp_path / "probe"
        probe.write_text("x")  # any file the user writes
    finally:
        os.umask(previous)
    expected = probe.stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in os.listdir(tmp_path / "d"):
        assert (tmp_path / "d" / name).stat().st_mode & 0o777 == expected, name
