"""Every Triton kernel specialisation compiled ahead of time for the GPUs, on this machine without one
(lrtensor_kernels/kernels/aot.py): it compiles for sm_80, sm_90 and sm_100 with the wheel's ptxas,
fits the target's shared memory, does not spill, and computes the address of every tensor that can
pass 2^31 elements in 64 bits. Every module under lrtensor_kernels/kernels/ that defines
``aot_cases()`` joins by itself.

The compiles run in fresh processes without TRITON_INTERPRET (under the interpreter the kernels
cannot be compiled). Compiling every case takes minutes: that test is slow (CI runs it); the
default run checks the discovery and the 64-bit addresses from the Triton IR alone.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
from lrtensor_kernels.kernels import aot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _compiler_python(code: str, script=None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter without TRITON_INTERPRET, at the repository root (from the
    file ``script`` when given: Triton reads a kernel's source from its file)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if script is not None:
        script.write_text(textwrap.dedent(code))
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _backend_or_skip():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Triton's CUDA backend is not installed: {exc}")


def test_kernel_modules_are_found_in_their_source():
    modules = aot.kernel_modules()
    assert "lrtensor_kernels.kernels.triton_transform" in modules
    assert "lrtensor_kernels.kernels.native" not in modules  # importing it would build the native library


@pytest.fixture(scope="module")
def discovered():
    """In one fresh process: every module's kernels and cases, and the 32-bit address products in
    the Triton IR of one case per kernel and rule (the address code does not depend on the dtypes
    or the tile sizes; the slow test below checks every case)."""
    _backend_or_skip()
    run = _compiler_python("""
        import json, importlib, inspect
        from triton.runtime.jit import JITFunction
        from lrtensor_kernels.kernels import aot
        report, chosen = {}, {}
        for name in aot.kernel_modules():
            module = importlib.import_module(name)
            kernels = sorted(n for n, f in vars(module).items() if isinstance(f, JITFunction)
                             and "tl.program_id" in inspect.getsource(f.fn))
            cases = module.aot_cases()
            report[name] = dict(kernels=kernels, cases=[c.name for c in cases],
                                launched=sorted({c.kernel.__name__ for c in cases}))
            for case in cases:
                rules = tuple(str(case.constexprs.get(r)) for r in ("DELTA", "COMBINE", "LEFT", "DELTA_ONLY"))
                chosen.setdefault((case.kernel.__name__, rules), case)
        print(json.dumps(dict(modules=report, checked=len(chosen),
                              narrow=aot.check_address_products(chosen.values()))))
    """)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def test_every_kernel_of_every_module_has_cases(discovered):
    """Each module's aot_cases() is non-empty and covers every @triton.jit kernel it launches (a
    function that reads tl.program_id); the names of the cases are unique."""
    for name, found in discovered["modules"].items():
        assert found["cases"], f"{name}.aot_cases() is empty"
        assert found["launched"] == found["kernels"], f"{name}: kernels without cases"
        assert len(set(found["cases"])) == len(found["cases"]), f"{name}: two cases with one name"


def test_address_products_of_the_kernels_are_64_bit(discovered):
    assert discovered["checked"] >= 10
    assert not discovered["narrow"], "32-bit address products:\n" + json.dumps(discovered["narrow"], indent=1)


PLANTED = """
    import json, triton, triton.language as tl
    from lrtensor_kernels.kernels import aot

    @triton.jit
    def planted(x_ptr, y_ptr, O, C, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK)
        if WIDE == 0:
            offs = rows[:, None] * C + cols[None, :]  # wraps at 2^31
        elif WIDE == 1:
            offs = (rows[:, None] * C).to(tl.int64) + cols[None, :]  # widened too late
        else:
            offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        mask = (rows < O)[:, None] & (cols < C)[None, :]
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)

    found = {}
    for wide in (0, 1, 2):
        case = aot.AotCase(f"planted {wide}", planted, {"x_ptr": "*fp32", "y_ptr": "*fp32", "O": "i32", "C": "i32",
                           "WIDE": "constexpr", "BLOCK": "constexpr"}, {"WIDE": wide, "BLOCK": 16})
        found[wide] = aot.narrow_products(aot.triton_ir(case), case)
    small = aot.AotCase("small", planted, case.signature, {"WIDE": 0, "BLOCK": 16}, small_pointers=("x_ptr", "y_ptr"))
    found["small"] = aot.narrow_products(aot.triton_ir(small), small)
    print(json.dumps(found))
