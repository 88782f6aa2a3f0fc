"""Measure the cost model's device constants (``lrtensor_kernels.strategies.cost.DeviceModel``).

Each field is timed directly, on shapes like the bench rows':

- ``flops[dtype]``: FLOP/s of dense convolutions (forward, input and weight gradient) and of a matmul;
  the model's rate is the median over the convolution shapes;
- ``bandwidth``: bytes/s of a large elementwise pass (``y = x * a``: one read, one write);
- ``op_overhead``: seconds per small op launched from Python (a chain of tiny adds);
- ``conv_overhead``: seconds a tiny convolution call costs beyond a tiny add;
- ``grouped`` / ``grouped_weight_grad``: FLOP/s of depthwise convolutions (3x3 and 7x7), forward and
  input gradient / weight gradient.

``python -m bench.calibrate [--device cuda] [--small] [--out FILE]`` prints the JSON it writes. On CUDA
the times are CUDA events after warm-up, median of the repeats; on the CPU, wall clock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def _timer(device: torch.device, fn, repeats: int, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _conv_rates(device, dtype, shapes, repeats, groups_of=lambda c: 1) -> tuple:
    """(forward + input-gradient FLOP/s, weight-gradient FLOP/s) per shape (batch, c, size, k)."""
    fwd_rates, wgrad_rates = [], []
    for batch, channels, size, k in shapes:
        groups = groups_of(channels)
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
        w = torch.randn(channels, channels // groups, k, k, device=device, dtype=dtype)
        y = F.conv2d(x, w, padding=k // 2, groups=groups)
        gy = torch.randn_like(y)
        flops = 2.0 * y.numel() * (channels // groups) * k * k
        fwd = _timer(device, lambda: F.conv2d(x, w, padding=k // 2, groups=groups), repeats)
        dgrad = _timer(device, lambda: torch.ops.aten.convolution_backward(
            gy, x, w, None, (1, 1), (k // 2, k // 2), (1, 1), False, (0, 0), groups, (True, False, False)), repeats)
        wgrad = _timer(device, lambda: torch.ops.aten.convolution_backward(
            gy, x, w, None, (1, 1), (k // 2, k // 2), (1, 1), False, (0, 0), groups, (False, True, False)), repeats)
        fwd_rates.append(2 * flops / (fwd + dgrad))
        wgrad_rates.append(flops / wgrad)
    return fwd_rates, wgrad_rates


def calibrate(device: torch.device, small: bool = False, repeats: int = 20) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if small:
        dense = [(2, 32, 16, 3)]
        depthwise = [(2, 32, 16, 3)]
        matmul_n, pass_numel, repeats = 256, 1 << 20, 3
    else:
        dense = [(32, 256, 56, 3), (32, 512, 28, 3), (4, 1280, 16, 3), (8, 640, 32, 3), (32, 1024, 14, 1)]
        depthwise = [(32, 96, 56, 7), (32, 384, 14, 7), (32, 256, 56, 3)]
        matmul_n, pass_numel = 8192, 1 << 28
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, flops={}, conv_rates={}, matmul_rates={})
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        fwd, wgrad = _conv_rates(device, dtype, dense, repeats)
        result["conv_rates"][name] = dict(fwd_dgrad=fwd, wgrad=wgrad)
        result["flops"][name] = statistics.median(fwd + wgrad)
        a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
        result["matmul_rates"][name] = 2.0 * matmul_n ** 3 / _timer(device, lambda: a @ a, repeats)
        if dtype == torch.bfloat16:
            fwd, wgrad = _conv_rates(device, dtype, depthwise, repeats, groups_of=lambda c: c)
            result["grouped"], result["grouped_weight_grad"] = statistics.median(fwd), statistics.median(wgrad)
            result["grouped_rates"] = dict(fwd_dgrad=fwd, wgrad=wgrad)
            x = torch.randn(pass_numel, device=device, dtype=dtype)
            result["bandwidth"] = 2.0 * x.numel() * x.element_size() / _timer(device, lambda: x * 1.5, repeats)

    tiny = torch.randn(8, device=device)
    chain = 200

    def adds():
        t = tiny
        for _ in range(chain):
            t = t + 1.0
        sync()
        return t

    small_x = torch.randn(1, 4, 8, 8, device=device)
    small_w = torch.randn(4, 4, 3, 3, device=device)

    def convs():
        for _ in range(chain):
            F.conv2d(small_x, small_w, padding=1)
        sync()

    def wall(fn):
        fn()
        samples = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) / chain

    result["op_overhead"] = wall(adds)
    result["conv_overhead"] = max(0.0, wall(convs) - result["op_overhead"])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a check of this script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = calibrate(torch.device(args.device), small=args.small)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
