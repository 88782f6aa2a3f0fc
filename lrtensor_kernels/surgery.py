"""Model surgery: inject adapter layers, merge, unmerge and unload them."""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from . import trainable
from .layers import LAYERS, AdapterLayer
from .trainable import owner_of

TargetSpec = Union[str, Sequence[str], None]


def adaptable_type(module: nn.Module) -> Optional[type]:
    """The nn class an adapter can replace ``module`` with, or None."""
    if isinstance(module, AdapterLayer) or isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
        if isinstance(module, base):
            return base
    return None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def match_modules(model: nn.Module, spec: TargetSpec, what: str) -> Optional[list]:
    """Names of ``model``'s modules that ``spec`` picks (None for None): list entries match a name
    exactly or as a dotted suffix, a string is a regex matched in full. Raises when an entry
    matches nothing."""
    if spec is None:
        return None
    named = [n for n, _ in model.named_modules() if n]
    if isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{what} regex {spec!r} does not compile: {err}") from None
        hits = [n for n in named if regex.fullmatch(n)]
        if not hits:
            raise ValueError(f"{what} regex {spec!r} matched no module")
        return hits
    hits = []
    for pattern in spec:
        found = [n for n in named if _matches(n, pattern)]
        if not found:
            raise ValueError(f"{what} entry {pattern!r} matched no module of {type(model).__name__}")
        hits.extend(found)
    return hits


def _select(model: nn.Module, target_modules: TargetSpec, exclude_modules: TargetSpec,
            trained: Sequence[str] = ()) -> list:
    """Names of the modules to adapt; raises before anything changes. Modules in or under
    ``trained`` (trained in full) are left out of the default targets and refused as targets."""
    named = dict(model.named_modules())
    named.pop("", None)
    targets = match_modules(model, target_modules, "target_modules")
    excluded = set(match_modules(model, exclude_modules, "exclude_modules") or ())
    if targets is None:
        names = [n for n, m in named.items() if adaptable_type(m) is not None and owner_of(n, trained) is None]
    else:
        names = list(dict.fromkeys(targets))
        for n in names:
            if isinstance(named[n], AdapterLayer):
                raise ValueError(f"module '{n}' is already a {type(named[n]).__name__}")
            if adaptable_type(named[n]) is None:
                raise TypeError(f"module '{n}' is a {type(named[n]).__name__}; expected one of Conv1d, Conv2d, "
                                "Conv3d, Linear")
            if owner_of(n, trained) is not None:
                raise ValueError(f"module '{n}' trains in full (trainable_modules: '{owner_of(n, trained)}'); it "
                                 "cannot also get an adapter")
    names = [n for n in names if n not in excluded]
    if not names:
        raise ValueError("no module to adapt: the targets left nothing after exclude_modules")
    return names


def select_trainable(model: nn.Module, trainable_modules: TargetSpec) -> list:
    """Names of the modules ``trainable_modules`` picks (outermost only), checked to be trainable in full."""
    names = trainable.outermost(list(dict.fromkeys(match_modules(model, trainable_modules, "trainable_modules") or ())))
    trainable.check_trainable(model, names)
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> Iterable:
    """``(name, layer)`` for every adapter layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def build_adapter(module: nn.Module, method: str, name: str, **method_kwargs) -> AdapterLayer:
    """The adapter layer of ``method`` around ``module`` (which is left untouched)."""
    if method not in LAYERS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(LAYERS)}")
    base = adaptable_type(module)
    if base is None:
        raise TypeError(f"module '{name}' is a {type(module).__name__}, which cannot be adapted")
    cls = LAYERS[method][base]
    try:
        layer = cls.from_module(module, **method_kwargs)
    except TypeError as err:
        raise TypeError(f"module '{name}' ({cls.__name__}): {err}") from None
    except ValueError as err:
        raise ValueError(f"module '{name}': {err}") from None
    layer.adapter_name = name
    return layer


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only adapter tensors and the parameters of modules trained in full stay trainable."""
    keep = {id(p) for _, layer in adapter_layers(model) for p in layer.adapter_parameters()}
    keep.update(id(p) for p in trainable.trained_parameters(model))
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def inject(model: nn.Module, method: str, target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
           trainable_modules: TargetSpec = None, **method_kwargs) -> list:
    """Replace Conv1d/2d/3d and Linear layers of ``model`` in place by adapter layers of ``method``.

    method: "flora", "liera", "ssl" or "ssb". target_modules, exclude_modules and
    trainable_modules: a list of names, each matched exactly or as a dotted suffix ("conv1"
    matches "conv1" and "block.conv1", not "block.subconv1"), or one regex string matched in full
    against the whole dotted name; targets default to every adaptable layer. trainable_modules:
    modules that train in full beside the adapters (a new head, norm layers); they are left out
    of the default targets, and ``save_adapters`` writes their whole state. Freezes everything
    else; returns the adapted names. Every layer is built and every name checked before anything
    changes, so a bad argument leaves the model unchanged.
    """
    if method not in LAYERS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(LAYERS)}")
    extras = select_trainable(model, trainable_modules)
    trained = extras + [n for n, _ in trainable.marked_modules(model)]
    names = _select(model, target_modules, exclude_modules, trained)
    built = {n: build_adapter(model.get_submodule(n), method, n, **method_kwargs) for n in names}
    for n, layer in built.items():
        replace_module(model, n, layer)
    trainable.mark(model, extras)
    freeze_all_but_adapters(model)
    return names


def merge(model: nn.Module) -> None:
    """Merge every adapter layer (``W <- W'``); merged layers are left as they are."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Restore every merged layer's exact base weight; unmerged layers are left as they are."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by its plain nn layer, holding ``W'`` (``merge``) or ``W``."""
    for name, layer in adapter_layers(model):
        replace_module(model, name, layer.to_plain(merge=merge))
    return model
