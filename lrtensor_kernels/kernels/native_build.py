"""Builds and loads the native extension (the C++ and CUDA C++ sources of ``csrc/``) on first use.

The sources are compiled with ``torch.utils.cpp_extension.load`` (ninja) against the torch that
is imported, so the extension always matches its ABI; ``csrc/README.md`` says why this beats a
build at install time. The build is cached under
``$TORCH_EXTENSIONS_DIR/lrtensor_kernels/lrtensor_native_<key>/`` (``TORCH_EXTENSIONS_DIR``
defaults to ``~/.cache/torch_extensions``), where ``<key>`` hashes the sources, the compiler
flags, the torch and Python versions and the CPU capability: a cached build is loaded as it is,
a changed source builds a new one.

The CUDA sources are compiled where torch has CUDA, a CUDA toolkit is found and there is an
architecture to compile for: the visible GPUs', or ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``).
On a machine without a GPU and without that variable (a CPU box with the standard CUDA build of
torch from PyPI) the CPU kernels alone are built, and one line says so. The architectures are part
of the cache key.

Several processes may use the backend for the first time at once (the ranks of a DDP job): one
builds, under an exclusive lock on ``<name>.lock`` beside the build directory (``fcntl.flock``,
released by the operating system if the process dies), the others wait for it and load what it
built. A build counts as done once its library has loaded (a ``built`` marker): a library left by a
build that was killed halfway is built again.

Loading the library registers ``torch.ops.lrtensor.lowrank_transform``, ``lowrank_project`` and
``channel_dot``. Without a compiler (or ninja, or when the build fails) :func:`available` is
False and :func:`unavailable_reason` says why; nothing fails at import.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

import torch


def find_sources(package: Path) -> Path:
    """The directory holding ``lrtensor/`` of the native sources, for the package directory
    ``package``: ``<package>/_csrc`` in an installed wheel or sdist (package data), else ``csrc/``
    beside the package in a source checkout or an editable install; the first of those when
    neither exists (``missing_tool`` then says so)."""
    candidates = (package / "_csrc", package.parent / "csrc")
    return next((c for c in candidates if (c / "lrtensor").is_dir()), candidates[0])


CSRC = find_sources(Path(__file__).resolve().parents[1])
LIBRARY_PREFIX = "lrtensor_native"

_lock = threading.Lock()
_state: dict = {}  # "path" once loaded, or "error": why it is unavailable


def _cpu_flags() -> list:
    """Optimisation flags and the ATen vector width (at::vec::Vectorized) for this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mfma", "-mf16c"]
    if capability == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


# at::parallel_for is an inline OpenMP loop: without -fopenmp it compiles to a serial loop. The
# extension then shares torch's OpenMP runtime (libgomp.so.1 is already loaded by torch), so
# torch.set_num_threads governs it too.
OPENMP_FLAGS = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3", "-Wall", "-Wno-unused-function"] + OPENMP_FLAGS
CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def cuda_plan() -> tuple:
    """``(build the CUDA sources?, the line saying why not or None)``: torch has CUDA, a CUDA toolkit
    is found, and ``TORCH_CUDA_ARCH_LIST`` is set or a GPU is visible (torch's default architecture
    list is the visible GPUs'; without one it has none to compile for)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        return False, None
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return True, None
    return False, ("no CUDA device is visible and TORCH_CUDA_ARCH_LIST is not set: the native backend is built "
                   "for the CPU only (set TORCH_CUDA_ARCH_LIST, e.g. \"8.0;9.0\", to build its CUDA kernels too)")


def with_cuda() -> bool:
    """Whether the CUDA sources are built (:func:`cuda_plan`)."""
    return cuda_plan()[0]


def cuda_architectures(cuda: bool) -> str:
    """What the CUDA code is compiled for (part of the cache key): ``TORCH_CUDA_ARCH_LIST``, else the
    visible GPUs' compute capabilities."""
    if not cuda:
        return ""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed and listed != "native":
        return listed
    return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))


