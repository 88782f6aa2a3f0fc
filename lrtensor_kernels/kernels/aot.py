"""Ahead-of-time compilation of the Triton kernels for the GPUs, on a machine without one.

Every module of Triton kernels under ``lrtensor_kernels/kernels/`` lists, in a module-level
function ``aot_cases()``, the specialisations its launchers can produce on a GPU, each an
:class:`AotCase`. The easy way to write one is to call the module's own launchers on meta tensors
inside :func:`lrtensor_kernels.kernels.launch.recording` (their launches go through
:func:`~lrtensor_kernels.kernels.launch.launch`): the block sizes, warps, stages, autotune
configs and the argument specialisations (Triton's own binder: integers equal to 1, divisibility
by 16) are then the launchers' own, and a new plan shows up by itself.

:func:`compile_case` compiles one case for one :class:`Target` with the installed Triton
(``triton.compile`` on an ``ASTSource``, the wheel's ``ptxas``) and reads what it costs: shared
memory from the compiled kernel's metadata, registers and spills from ptxas's report. Checked
against each target's limits by ``tests/test_aot.py``:

- shared memory per block at most the target's opt-in maximum (:data:`TARGETS`);
- spills of at most :data:`SPILL_BOUND_BYTES` per thread: the kernels stream weight-sized tensors,
  and a spilled tile is a local-memory round trip per element in their inner loop (the plans before
  these checks spilled up to 38 KB of stores per thread), so the plans keep every tile in registers. The bound
  is 16 bytes, not 0, for what was measured: in one case on sm_90 and seven on sm_100 ptxas caps
  the kernel at 128 registers (for more resident blocks) and spills one to four values (8-16
  bytes); with ``.maxnreg 255`` the sm_100 ones used 136-162 registers and spilled nothing;
- 64-bit address products (:func:`narrow_products`): every multiplication of two run-time values
  that feeds the address of a tensor which can hold 2^31 elements or more is done in int64.

Run ``python -m lrtensor_kernels.kernels.aot`` for the table (``--help`` for the options). It must
not run under ``TRITON_INTERPRET=1`` (the kernels would not be compilable ``JITFunction`` s); the
command line starts its workers without it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class AotCase:
    """One specialisation of one ``@triton.jit`` kernel, as a launcher would launch it.

    ``signature``: argument name -> Triton type string (``"*fp32"``, ``"*bf16"``, ``"i32"``,
    ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs``: the constexpr arguments' values;
    ``attrs``: Triton's specialisation attributes (argument index path -> e.g.
    ``[["tt.divisibility", 16]]``); ``options``: other compile options (``num_ctas``, ``maxnreg``);
    ``small_pointers``: pointer arguments whose tensors stay far below 2^31 elements (their
    addresses may be 32-bit). ``name`` says what the case is (kernel, dtypes, plan) in a test id.
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    attrs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    small_pointers: tuple = ()
    notes: dict = field(default_factory=dict, compare=False)

    def key(self) -> str:
        """What the compiled code depends on (two cases with one key compile to the same kernel)."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return repr((fn.__module__, fn.__qualname__, sorted(self.signature.items()),
                     sorted((str(k), repr(v)) for k, v in self.constexprs.items()),
                     sorted((str(k), repr(v)) for k, v in self.attrs.items()), self.num_warps, self.num_stages,
                     sorted(self.options.items())))


@dataclass(frozen=True)
class Target:
    """A GPU architecture compiled for, and its shared memory per block.

    ``shared_bytes``: the most dynamic shared memory one block may opt into, from the CUDA C++
    Programming Guide's table "Technical Specifications per Compute Capability" (8.0: 163 KB;
    9.0 and 10.0: 227 KB), the ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` that Triton's launcher
    compares ``metadata.shared`` with (``OutOfResources`` above it)."""

    capability: int
    name: str
    shared_bytes: int


TARGETS = (
    Target(80, "sm_80 (A100)", 163 * 1024),
    Target(90, "sm_90 (H100, H200)", 227 * 1024),
    Target(100, "sm_100 (B200)", 227 * 1024),
)
SPILL_BOUND_BYTES = 16  # spill stores + spill loads per thread; see the module doc
WIDE_ELEMENTS = 2 ** 31  # tensors that can reach this many elements need 64-bit address products


# ---------------------------------------------------------------------------------------------
# recording launches as cases (called by kernels.launch.launch inside recording())
# ---------------------------------------------------------------------------------------------

BIND_CAPABILITY = 90  # the specialisation of integer and pointer arguments is the same on every CUDA target


def _configurations(kernel, args: tuple, kwargs: dict) -> list:
    """``(jit_function, kwargs)`` for every configuration ``kernel[grid](*args, **kwargs)`` can run:
    each ``triton.autotune`` config that survives the kernel's own early pruning, with the values of
    ``triton.heuristics`` computed from the arguments."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return [(kernel, kwargs)]
    if type(kernel).__name__ == "InterpretedFunction":  # under TRITON_INTERPRET=1: bound, not compilable
        return [(_as_jit_function(kernel), kwargs)]
    named = dict(zip(kernel.arg_names, args))
    if isinstance(kernel, Heuristics):
        values = {name: rule({**named, **kwargs}) for name, rule in kernel.values.items()}
        return _configurations(kernel.fn, args, {**kwargs, **values})
    if isinstance(kernel, Autotuner):
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, named, **kwargs)
        return [c for config in configs for c in _configurations(kernel.fn, args, {**kwargs, **config.all_kwargs()})]
    raise TypeError(f"cannot record a launch of {type(kernel).__name__} (expected a triton.jit kernel, possibly "
                    "under triton.autotune / triton.heuristics)")


_JIT_TWINS: dict = {}


def _as_jit_function(interpreted):
    """The ``JITFunction`` of an interpreted kernel, for Triton's binder (it cannot be compiled: the
    functions it calls are interpreted too)."""
    from triton.runtime.jit import JITFunction

    if interpreted.fn not in _JIT_TWINS:
        _JIT_TWINS[interpreted.fn] = JITFunction(interpreted.fn, **interpreted.kwargs)
    return _JIT_TWINS[interpreted.fn]


def _short(value) -> str:
    text = getattr(value, "name", None) or str(value)
    return text.replace("triton.language.", "")


def _pointer_types(signature: dict) -> str:
    """The pointer arguments' element types in order, repeats counted: ``"bf16,fp32*7"``."""
    runs = [(t, len(list(group))) for t, group in
            itertools.groupby(t[1:] for t in signature.values() if t.startswith("*"))]
    return ",".join(t if n == 1 else f"{t}*{n}" for t, n in runs)


def cases_of_launch(kernel, grid, args: tuple, kwargs: dict, small_pointers: tuple = ()) -> list:
    """The :class:`AotCase` of every configuration of one launch, specialised by Triton's binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", BIND_CAPABILITY, 32))
    cases = []
    for fn, config_kwargs in _configurations(kernel, args, kwargs):
        names = [p.name for p in fn.params]
        kernel_kwargs = {k: v for k, v in config_kwargs.items() if k in names}
        options = {k: v for k, v in config_kwargs.items() if k not in names}
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, binder_options = binder(*args, **kernel_kwargs)
        _, signature, constexprs, attrs = fn._pack_args(backend, kernel_kwargs, bound, specialization, binder_options)
        constexprs = {names[path[0]] if len(path) == 1 else path: value for path, value in constexprs.items()}
        num_warps, num_stages = options.pop("num_warps", 4), options.pop("num_stages", 3)
        pointers = _pointer_types(signature)
        ones = [n for n in constexprs if isinstance(n, str) and not fn.params[names.index(n)].is_constexpr]
        values = " ".join(f"{n}={_short(v)}" for n, v in constexprs.items() if n not in ones)
        unit = f" {'='.join(ones)}=1" if ones else ""
        divisible = [names[path[0]] for path, attr in attrs.items() if len(path) == 1 and attr
                     and not signature[names[path[0]]].startswith("*")]
        aligned = "".join(f" {n}%16" for n in divisible)
        name = f"{fn.__name__} {pointers} {values}{unit}{aligned} w{num_warps} s{num_stages}"
        cases.append(AotCase(name, fn, signature, constexprs, num_warps, num_stages, attrs, options,
                             tuple(small_pointers), notes={"grid": grid if not callable(grid) else "callable"}))
    return cases


def unique(cases) -> list:
    """``cases`` without repeats (cases that compile to the same kernel), in order."""
    seen, out = set(), []
    for case in cases:
        key = case.key()
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------

KERNELS_DIR = Path(__file__).resolve().parent


def kernel_modules() -> list:
    """The modules under ``lrtensor_kernels/kernels/`` that define a module-level ``aot_cases()``
    (found in their source, so that nothing else, such as the native build, is imported)."""
    found = []
    for path in sorted(KERNELS_DIR.rglob("*.py")):
        if re.search(r"^def aot_cases\(", path.read_text(), re.MULTILINE):
            parts = path.relative_to(KERNELS_DIR).with_suffix("").parts
            found.append(".".join((__package__, *parts)))
    return found


def all_cases(modules: Optional[list] = None) -> list:
    """Every module's ``aot_cases()``, repeats removed; each case's notes name its module."""
    from ..backend import triton_interpreted

    if triton_interpreted():
        raise RuntimeError("the ahead-of-time cases cannot be made under TRITON_INTERPRET=1 (the kernels are "
                           "interpreted functions there); run `python -m lrtensor_kernels.kernels.aot`")
    cases = []
    for name in modules or kernel_modules():
        for case in importlib.import_module(name).aot_cases():
            case.notes.setdefault("module", name)
            cases.append(case)
    return unique(cases)


# ---------------------------------------------------------------------------------------------
# compiling and measuring
# ---------------------------------------------------------------------------------------------

_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v``'s report of one kernel."""
    spills, registers = _PTXAS_SPILLS.search(log), _PTXAS_REGISTERS.search(log)
    if spills is None or registers is None:
        raise ValueError(f"no resource report in the ptxas output: {log[-500:]!r}")
    return dict(registers=int(registers.group(1)), stack=int(spills.group(1)), spill_stores=int(spills.group(2)),
                spill_loads=int(spills.group(3)))


def supported(target: Target) -> Optional[str]:
    """None when the installed Triton compiles for ``target``, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"Triton's CUDA backend is not installed ({exc})"
    try:
        tool = get_ptxas(target.capability)
        version = subprocess.run([tool.path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception as exc:  # a missing or broken ptxas
        return f"no ptxas for {target.name} in the Triton wheel ({type(exc).__name__}: {exc})"
    release = re.search(r"release (\d+)\.(\d+)", version)
    if release and target.capability >= 100 and (int(release.group(1)), int(release.group(2))) < (12, 8):
        return f"{target.name} needs ptxas 12.8 or newer; Triton's is {release.group(0)}"
    return None


def compile_case(case: AotCase, target: Target) -> dict:
    """Compiles ``case`` for ``target``; the resources it uses and what the checks found."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    result = dict(case=case.name, module=case.notes.get("module"), target=target.capability,
                  num_warps=case.num_warps, num_stages=case.num_stages)
    options = dict(case.options, num_warps=case.num_warps, num_stages=case.num_stages)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report is printed
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(case.kernel, case.signature, case.constexprs, case.attrs),
                                      target=GPUTarget("cuda", target.capability, 32), options=options)
        result.update(parse_ptxas(log.getvalue()))
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        result["error"] = f"{type(exc).__name__}: " + " | ".join(lines[:6])[:1500]
        return result
    finally:
        knobs.nvidia.dump_ptxas_log = False
    ptx = compiled.asm.get("ptx", "")
    result.update(shared=int(compiled.metadata.shared), shared_limit=target.shared_bytes,
                  mma="wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else "none",
                  narrow_products=narrow_products(compiled.asm["ttir"], case),
                  seconds=round(time.perf_counter() - started, 2))
    return result


def triton_ir(case: AotCase, capability: int = BIND_CAPABILITY) -> str:
    """The Triton IR (TTIR) of ``case`` alone, without the GPU code generation: what
    :func:`narrow_products` reads, in a fraction of the time of :func:`compile_case`."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(case.options, num_warps=case.num_warps, num_stages=case.num_stages))
    source = ASTSource(case.kernel, case.signature, case.constexprs, case.attrs)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    stages = {}
    backend.add_stages(stages, options, source.language)
    return str(stages["ttir"](module, {"target": target, **options.__dict__}))


def check_address_products(cases) -> dict:
    """``{case name: narrow products}`` for every case whose TTIR has 32-bit address products."""
    return {case.name: found for case in cases if (found := narrow_products(triton_ir(case), case))}


def problems(result: dict) -> list:
    """What is wrong with one compiled case (empty when it passes every check)."""
    if "error" in result:
        return [f"does not compile: {result['error']}"]
    found = []
    if result["shared"] > result["shared_limit"]:
        found.append(f"needs {result['shared']} B of shared memory per block, over the {result['shared_limit']} B "
                     f"of sm_{result['target']}")
    spills = result["spill_stores"] + result["spill_loads"]
    if spills > SPILL_BOUND_BYTES:
        found.append(f"spills {result['spill_stores']} B (stores) + {result['spill_loads']} B (loads) per thread "
                     f"at {result['registers']} registers, over the bound of {SPILL_BOUND_BYTES} B")
    if result["narrow_products"]:
        found.append("32-bit address products: " + "; ".join(result["narrow_products"]))
    return found


# ---------------------------------------------------------------------------------------------
# 64-bit address products, read from the Triton IR
# ---------------------------------------------------------------------------------------------

_SSA_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_SSA_USE = re.compile(r"%[\w.]+")


def _operands(rest: str) -> list:
    """The SSA values an op reads (the text after its name, up to its type signature)."""
    body = rest.split(" : ")[0] if " : " in rest else rest
    body = re.sub(r"loc\([^)]*\)", "", body)
    return _SSA_USE.findall(body)


def narrow_products(ttir: str, case: AotCase) -> list:
    """The 32-bit multiplications of two run-time values that feed the address of a pointer
    argument not in ``case.small_pointers`` (such a product wraps at 2^31), as IR lines.

    Walks the Triton IR (TTIR) of the kernel: for every ``tt.addptr`` whose base pointer comes from
    such an argument, every op its offset is computed from; an ``arith.muli`` whose operands are
    both non-constant and whose type is i32 is reported. Products with a constant (``pid * BLOCK``,
    ``arange * 4``) stay below the dimension they index and are allowed."""
    lines = ttir.splitlines()
    defs, constants = {}, set()
    for line in lines:
        match = _SSA_DEF.match(line)
        if match:
            name, op, rest = match.groups()
            defs[name] = (op, rest, line.strip())
            if op == "arith.constant":
                constants.add(name)
    # the kernel's arguments, in order, are its non-constexpr parameters (integers equal to 1 are constexprs)
    arguments = [n for n, t in case.signature.items() if t != "constexpr"]
    header = next((line for line in lines if "tt.func public" in line), "")
    ssa_arguments = re.findall(r"(%[\w.]+): ", header.split("(", 1)[-1])
    arg_name = dict(zip(ssa_arguments, arguments))

    def is_constant(value: str) -> bool:
        seen = value
        while seen in defs and defs[seen][0] in ("tt.splat", "tt.broadcast", "tt.expand_dims"):
            seen = _operands(defs[seen][1])[0]
        return seen in constants

    def root(value: str) -> Optional[str]:
        """The pointer argument a pointer value is derived from."""
        while value in defs:
            op, rest, _ = defs[value]
            if op not in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.addptr", "tt.reshape", "tt.trans"):
                return None
            value = _operands(rest)[0]
        return arg_name.get(value)

    found = []
    for name, (op, rest, text) in defs.items():
        if op != "tt.addptr":
            continue
        base, offset = _operands(rest)[:2]
        pointer = root(base)
        if pointer is None or pointer in case.small_pointers:
            continue
        stack, visited = [offset], set()
        while stack:
            value = stack.pop()
            if value in visited or value not in defs:
                continue
            visited.add(value)
            vop, vrest, vtext = defs[value]
            if vop == "tt.addptr":
                continue
            operands = _operands(vrest)
            if vop == "arith.muli" and not any(is_constant(o) for o in operands):
                result_type = vrest.rsplit(":", 1)[-1]
                if re.search(r"\bi32\b|xi32>", result_type):
                    found.append(f"{pointer}: {re.sub(r' loc.*$', '', vtext)}")
            stack.extend(operands)
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------
# command line: compile every case for every target, in parallel worker processes
# ---------------------------------------------------------------------------------------------

def _worker(args) -> int:
    """Compiles this worker's share of the cases (every ``jobs``-th from ``index``), one JSON line each."""
    cases = [c for c in all_cases() if not args.match or any(m in c.name for m in args.match)]
    targets = [t for t in TARGETS if t.capability in args.targets]
    work = [(c, t) for c in cases for t in targets][args.index::args.jobs]
    with open(args.out, "w") as out:
        for case, target in work:
            out.write(json.dumps(compile_case(case, target)) + "\n")
            out.flush()
    return 0


def run(targets=None, jobs: Optional[int] = None, match=None, timeout: float = 3600) -> dict:
    """Compiles every case for every supported target in ``jobs`` fresh processes (without
    ``TRITON_INTERPRET``, each with an empty Triton cache so that ptxas reports every kernel).
    Returns ``{"targets": {capability: None or why skipped}, "cases": n, "results": [...]}``."""
    wanted = [t for t in TARGETS if targets is None or t.capability in targets]
    skipped = {t.capability: supported(t) for t in wanted}
    capabilities = [t.capability for t in wanted if skipped[t.capability] is None]
    jobs = jobs or max(1, os.cpu_count() or 1)
    results = []
    if capabilities:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, without Triton's warning
        with tempfile.TemporaryDirectory(prefix="lrtensor_aot_") as tmp:
            processes = []
            for index in range(jobs):
                out = Path(tmp) / f"worker{index}.jsonl"
                command = [sys.executable, "-m", "lrtensor_kernels.kernels.aot", "--worker", str(index), "--jobs",
                           str(jobs), "--out", str(out), "--targets", ",".join(map(str, capabilities))]
                command += [a for m in (match or []) for a in ("--match", m)]
                worker_env = dict(env, TRITON_CACHE_DIR=str(Path(tmp) / f"cache{index}"), TRITON_ALWAYS_COMPILE="1")
                processes.append((subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True), out))
            for process, out in processes:
                output, _ = process.communicate(timeout=timeout)
                if process.returncode != 0:
                    raise RuntimeError(f"an ahead-of-time compile worker failed:\n{output[-3000:]}")
                results += [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    results.sort(key=lambda r: (r["case"], r["target"]))
    return dict(targets={t.capability: skipped[t.capability] for t in wanted},
                cases=len({r["case"] for r in results}), results=results)


def table(results: list) -> str:
    """A Markdown table: one row per case, registers / spills / shared memory per target."""
    capabilities = sorted({r["target"] for r in results})
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["target"]] = r
    head = "| case | " + " | ".join(f"sm_{c}: regs, spill B, smem KB, mma" for c in capabilities) + " |"
    rows = [head, "|---|" + "---|" * len(capabilities)]
    for name, per_target in by_case.items():
        cells = []
        for c in capabilities:
            r = per_target.get(c)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("error")
            else:
                cells.append(f"{r['registers']}, {r['spill_stores'] + r['spill_loads']}, "
                             f"{r['shared'] / 1024:.1f}, {r['mma']}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrtensor_kernels.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(str(t.capability) for t in TARGETS),
                        help="comma-separated compute capabilities (default: all of TARGETS)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPU count)")
    parser.add_argument("--match", action="append", help="only the cases whose name contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--address-products", action="store_true",
                        help="only check the 64-bit address products of every case, from its Triton IR (fast)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--worker", type=int, dest="index", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.targets = [int(t) for t in args.targets.split(",") if t]
    if args.index is not None:
        return _worker(args)
    selected = lambda: [c for c in all_cases() if not args.match or any(m in c.name for m in args.match)]  # noqa: E731
    if args.list:
        for case in selected():
            print(case.name)
        return 0
    if args.address_products:
        started, cases = time.perf_counter(), selected()
        narrow = check_address_products(cases)
        for name, found in narrow.items():
            print(f"FAIL {name}: 32-bit address products: " + "; ".join(found))
        print(f"{len(cases)} cases, {len(narrow)} with 32-bit address products, {time.perf_counter() - started:.0f} s")
        return 1 if narrow else 0
    started = time.perf_counter()
    report = run(args.targets, args.jobs, args.match)
    for capability, reason in report["targets"].items():
        if reason:
            print(f"sm_{capability}: skipped: {reason}")
    print(table(report["results"]))
    bad = [(r, p) for r in report["results"] for p in problems(r)]
    for r, p in bad:
        print(f"FAIL {r['case']} sm_{r['target']}: {p}")
    print(f"{report['cases']} cases, {len(report['results'])} compiles, {len(bad)} problems, "
          f"{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
