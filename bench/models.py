"""One training step of whole networks: adapters injected against full fine-tuning, PEFT LoRA and a linear probe.

For each network (torchvision ResNet-50 and timm ConvNeXt-T on CUDA, where they import; a small
CNN on the CPU with ``--tiny``) and each way to train it, the median time of one step (forward,
cross-entropy, backward; the optimizer step left out) under bfloat16 autocast on CUDA, its peak
memory, and a check that the loss and every trained gradient are finite:

- ``probe``: every layer frozen but the classifier (the floor: the backbone's forward and the
  input gradients the classifier needs; nothing below it gets a backward);
- ``full_ft``: every parameter trained;
- ``peft_lora``: PEFT's LoRA (rank 8) on every convolution and linear layer but the classifier,
  where peft is installed;
- ``flora``, ``liera``, ``ssl``, ``ssb``: ``lk.inject`` on the same layers, strategy ``auto``
  (the backend's default: Triton on CUDA).

The classifier trains in every row. ``python -m bench.models [--models resnet50,convnext_tiny]
[--batch 32] [--tiny] [--out PATH]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lrtensor_kernels as lk  # noqa: E402

METHODS = ("flora", "liera", "ssl", "ssb")


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, num_classes))


def build(name: str) -> tuple:
    """``(model, classifier module name, input size)``; raises ImportError where its package is missing."""
    if name == "tiny":
        return tiny_cnn(), "7", 16
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None), "fc", 224
    if name == "convnext_tiny":
        import timm

        return timm.create_model("convnext_tiny", pretrained=False), "head.fc", 224
    raise ValueError(f"unknown model {name!r}")


def adapted_layers(model: nn.Module, head: str) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head]


def prepare(base: nn.Module, head: str, provider: str) -> nn.Module:
    """A copy of ``base`` set up to train as ``provider`` says (module doc)."""
    model = copy.deepcopy(base)
    if provider == "full_ft":
        return model
    model.requires_grad_(False)
    model.get_submodule(head).requires_grad_(True)
    targets = adapted_layers(model, head)
    if provider == "peft_lora":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, modules_to_save=[head])
        return peft.get_peft_model(model, config)
    if provider in METHODS:
        lk.inject(model, provider, target_modules=targets, trainable_modules=[head])
    return model


def time_steps(model, x, y, clock, warmup: int, repeats: int, autocast) -> dict:
    def step():
        for p in model.parameters():
            p.grad = None
        with autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = clock()
        loss = step()
        times.append(clock(start))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    finite = bool(torch.isfinite(loss).item()) and all(g is not None and torch.isfinite(g).all().item() for g in grads)
    return dict(ms=statistics.median(times), finite=finite, trained=sum(p.numel() for p in model.parameters()
                                                                       if p.requires_grad))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,convnext_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="the small CNN on the CPU, 2 images (a dry run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/out/models.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    names, batch = (["tiny"], 2) if args.tiny else (args.models.split(","), args.batch)
    if cuda:
        def clock(start=None):
            if start is None:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                return event
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        def clock(start=None):
            return time.perf_counter() if start is None else 1e3 * (time.perf_counter() - start)

        def autocast():
            return torch.autocast("cpu", enabled=False)
    rows = []
    print(f"{'model':14} {'provider':10} {'ms/step':>9} {'/full_ft':>8} {'peak MiB':>9} {'trained':>10} finite")
    for name in names:
        try:
            torch.manual_seed(0)
            base, head, size = build(name)
        except ImportError as exc:
            rows.append(dict(model=name, status="skipped", note=f"not installed: {exc}"))
            print(f"{name:14} skipped: {exc}")
            continue
        base = base.to(device)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, size, size, generator=generator).to(device)
        y = torch.randint(0, 10, (batch,), generator=generator).to(device)
        full = None
        for provider in ("probe", "full_ft", "peft_lora", *METHODS):
            row = dict(model=name, provider=provider)
            try:
                model = prepare(base, head, provider).to(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                row.update(time_steps(model, x, y, clock, args.warmup, args.repeats, autocast), status="ok")
                if cuda:
                    row["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
                full = row["ms"] if provider == "full_ft" else full
            except ImportError as exc:
                row.update(status="skipped", note=f"not installed: {exc}")
            except Exception as exc:  # one provider failing must not stop the others
                row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            model = None
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            if row["status"] == "ok":
                ratio = row["ms"] / full if full else float("nan")
                print(f"{name:14} {provider:10} {row['ms']:9.2f} {ratio:8.2f} {row.get('peak_mib', 0):9.0f} "
                      f"{row['trained']:10d} {row['finite']}", flush=True)
            else:
                print(f"{name:14} {provider:10} {row['status']}: {row['note']}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                       batch=batch, autocast="bfloat16" if cuda else None, rows=rows), f, indent=1)
    bad = [r for r in rows if r["status"] == "error" or (r["status"] == "ok" and not r["finite"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
