"""One training step of a whole injected model, eager against ``torch.compile`` (inductor).

For each model and method: the model (built without weights, nothing downloaded) is injected
with ``strategy="auto"`` on the backend in force, its adapter tensors randomised, and trained
with AdamW on a fixed batch (forward, cross-entropy, backward, optimiser step). Two copies run:
the eager model and ``torch.compile(model)`` (inductor, no fullgraph flag; one graph each way on
this package). After the compile and a warm-up, the two are timed in interleaved rounds, the
order alternating each round, and the medians compared. Wall time (``time.perf_counter``), one
torch thread by default.

Run from the repository root::

    python -m bench.compiled_step                       # torchvision resnet18, timm convnext_atto
    python -m bench.compiled_step --models resnet18 --methods flora --rounds 9

Models that do not import here (torchvision, timm) are reported as skipped.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import lrtensor_kernels as lk

METHODS = {"flora": {}, "liera": dict(rank=4), "lora": {}, "ssl": {}, "ssb": {}}


def resnet18():
    return importlib.import_module("torchvision.models").resnet18(weights=None, num_classes=10), ["fc"]


def convnext_atto():
    return importlib.import_module("timm").create_model("convnext_atto", pretrained=False, num_classes=10), ["head"]


MODELS = {"resnet18": resnet18, "convnext_atto": convnext_atto}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--backend", default="auto", choices=lk.BACKENDS, help="lrtensor_kernels backend")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each after the compile")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (one step of each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args(argv)


def training_step(model, optimizer, x, y):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def build(make, method: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    model, head = make()
    lk.inject(model, method, trainable_modules=head, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.adapter_layers(model):
            for p in layer.adapter_parameters():
                noise = 0.05 * torch.randn(p.shape, generator=g)
                p.copy_(1 + noise if method in ("ssl", "ssb") else noise)
    return model.train()


def measure(make, method: str, args) -> dict:
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(2))
    steps = {}
    for name in ("eager", "compiled"):
        model = build(make, method, METHODS[method])
        trained = [p for p in model.parameters() if p.requires_grad]
        runnable = torch.compile(model) if name == "compiled" else model
        steps[name] = training_step(runnable, torch.optim.AdamW(trained, lr=1e-4), x, y)
    torch._dynamo.reset()
    start = time.perf_counter()
    steps["compiled"]()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    order = list(steps)
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    return dict(eager_ms=eager, compiled_ms=compiled, ratio=compiled / eager, compile_s=compile_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lk.set_backend(args.backend)
    backend = lk.backend.resolve(torch.device("cpu"))
    print(f"torch {torch.__version__}, backend {backend}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.size}x{args.size}, float32, AdamW step; median of {args.rounds} interleaved rounds\n")
    print("| model | method | eager ms | compiled ms | compiled / eager | first compiled step s |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        make = MODELS[model_name]
        try:
            make()
        except Exception as err:  # noqa: BLE001 (a wrong torch build raises more than ImportError)
            print(f"| {model_name} | skipped: {type(err).__name__}: {str(err).splitlines()[0][:80]} | | | | |")
            continue
        for method in args.methods.split(","):
            r = measure(make, method, args)
            print(f"| {model_name} | {method} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['ratio']:.2f} | "
                  f"{r['compile_s']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
