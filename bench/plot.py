"""The main job's plot: one training step's time over the frozen layer's, one panel per method.

Each panel has a shape per x position (grouped by network), a log y axis shared by all panels,
the frozen layer as the labelled line at 1, one series per provider of the panel's method (a
marker per backend, filled under ``auto``, hollow where a strategy is forced; a colour per backend
and strategy, the same in every panel, none twice in a panel) and, for reference, full fine-tuning and the LoRA baseline. The first panel holds those
baselines themselves (and the real PEFT and LyCORIS layers where they were measured). The title
says what is plotted, that lower is better, and the device, dtype and shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from bench import report, suite, summary

ROUTE_MARKERS = {"reference": "o", "native": "s", "triton": "^", "compiled": "D"}
BASELINE_MARKERS = "ovsD^<>ph*"
FULL_FT_STYLE = dict(color="0.45", marker="_", markersize=14, markeredgewidth=2.0, linestyle="none")
FROZEN_LABEL = "frozen layer = 1"
LORA_STYLE = dict(color="black", marker="x", markersize=6, markeredgewidth=1.2, linestyle="none")


def _palette(n: int) -> list:
    """``n`` colours, none grey or black (those mark the reference series): tab10 for up to 9, tab20 beyond."""
    import matplotlib

    def usable(name):
        return [c for c in matplotlib.colormaps[name].colors if len(set(c[:3])) > 1]

    colours = usable("tab10") if n <= 9 else usable("tab20")
    return [colours[i % len(colours)] for i in range(n)]


def _colours(groups: dict) -> dict:
    """Provider -> colour: the baselines one each; a method's providers by (backend, strategy), so
    that a colour means the same backend and strategy in every method's panel (and none repeats
    within a panel)."""
    baselines = groups.get(summary.BASELINE_GROUP, [])
    kinds = list(dict.fromkeys(suite.adapter_provider_parts(p)[1:] for title, members in groups.items()
                               if title != summary.BASELINE_GROUP for p in members))
    by_kind = dict(zip(kinds, _palette(len(kinds))))
    colours = dict(zip(baselines, _palette(len(baselines))))
    for title, members in groups.items():
        if title != summary.BASELINE_GROUP:
            colours.update({p: by_kind[suite.adapter_provider_parts(p)[1:]] for p in members})
    return colours


def _series(measured: summary.Rows, provider: str) -> tuple:
    xs, ys = [], []
    for i, shape in enumerate(measured.shapes):
        t, f = measured.time(shape, provider), measured.time(shape, suite.FLOOR)
        if t is not None and f:
            xs.append(i)
            ys.append(t / f)
    return xs, ys


def _legend_label(provider: str) -> str:
    parts = suite.adapter_provider_parts(provider)
    if parts is None:
        what, runs = summary.describe_baseline(provider)
        return f"{provider}: {what}, {runs}"
    return f"{parts[1]}, {parts[2]}" if parts[2] != "auto" else f"{parts[1]}, auto (default)"


def _family_separators(ax, shapes: list) -> None:
    families = [s.split("/")[0] for s in shapes]
    for i in range(1, len(shapes)):
        if families[i] != families[i - 1]:
            ax.axvline(i - 0.5, color="0.8", linewidth=0.8, zorder=0)


def figure(rows: list, meta: dict, lora: Optional[str]):
    """The plot of a run as a matplotlib Figure (None when no ratio was measured); needs matplotlib."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    measured = summary.Rows(rows)
    groups = {title: [p for p in members if _series(measured, p)[0]]
              for title, members in summary.provider_groups(measured.providers).items()}
    groups = {title: members for title, members in groups.items() if members}
    if not groups:
        return None
    shapes = measured.shapes
    width = max(11.0, 0.42 * len(shapes) + 6.5)
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, 2.9 * len(groups) + 2.8), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    colours = _colours(groups)
    for ax, (title, members) in zip(axes[:, 0], groups.items()):
        baseline_panel = title == summary.BASELINE_GROUP
        for provider in members:
            parts = suite.adapter_provider_parts(provider)
            marker = (BASELINE_MARKERS[members.index(provider) % len(BASELINE_MARKERS)] if parts is None
                      else ROUTE_MARKERS.get(parts[1], "o"))
            forced = parts is not None and parts[2] != "auto"
            ax.plot(*_series(measured, provider), linestyle="none", marker=marker, color=colours[provider],
                    markersize=5 if forced else 7, fillstyle="none" if forced else "full",
                    label=_legend_label(provider))
        if not baseline_panel:
            ax.plot(*_series(measured, suite.FULL_FINE_TUNING), label=f"{suite.FULL_FINE_TUNING}: full fine-tuning",
                    **FULL_FT_STYLE)
            if lora:
                ax.plot(*_series(measured, lora), label=f"{lora}: the LoRA baseline", **LORA_STYLE)
        ax.axhline(1.0, color="black", linewidth=1.0, zorder=1)
        ax.annotate(FROZEN_LABEL, xy=(0, 1.0), xycoords=("axes fraction", "data"), xytext=(3, 2),
                    textcoords="offset points", fontsize=8, va="bottom")
        _family_separators(ax, shapes)
        ax.set_title(title if baseline_panel else f"{title}: every backend and strategy", loc="left", fontsize=10)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel("time / frozen")
        ax.grid(True, axis="y", which="major", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    bottom = axes[-1, 0]
    bottom.set_xticks(range(len(shapes)))
    bottom.set_xticklabels(shapes, rotation=50, ha="right", fontsize=8)
    bottom.set_xlim(-0.6, len(shapes) - 0.4)
    fig.suptitle("\n".join(["One training step (forward + backward) of one layer: time over the frozen layer's "
                           "time on the same shape (log scale; lower is better)", *report.run_description_lines(meta)]),
                 fontsize=10.5)
    return fig


def plot_run(rows: list, path: Path, meta: dict, lora: Optional[str]) -> Optional[Path]:
    """Draws the run into ``path`` (PNG). Returns the path, or None (with a note printed) when
    matplotlib is missing or no ratio was measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; the plot is skipped (pip install matplotlib)")
        return None
    fig = figure(rows, meta, lora)
    if fig is None:
        print("note: no ratios to plot")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