def sources(cuda: bool) -> list:
    """The files compiled: every .cpp under csrc/lrtensor, and every .cu where ``cuda``."""
    files = sorted(CSRC.glob("lrtensor/**/*.cpp"))
    if cuda:
        files += sorted(CSRC.glob("lrtensor/**/*.cu"))
    return files


def build_key(cuda: bool) -> str:
    """A hash of everything the built library depends on."""
    digest = hashlib.sha256()
    for path in sorted(p for p in CSRC.glob("lrtensor/**/*") if p.is_file()):
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), str(cuda), cuda_architectures(cuda),
                 sys.implementation.cache_tag, " ".join(CXX_FLAGS + _cpu_flags()), " ".join(CUDA_FLAGS)):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def build_directory(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch_extensions")
    return Path(root) / "lrtensor_kernels" / name


def compiler() -> Optional[str]:
    """Path of the C++ compiler the build would use ($CXX, else c++), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def missing_tool() -> Optional[str]:
    """Why a build cannot start here, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    if compiler() is None:
        return f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r} on PATH; set CXX to choose one)"
    if not is_ninja_available():
        return "ninja is not installed (python3 -m pip install ninja)"
    if not CSRC.is_dir():
        return (f"the C++ sources are not at {CSRC} (this install lacks them; a wheel or sdist of this package, "
                f"pip install . and a source checkout all carry them)")
    return None


class _MissingTool(RuntimeError):
    pass


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive ``flock`` on ``lock_path`` (waits for it); the OS releases it if the process dies."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_and_load() -> str:
    cuda, cpu_only_reason = cuda_plan()
    name = f"{LIBRARY_PREFIX}_{build_key(cuda)}"
    directory = build_directory(name)
    library, built = directory / f"{name}.so", directory / "built"
    if built.is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return str(library)
    reason = missing_tool()
    if reason is not None:
        raise _MissingTool(reason)
    with _exclusive(directory.parent / f"{name}.lock"):
        if built.is_file() and library.is_file():  # another process built it while this one waited
            torch.ops.load_library(str(library))
            return str(library)
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        # what a build killed halfway leaves: torch's own lock file, and a library that may be cut short
        # (ninja would take it as up to date)
        (directory / "lock").unlink(missing_ok=True)
        library.unlink(missing_ok=True)
        if cpu_only_reason:
            print(f"lrtensor_kernels: {cpu_only_reason}", file=sys.stderr, flush=True)
        print(f"lrtensor_kernels: compiling the native backend ({'C++ and CUDA' if cuda else 'C++'}, first use "
              f"with this torch; about a minute), cached in {directory}", file=sys.stderr, flush=True)
        path = cpp_extension.load(
            name, [str(p) for p in sources(cuda)], extra_cflags=CXX_FLAGS + _cpu_flags(),
            extra_cuda_cflags=CUDA_FLAGS, extra_ldflags=OPENMP_FLAGS, extra_include_paths=[str(CSRC)],
            build_directory=str(directory), with_cuda=cuda, is_python_module=False, verbose=False)
        built.write_text(f"{path}\n")
        return path


def load() -> str:
    """Builds (first use) and loads the library; returns its path. RuntimeError with the reason otherwise."""
    with _lock:
        if "path" not in _state and "error" not in _state:
            try:
                _state["path"] = _build_and_load()
                _state["cuda"] = with_cuda()
            except _MissingTool as exc:
                _state["error"] = str(exc)
            except Exception as exc:  # a failed build must leave the other backends usable
                lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
                _state["error"] = f"building it failed: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else "")
        if "error" in _state:
            raise RuntimeError(f"the native backend is unavailable: {_state['error']}")
        return _state["path"]


def available() -> bool:
    """Whether the native library is loaded, building it on first call."""
    try:
        load()
        return True
    except RuntimeError:
        return False


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True); builds on first call."""
    return None if available() else _state["error"]


def has_cuda_kernels() -> bool:
    """Whether the loaded library has its CUDA kernels (torch with CUDA and a CUDA toolkit at build time)."""
    return available() and _state.get("cuda", False)
