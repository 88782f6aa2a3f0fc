"""Model surgery: inject adapter layers, merge, unmerge and unload them."""
from __future__ import annotations

import re
import warnings
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from . import suggestions, trainable, validation
from .errors import AdapterConfigError, AdapterError, AdapterTypeError, OversizedAdapterWarning, SharedWeightError
from .adapter_layer import DEFAULT_ADAPTER, AdapterLayer, oversized_adapters_collected, oversized_description
from .layers import LAYERS
from .trainable import owner_of

TargetSpec = Union[str, Sequence[str], None]
OVERSIZED_SHOWN = 5  # layers an OversizedAdapterWarning names


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


def names_by_module(model: nn.Module) -> dict:
    """Every name of every module of ``model`` by module id, in the model's order: a module
    registered under two names (``s.a = s.b = nn.Linear(4, 4)``) has both."""
    names = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def _picked(model: nn.Module, named: dict, spec: TargetSpec, what: str) -> Optional[list]:
    """The names ``spec`` selects: one regex matched in full, or names matched exactly or as a dotted suffix.
    A spec that matches nothing is an error naming the closest names (of adaptable modules, for targets)."""
    if spec is None:
        return None
    candidates = [n for n in named if what != "target_modules" or adaptable_type(named[n]) is not None]
    if isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as err:
            raise AdapterConfigError(f"{what} regex {spec!r} does not compile: {err}") from None
        hits = [n for n in named if regex.fullmatch(n)]
        if not hits:
            raise AdapterConfigError(f"{what} regex {spec!r} matched no module of {type(model).__name__} (a regex "
                                     "matches whole dotted names)" + suggestions.module_name_phrase(spec, candidates))
        return hits
    if not validation.is_sequence(spec) and not isinstance(spec, (set, frozenset)):
        raise AdapterTypeError(f"{what} must be a list of module names or one regex string, got {spec!r}")
    spec = list(spec)
    if not spec:
        raise AdapterConfigError(f"{what} is an empty list; pass None for "
                                 + ("every adaptable module" if what == "target_modules" else "no exclusion"))
    hits = []
    for pattern in spec:
        if not isinstance(pattern, str):
            raise AdapterTypeError(f"{what} entries must be module names (str), got {pattern!r}")
        found = [n for n in named if _matches(n, pattern)]
        if not found:
            raise AdapterConfigError(f"{what} entry {pattern!r} matched no module of {type(model).__name__}"
                                     + suggestions.module_name_phrase(pattern, candidates))
        hits.extend(found)
    return hits


def _takes(module: nn.Module, method: str, adapter: str) -> bool:
    """Whether ``module`` can take a new adapter ``adapter`` of ``method`` by default: a plain
    adaptable layer, or an adapter layer of ``method`` that does not hold that name."""
    if isinstance(module, AdapterLayer):
        return module.adapter_method == method and adapter not in module.held_adapters()
    return adaptable_type(module) is not None


