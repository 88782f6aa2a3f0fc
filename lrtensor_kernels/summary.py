"""``trainable_summary(model)``: how many parameters train, per adapter and method.

The first line is PEFT's ``print_trainable_parameters`` line (trainable / all / percent, every
parameter of the model counted once, adapter tensors included); the table below it gives, per
adapter name and method, the layers holding it, its parameters, how many of them train and on how
many layers it is active, then the modules trained in full and any other trainable parameter
(a base weight made trainable again by hand).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import trainable, validation
from .surgery import adapter_layers


@dataclass(frozen=True)
class AdapterCount:
    """One named adapter of one method: on how many layers, its parameter count, how many of them
    train, and on how many of its layers it is the active adapter."""

    name: str
    method: str
    layers: int
    params: int
    trainable: int
    active_layers: int


@dataclass(frozen=True)
class TrainableSummary:
    """What :func:`trainable_summary` counted; ``str()`` is the printable report."""

    trainable: int
    total: int
    adapters: tuple  # AdapterCount, in the order the model's layers first hold them
    trained_in_full: tuple  # (module name, parameter count)
    other_trainable: int  # trainable parameters that are neither adapter tensors nor trained in full

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def by_method(self) -> dict:
        """``{method: parameter count}`` over every adapter of that method."""
        out = {}
        for a in self.adapters:
            out[a.method] = out.get(a.method, 0) + a.params
        return out

    def __str__(self) -> str:
        head = (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")
        rows = [(a.name, a.method, str(a.layers), f"{a.params:,}", f"{a.trainable:,}",
                 f"{a.active_layers} of {a.layers}") for a in self.adapters]
        rows += [(name, "trained in full", "", f"{n:,}", f"{n:,}", "") for name, n in self.trained_in_full]
        if self.other_trainable:
            rows.append(("other", "trainable by hand", "", "", f"{self.other_trainable:,}", ""))
        if not rows:
            return head
        header = ("adapter", "method", "layers", "params", "trainable", "active on")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        return "\n".join([head, line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])

    __repr__ = __str__


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable and total parameter counts of ``model``, per named adapter and method (see the module doc)."""
    validation.model(model, "trainable_summary")
    params = list(model.parameters())  # each Parameter once
    counted, counts = set(), {}
    for _, layer in adapter_layers(model):
        for name in layer.held_adapters():
            tensors = [p for p in layer.adapter_state_of(name).values() if id(p) not in counted]
            counted.update(id(p) for p in tensors)
            key = (name, layer.adapter_method)
            layers, n, trains, active = counts.get(key, (0, 0, 0, 0))
            counts[key] = (layers + 1, n + sum(p.numel() for p in tensors),
                           trains + sum(p.numel() for p in tensors if p.requires_grad),
                           active + (name == layer.active_adapter))
    full = []
    for name, module in trainable.marked_modules(model):
        owned = [p for p in module.parameters() if id(p) not in counted]
        counted.update(id(p) for p in owned)
        full.append((name, sum(p.numel() for p in owned)))
    other = sum(p.numel() for p in params if p.requires_grad and id(p) not in counted)
    return TrainableSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad), total=sum(p.numel() for p in params),
        adapters=tuple(AdapterCount(name, method, *c) for (name, method), c in counts.items()),
        trained_in_full=tuple(full), other_trainable=other)
