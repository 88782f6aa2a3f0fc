"""Achieved bandwidth of the fused weight transform and backward projection.

For each weight of the suite and each method: the bytes each kernel must move (weight-sized
tensors read and written once, plus, for Triton, its partial-sum buffers), its median time, and
the ratio of bytes / time to a copy measured in the same run; next to them, the reference path
(plain PyTorch: ``methods.effective_weight`` forward, and its autograd backward from the same
``dL/dW'``).

- CUDA (``--backend triton`` or ``native``): the copy is one large device-to-device copy.
- CPU (``--backend native``, ``--threads N``): the copy is a torch clone of the weight's own bytes
  at the same thread count (allocation included, as the transform allocates W'), and, as a second
  baseline, ``copy_`` into a buffer allocated once (the memory bandwidth alone); the transform is
  timed both ways (``transform`` and ``transform(out=...)``).

Run: ``python -m bench.kernels`` (CUDA), ``python -m bench.kernels --backend native --threads 1``
(CPU), or ``--small`` on the CPU under ``TRITON_INTERPRET=1`` as a smoke test of the Triton path
(its timings mean nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from lrtensor_kernels import methods
from lrtensor_kernels.kernels.lowrank_form import LowRankForm
from lrtensor_kernels.ops import kernels_for

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import clock_for, median_ms  # noqa: E402

WEIGHTS = {  # name: weight shape (out, in, *kernel)
    "sd15_3x3_1280-1280": (1280, 1280, 3, 3),
    "sd15_3x3_2560-1280": (1280, 2560, 3, 3),
    "sd15_3x3_1920-640": (640, 1920, 3, 3),
    "resnet50_3x3_512-512": (512, 512, 3, 3),
    "llama_4096-11008": (11008, 4096),
    "llama_4096-4096": (4096, 4096),
}
METHODS = {  # name: math key of lrtensor_kernels.methods
    "flora": "tucker:add",
    "lora": "lora:add",
    "liera_exp": "lora:exp",
    "liera_first_order": "lora:first_order",
    "ssb": "scales:mul",
}


def adapter_for(key: str, shape, device, rank: int = 16):
    """Random adapter tensors of the method's delta (float32, as the layers keep them)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: (0.1 * torch.randn(*s, generator=g)).to(device)  # noqa: E731
    delta = key.split(":")[0]
    if delta == "tucker":
        ranks = [min(d, r) for d, r in zip(shape, (rank, rank) + (2,) * (len(shape) - 2))]
        return [rnd(*ranks)] + [rnd(d, r) for d, r in zip(shape, ranks)]
    if delta == "lora":
        return [rnd(shape[0], rank), rnd(rank, math.prod(shape[1:]))]
    return [1 + rnd(shape[1]), 1 + rnd(shape[0])]


