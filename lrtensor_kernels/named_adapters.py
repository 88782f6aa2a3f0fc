"""Named adapters on one model: switch, delete, merge a weighted combination, run without them.

Every adapter has a name; a layer made by ``inject`` (or a constructor) holds one, ``"default"``.
``inject(model, method, adapter_name="style", ...)`` adds an adapter of that name: to a plain
layer (which becomes an adapter layer running it), or, inactive, to an adapter layer of the same
method that does not hold the name yet. A layer holds adapters of one method only (its class is
the method: the math, the strategies that can run it and its file entry follow from it), so an
adapter of another method is refused there with a clear error.

- ``set_adapter(model, name)``: every layer holding ``name`` runs it; a layer not holding it runs
  no adapter (its base layer), so the model computes the base plus that adapter. The active
  adapter's tensors are the layer's own attributes and train; inactive ones are frozen
  (``requires_grad`` False: an optimiser over all parameters leaves them alone).
- ``delete_adapter(model, name)``: drops it from every layer; a layer left without adapters
  becomes its plain nn layer again (its own weight and bias Parameters).
- ``merge(model, adapter_weights={"a": 1.0, "b": 0.5})`` (:func:`merge_weighted`): ``W <-
  combine(W, sum_i w_i s_i dW_i)``: ``W + sum_i w_i s_i dW_i`` for FLoRA and LoRA (the weighted
  sum of the updates), ``W * exp(sum_i w_i s_i dW_i)`` for LieRA (= ``W * prod_i exp(s_i
  dW_i)^w_i``) and ``W * (1 + sum_i w_i s_i dW_i)`` for first-order LieRA (= ``W + sum_i w_i
  (W'_i - W)``); refused for SSL/SSB (a sum of channel scalings is not a sum of updates) and for
  LieRA adapters of different modes on one layer. ``unmerge`` restores W bit for bit.
- ``disable_adapters(model)``: a context manager inside which every adapter layer computes its
  plain nn layer's op on the base weight (merged layers included: the kept base weight, not
  ``W'``), bit for bit the base model's output.

Strategies, backends and kernels never see names: they get the active adapter's tensors.
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch
from torch import nn

from . import methods, validation
from .adapter_layer import AdapterLayer
from .errors import AdapterConfigError, AdapterTypeError
from .surgery import adapter_layers, install, names_by_module

# combine rules whose weighted merge has a stated exact meaning (see the module doc)
WEIGHTED_COMBINES = ("add", "exp", "first_order")


def check_adapter_name(name, owner: str) -> str:
    """A name an adapter can be stored under: a non-empty string without dots that is not an
    attribute of the ModuleDict holding the inactive ones."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise AdapterConfigError(f"{owner}: adapter_name must be a non-empty string without dots that is not a "
                                 f"ModuleDict attribute, got {name!r}")
    return name


def _holding(model: nn.Module, name, what: str) -> list:
    """``(layer name, layer)`` of every adapter layer holding adapter ``name``; an error naming the
    held names when none does."""
    check_adapter_name(name, what)
    layers = adapter_layers(model)
    if not layers:
        raise AdapterConfigError(f"{what}: {type(model).__name__} has no adapter layer; call inject first")
    holding = [(n, layer) for n, layer in layers if name in layer.held_adapters()]
    if not holding:
        held = sorted({a for _, layer in layers for a in layer.held_adapters()})
        raise AdapterConfigError(f"{what}: no layer of {type(model).__name__} holds an adapter named {name!r}; "
                                 f"the adapters held are {held}")
    return holding


def _refuse_merged(layers: list, what: str) -> None:
    merged = [layer._label() for _, layer in layers if layer.merged]
    if merged:
        raise AdapterConfigError(f"{what}: {', '.join(merged)} merged; unmerge first (lk.unmerge(model)). "
                                 "Nothing was changed.")


def set_adapter(model: nn.Module, name: str) -> list:
    """Every adapter layer holding adapter ``name`` runs it (its tensors train); every other adapter
    layer runs no adapter (its base layer). Refused, changing nothing, when a layer that would
    change is merged. Returns the names of the layers running ``name``."""
    holding = _holding(model, name, "set_adapter")
    changing = [(n, layer) for n, layer in adapter_layers(model)
                if layer.active_adapter != (name if name in layer.held_adapters() else None)]
    _refuse_merged(changing, "set_adapter")
    for _, layer in changing:
        layer._activate(name if name in layer.held_adapters() else None)
    return [n for n, _ in holding]