def _select(model: nn.Module, method: str, target_modules: TargetSpec, exclude_modules: TargetSpec,
            trained: Sequence[str] = (), adapter: str = DEFAULT_ADAPTER) -> list:
    """Names of the modules to give adapter ``adapter`` of ``method``, one per module (its first
    name); raises before anything changes. Plain layers and adapter layers of ``method`` not holding
    that name qualify. Modules in or under ``trained`` (trained in full) are left out of the default
    targets and refused as targets."""
    named = dict(model.named_modules(remove_duplicate=False))
    named.pop("", None)
    first_name = {id(m): n for n, m in reversed(list(named.items()))}
    targets = _picked(model, named, target_modules, "target_modules")
    # a module registered under several names is excluded by any of them
    excluded = {id(named[n]) for n in _picked(model, named, exclude_modules, "exclude_modules") or ()}
    if targets is None:
        names = [n for n, m in model.named_modules()
                 if n and _takes(m, method, adapter) and owner_of(n, trained) is None]
    else:
        names = list(dict.fromkeys(first_name[id(named[n])] for n in targets))
        for n in names:
            layer = named[n]
            if isinstance(layer, AdapterLayer) and layer.adapter_method != method:
                raise AdapterConfigError(f"module '{n}' is already a {type(layer).__name__}; a layer holds adapters "
                                         f"of one method ({layer.adapter_method!r}), so a {method!r} adapter cannot "
                                         "be added to it")
            if isinstance(layer, AdapterLayer) and adapter in layer.held_adapters():
                raise AdapterConfigError(f"module '{n}' is already a {type(layer).__name__} holding an adapter named "
                                         f"{adapter!r} (inject(..., adapter_name=...) adds another)")
            if not isinstance(layer, AdapterLayer) and adaptable_type(layer) is None:
                raise AdapterTypeError(f"module '{n}' is a {type(named[n]).__name__}; expected one of Conv1d, "
                                       "Conv2d, Conv3d, Linear")
            if owner_of(n, trained) is not None:
                raise AdapterConfigError(f"module '{n}' trains in full (trainable_modules: "
                                         f"'{owner_of(n, trained)}'); it cannot also get an adapter")
    kept = [n for n in names if id(named[n]) not in excluded]
    if not kept:
        raise AdapterConfigError(_nothing_to_adapt(model, method, names))
    return kept


def _nothing_to_adapt(model: nn.Module, method: str, names: list) -> str:
    if names:
        return f"no module to adapt: exclude_modules removed every target ({', '.join(names)})"
    message = f"no module to adapt: {type(model).__name__} has no Conv1d, Conv2d, Conv3d or Linear submodule"
    adapted = [n or "the model itself" for n, _ in adapter_layers(model)]
    if adapted:
        message += f" that is not adapted already (adapted: {', '.join(adapted)})"
    elif adaptable_type(model) is not None:
        message += (f"; the model itself is a {type(model).__name__}, which inject cannot replace: use "
                    f"lk.{LAYERS[method][adaptable_type(model)].__name__}.from_module(model)")
    return message


def select_trainable(model: nn.Module, trainable_modules: TargetSpec) -> list:
    """Names of the modules ``trainable_modules`` picks (outermost only), checked to be trainable in full."""
    named = dict(model.named_modules(remove_duplicate=False))
    named.pop("", None)
    names = trainable.outermost(list(dict.fromkeys(_picked(model, named, trainable_modules, "trainable_modules")
                                                   or ())))
    trainable.check_trainable(model, names)
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> Iterable:
    """``(name, layer)`` for every adapter layer of ``model``."""
    validation.model(model, "adapter_layers")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _check_method(method) -> None:
    if not isinstance(method, str) or method not in LAYERS:
        raise AdapterConfigError(f"unknown method {method!r}; expected one of {tuple(LAYERS)}")


def build_adapter(module: nn.Module, method: str, name: str, **method_kwargs) -> AdapterLayer:
    """The adapter layer of ``method`` around ``module`` (which is left untouched but for its
    frozen weight and bias, which the layer shares)."""
    layer = _sized_adapter(module, method, name, **method_kwargs)
    layer.take_module(module)
    return layer


def _sized_adapter(module: nn.Module, method: str, name: str, **method_kwargs) -> AdapterLayer:
    """``build_adapter``'s layer still on the meta device (``AdapterLayer.sized_for``), named."""
    _check_method(method)
    base = adaptable_type(module)
    if base is None:
        raise AdapterTypeError(f"module '{name}' is a {type(module).__name__}, which cannot be adapted")
    cls = LAYERS[method][base]
    try:
        layer = cls.sized_for(module, **method_kwargs)
    except AdapterError as err:
        raise type(err)(f"module '{name}': {err}") from None
    except TypeError as err:
        raise AdapterTypeError(f"module '{name}' ({cls.__name__}): {err}") from None
    layer.adapter_name = name
    return layer