def copy_bandwidth(device, clock, nbytes: int = 2 ** 30) -> float:
    """Bytes read plus bytes written per second of a large device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), clock, 3, 20)
    return 2 * nbytes / (ms * 1e-3)


def kernel_bytes(shape, dtype, key, backend, adapter, device) -> tuple:
    """Fewest bytes of the forward transform and of the backward projection: the weight-sized
    streams, plus the partial sums of the Triton projection as launched (the native CPU kernels'
    partials, at most a few percent of the weight and mostly in cache, are not counted)."""
    n = math.prod(shape)
    elem = torch.finfo(dtype).bits // 8
    forward = 2 * n * elem
    reads_weight = key.split(":")[1] != "add"
    backward = n * elem * (2 if reads_weight else 1)
    if backend == "triton":
        from lrtensor_kernels.kernels import triton_transform as tt

        form = LowRankForm(torch.empty(shape, device="meta", dtype=dtype), adapter, key.split(":")[0], 1.0)
        col_blocks, splits = tt._plan(form, device).grid
        backward += 2 * 4 * form.rank1 * (col_blocks * form.out_rows + splits * form.cols)
    return forward, backward


def measure(name, shape, method, key, dtype, device, clock, copy_bw, repeats, backend):
    kernels = kernels_for(backend)
    weight = (0.5 * torch.randn(shape, device=device)).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    adapter = adapter_for(key, shape, device)
    spec = methods.AdapterMath.from_key(key)
    fwd_ms = median_ms(lambda: kernels.transform(weight, adapter, key, 1.0), clock, 3, repeats)
    out = torch.empty_like(weight)
    fwd_out_ms = median_ms(lambda: kernels.transform(weight, adapter, key, 1.0, out=out), clock, 3, repeats)
    bwd_ms = median_ms(lambda: kernels.project(grad, weight, adapter, key, 1.0), clock, 3, repeats)
    leaves = [t.clone().requires_grad_() for t in adapter]
    ref_fwd_ms = median_ms(lambda: methods.effective_weight(weight, leaves, spec, 1.0), clock, 3, repeats)

    def reference_backward():
        w_new = methods.effective_weight(weight, leaves, spec, 1.0)
        torch.autograd.grad(w_new, leaves, grad)

    ref_step_ms = median_ms(reference_backward, clock, 3, repeats)
    fwd_bytes, bwd_bytes = kernel_bytes(shape, dtype, key, backend, adapter, device)
    row = dict(weight=name, shape=list(shape), method=method, dtype=str(dtype).replace("torch.", ""),
               backend=backend, fwd_ms=fwd_ms, fwd_out_ms=fwd_out_ms, bwd_ms=bwd_ms, fwd_bytes=fwd_bytes,
               bwd_bytes=bwd_bytes, ref_fwd_ms=ref_fwd_ms, ref_fwd_bwd_ms=ref_step_ms,
               fused_vs_ref=(fwd_ms + bwd_ms) / ref_step_ms)
    if device.type == "cuda":
        row.update(fwd_of_copy=fwd_bytes / (fwd_out_ms * 1e-3) / copy_bw,
                   bwd_of_copy=bwd_bytes / (bwd_ms * 1e-3) / copy_bw)
    else:
        # the weight's own bytes cloned (allocation included) and copied into a kept buffer, same threads
        clone_ms = median_ms(lambda: weight.clone(), clock, 3, repeats)
        copy_ms = median_ms(lambda: out.copy_(weight), clock, 3, repeats)
        clone_bw, copy_bw = 2 * weight.nbytes / (clone_ms * 1e-3), 2 * weight.nbytes / (copy_ms * 1e-3)
        row.update(clone_ms=clone_ms, copy_ms=copy_ms,
                   fwd_of_clone=fwd_bytes / (fwd_ms * 1e-3) / clone_bw,
                   bwd_of_clone=bwd_bytes / (bwd_ms * 1e-3) / clone_bw,
                   fwd_of_copy=fwd_bytes / (fwd_out_ms * 1e-3) / copy_bw,
                   bwd_of_copy=bwd_bytes / (bwd_ms * 1e-3) / copy_bw)
    return row


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def save(path, device, backend, copy_bw, rows) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
                       backend=backend, threads=torch.get_num_threads(), copy_bandwidth=copy_bw,
                       torch=torch.__version__, rows=rows), f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["triton", "native"], help="default: triton on CUDA, native on the CPU")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    parser.add_argument("--weights", help="comma-separated substrings of the weight names to run")
    parser.add_argument("--small", action="store_true", help="weights divided by 32 per mode (CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default: CUDA 50, CPU 15)")
    parser.add_argument("--out", default="bench/out/kernels.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend or ("triton" if device.type == "cuda" else "native")
    if device.type == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run the Triton path with TRITON_INTERPRET=1 and --small as a smoke test of this script")
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (50 if device.type == "cuda" else 15)
    clock = clock_for(device)
    copy_bw = copy_bandwidth(device, clock, 2 ** 30) if device.type == "cuda" else None
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); "
              f"backend {backend}; dtype {args.dtype}")
        header = f"{'weight':24} {'method':18} {'fwd us':>8} {'% copy':>7} {'bwd us':>8} {'% copy':>7} " \
                 f"{'ref fwd+bwd us':>15} {'fused/ref':>9}"
    else:
        print(f"device: {_cpu_name()}, {torch.get_num_threads()} thread(s); backend {backend}; dtype {dtype}; "
              "ratios: bytes/time over a clone of the weight (allocating) and over copy_ into a kept buffer")
        header = f"{'weight':24} {'method':18} {'fwd ms':>8} {'/clone':>7} {'/copy':>6} {'bwd ms':>8} {'/clone':>7} " \
                 f"{'/copy':>6} {'ref fwd+bwd ms':>15} {'fused/ref':>9}"
    rows = []
    print(header)
    print("-" * len(header))
    for name, shape in WEIGHTS.items():
        if args.weights and not any(p in name for p in args.weights.split(",")):
            continue
        if args.small:
            shape = tuple(max(1, d // 32) if i < 2 else d for i, d in enumerate(shape))
        for method, key in METHODS.items():
            r = measure(name, shape, method, key, dtype, device, clock, copy_bw, repeats if not args.small else 3,
                        backend)
            rows.append(r)
            save(args.out, device, backend, copy_bw, rows)  # after every row: a run cut off keeps what it measured
            if device.type == "cuda":
                print(f"{name:24} {method:18} {1e3 * r['fwd_out_ms']:8.1f} {100 * r['fwd_of_copy']:6.1f}% "
                      f"{1e3 * r['bwd_ms']:8.1f} {100 * r['bwd_of_copy']:6.1f}% {1e3 * r['ref_fwd_bwd_ms']:15.1f} "
                      f"{r['fused_vs_ref']:9.2f}")
            else:
                print(f"{name:24} {method:18} {r['fwd_ms']:8.2f} {r['fwd_of_clone']:7.2f} {r['fwd_of_copy']:6.2f} "
                      f"{r['bwd_ms']:8.2f} {r['bwd_of_clone']:7.2f} {r['bwd_of_copy']:6.2f} {r['ref_fwd_bwd_ms']:15.2f} "
                      f"{r['fused_vs_ref']:9.2f}", flush=True)
    save(args.out, device, backend, copy_bw, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
