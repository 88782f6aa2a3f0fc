"""Fine-tuning recipe on real data, on a CPU in a few minutes, nothing downloaded.

scikit-learn's digits (1797 8x8 images, shipped inside the package). A small CNN is pretrained here
on the digits 0-4; the new task is the digits 5-9, which the network has never seen. Every method
gets a new 5-way head trained in full and adapts (or trains) the rest:

- ``full``: everything trains (full fine-tuning);
- ``head``: only the new head (the frozen network as a feature extractor);
- ``lora``: PEFT-style LoRA of rank 4 on both convolutions and the hidden linear layer (plain
  PyTorch, ``bench.suite.PlainLoRA``): this sets the budget;
- ``flora``, ``liera_exp``, ``liera_first_order``: the largest rank within LoRA's trainable count
  (``lk.ranks_for_budget(..., match_lora_rank=4)``);
- ``ssl``, ``ssb``: no rank; they train what they train (far fewer parameters).

Every run: Adam, one learning rate for all (3e-3), batch 32, 40 epochs over 300 training images,
accuracy on the other 600-odd images of the digits 5-9. Seeds 0-4 (the new head's and the
adapters' initialisation and the batch order; the pretrained network and the split are fixed).

Measured per method: test accuracy (mean and standard deviation over the seeds), trainable
parameters, the median time of one training step (forward, backward, optimiser; one CPU thread;
timed apart from training, the methods interleaved round-robin over 200 rounds),
and the memory autograd keeps for the backward of one step (distinct storages seen by
``saved_tensors_hooks``, less the input and parameters). That last column is not a peak: on the
CPU, PyTorch's allocations are not tracked the way ``torch.cuda.max_memory_allocated`` tracks
them, and the process's peak RSS mixes everything the process ever did.

Run from the repository root: ``python3 examples/finetune_digits.py`` (``--seeds 2 --epochs 10``
for a quick look). Writes ``examples/out/finetune_digits.{json,md,png}`` (ignored by git; ``--out
PREFIX`` for another place); ``--update-results`` writes the committed copy in ``examples/results/``
instead, which is otherwise left as it is.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the repository's package and bench/, not an installed copy
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import lrtensor_kernels as lk  # noqa: E402
from bench.suite import PlainLoRA  # noqa: E402
from bench.timing import Step, saved_for_backward_mib  # noqa: E402

OUT = ROOT / "examples" / "out" / "finetune_digits"  # ignored by git
COMMITTED_RESULTS = ROOT / "examples" / "results" / "finetune_digits"  # what the README shows; --update-results
TARGETS = ["conv1", "conv2", "fc"]  # what LoRA and the tensor adapters adapt; "head" is new and trains in full
LORA_RANK = 4
LR = 3e-3
BATCH = 32
TRAIN_IMAGES = 300
PRETRAIN_STEPS = 400
METHODS = ["full", "head", "lora", "flora", "liera_exp", "liera_first_order", "ssl", "ssb"]


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.head(F.relu(self.fc(h.flatten(1))))


def digits():
    """Images scaled to [0, 1], shape (N, 1, 8, 8), and labels."""
    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target)


def split(x, y, classes, train_images, seed=1234):
    """The images of ``classes`` (labels renumbered 0..), a fixed random train/test split."""
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep] - min(classes)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return (x[order[:train_images]], y[order[:train_images]]), (x[order[train_images:]], y[order[train_images:]])


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


def pretrain(train, test):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(PRETRAIN_STEPS):
        idx = torch.randint(0, len(train[1]), (BATCH,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
        opt.step()
    return model, accuracy(model, test)


def prepare(base: nn.Module, method: str, seed: int):
    """The model for ``method``: a new head, then the method's adapters. Returns (model, note)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.head = nn.Linear(64, 5)
    if method == "full":
        return model, "all parameters"
    if method == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        model.head.requires_grad_(True)
        return model, "new head only"
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for name in TARGETS:
            setattr(model, name, PlainLoRA(getattr(model, name), LORA_RANK, float(LORA_RANK)))
        model.head.requires_grad_(True)
        return model, f"rank {LORA_RANK}, alpha {LORA_RANK}"
    name, _, mode = method.partition("_")
    kwargs = {"mode": mode} if mode else {}
    if name in ("ssl", "ssb"):
        lk.inject(model, name, target_modules=TARGETS, trainable_modules=["head"])
        return model, ""
    plan = lk.ranks_for_budget(model, name, match_lora_rank=LORA_RANK, target_modules=TARGETS,
                               trainable_modules=["head"], **kwargs)
    plan.inject(model)
    return model, f"{'ranks' if name == 'flora' else 'rank'} {plan.kwargs.get('ranks', plan.kwargs.get('rank'))} " \
                  f"(budget {plan.budget:,}, {plan.total:,} used)"


def finetune(model, train, test, epochs: int, seed: int) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=LR)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train[1]), generator=g)
        for start in range(0, len(order), BATCH):
            training_step(model, opt, train[0][order[start:start + BATCH]], train[1][order[start:start + BATCH]])
    x = train[0][:BATCH]
    saved = saved_for_backward_mib(Step(lambda inp: model(inp), x, None, trainable))
    return dict(accuracy=accuracy(model, test), trainable=sum(p.numel() for p in trainable), saved_kib=saved * 1024)