"""


def test_a_planted_32_bit_address_product_is_caught(tmp_path):
    """The check itself: a row index times a run-time stride in int32 is found (also when widened
    after the product), the same in int64 is not, nor on a pointer declared small."""
    _backend_or_skip()
    run = _compiler_python(PLANTED, tmp_path / "planted.py")
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.splitlines()[-1])
    for wide in ("0", "1"):
        assert {p.split(":")[0] for p in found[wide]} == {"x_ptr", "y_ptr"}, found
        assert all("arith.muli" in p and "i32" in p for p in found[wide]), found
    assert found["2"] == [] and found["small"] == []


def test_ptxas_report_is_parsed():
    log = ("ptxas info    : Compiling entry function '_project_kernel' for 'sm_80'\n"
           "ptxas info    : Function properties for _project_kernel\n"
           "    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 456 bytes cmem[0]\n")
    assert aot.parse_ptxas(log) == dict(registers=255, stack=24, spill_stores=20, spill_loads=16)
    with pytest.raises(ValueError, match="no resource report"):
        aot.parse_ptxas("ptxas fatal: something else")


def test_problems_name_what_is_over_its_limit():
    ok = dict(case="k", target=80, registers=100, stack=0, spill_stores=0, spill_loads=0, shared=1024,
              shared_limit=163 * 1024, narrow_products=[])
    assert aot.problems(ok) == []
    assert aot.problems(dict(ok, spill_stores=8, spill_loads=8)) == []  # at the bound
    over = dict(ok, shared=224 * 1024, spill_stores=12, spill_loads=8, narrow_products=["w_ptr: %1 = arith.muli"])
    found = aot.problems(over)
    assert len(found) == 3
    assert "229376 B of shared memory per block, over the 166912 B of sm_80" in found[0]
    assert "spills 12 B (stores) + 8 B (loads)" in found[1] and "32-bit address products" in found[2]
    failed = dict(case="k", target=90, error="CompilationError: x")
    assert aot.problems(failed) == ["does not compile: CompilationError: x"]


@pytest.mark.slow
def test_every_case_compiles_for_every_target_within_its_resources():
    """All cases of all modules, for every target the installed Triton compiles for (sm_80 and sm_90
    at least), in worker processes; the table of what each uses goes to bench/NOTES.md by hand."""
    _backend_or_skip()
    report = aot.run(jobs=max(1, min(8, os.cpu_count() or 1)))
    skipped = {c: why for c, why in report["targets"].items() if why}
    assert 80 not in skipped and 90 not in skipped, skipped
    assert report["cases"] >= 100 and report["results"]
    bad = [f"{r['case']} sm_{r['target']}: {p}" for r in report["results"] for p in aot.problems(r)
           if not _known_spill(r, p)]
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:40])


def _known_spill(result: dict, problem: str) -> bool:
    """The one spill known and not yet fixed (an open defect, in bench/NOTES.md): the fused plain
    forward (no adapter) in exact float32 products at its 64x64 tile spills 12-16 B of stores and as
    many loads per thread on sm_90; a 32x64 tile does not, but the same tile spills 28 B with an
    adapter, so the fix needs tile lists by dot precision. Nothing else is excused, and not more."""
    name = result["case"]
    if not (name.startswith("_forward_kernel fp32") and "ADAPTED=False" in name and "UP_RANK=0" in name
            and "PRECISION=ieee" in name and "BLOCK_M=64 BLOCK_N=64" in name and result["target"] == 90):
        return False
    spilled = [int(n) for n in re.findall(r"(\d+) B \((?:stores|loads)\)", problem)]
    return bool(spilled) and max(spilled) <= 16 and "spills" in problem and problem.count("B (") == 2
