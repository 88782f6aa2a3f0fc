"""FLOPs and bytes kept for backward of one training step, as ratios to the frozen layer.

Counted, not timed, so the figures hold on any machine: FLOPs by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls; a fused kernel's own
arithmetic is not an aten op and is not counted), bytes by ``saved_tensors_hooks`` (distinct
storages autograd keeps from the forward, the input and weight included, as the frozen layer
keeps them too). One step = forward + backward with the input requiring grad, as inside a
network; the frozen layer = the plain layer with its weight and bias frozen.

Run: ``python -m bench.costs`` (the shapes of the strategies' table, batch cut for the CPU).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lrtensor_kernels as lk

# (name, plain layer, input shape): ResNet-50, SD-UNet and LLaMA-like layers; batches cut so that
# a step runs in about a second on one CPU core
COST_SHAPES = [
    ("3x3_64-64_56", lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (2, 64, 56, 56)),
    ("3x3_256-256_14", lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (8, 256, 14, 14)),
    ("3x3_512-512_7", lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (8, 512, 7, 7)),
    ("3x3_640-640_32", lambda: nn.Conv2d(640, 640, 3, padding=1), (1, 640, 32, 32)),
    ("1x1_1024-256_14", lambda: nn.Conv2d(1024, 256, 1, bias=False), (8, 1024, 14, 14)),
    ("linear_1024-2816_t512", lambda: nn.Linear(1024, 2816), (512, 1024)),
]
METHODS = ("flora", "lora", "liera", "ssl", "ssb")


def frozen_layer(make) -> nn.Module:
    torch.manual_seed(0)
    base = make()
    base.requires_grad_(False)
    return base


def adapted(base: nn.Module, method: str, strategy: str = "auto", seed: int = 2, **kwargs) -> lk.AdapterLayer:
    """``method``'s layer around ``base`` (shared weight, ``kwargs`` of the method), every adapter
    tensor random."""
    cls = lk.layers.LAYERS[method][nn.Linear if isinstance(base, nn.Linear) else nn.Conv2d]
    layer = cls.from_module(base, strategy=strategy, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return layer


def step_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x.detach().requires_grad_()).sum().backward()
    return counter.get_total_flops()


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_())
    return sum(storages.values())


def full_fine_tuning(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base).requires_grad_(True)


def table(backend: str = "reference") -> str:
    lines = [f"One training step, backend {backend!r}, float32; FLOPs / bytes kept for backward, ratios to the "
             "frozen layer; strategy: auto.", "",
             "| layer (input) | full fine-tuning | FLoRA | LoRA | LieRA | SSL | SSB | FLoRA merged | FLoRA hybrid |",
             "|---|---|---|---|---|---|---|---|---|"]
    with lk.use_backend(backend):
        for name, make, shape in COST_SHAPES:
            base, x = frozen_layer(make), torch.randn(shape)
            flops, nbytes = step_flops(base, x), saved_bytes(base, x)
            modules = [full_fine_tuning(base)] + [adapted(base, m) for m in METHODS] + [
                adapted(base, "flora", "merged"), adapted(base, "flora", "hybrid")]
            cells = [f"{step_flops(m, x) / flops:.2f} / {saved_bytes(m, x) / nbytes:.2f}" for m in modules]
            lines.append(f"| {name} ({'x'.join(map(str, shape))}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="reference", choices=[b for b in lk.BACKENDS if b != "auto"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(table(args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
