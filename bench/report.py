"""Result rows and their outputs: the printed table, the JSON file, the Markdown table and the ratio plot."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

TABLE_COLUMNS = (("shape", 34, "<"), ("provider", 28, "<"), ("strategy", 10, "<"), ("ms fwd", 9, ">"),
                 ("ms bwd", 9, ">"),
                 ("ms fwd+bwd", 10, ">"), ("x frozen", 8, ">"), ("saved MiB", 9, ">"), ("peak MiB", 9, ">"),
                 ("note", 0, "<"))


@dataclass
class Row:
    """The measurement of one provider on one shape (medians in ms; ratios to "frozen", same shape, same run)."""

    shape: str
    provider: str
    status: str = "ok"  # "ok", "error" or "skipped"
    strategy: str = ""  # the strategy an adapter layer ran (the cost model's choice for "auto" providers)
    note: str = ""
    ms: dict = field(default_factory=dict)  # fwd, bwd, fwd_bwd medians
    ratio_to_frozen: dict = field(default_factory=dict)
    memory_mib: Optional[dict] = None  # peak, step_extra (CUDA only)
    saved_mib: Optional[float] = None  # kept from forward for backward, beyond input and parameters
    trainable_params: int = 0
    samples_ms: dict = field(default_factory=dict)  # every timed run, per phase
    traceback: str = ""

    def set_ratios(self, floor: Optional["Row"]) -> None:
        if floor is None or floor.status != "ok" or self.status != "ok":
            return
        self.ratio_to_frozen = {k: self.ms[k] / floor.ms[k] for k in self.ms if floor.ms.get(k)}


def _cell(text: str, width: int, align: str) -> str:
    return f"{text:{align}{width}}" if width else text


def table_header() -> str:
    head = " ".join(_cell(name, width, align) for name, width, align in TABLE_COLUMNS)
    return f"{head}\n{'-' * len(head)}"


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_row(row: Row) -> str:
    if row.status != "ok":
        memory = saved = "-"
    else:
        memory = "n/a" if row.memory_mib is None else f"{row.memory_mib['peak']:.1f}"
        saved = "-" if row.saved_mib is None else f"{row.saved_mib:.2f}"
    ratio = row.ratio_to_frozen.get("fwd_bwd")
    note = row.note if row.status == "ok" else f"{row.status}: {row.note}"
    cells = (row.shape, row.provider, row.strategy or "-", _ms(row.ms.get("fwd")), _ms(row.ms.get("bwd")),
             _ms(row.ms.get("fwd_bwd")),
             "-" if ratio is None else f"{ratio:.2f}", saved, memory, note)
    return " ".join(_cell(text, width, align) for text, (_, width, align) in zip(cells, TABLE_COLUMNS)).rstrip()


def write_json(path: Path, meta: dict, shapes: list, rows: list, checks: list) -> None:
    """Everything measured so far, in one file (rewritten after every shape). Non-finite numbers
    (an infinite relative error, say) are written as the strings "inf", "-inf" and "nan"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "shapes": shapes, "results": [asdict(r) for r in rows],
                "verify": [asdict(c) for c in checks]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(document), indent=1, allow_nan=False))
    tmp.replace(path)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def markdown_table(rows: list, meta: dict) -> str:
    """fwd+bwd medians as a Markdown table, one line per shape, one column per provider:
    ``ms (ratio to frozen)``; a failed or skipped cell shows its status."""
    providers = list(dict.fromkeys(r.provider for r in rows))
    cells = {(r.shape, r.provider): r for r in rows}
    lines = [f"{meta['mode']} mode, {meta['device']}, {meta['dtype']}, torch {meta['torch']}, "
             f"median of {meta['repeats']} runs after {meta['warmup']} warm-up runs; shapes: {meta['shape_scaling']}.",
             "Cells: fwd+bwd ms (ratio to frozen) [strategy auto chose]; `<provider>:<strategy>` forces one.", "",
             "| shape | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for shape in dict.fromkeys(r.shape for r in rows):
        line = []
        for provider in providers:
            row = cells.get((shape, provider))
            if row is None:
                line.append("")
            elif row.status != "ok":
                line.append(row.status)
            else:
                ratio = row.ratio_to_frozen.get("fwd_bwd")
                chosen = f" [{row.strategy}]" if row.strategy and ":" not in provider else ""
                line.append(f"{row.ms['fwd_bwd']:.3f}" + ("" if ratio is None else f" ({ratio:.2f}x)") + chosen)
        lines.append(f"| {shape} | " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def plot_ratios(rows: list, path: Path, title: str) -> Optional[Path]:
    """fwd+bwd time / frozen per shape, one marker series per provider, log scale. Returns the PNG
    path, or None (with a note printed) when matplotlib is missing or nothing was measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; the ratio plot is skipped (pip install matplotlib)")
        return None
    shapes = list(dict.fromkeys(r.shape for r in rows))
    series = {}
    for r in rows:
        ratio = r.ratio_to_frozen.get("fwd_bwd")
        if ratio is not None and r.provider != "frozen":
            series.setdefault(r.provider, {})[r.shape] = ratio
    if not series:
        print("note: no ratios to plot")
        return None
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(shapes) + 3), 6))
    markers = "osD^v<>phX*"
    for i, (provider, by_shape) in enumerate(series.items()):
        xs = [shapes.index(s) for s in by_shape]
        ax.plot(xs, list(by_shape.values()), linestyle="none", marker=markers[i % len(markers)], label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("fwd+bwd time / frozen (same shape)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
