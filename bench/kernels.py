"""Achieved bandwidth of the fused weight transform and backward projection.

For each weight of the suite and each method: the bytes each kernel must move (weight-sized
tensors read and written once, plus its partial-sum buffers), its median time, and the ratio of
bytes / time to the device-to-device copy bandwidth measured in the same run; next to them, the
reference path (plain PyTorch: ``methods.effective_weight`` forward, and its autograd backward
from the same ``dL/dW'``). Run: ``python -m bench.kernels`` (CUDA), or ``--small`` on the CPU
under ``TRITON_INTERPRET=1`` as a smoke test of the script (its timings mean nothing).
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


def kernel_bytes(shape, dtype, key, tt, adapter, device) -> tuple:
    """Fewest bytes of the forward transform and of the backward projection as launched."""
    n = math.prod(shape)
    elem = torch.finfo(dtype).bits // 8
    forward = 2 * n * elem
    form = LowRankForm(torch.empty(shape, device="meta", dtype=dtype), adapter, key.split(":")[0], 1.0)
    cfg = tt._launch_config(form, device, dtype)
    col_blocks, splits = cfg["grid"]
    partials = 4 * form.rank1 * (col_blocks * form.out_rows + splits * form.cols)
    reads_weight = key.split(":")[1] != "add"
    backward = n * elem * (2 if reads_weight else 1) + 2 * partials
    return forward, backward


def measure(name, shape, method, key, dtype, device, clock, copy_bw, repeats):
    from lrtensor_kernels.kernels import triton_transform as tt

    weight = (0.5 * torch.randn(shape, device=device)).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    adapter = adapter_for(key, shape, device)
    spec = methods.AdapterMath.from_key(key)
    fwd_ms = median_ms(lambda: tt.transform(weight, adapter, key, 1.0), clock, 3, repeats)
    bwd_ms = median_ms(lambda: tt.project(grad, weight, adapter, key, 1.0), clock, 3, repeats)
    leaves = [t.clone().requires_grad_() for t in adapter]
    ref_fwd_ms = median_ms(lambda: methods.effective_weight(weight, leaves, spec, 1.0), clock, 3, repeats)

    def reference_backward():
        w_new = methods.effective_weight(weight, leaves, spec, 1.0)
        torch.autograd.grad(w_new, leaves, grad)

    ref_step_ms = median_ms(reference_backward, clock, 3, repeats)
    fwd_bytes, bwd_bytes = kernel_bytes(shape, dtype, key, tt, adapter, device)
    return dict(weight=name, shape=list(shape), method=method, dtype=str(dtype).replace("torch.", ""),
                fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes,
                fwd_of_copy=fwd_bytes / (fwd_ms * 1e-3) / copy_bw, bwd_of_copy=bwd_bytes / (bwd_ms * 1e-3) / copy_bw,
                ref_fwd_ms=ref_fwd_ms, ref_fwd_bwd_ms=ref_step_ms, fused_vs_ref=(fwd_ms + bwd_ms) / ref_step_ms)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--small", action="store_true", help="weights divided by 32 per mode (CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="bench/out/kernels.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run with TRITON_INTERPRET=1 and --small for a smoke test of this script")
        return 2
    dtype = getattr(torch, args.dtype)
    clock = clock_for(device)
    copy_bw = copy_bandwidth(device, clock, 2 ** 30 if device.type == "cuda" else 2 ** 24)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); dtype {args.dtype}")
    rows = []
    header = f"{'weight':24} {'method':18} {'fwd us':>8} {'% copy':>7} {'bwd us':>8} {'% copy':>7} " \
             f"{'ref fwd+bwd us':>15} {'fused/ref':>9}"
    print(header)
    print("-" * len(header))
    for name, shape in WEIGHTS.items():
        if args.small:
            shape = tuple(max(1, d // 32) if i < 2 else d for i, d in enumerate(shape))
        for method, key in METHODS.items():
            r = measure(name, shape, method, key, dtype, device, clock, copy_bw, args.repeats if not args.small else 3)
            rows.append(r)
            print(f"{name:24} {method:18} {1e3 * r['fwd_ms']:8.1f} {100 * r['fwd_of_copy']:6.1f}% "
                  f"{1e3 * r['bwd_ms']:8.1f} {100 * r['bwd_of_copy']:6.1f}% {1e3 * r['ref_fwd_bwd_ms']:15.1f} "
                  f"{r['fused_vs_ref']:9.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=str(device), copy_bandwidth=copy_bw, torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
