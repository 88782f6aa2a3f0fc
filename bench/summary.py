"""The main job's summary: per method and backend, geometric means over the shapes of a run.

For a provider P and a reference R (the frozen layer, full fine-tuning, the LoRA baseline), the
ratio on one shape is ``fwd+bwd ms of P / fwd+bwd ms of R`` (medians, same shape, same run); the
summary gives the geometric mean of these ratios over the shapes where both rows ran, and how many
shapes that was. The geometric mean is the mean that treats 2x slower and 2x faster as opposite
and equal, and one that a single large shape cannot dominate. Bytes kept are
:attr:`bench.timing.KeptBytes.total` (saved for backward plus held outside autograd) over the frozen
layer's, averaged the same way.

Two tables:

- :func:`summary_lines`: one line per baseline and per method x backend under ``auto`` (the layer
  as a user gets it): x frozen, x full fine-tuning, x LoRA, kept x frozen;
- :func:`strategy_lines`: per method x backend, x frozen under ``auto`` and under each forced
  strategy, and ``auto / best``: the geometric mean over shapes of auto's time over the fastest
  forced strategy's on that shape (1.00: auto always picked the fastest; above 1: it lost time),
  given only where every strategy that can run the method was run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from bench import external, suite

TIME_KEY = "fwd_bwd"


def geometric_mean(values: Sequence[float]) -> Optional[float]:
    """exp(mean(log v)) of positive values; None for none."""
    values = list(values)
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


class Rows:
    """The ok rows of a run, found by (shape, provider)."""

    def __init__(self, rows: Sequence):
        self.shapes = list(dict.fromkeys(r.shape for r in rows))
        self.providers = list(dict.fromkeys(r.provider for r in rows))
        self._ok = {(r.shape, r.provider): r for r in rows if r.status == "ok"}

    def time(self, shape: str, provider: str) -> Optional[float]:
        row = self._ok.get((shape, provider))
        return None if row is None else row.ms.get(TIME_KEY)

    def kept(self, shape: str, provider: str) -> Optional[float]:
        row = self._ok.get((shape, provider))
        return None if row is None or not row.kept_mib else row.kept_mib["total"]

    def ratios(self, provider: str, reference: str, measure: str = "time") -> list:
        """``provider / reference`` on every shape where both have the measure."""
        get = self.time if measure == "time" else self.kept
        pairs = ((get(s, provider), get(s, reference)) for s in self.shapes)
        return [p / r for p, r in pairs if p is not None and r]



def lora_baseline(rows: Rows, preferred: Optional[str] = None) -> Optional[str]:
    """The provider the "x LoRA" column divides by: ``preferred`` if given, else the first of
    :data:`bench.suite.LORA_BASELINES` that ran on some shape (None when none did). The column
    covers the shapes where it ran (:func:`explanation` says on how many)."""
    candidates = [preferred] if preferred is not None else suite.LORA_BASELINES
    return next((p for p in candidates if any(rows.time(s, p) is not None for s in rows.shapes)), None)


@dataclass
class SummaryLine:
    """One provider's geometric means (None where nothing could be compared)."""

    provider: str
    method: str
    backend: str
    strategy: str
    shapes: int
    x_frozen: Optional[float]
    x_full_ft: Optional[float]
    x_lora: Optional[float]
    kept_x_frozen: Optional[float]


def _line(rows: Rows, provider: str, lora: Optional[str], method: str, backend: str, strategy: str) -> SummaryLine:
    to_frozen = rows.ratios(provider, suite.FLOOR)
    return SummaryLine(
        provider, method, backend, strategy, len(to_frozen), geometric_mean(to_frozen),
        geometric_mean(rows.ratios(provider, suite.FULL_FINE_TUNING)),
        geometric_mean(rows.ratios(provider, lora)) if lora else None,
        geometric_mean(rows.ratios(provider, suite.FLOOR, "kept")))


def describe_baseline(provider: str) -> tuple:
    """``(what it is, what runs it)`` of a provider that is not a method's."""
    if provider in suite.BASELINE_DESCRIPTIONS:
        return suite.BASELINE_DESCRIPTIONS[provider]
    if provider in external.SETUPS:
        return external.describe(provider)
    return provider, "-"