def build_all(model: nn.Module, specs: dict, adapter: str = DEFAULT_ADAPTER, warn_oversized: bool = True,
              oversized_elsewhere: Sequence = ()) -> dict:
    """``{name: build_adapter(module, method, name, **kwargs)}`` for ``specs = {name: (method, kwargs)}``,
    each layer running adapter ``adapter`` (its only one).

    Building freezes the base weights the new layers share with ``model``; if any build fails,
    every ``requires_grad`` flag is restored before the error propagates. Every layer is sized (on
    the meta device) before any adapter is allocated; layers whose adapters train more numbers
    than their weights hold get one OversizedAdapterWarning for them all (``warn_oversized``;
    with those of ``oversized_elsewhere``, collected by the caller), before the allocation (a
    warning turned into an error leaves the model unchanged)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with oversized_adapters_collected() as oversized:
            built = {n: _sized_adapter(model.get_submodule(n), method, n, **kwargs)
                     for n, (method, kwargs) in specs.items()}
        oversized = list(oversized_elsewhere) + oversized
        if oversized and warn_oversized:
            shown = "; ".join(oversized_description(*found) for found in oversized[:OVERSIZED_SHOWN])
            more = f"; and {len(oversized) - OVERSIZED_SHOWN} more" if len(oversized) > OVERSIZED_SHOWN else ""
            warnings.warn(f"{len(oversized)} adapter layer{'s' if len(oversized) > 1 else ''} train more numbers than "
                          f"the weights they adapt hold: {shown}{more}. A lower rank, or training such a layer in "
                          "full (trainable_modules), trains fewer", OversizedAdapterWarning, stacklevel=3)
        for n, layer in built.items():
            layer.take_module(model.get_submodule(n))
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for layer in built.values():
        layer.active_adapter, layer._held = adapter, [adapter]
    return built


def build_stored_all(model: nn.Module, specs: dict) -> dict:
    """``{name: the new adapter (a StoredAdapter) for the adapter layer name}`` for ``specs = {name:
    kwargs}``; the layers are unchanged. Errors name the layer."""
    stored = {}
    for n, kwargs in specs.items():
        layer = model.get_submodule(n)
        try:
            stored[n] = layer.build_stored(**kwargs)
        except AdapterError as err:
            raise type(err)(f"module '{n}': {err}") from None
        except TypeError as err:  # an unknown keyword argument
            raise AdapterTypeError(f"module '{n}' ({type(layer).__name__}): {err}") from None
    return stored


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only adapter tensors and the parameters of modules trained in full stay trainable."""
    keep = {id(p) for _, layer in adapter_layers(model) for p in layer.adapter_parameters()}
    keep.update(id(p) for p in trainable.trained_parameters(model))
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def install(model: nn.Module, module: nn.Module, replacement: nn.Module, names: dict) -> None:
    """Put ``replacement`` wherever ``module`` sits in ``model`` (under each of its ``names``)."""
    for name in names[id(module)]:
        replace_module(model, name, replacement)


