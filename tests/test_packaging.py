"""Packaging: wheels and sdists carry the native sources (csrc/ as ``lrtensor_kernels/_csrc``), an
installed package finds them and builds the native backend from them on first use, and Triton is
optional. The builds are marked slow; CI also installs the built wheel into a fresh environment
(.ci/run)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from lrtensor_kernels.kernels import native_build

ROOT = Path(__file__).resolve().parents[1]
NATIVE_SUFFIXES = {".h", ".cpp", ".cuh", ".cu"}


def native_sources(csrc: Path) -> set:
    """Every file the native build reads (relative to csrc/), and csrc/README.md."""
    files = {p.relative_to(csrc).as_posix() for p in csrc.rglob("*") if p.suffix in NATIVE_SUFFIXES}
    return files | {"README.md"}


def test_the_native_sources_are_found_installed_and_in_a_checkout(tmp_path):
    installed = tmp_path / "site-packages" / "lrtensor_kernels"
    (installed / "_csrc" / "lrtensor").mkdir(parents=True)
    assert native_build.find_sources(installed) == installed / "_csrc"
    checkout = tmp_path / "checkout"
    (checkout / "lrtensor_kernels").mkdir(parents=True)
    (checkout / "csrc" / "lrtensor").mkdir(parents=True)
    assert native_build.find_sources(checkout / "lrtensor_kernels") == checkout / "csrc"
    bare = tmp_path / "bare" / "lrtensor_kernels"
    bare.mkdir(parents=True)
    assert native_build.find_sources(bare) == bare / "_csrc"  # where missing_tool then says they are not


def test_without_triton_the_other_backends_run_and_selecting_triton_says_how_to_get_it():
    run = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # as if not installed
        import torch, lrtensor_kernels as lk
        for name in ("auto", "reference"):
            with lk.use_backend(name):
                lk.FLoRALinear(5, 3)(torch.randn(2, 5)).sum().backward()
        try:
            with lk.use_backend("triton"):
                lk.FLoRALinear(5, 3)(torch.randn(2, 5))
        except RuntimeError as err:
            print("ERROR", err)
    """)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "ERROR backend 'triton' was selected but the triton package is not installed" in run.stdout
    assert "pip install 'lrtensor_kernels[triton]'" in run.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """An sdist and a wheel built by setuptools' PEP 517 hooks (what ``python -m build`` and
    ``pip install .`` call) from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out", ".benchmarks"))
    dist = tmp / "dist"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from setuptools import build_meta
        print("SDIST", build_meta.build_sdist({str(dist)!r}))
        print("WHEEL", build_meta.build_wheel({str(dist)!r}))
    """)], capture_output=True, text=True, cwd=source)
    assert run.returncode == 0, run.stderr[-3000:]
    names = dict(line.split() for line in run.stdout.splitlines() if line.startswith(("SDIST", "WHEEL")))
    return {"source": source, "sdist": dist / names["SDIST"], "wheel": dist / names["WHEEL"]}


@pytest.mark.slow
def test_the_wheel_and_the_sdist_carry_every_native_source(built):
    expected = native_sources(built["source"] / "csrc")
    assert {"lrtensor/ops/lowrank.cpp", "lrtensor/ops/cuda/cuda_common.cuh"} <= expected
    with zipfile.ZipFile(built["wheel"]) as wheel:
        prefix = "lrtensor_kernels/_csrc/"
        in_wheel = {n[len(prefix):] for n in wheel.namelist() if n.startswith(prefix)}
    assert in_wheel == expected
    with tarfile.open(built["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        in_sdist = {n[len(top) + len("/csrc/"):] for n in sdist.getnames() if n.startswith(f"{top}/csrc/")
                    and sdist.getmember(n).isfile()}
        assert f"{top}/setup.py" in sdist.getnames() and f"{top}/pyproject.toml" in sdist.getnames()
    assert expected <= in_sdist


@pytest.mark.slow
def test_the_installed_wheel_runs_every_backend_from_outside_the_sources(built, tmp_path):
    """The wheel installed on its own (the environment's torch beside it), run from a directory
    without sources: imports from the install, builds (or loads the cached build of) the native
    backend from the installed sources, and every backend matches the reference."""
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                              str(site), str(built["wheel"])], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "lrtensor_kernels" / "_csrc" / "lrtensor" / "ops" / "lowrank.cpp").is_file()
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(ROOT / "tests" / "installed_smoke.py", workdir)
    required = [b for b, runs in (("native", native_build.available()), ("triton", importlib.util.find_spec("triton")))
                if runs]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "installed_smoke.py", str(ROOT), "--require", ",".join(required)],
                         capture_output=True, text=True, cwd=workdir, env=env)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert f"imported from {site / 'lrtensor_kernels'}" in run.stdout
    assert "0 failure(s)" in run.stdout

