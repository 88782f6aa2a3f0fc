"""The native backend's build: it builds where a C++ compiler exists, is found in its cache, shares
the `lrtensor` namespace with the Python custom ops in either order of loading, falls back with
a warning where it cannot build, and every CUDA source compiles with nvcc."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lrtensor_kernels as lk
from lrtensor_kernels import backend
from lrtensor_kernels.kernels import native_build

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter at the repository root (this checkout's package)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_native_backend_builds_where_a_compiler_exists():
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine: the native backend cannot build here")
    assert native_build.available(), f"the native backend did not build: {native_build.unavailable_reason()}"
    assert native_build.unavailable_reason() is None


@pytest.mark.parametrize("make, shape, want", [
    (lambda: lk.LieRALinear(512, 512, rank=8), (4, 512), "native"),  # weight-sized passes: one fused pass wins
    (lambda: lk.FLoRAConv2d(4, 6, 3), (1, 4, 5, 5), "reference"),  # fixed costs: the fused call's are dearer
])
def test_auto_offers_native_on_cpu_where_it_builds(monkeypatch, make, shape, want):
    """Under auto on the CPU, with the native library built, both native and reference are offered
    per layer, and the layer runs (its kernels included) on the one the cost model estimates faster."""
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    from lrtensor_kernels import ops, strategies

    used, decisions = [], []
    real = ops.kernels_for
    monkeypatch.setattr(ops, "kernels_for", lambda impl: used.append(impl) or real(impl))
    layer = make()
    with lk.use_backend("auto"), strategies.observing(lambda call, decision: decisions.append(decision)):
        layer(torch.randn(shape, requires_grad=True)).sum().backward()
    assert backend.resolve(torch.device("cpu")) == "native"
    assert backend.candidates(torch.device("cpu")) == ("native", "reference")
    (decision,) = decisions
    assert set(decision.backend_seconds) == {"native", "reference"}
    assert decision.impl == want == min(decision.backend_seconds, key=decision.backend_seconds.get)
    assert set(used) == ({"native"} if want == "native" else set())


@pytest.mark.parametrize("order", ["python_ops_first", "library_first"])
def test_namespace_is_shared_in_either_order(order):
    """The C++ library owns `lrtensor` (TORCH_LIBRARY); the Python custom ops of ops.py are fragments.
    A fresh process finds the cached build: nothing is compiled again."""
    path = native_build.load()
    load_library = f"import torch; torch.ops.load_library({path!r})"
    import_package = "import lrtensor_kernels as lk"
    first, second = (import_package, load_library) if order == "python_ops_first" else (load_library, import_package)
    run = _python(f"""
        {first}
        {second}
        import torch
        import lrtensor_kernels as lk
        layer = lk.LieRALinear(6, 4)
        with lk.use_backend("native"):
            y = layer(torch.randn(3, 6))
        y.sum().backward()
        print(torch.ops.lrtensor.adapted_op.default, torch.ops.lrtensor.lowrank_transform.default)
    """)
    assert run.returncode == 0, run.stderr
    assert "lrtensor.adapted_op.default" in run.stdout and "lrtensor.lowrank_transform.default" in run.stdout
    assert "compiling" not in run.stderr


def test_without_a_compiler_auto_warns_and_native_raises(tmp_path):
    """A machine without a compiler: import works, 'auto' warns once with the reason and runs the
    reference backend, an explicit 'native' raises a clear error."""
    run = _python("""
        import warnings, torch
        import lrtensor_kernels as lk
        from lrtensor_kernels.kernels import native_build
        assert not native_build.available()
        layer = lk.SSBConv2d(3, 4, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(torch.randn(1, 3, 5, 5)).sum().backward()
            layer(torch.randn(1, 3, 5, 5))
        print("WARNINGS", [str(w.message) for w in caught])
        try:
            with lk.use_backend("native"):
                layer(torch.randn(1, 3, 5, 5))
        except RuntimeError as exc:
            print("ERROR", exc)
    """, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="no-such-compiler")
    assert run.returncode == 0, run.stderr
    warnings_line = next(line for line in run.stdout.splitlines() if line.startswith("WARNINGS"))
    assert warnings_line.count("native CPU backend is unavailable") == 1, warnings_line
    assert "no C++ compiler found (looked for 'no-such-compiler'" in warnings_line
    assert "'auto' uses the 'reference' backend" in warnings_line
    error = next(line for line in run.stdout.splitlines() if line.startswith("ERROR"))
    assert "backend 'native' was selected but the native backend is unavailable" in error
    assert "no C++ compiler found" in error and "'reference' backend runs without it" in error


def test_selecting_native_on_an_unsupported_device_is_an_error():
    if not native_build.available():
        pytest.skip("native backend unavailable")
    with lk.use_backend("native"), pytest.raises(RuntimeError, match="backend 'native' has no kernels for tensors on "
                                                                      "xpu"):
        backend.resolve(torch.device("xpu"))
    with lk.use_backend("native"):  # meta tensors hold shapes only: every backend runs its reference math there
        assert backend.resolve(torch.device("meta")) == "native"


def test_a_failed_build_warns_and_leaves_the_other_backends(tmp_path):
    broken = tmp_path / "csrc" / "lrtensor"
    broken.mkdir(parents=True)
    (broken / "broken.cpp").write_text("#error this source does not compile\n")
    run = _python(f"""
        import warnings, torch
        from pathlib import Path
        import lrtensor_kernels as lk
        from lrtensor_kernels.kernels import native_build
        native_build.CSRC = Path({str(tmp_path / "csrc")!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lk.FLoRALinear(5, 3)(torch.randn(2, 5)).sum().backward()
        print("WARNINGS", [str(w.message) for w in caught])
    """, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr
    assert "the native CPU backend is unavailable (building it failed: Error building extension" in run.stdout


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        found = os.path.join(CUDA_HOME, "bin", "nvcc")
    return found


CUDA_TARGETS = ("80", "90")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def spilling_kernels(ptxas_output: str) -> list:
    """The ``Function properties`` lines of ``ptxas -v`` (one per kernel and target) that report a spill."""
    lines = ptxas_output.splitlines()
    return [f"{lines[i - 1].strip()} {line.strip()}" for i, line in enumerate(lines)
            if (m := SPILLS.search(line)) and (int(m.group(1)) or int(m.group(2)))]


def nvcc_command(nvcc: str, source: Path, output: Path) -> list:
    """The nvcc command that compiles one CUDA source of csrc/ to an object, as the extension build
    would (torch's include dirs and nvcc flags, C++20), for the A100's sm_80 and the H100's sm_90,
    with ptxas reporting each kernel's registers and spills."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = include_paths("cpu") + [str(native_build.CSRC)]
    defines = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in includes):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # the CPU wheel ships the CUDA headers without it
    return [nvcc, "-c", str(source), "-o", str(output), "-std=c++20", "-Xcompiler", "-fPIC",
            *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_TARGETS], "-Xptxas=-v", *COMMON_NVCC_FLAGS, *native_build.CUDA_FLAGS, *defines,
            *[f"-I{d}" for d in includes]]


@pytest.mark.slow  # minutes of nvcc on a small CPU where nothing is cached
def test_every_cuda_source_compiles_with_nvcc(tmp_path):
    """Each .cu file of csrc/ compiles for sm_80 and sm_90, and no kernel spills. A passing set of sources is remembered by the hash of
    csrc/, nvcc's version and the command (the compile takes minutes on a small CPU); any change
    compiles again."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA sources cannot be compiled here")
    sources = sorted(native_build.CSRC.glob("lrtensor/**/*.cu"))
    assert len(sources) >= 4, sources
    commands = {s: nvcc_command(nvcc, s, tmp_path / (s.stem + ".o")) for s in sources}
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256((version + torch.__version__ + repr([c[5:] for c in commands.values()])).encode())
    for path in sorted(native_build.CSRC.glob("lrtensor/**/*")):  # what the CUDA sources can include
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h") and "cpu" not in path.parts:
            digest.update(path.read_bytes())
    key = digest.hexdigest()[:16]
    passed = native_build.build_directory(f"nvcc_check_{key}") / "passed"
    if passed.is_file():
        return
    running = {s: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for s, c in commands.items()}
    failures = []
    for source, process in running.items():
        output, _ = process.communicate(timeout=1200)
        if process.returncode != 0 or not (tmp_path / (source.stem + ".o")).is_file():
            errors = [line for line in output.splitlines() if "error" in line.lower()]
            failures.append(f"{source.relative_to(REPO)}:\n" + "\n".join(errors[:20] or output.splitlines()[-20:]))
        elif spilling_kernels(output):
            failures.append(f"{source.relative_to(REPO)} spills:\n" + "\n".join(spilling_kernels(output)))
    assert not failures, "nvcc failed or a kernel spills:\n" + "\n\n".join(failures)
    passed.parent.mkdir(parents=True, exist_ok=True)
    passed.write_text("\n".join(" ".join(c) for c in commands.values()))


# ---------------------------------------------------------------------------------------------
# first use in several processes at once; CUDA builds of torch on machines without a GPU
# ---------------------------------------------------------------------------------------------

_FIRST_USE = """
    import json, os, sys, time
    from pathlib import Path
    import torch
    from lrtensor_kernels.kernels import native_build
    if os.environ.get("PROBE_CSRC"):
        native_build.CSRC = Path(os.environ["PROBE_CSRC"])
    while time.time() < float(os.environ["START_AT"]):  # both processes reach the build together
        time.sleep(0.01)
    print(json.dumps({"available": native_build.available(), "reason": native_build.unavailable_reason(),
                      "path": native_build._state.get("path")}))
"""


def _probe_sources(root: Path) -> Path:
    """A csrc/ with one trivial C++ source: a build of a second, not a minute."""
    (root / "lrtensor").mkdir(parents=True)
    (root / "lrtensor" / "probe.cpp").write_text('extern "C" int lrtensor_probe() { return 1; }\n')
    return root


def _first_use(extensions: Path, csrc=None, processes: int = 2, delay: float = 3.0) -> list:
    """Starts fresh interpreters that use the native backend at the same moment; their results and stderr."""
    import json
    import time

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "START_AT": str(time.time() + delay),
           "PROBE_CSRC": str(csrc or "")}
    runs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_FIRST_USE)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(processes)]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=1800)
        assert run.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    return results


def test_first_use_in_two_processes_builds_once(tmp_path):
    """One process builds under the lock; the other waits and loads the same library; neither fails."""
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    csrc = _probe_sources(tmp_path / "csrc")
    results = _first_use(tmp_path / "ext", csrc)
    assert all(r["available"] for r, _ in results), results
    assert results[0][0]["path"] == results[1][0]["path"]
    assert sum(err.count("compiling the native backend") for _, err in results) == 1, [e for _, e in results]


@pytest.mark.slow
def test_a_build_killed_halfway_is_built_again(tmp_path):
    """A library without the 'built' marker (its build was killed) and torch's lock file left behind
    neither load a broken library nor block the next build."""
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    csrc = _probe_sources(tmp_path / "csrc")
    [(first, err)] = _first_use(tmp_path / "ext", csrc, processes=1, delay=0)
    library = Path(first["path"])
    (library.parent / "built").unlink()
    library.write_bytes(b"not a library")  # what a killed link leaves
    (library.parent / "lock").write_text("")  # torch's lock file, never released
    [(again, err)] = _first_use(tmp_path / "ext", csrc, processes=1, delay=0)
    assert again["available"], again
    assert "compiling the native backend" in err


@pytest.mark.slow
def test_first_use_in_two_spawned_processes_uses_native_in_both(tmp_path):
    """Two ranks spawned as DDP spawns them, a fresh cache, the real sources: one compiles, both run
    the native backend under 'auto' (no fallback warning)."""
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    results = _first_use(tmp_path / "ext")
    assert all(r["available"] for r, _ in results), results
    assert sum(err.count("compiling the native backend") for _, err in results) == 1


def test_cuda_plan_without_a_gpu(monkeypatch):
    """A CUDA build of torch and a CUDA toolkit but no GPU: without TORCH_CUDA_ARCH_LIST torch has no
    architecture to compile for (IndexError in its arch flags), so the CPU kernels alone are built,
    with a line that says how to get the CUDA ones; with it, they are built for those architectures."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    cuda, reason = native_build.cuda_plan()
    assert not cuda and "no CUDA device is visible and TORCH_CUDA_ARCH_LIST is not set" in reason
    assert "built for the CPU only" in reason and native_build.cuda_architectures(cuda) == ""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert native_build.cuda_plan() == (True, None)
    assert native_build.cuda_architectures(True) == "8.0;9.0"
    key_80_90 = native_build.build_key(True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert native_build.build_key(True) != key_80_90, "the architectures are part of the cache key"
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert native_build.cuda_plan() == (False, None)


@pytest.mark.slow
def test_cuda_torch_without_a_gpu_builds_the_cpu_kernels(tmp_path):
    """Where the installed torch is a CUDA build and no GPU is visible (a build node; CI's CUDA torch),
    the native backend builds in a fresh cache with one line saying it is CPU-only."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None or torch.cuda.device_count() > 0:
        pytest.skip("needs a CUDA build of torch, a CUDA toolkit and no visible GPU")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    run = subprocess.run([sys.executable, "-c", "import torch, lrtensor_kernels as lk; from lrtensor_kernels.kernels "
                          "import native_build as nb; lk.SSBLinear(5, 3)(torch.randn(2, 5)).sum().backward(); "
                          "print(nb.available(), nb.has_cuda_kernels(), torch.version.cuda)"],
                         cwd=REPO, capture_output=True, text=True, timeout=1800,
                         env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:2] == ["True", "False"], run.stdout + run.stderr
    assert run.stderr.count("built for the CPU only") == 1 and "unavailable" not in run.stderr