def training_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def step_times(base, train, rounds: int) -> dict:
    """Median ms of one training step per method, the methods interleaved round-robin (other
    processes on a shared machine then slow every method alike), after 5 untimed rounds."""
    models = {m: prepare(base, m, seed=0)[0].train() for m in METHODS}
    opts = {m: torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
            for m, model in models.items()}
    x, y = train[0][:BATCH], train[1][:BATCH]
    times = {m: [] for m in METHODS}
    for round_ in range(rounds + 5):
        for m in METHODS:
            t0 = time.perf_counter()
            training_step(models[m], opts[m], x, y)
            if round_ >= 5:
                times[m].append((time.perf_counter() - t0) * 1e3)
    return {m: statistics.median(t) for m, t in times.items()}


class Progress:
    """A plain-text progress bar on stderr."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.done, self.width, self.start = total, 0, width, time.perf_counter()

    def step(self, label: str):
        self.done += 1
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s  {label:<28}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def summarise(runs: dict, notes: dict, step_ms: dict) -> list:
    rows = []
    for method in METHODS:
        r = runs[method]
        accs = [x["accuracy"] for x in r]
        rows.append(dict(method=method, note=notes[method], accuracy_mean=statistics.mean(accs),
                         accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         accuracy_min=min(accs), accuracy_max=max(accs), trainable=r[0]["trainable"],
                         step_ms=step_ms[method],
                         saved_kib=statistics.median(x["saved_kib"] for x in r)))
    return rows


def table(rows, meta) -> str:
    lines = [f"Digits 5-9 after pretraining on 0-4; {meta['seeds']} seeds, {meta['epochs']} epochs on "
             f"{meta['train_images']} images, {meta['test_images']} test images; {meta['machine']}, "
             f"torch {meta['torch']}, float32, one thread. Pretrained network on 0-4: "
             f"{100 * meta['pretrain_accuracy']:.1f}% test accuracy.", "",
             "| method | accuracy % (mean ± std) | min-max % | trainable params | step ms (median) | "
             "saved for backward KiB | setting |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} | "
                     f"{100 * r['accuracy_min']:.1f}-{100 * r['accuracy_max']:.1f} | {r['trainable']:,} | "
                     f"{r['step_ms']:.2f} | {r['saved_kib']:.0f} | {r['note']} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    names = [f"{r['method']} ({r['trainable']:,})" for r in rows]
    means = [100 * r["accuracy_mean"] for r in rows]
    left.barh(names, means, xerr=[100 * r["accuracy_std"] for r in rows], capsize=3, color="tab:blue")
    for i, m in enumerate(means):
        left.text(m - 1, i, f"{m:.1f}", va="center", ha="right", color="white", fontsize=8)
    left.invert_yaxis()
    left.set_xlim(min(means) - 10, 100)
    left.set_xlabel("test accuracy %, mean ± std over seeds")
    left.set_title("digits 5-9 after pretraining on 0-4 (trainable parameters)", fontsize=10)
    right.barh(names, [r["step_ms"] for r in rows], color="tab:gray")
    right.set_xlabel("median training step, ms (CPU, one thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    """The options; ``out`` is the path prefix of the outputs (``--update-results``: the committed copy)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--timing-rounds", type=int, default=200, help="interleaved rounds for the step times")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=OUT,
                       help=f"path prefix of the .json/.md/.png outputs (default: {OUT.relative_to(ROOT)}, ignored by git)")
    where.add_argument("--update-results", dest="out", action="store_const", const=COMMITTED_RESULTS,
                       help=f"write the committed results ({COMMITTED_RESULTS.relative_to(ROOT)}.*) instead")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    lk.set_backend("reference")

    x, y = digits()
    pre_train, pre_test = split(x, y, [0, 1, 2, 3, 4], train_images=600)
    new_train, new_test = split(x, y, [5, 6, 7, 8, 9], train_images=TRAIN_IMAGES)
    base, pre_acc = pretrain(pre_train, pre_test)
    print(f"pretrained on digits 0-4: {100 * pre_acc:.1f}% test accuracy")

    progress = Progress(len(METHODS) * args.seeds)
    runs, notes = {m: [] for m in METHODS}, {}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for method in METHODS:
            model, notes[method] = prepare(base, method, seed)
            runs[method].append(finetune(model, new_train, new_test, args.epochs, seed))
            progress.step(f"{method} seed {seed}")
    rows = summarise(runs, notes, step_times(base, new_train, rounds=args.timing_rounds))
    meta = dict(seeds=args.seeds, epochs=args.epochs, train_images=TRAIN_IMAGES, test_images=len(new_test[1]),
                lr=LR, batch=BATCH, lora_rank=LORA_RANK, pretrain_accuracy=pre_acc, torch=torch.__version__,
                machine=f"{platform.machine()} CPU", wall_s=round(time.perf_counter() - start, 1),
                memory="saved for backward: distinct storages packed by saved_tensors_hooks for one batch of "
                       f"{BATCH}, less the input and parameters; not a peak")
    text = table(rows, meta)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, summary=rows, runs=runs), indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png ({meta['wall_s']} s)")


if __name__ == "__main__":
    main()
