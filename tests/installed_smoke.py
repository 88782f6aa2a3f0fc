"""Smoke test of an installed lrtensor_kernels (a wheel or an sdist installed into an environment
of its own), run from a directory that holds no sources::

    python installed_smoke.py SOURCE_ROOT [--require native,triton]

Checks that the package and its native sources are the installed ones (not under SOURCE_ROOT),
then runs a FLoRA, LieRA, SSL and SSB convolution and linear layer, forward and backward, on every
backend this install runs (native: built on first use from the installed sources; triton: under
its interpreter without a GPU) and compares output and gradients with the reference backend's.
A backend named in ``--require`` that does not run is a failure; others are reported and passed
over. Prints one line per check; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import lrtensor_kernels as lk  # noqa: E402
from lrtensor_kernels import backend  # noqa: E402
from lrtensor_kernels.kernels import native_build  # noqa: E402

LAYERS = [(lk.FLoRAConv2d, dict(ranks=(3, 3, 2, 2))), (lk.LieRAConv2d, dict(rank=3)), (lk.SSLConv2d, {}),
          (lk.SSBConv2d, {}), (lk.FLoRALinear, dict(ranks=(3, 3))), (lk.SSBLinear, {})]
TOLERANCE = 1e-5  # relative, float32 against float32 on layers this small


def run_layer(cls, kwargs, backend_name: str, seed: int = 0):
    torch.manual_seed(seed)
    conv = cls.__name__.endswith("2d")
    layer = cls(6, 5, 3, padding=1, **kwargs) if conv else cls(6, 5, **kwargs)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn((2, 6, 7, 7) if conv else (4, 6), requires_grad=True)
    with lk.use_backend(backend_name):
        y = layer(x)
        y.square().sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in layer.adapter_parameters())]


def relative_error(got, ref) -> float:
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_root", type=Path)
    parser.add_argument("--require", default="", help="comma-separated backends that must run")
    args = parser.parse_args(argv)
    source_root = args.source_root.resolve()
    required = {b for b in args.require.split(",") if b}
    failures = []

    def check(ok: bool, line: str, passed_over: bool = False):
        print(("skip  " if passed_over else "ok    " if ok else "FAIL  ") + line, flush=True)
        if not ok:
            failures.append(line)

    package = Path(lk.__file__).resolve().parent
    check(not package.is_relative_to(source_root), f"lrtensor_kernels {lk.__version__} imported from {package}")
    check(native_build.CSRC.is_relative_to(package), f"native sources at {native_build.CSRC}")
    print(f"torch {torch.__version__}, TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', '(default)')}")
    for name in ("native", "triton"):
        try:
            with lk.use_backend(name):
                backend.resolve(torch.device("cpu"))
        except RuntimeError as err:
            check(name not in required, f"backend {name} does not run here: {err}", passed_over=name not in required)
            continue
        for cls, kwargs in LAYERS:
            reference = run_layer(cls, kwargs, "reference")
            got = run_layer(cls, kwargs, name)
            worst = max(relative_error(g, r) for g, r in zip(got, reference))
            check(worst <= TOLERANCE, f"backend {name}: {cls.__name__} output and gradients within {worst:.1e} "
                                      f"of the reference backend's")
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
