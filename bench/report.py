"""Result rows and their outputs: the printed per-row lines, the JSON file and the Markdown report
(the summary of :mod:`bench.summary` first, then every row, one table per method)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from bench import suite, summary

TABLE_COLUMNS = (("shape", 34, "<"), ("provider", 28, "<"), ("strategy", 10, "<"), ("ms fwd", 9, ">"),
                 ("ms bwd", 9, ">"),
                 ("ms fwd+bwd", 10, ">"), ("x frozen", 8, ">"), ("kept MiB", 9, ">"), ("peak MiB", 9, ">"),
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
    kept_mib: Optional[dict] = None  # kept from forward for backward: bench.timing.KeptBytes in MiB, and its total
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
        memory = kept = "-"
    else:
        memory = "n/a" if row.memory_mib is None else f"{row.memory_mib['peak']:.1f}"
        kept = "-" if row.kept_mib is None else f"{row.kept_mib['total']:.2f}"
    ratio = row.ratio_to_frozen.get("fwd_bwd")
    note = row.note if row.status == "ok" else f"{row.status}: {row.note}"
    cells = (row.shape, row.provider, row.strategy or "-", _ms(row.ms.get("fwd")), _ms(row.ms.get("bwd")),
             _ms(row.ms.get("fwd_bwd")),
             "-" if ratio is None else f"{ratio:.2f}", kept, memory, note)
    return " ".join(_cell(text, width, align) for text, (_, width, align) in zip(cells, TABLE_COLUMNS)).rstrip()


def write_json(path: Path, meta: dict, shapes: list, rows: list, checks: list,
               summary_data: Optional[dict] = None) -> None:
    """Everything measured so far, in one file (rewritten after every shape; ``summary`` added at
    the end). Non-finite numbers (an infinite relative error, say) are written as the strings
    "inf", "-inf" and "nan"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "shapes": shapes, "results": [asdict(r) for r in rows],
                "verify": [asdict(c) for c in checks]}
    if summary_data is not None:
        document["summary"] = summary_data
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


def format_table(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A table as Markdown or as aligned text (first column left, the others right)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]

    def line(cells):
        return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def run_description_lines(meta: dict) -> tuple:
    """(device, threads, dtype, torch and runs; the shapes measured)."""
    device = f"{meta['mode'].upper()} ({meta['device']}"
    device += f", {meta['cpu_threads']} thread{'s' if meta['cpu_threads'] != 1 else ''})" if meta["mode"] == "cpu" else ")"
    return (f"{device}, {meta['dtype']}, torch {meta['torch']}; median of {meta['repeats']} runs after "
            f"{meta['warmup']} warm-up runs.", f"Shapes: {meta['shape_scaling']}.")


def run_description(meta: dict) -> str:
    return " ".join(run_description_lines(meta))


def _ratio_cell(row: Optional[Row], show_strategy: bool) -> str:
    if row is None:
        return ""
    if row.status != "ok":
        return row.status
    ratio = row.ratio_to_frozen.get("fwd_bwd")
    chosen = f" [{row.strategy}]" if show_strategy and row.strategy else ""
    return ("-" if ratio is None else f"{ratio:.2f}") + chosen


def _chooses_strategy(provider: str) -> bool:
    """Whether the strategy a provider's rows ran is news: not for a forced ``<method>_<route>:<strategy>``."""
    parts = suite.adapter_provider_parts(provider)
    return parts is None or parts[2] == "auto"


def per_shape_tables(rows: list, groups: dict) -> list:
    """One Markdown table per group (``title -> providers``): a line per shape, the frozen layer's
    fwd+bwd ms, then each provider's fwd+bwd time over the frozen layer's (``[strategy]`` where
    the provider did not force one)."""
    cells = {(r.shape, r.provider): r for r in rows}
    shapes = list(dict.fromkeys(r.shape for r in rows))
    tables = []
    for title, providers in groups.items():
        body = []
        for shape in shapes:
            frozen = cells.get((shape, "frozen"))
            frozen_ms = f"{frozen.ms['fwd_bwd']:.3f}" if frozen is not None and frozen.status == "ok" else "-"
            body.append((shape, frozen_ms, *(_ratio_cell(cells.get((shape, p)), _chooses_strategy(p)) for p in providers)))
        tables.append(f"### {title}\n\n" + format_table(("shape", "frozen ms", *providers), body, markdown=True))
    return tables


def kept_table(rows: list, providers: list) -> str:
    """Bytes kept for backward over the frozen layer's, a line per shape (the frozen layer's MiB first)."""
    cells = {(r.shape, r.provider): r for r in rows if r.status == "ok" and r.kept_mib}
    body = []
    for shape in dict.fromkeys(r.shape for r in rows):
        frozen = cells.get((shape, "frozen"))
        line = [shape, "-" if frozen is None else f"{frozen.kept_mib['total']:.3f}"]
        for provider in providers:
            row = cells.get((shape, provider))
            line.append("" if row is None or frozen is None else f"{row.kept_mib['total'] / frozen.kept_mib['total']:.2f}")
        body.append(line)
    return format_table(("shape", "frozen MiB", *providers), body, markdown=True)


def summary_text(rows: list, lora: Optional[str], markdown: bool) -> str:
    """The summary and strategy tables of :mod:`bench.summary` with what they show."""
    measured = summary.Rows(rows)
    parts = [summary.explanation(measured, lora), format_table(*summary.summary_table(measured, lora), markdown)]
    header, body = summary.strategy_table(measured)
    if body:
        parts += ["Per strategy: x frozen under auto and under each strategy forced; `auto / best forced`: auto's "
                  "time over the fastest forced strategy's on each shape (1.00 = auto always chose the fastest).",
                  format_table(header, body, markdown)]
    return "\n\n".join(parts)


def _verify_text(checks: list) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "MISMATCH", "error", "skipped")}
    lines = [", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(checks)} checks."]
    lines += [f"- `{c.shape}` `{c.provider}`: {c.status} {c.note}".rstrip() for c in checks if c.status != "ok"]
    return "\n".join(lines)


def markdown_report(rows: list, meta: dict, checks: list, lora: Optional[str]) -> str:
    """The run as a Markdown document: the summary, then every row (one table per method), bytes
    kept, and the verify pass."""
    groups = summary.provider_groups(list(dict.fromkeys(r.provider for r in rows)))
    auto_providers = [p for members in groups.values() for p in members if ":" not in p]
    parts = [f"# One training step of one layer: {meta['mode'].upper()} run", run_description(meta),
             "## Summary", summary_text(rows, lora, markdown=True),
             "## Every shape: fwd+bwd time / frozen (lower is better)",
             "`[strategy]`: the strategy the layer ran under `auto`; `<provider>:<strategy>` forces one. "
             "`frozen ms`: the frozen layer's median fwd+bwd time.",
             *per_shape_tables(rows, groups),
             "## Every shape: bytes kept for backward / frozen (under auto)", kept_table(rows, auto_providers)]
    if checks:
        parts += ["## Verify: every provider against its oracle", _verify_text(checks)]
    return "\n\n".join(parts) + "\n"


def summary_markdown(rows: list, meta: dict, lora: Optional[str]) -> str:
    """The summary alone, as the file written beside the JSON."""
    return "\n\n".join([f"# Summary of a {meta['mode'].upper()} run", run_description(meta),
                         summary_text(rows, lora, markdown=True)]) + "\n"