def inject(model: nn.Module, method: str, target_modules: TargetSpec = None, exclude_modules: TargetSpec = None,
           trainable_modules: TargetSpec = None, adapter_name: Optional[str] = None, **method_kwargs) -> list:
    """Replace Conv1d/2d/3d and Linear layers of ``model`` in place by adapter layers of ``method``.

    method: "flora", "lora", "liera", "ssl" or "ssb". adapter_name: the adapter's name (default
    "default"); a plain layer becomes an adapter layer running it, an adapter layer of the same
    method that does not hold the name yet gets it as an inactive adapter (``lk.set_adapter``
    switches; :mod:`lrtensor_kernels.named_adapters`). target_modules: a list of names matched exactly or
    as a dotted suffix, or one regex string matched in full against the whole name; by default
    every adaptable layer. A module registered under several names gets one adapter layer under
    all of them (it is listed once, under its first name; excluding any name excludes it).
    trainable_modules: modules that train in full beside the adapters (a new head, norm layers),
    selected the same way; they are left out of the default targets, and ``save_adapters`` writes
    their whole state. Freezes everything else; returns the adapted names. Every layer is built
    and every name checked before anything changes, so a bad argument leaves the model unchanged.
    """
    from .named_adapters import check_adapter_name

    validation.model(model, "inject")
    _check_method(method)
    adapter = DEFAULT_ADAPTER if adapter_name is None else check_adapter_name(adapter_name, "inject")
    extras = select_trainable(model, trainable_modules)
    trained = extras + [n for n, _ in trainable.marked_modules(model)]
    names = _select(model, method, target_modules, exclude_modules, trained, adapter)
    adapted = [n for n in names if isinstance(model.get_submodule(n), AdapterLayer)]
    with oversized_adapters_collected() as oversized:  # a named adapter added to an adapted layer
        stored = build_stored_all(model, {n: method_kwargs for n in adapted})
    built = build_all(model, {n: (method, method_kwargs) for n in names if n not in stored}, adapter,
                      oversized_elsewhere=oversized)
    aliases = names_by_module(model)
    for n, layer in built.items():
        install(model, model.get_submodule(n), layer, aliases)
    for n, new in stored.items():
        model.get_submodule(n)._add_stored(adapter, new)
    trainable.mark(model, extras)
    freeze_all_but_adapters(model)
    return names


def _refuse_tied_weights(model: nn.Module, layers: list) -> None:
    """Merging writes W' into the weight Parameter: refuse when another module holds the same Parameter."""
    holders = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((module, f"{module_name}.{param_name}" if module_name else param_name))
    tied = []
    for name, layer in layers:
        others = sorted({q for m, q in holders.get(id(layer.weight), []) if m is not layer})
        if others:
            tied.append(f"the weight of {layer._label()} is also {', '.join(repr(q) for q in others)}")
    if tied:
        raise SharedWeightError(
            "merge refused: " + "; ".join(tied) + ". Merging writes W' into that Parameter and would change the "
            "other modules too. Untie it (layer.weight = nn.Parameter(layer.weight.detach().clone())), use "
            "lk.unload(model, merge=True) (W' in a new Parameter), or keep the layer unmerged. Nothing was merged.")


def merge(model: nn.Module, adapter_weights: Optional[dict] = None) -> None:
    """Merge every adapter layer (``W <- W'`` of its active adapter); merged layers are left as they are.
    With ``adapter_weights`` ({adapter name: weight}), a weighted combination of named adapters
    (:func:`lrtensor_kernels.named_adapters.merge_weighted`).

    All or nothing: a weight Parameter that another module also holds (tied weights) raises
    SharedWeightError, a ``W'`` holding inf or NaN raises NonFiniteError, before any layer changes.
    """
    if adapter_weights is not None:
        from .named_adapters import merge_weighted

        validation.model(model, "merge")
        return merge_weighted(model, adapter_weights)
    validation.model(model, "merge")
    layers = [(n, layer) for n, layer in adapter_layers(model) if not layer.merged]
    _refuse_tied_weights(model, layers)
    merged = [layer.checked_effective_weight("merge") for _, layer in layers]
    for (_, layer), weight in zip(layers, merged):
        layer._set_merged(weight)


def unmerge(model: nn.Module) -> None:
    """Restore every merged layer's exact base weight; unmerged layers are left as they are."""
    validation.model(model, "unmerge")
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer (under each of its names) by its plain nn layer, holding ``W'``
    in a new Parameter (``merge``) or the layer's own base weight Parameter.

    All or nothing: with ``merge``, a ``W'`` holding inf or NaN raises NonFiniteError before any
    layer is replaced.
    """
    validation.model(model, "unload")
    layers = adapter_layers(model)
    if not merge:
        unmerge(model)
    plains = [layer.to_plain(merge=merge) for _, layer in layers]
    aliases = names_by_module(model)
    for (_, layer), plain in zip(layers, plains):
        install(model, layer, plain, aliases)
    return model