def delete_adapter(model: nn.Module, name: str) -> list:
    """Drop adapter ``name`` from every layer holding it. A layer where it was active runs no adapter
    until ``set_adapter``; a layer left without adapters is replaced by its plain nn layer (its own
    weight and bias Parameters), under each of its names. Refused, changing nothing, when a layer
    holding it is merged. Returns the names of the layers it was dropped from."""
    holding = _holding(model, name, "delete_adapter")
    _refuse_merged(holding, "delete_adapter")
    aliases = names_by_module(model)
    for _, layer in holding:
        if layer.held_adapters() == [name]:
            install(model, layer, layer.to_plain(merge=False), aliases)
        else:
            layer._remove_adapter(name)
    return [n for n, _ in holding]


def _weights(adapter_weights, what: str) -> dict:
    if not isinstance(adapter_weights, Mapping) or not adapter_weights:
        raise AdapterTypeError(f"{what}: adapter_weights must be a non-empty mapping of adapter names to weights, "
                               f"got {adapter_weights!r}")
    return {check_adapter_name(n, what): validation.real_number(w, f"the weight of adapter {n!r}", what)
            for n, w in adapter_weights.items()}


@torch.no_grad()
def weighted_effective_weight(layer: AdapterLayer, weights: dict, what: str = "merge") -> torch.Tensor:
    """``combine(W, sum_i w_i s_i D_i)`` over the adapters of ``weights`` that ``layer`` holds (``W``
    itself, copied, when it holds none), in the adapter math's precision, in W's dtype."""
    base = layer.base_weight()
    acc = methods.compute_dtype(base.dtype)
    update, combines = None, set()
    for name, weight in weights.items():
        if name not in layer.held_adapters():
            continue
        with layer._activated(name):
            spec, scale = layer.adapter_math, layer.scale
            tensors = [t.detach().to(acc) for t in layer.adapter_tensors()]
        combines.add(spec.combine)
        if spec.combine not in WEIGHTED_COMBINES:
            raise AdapterConfigError(
                f"{what}: {layer._label()}: a weighted merge of {layer.adapter_method} adapters has no stated "
                "meaning (a weighted sum of channel scalings is not a weighted sum of updates); it is defined for "
                "FLoRA, LoRA and LieRA. Nothing was merged.")
        term = (scale * weight) * methods.delta(spec.delta, tensors, base.shape)
        update = term if update is None else update + term
    if update is None:
        return base.clone()
    if len(combines) > 1:
        raise AdapterConfigError(f"{what}: {layer._label()} holds adapters of modes {sorted(combines)}; a weighted "
                                 "merge combines updates of one rule. Nothing was merged.")
    return methods.combine(combines.pop(), base.to(acc), update).to(base.dtype)


def merge_weighted(model: nn.Module, adapter_weights: Mapping) -> None:
    """Merge a weighted combination of named adapters into every adapter layer's weight (see the
    module doc for its meaning per method); a layer holding none of them gets ``W' = W``. All or
    nothing: refused before any layer changes when a name is held by no layer, a weight is not a
    finite number, a layer is merged already, a method or mix has no weighted merge, ``W'`` would
    hold inf or NaN, or a weight is tied to another module. ``lk.unmerge`` restores every base weight
    bit for bit. One adapter at weight 1 merges exactly what ``lk.merge`` does with it active."""
    from .surgery import _refuse_tied_weights

    what = "merge"
    weights = _weights(adapter_weights, what)
    for name in weights:
        _holding(model, name, what)
    layers = adapter_layers(model)
    _refuse_merged(layers, what)
    _refuse_tied_weights(model, layers)
    merged = []
    for _, layer in layers:
        weight = weighted_effective_weight(layer, weights, what)
        validation.finite_weight(weight, layer.base_weight(), layer._label(), what)
        merged.append(weight)
    for (_, layer), weight in zip(layers, merged):
        layer._set_merged(weight)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block every adapter layer of ``model`` computes its plain nn layer's op on its base
    weight: exactly the base model's outputs. A merged layer uses the base weight its merge kept
    (it stays merged). On exit every layer is as before (nesting works)."""
    validation.model(model, "disable_adapters")
    layers = [layer for _, layer in adapter_layers(model)]
    before = [layer.__dict__.get("_adapters_disabled") for layer in layers]
    for layer in layers:
        layer._adapters_disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            if flag is None:
                layer.__dict__.pop("_adapters_disabled", None)
            else:
                layer._adapters_disabled = flag

