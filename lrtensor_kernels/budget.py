"""Adapters at a given parameter budget: ``ranks_for_budget`` picks the rank, reports the count.

The rule: one nominal rank ``r`` for every targeted layer, as the papers use, the largest ``r``
for which the whole trainable count (adapters plus modules trained in full) stays within the
budget. What ``r`` means per method:

- ``"flora"``: ``ranks=r``: Tucker ranks (r, r, min(k, 2), ...), each clipped to its mode size;
- ``"lora"``: ``rank=r``: A (r, prod(W.shape[1:])), B (out, r): on a Linear and a dense conv exactly
  what ``match_lora_rank=r`` counts; on a grouped conv A has in/groups * prod(k) columns, fewer;
- ``"liera"``: ``rank=r`` (delta "lora": B (out, r), A (r, prod(W.shape[1:])); delta "tucker": as
  FLoRA); ``alpha`` stays what is given (default 8), so the scale ``alpha / r`` follows the rank;
- ``"ssl"``, ``"ssb"``: no rank; the count is what it is, and a budget below it is an error.

Every count is that of the layers as they are built (on the meta device, no memory), so clipped
ranks count as built. ``match_lora_rank=r`` sets the budget to what PEFT-style LoRA of rank r
trains on the same targets: ``r * (in + out)`` for Linear, ``r * (in * prod(k) + out)`` for a
convolution (a dense k x k conv down to r channels, a 1x1 conv up), plus the modules trained in
full.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from . import trainable
from .adapter_layer import AdapterLayer, oversized_adapters_collected
from .layers import LAYERS
from .surgery import TargetSpec, _select, adaptable_type, inject, select_trainable

RANKED = {"flora": "ranks", "lora": "rank", "liera": "rank"}


@dataclass(frozen=True)
class LayerCount:
    """One targeted layer: its adapter keyword arguments as built (ranks clipped) and its count."""

    name: str
    module_type: str
    weight_shape: tuple
    config: dict
    params: int


@dataclass(frozen=True)
class BudgetPlan:
    """What :func:`ranks_for_budget` chose. ``kwargs`` go to :func:`inject` as they are (or call
    :meth:`inject`); ``str(plan)`` is the per-layer table."""

    method: str
    budget: int
    kwargs: dict
    layers: tuple
    trained_in_full: tuple  # (name, parameter count) of each module trained in full

    @property
    def adapter_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total(self) -> int:
        return self.adapter_params + sum(n for _, n in self.trained_in_full)

    def inject(self, model: nn.Module) -> list:
        """``inject`` with exactly the planned layers, modules trained in full and keyword arguments."""
        exact = lambda names: "|".join(re.escape(n) for n in names)  # noqa: E731
        extras = [n for n, _ in self.trained_in_full]
        return inject(model, self.method, target_modules=exact([layer.name for layer in self.layers]),
                      trainable_modules=exact(extras) if extras else None, **self.kwargs)

    def table(self) -> str:
        rows = [(layer.name, layer.module_type, "x".join(map(str, layer.weight_shape)),
                 _describe(layer.config), f"{layer.params:,}") for layer in self.layers]
        rows += [(name, "trained in full", "", "", f"{n:,}") for name, n in self.trained_in_full]
        header = ("layer", "type", "weight", self.method, "trainable")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
        line = lambda r: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        out = [line(header), line(tuple("-" * w for w in widths))]
        out += [line(r) for r in rows]
        out.append(f"total {self.total:,} trainable parameters, budget {self.budget:,} "
                   f"({100 * self.total / self.budget:.1f}% used); inject kwargs {self.kwargs}")
        return "\n".join(out)

    __str__ = table


def _describe(config: dict) -> str:
    if "ranks" in config:
        return "ranks " + "x".join(map(str, config["ranks"]))
    if "rank" in config:
        return f"rank {config['rank']}" + (f" ({config['delta']})" if "delta" in config else "")
    return ""


def lora_parameter_count(module: nn.Module, rank: int) -> int:
    """What PEFT-style LoRA of ``rank`` trains on ``module`` (Linear or ConvNd; see module doc)."""
    if isinstance(module, nn.Linear):
        return rank * (module.in_features + module.out_features)
    return rank * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)


def _count(module: nn.Module, method: str, name: str, kwargs: dict) -> LayerCount:
    cls = LAYERS[method][module._nn_base() if isinstance(module, AdapterLayer) else adaptable_type(module)]
    try:
        with oversized_adapters_collected():  # a candidate rank: inject warns for the one applied
            layer = cls(**cls._base_kwargs(module), device="meta", dtype=module.weight.dtype, **kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"ranks_for_budget: module '{name}': {err}") from None
    return LayerCount(name, type(module).__name__, tuple(module.weight.shape), layer.adapter_config(),
                      sum(p.numel() for p in layer.adapter_parameters()))


def ranks_for_budget(model: nn.Module, method: str, budget: Optional[int] = None,
                     match_lora_rank: Optional[int] = None, target_modules: TargetSpec = None,
                     exclude_modules: TargetSpec = None, trainable_modules: TargetSpec = None,
                     **method_kwargs) -> BudgetPlan:
    """The largest single rank whose trainable count fits ``budget`` (see the module doc for the rule).

    Give ``budget`` (a parameter count) or ``match_lora_rank`` (the count of PEFT-style LoRA of that
    rank on the same targets). Targets and modules trained in full are selected as :func:`inject`
    selects them; other keyword arguments go to every layer (not the rank). Changes nothing in
    ``model``; returns a :class:`BudgetPlan` (print it for the per-layer table, ``plan.inject(model)``
    to apply it).
    """
    if method not in LAYERS:
        raise ValueError(f"ranks_for_budget: unknown method {method!r}; expected one of {tuple(LAYERS)}")
    if (budget is None) == (match_lora_rank is None):
        raise ValueError("ranks_for_budget: give exactly one of budget and match_lora_rank, got "
                         f"budget={budget!r}, match_lora_rank={match_lora_rank!r}")
    for what, value in (("budget", budget), ("match_lora_rank", match_lora_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"ranks_for_budget: {what} must be an integer >= 1, got {value!r}")
    if method in RANKED and RANKED[method] in method_kwargs:
        raise ValueError(f"ranks_for_budget: {RANKED[method]!r} is what it chooses; do not pass it")
    extras = select_trainable(model, trainable_modules)
    names = _select(model, method, target_modules, exclude_modules,
                    extras + [n for n, _ in trainable.marked_modules(model)])
    modules = {n: model.get_submodule(n) for n in names}
    trained = tuple((n, sum(p.numel() for p in model.get_submodule(n).parameters())) for n in extras)
    if match_lora_rank is not None:
        budget = sum(lora_parameter_count(m, match_lora_rank) for m in modules.values()) + sum(n for _, n in trained)

    def plan_for(kwargs):
        return BudgetPlan(method, budget, kwargs, tuple(_count(m, method, n, kwargs) for n, m in modules.items()),
                          trained)

    if method not in RANKED:
        plan = plan_for(dict(method_kwargs))
        if plan.total > budget:
            raise ValueError(f"ranks_for_budget: {method} trains {plan.total:,} parameters on these targets "
                             f"(it has no rank to lower), over the budget of {budget:,}")
        return plan
    key = RANKED[method]
    # counts grow with the rank until every rank is clipped to its mode size
    low, high = 1, max(max(m.weight.shape[:2]) for m in modules.values())
    best = plan_for({**method_kwargs, key: low})
    if best.total > budget:
        raise ValueError(f"ranks_for_budget: {method} at {key}=1 trains {best.total:,} parameters on these "
                         f"targets, over the budget of {budget:,}")
    while low < high:
        mid = (low + high + 1) // 2
        candidate = plan_for({**method_kwargs, key: mid})
        if candidate.total <= budget:
            low, best = mid, candidate
        else:
            high = mid - 1
    return best
