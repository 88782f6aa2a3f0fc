"""``plan(model, *example_inputs)``: which strategy every adapter layer runs on an example, and why."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_layer import AdapterLayer
from .strategies import cost, observing

_STRATEGY_COLUMNS = ("merged", "two_branch", "bypass", "hybrid", "fused")  # "fused": shown when a row has it (triton)


@dataclass
class PlanRow:
    """One adapter layer's call on the example: its shapes, the strategy asked for and the one run,
    the backend it ran on, every applicable strategy's estimated time (on that backend) relative to
    the frozen layer's, and why (with the estimate on each backend where the cost model chose it)."""

    name: str
    layer: str
    weight_shape: tuple
    input_shape: tuple
    dtype: str
    backend: str
    requested: str
    strategy: str
    relative_cost: dict = field(default_factory=dict)
    reason: str = ""
    notes: list = field(default_factory=list)


class Plan(list):
    """A list of :class:`PlanRow`; ``str(plan)`` is a Markdown table."""

    def __str__(self) -> str:
        columns = [s for s in _STRATEGY_COLUMNS if s != "fused" or any(s in r.relative_cost for r in self)]
        head = ["layer", "type", "weight", "input", "dtype", "strategy", "backend"] + [
            f"{s} (x frozen)" for s in columns] + ["why"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self:
            chosen = r.strategy if r.requested == "auto" else f"{r.strategy} (set)"
            costs = [f"{r.relative_cost[s]:.2f}" if s in r.relative_cost else "-" for s in columns]
            why = "; ".join([r.reason] + r.notes)
            lines.append("| " + " | ".join([r.name or "(root)", r.layer, "x".join(map(str, r.weight_shape)),
                                            "x".join(map(str, r.input_shape)), r.dtype, chosen, r.backend or "-",
                                            *costs, why]) + " |")
        return "\n".join(lines)


def plan(model: nn.Module, *example_inputs, **example_kwargs) -> Plan:
    """Runs ``model(*example_inputs, **example_kwargs)`` once (forward only, autograd on, as in
    training) and returns, per adapter layer call, the strategy chosen and the cost model's
    estimates. Merged layers (``lk.merge``) run the plain layer and are listed as such.

    It sees the forward it runs in the calling thread, nothing else: other threads may run this
    model or others meanwhile (not merge or change it), and their calls are neither listed nor
    disturbed. Layers a model runs in threads of its own are not listed."""
    rows, current, hooks = Plan(), [None], []
    thread = threading.get_ident()

    def observe(call, decision):
        layer_name, layer = current[0]
        work = cost.Workload.of(call)
        frozen = cost.frozen_seconds(work)
        device = cost.device_model(work.device_type)
        relative = {s: c.seconds(device, work.dtype) / frozen for s, c in decision.costs.items()}
        rows.append(PlanRow(layer_name, type(layer).__name__, tuple(call.weight.shape), tuple(call.x.shape),
                            str(call.x.dtype).replace("torch.", ""), call.impl, layer.strategy, decision.strategy,
                            relative, decision.reason, list(decision.costs[decision.strategy].notes)))

    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            def pre_hook(mod, args, name=name):
                if threading.get_ident() != thread:  # another thread's forward of this model
                    return
                current[0] = (name, mod)
                if mod.merged:
                    rows.append(PlanRow(name, type(mod).__name__, tuple(mod.weight.shape), (), "", "",
                                        mod.strategy, "merged into the weight", reason="lk.merge: the plain layer"))
            hooks.append(module.register_forward_pre_hook(pre_hook))
    try:
        with observing(observe), torch.enable_grad():
            model(*example_inputs, **example_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return rows