def summary_lines(rows: Rows, lora: Optional[str]) -> list:
    """The baselines (every provider that is not a method's), then every method x backend under auto."""
    lines = []
    for provider in rows.providers:
        parts = suite.adapter_provider_parts(provider)
        if parts is None:
            lines.append(_line(rows, provider, lora, *describe_baseline(provider), "-"))
        elif parts[2] == "auto":
            lines.append(_line(rows, provider, lora, *parts))
    return lines


def strategy_lines(rows: Rows) -> list:
    """``(method, backend, {strategy: x frozen}, auto / best forced)`` per method x backend that ran
    under more than one strategy."""
    groups = {}
    for provider in rows.providers:
        parts = suite.adapter_provider_parts(provider)
        if parts is not None:
            groups.setdefault(parts[:2], {})[parts[2]] = provider
    lines = []
    for (method, backend), by_strategy in groups.items():
        if len(by_strategy) < 2:
            continue
        x_frozen = {st: geometric_mean(rows.ratios(p, suite.FLOOR)) for st, p in by_strategy.items()}
        auto_over_best = None
        if "auto" in by_strategy and set(by_strategy) == set(suite.route_strategies(method, backend)):
            forced = [p for st, p in by_strategy.items() if st != "auto"]
            losses = []
            for shape in rows.shapes:
                auto = rows.time(shape, by_strategy["auto"])
                times = [t for t in (rows.time(shape, p) for p in forced) if t is not None]
                if auto is not None and len(times) == len(forced):
                    losses.append(auto / min(times))
            auto_over_best = geometric_mean(losses)
        lines.append((method, backend, x_frozen, auto_over_best))
    return lines


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_table(rows: Rows, lora: Optional[str]) -> tuple:
    """(header, body) of the summary table."""
    header = ("provider", "method", "backend", "shapes", "x frozen", "x full_ft", f"x LoRA ({lora or 'none'})",
              "kept x frozen")
    body = [(line.provider, line.method, line.backend, str(line.shapes), _num(line.x_frozen), _num(line.x_full_ft),
             _num(line.x_lora), _num(line.kept_x_frozen)) for line in summary_lines(rows, lora)]
    return header, body


def strategy_table(rows: Rows) -> tuple:
    """(header, body) of the per-strategy table; empty when no method ran under two strategies."""
    lines = strategy_lines(rows)
    strategies = [st for st in ("auto", "merged", "two_branch", "bypass")
                  if any(st in line[2] for line in lines)]
    header = ("method", "backend", *(f"{st} x frozen" for st in strategies), "auto / best forced")
    body = [(method, backend, *(_num(x.get(st)) for st in strategies), _num(best))
            for method, backend, x, best in lines]
    return header, body


def explanation(rows: Rows, lora: Optional[str]) -> str:
    """What the tables' numbers are, in a few sentences."""
    lora_text = "none measured"
    if lora:
        ran = sum(rows.time(s, lora) is not None for s in rows.shapes)
        lora_text = f"`{lora}`" + ("" if ran == len(rows.shapes) else f", over the {ran} shapes where it ran")
    return (f"Geometric means over the {len(rows.shapes)} shapes of this run of one training step's time "
            f"(forward + backward, medians) as a ratio to the frozen layer, to full fine-tuning and to the LoRA "
            f"baseline ({lora_text}) on the same shape: lower is better, 1.00 = as fast. "
            "`kept x frozen`: bytes kept from the forward for the backward (saved by autograd, input and weights "
            "included, plus anything the forward left allocated outside autograd) over the frozen layer's. "
            "`shapes`: on how many shapes the provider ran.")


def as_dict(rows: Rows, lora: Optional[str]) -> dict:
    """The summary for the JSON file."""
    return {"lora_baseline": lora, "shapes": len(rows.shapes),
            "lines": [vars(line) for line in summary_lines(rows, lora)],
            "strategies": [{"method": m, "backend": b, "x_frozen": x, "auto_over_best_forced": best}
                           for m, b, x, best in strategy_lines(rows)]}


BASELINE_GROUP = "full fine-tuning and the LoRA baselines"


def provider_groups(providers: Sequence[str]) -> dict:
    """Title -> providers, in run order: the baselines (the frozen layer left out: every ratio is to
    it), then one group per method with all its backends and strategies."""
    groups = {BASELINE_GROUP: []}
    for provider in providers:
        parts = suite.adapter_provider_parts(provider)
        if parts is None:
            if provider != suite.FLOOR:
                groups[BASELINE_GROUP].append(provider)
        else:
            groups.setdefault(parts[0], []).append(provider)
    return {title: members for title, members in groups.items() if members}
