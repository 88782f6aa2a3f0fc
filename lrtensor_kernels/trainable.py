"""Trainable extras: whole modules that train in full beside the adapters (a new classifier head,
norm layers), and their state in adapter files.

``inject(..., trainable_modules=...)`` marks such a module; every parameter of a marked module
stays trainable through later ``inject`` and ``load_adapters`` calls, and ``save_adapters``
writes its whole state (parameters and persistent buffers, e.g. BatchNorm running statistics)
next to the adapter tensors, so that a model rebuilt from the original base and the file is the
trained model.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from . import suggestions
from .adapter_layer import AdapterLayer

MARK = "lrtensor_trainable"  # attribute set on a marked module


def is_marked(module: nn.Module) -> bool:
    return getattr(module, MARK, False) is True


def marked_modules(model: nn.Module) -> list:
    """``(name, module)`` for every module trained in full, outermost only."""
    found = []
    for name, module in model.named_modules():
        if is_marked(module) and owner_of(name, [n for n, _ in found]) is None:
            found.append((name, module))
    return found


def owner_of(name: str, owners: Iterable[str]) -> Optional[str]:
    """The entry of ``owners`` that is ``name`` or one of its ancestors, or None."""
    for owner in owners:
        if name == owner or name.startswith(owner + "."):
            return owner
    return None


def outermost(names: list) -> list:
    """``names`` without those nested in another entry (their parameters are included already)."""
    return [n for n in names if owner_of(n, [m for m in names if m != n]) is None]


def check_trainable(model: nn.Module, names: list) -> None:
    """Raises unless every named module can train in full: it holds parameters or buffers and
    neither is, nor contains, nor lies inside an adapter layer."""
    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    for name in names:
        module = model.get_submodule(name)
        inside = owner_of(name, adapters)
        if inside is not None:
            raise ValueError(f"trainable_modules: module '{name}' is {'an' if inside == name else 'inside the'} "
                             f"adapter layer '{inside}' ({type(model.get_submodule(inside)).__name__}); an adapted "
                             "layer trains its adapter, not its base weight")
        contained = [n for n in adapters if owner_of(n, [name])]
        if contained:
            raise ValueError(f"trainable_modules: module '{name}' contains the adapter layer '{contained[0]}'; "
                             "name the modules to train in full beside the adapted ones, not around them")
        if not module.state_dict():
            raise ValueError(f"trainable_modules: module '{name}' ({type(module).__name__}) has no parameter or "
                             "buffer to train")


def mark(model: nn.Module, names: list) -> None:
    for name in names:
        setattr(model.get_submodule(name), MARK, True)


def trained_parameters(model: nn.Module) -> list:
    return [p for _, module in marked_modules(model) for p in module.parameters()]


# -- adapter files ------------------------------------------------------------------------
def file_entries(model: nn.Module) -> tuple:
    """``(tensors, config)`` of every marked module for ``save_adapters``: tensors keyed
    ``"<module>.<state key>"`` (contiguous CPU copies), config per module: its type and the shape
    and dtype of each state tensor."""
    tensors, config = {}, {}
    for name, module in marked_modules(model):
        state = module.state_dict()
        for key, t in state.items():
            tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        config[name] = dict(module_type=type(module).__name__,
                            tensors={key: dict(shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""))
                                     for key, t in state.items()})
    return tensors, config


def plan_load(model: nn.Module, config: dict, stored: dict, adapter_names: list) -> tuple:
    """``(problems, plan, keys)`` for the ``trainable_modules`` section of an adapter file: every
    mismatch between the file and ``model`` as a message naming the module; the modules and the
    state they get; the file keys this section accounts for. ``stored``: ``{file key: (shape,
    is floating)}`` of the tensors file (from the tensors or from its header). Changes nothing."""
    problems, plan, keys = [], {}, set()
    if not isinstance(config, dict):
        return [f"trainable_modules: expected a mapping of module names, got {type(config).__name__}"], plan, keys
    modules = dict(model.named_modules())
    for name, entry in config.items():
        what = f"trainable module '{name}'"
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            problems.append(f"{what}: expected an entry with \"module_type\" and \"tensors\", got {entry!r}")
            continue
        expected = entry["tensors"]
        keys.update(f"{name}.{k}" for k in expected)
        inside = owner_of(name, adapter_names)
        if inside is not None:
            problems.append(f"{what}: the file also adapts '{inside}'; a module trains in full or gets an adapter, "
                            "not both")
            continue
        module = modules.get(name)
        if module is None:
            problems.append(f"{what}: no such module in {type(model).__name__}"
                            + suggestions.closest_phrase(name, [n for n in modules if n]))
            continue
        if isinstance(module, AdapterLayer):
            problems.append(f"{what}: an adapter layer ({type(module).__name__}) in the model; the file trains it "
                            "in full")
            continue
        if type(module).__name__ != entry.get("module_type"):
            problems.append(f"{what}: a {type(module).__name__} in the model, a {entry.get('module_type')} in the file")
            continue
        state = module.state_dict(keep_vars=True)
        if any(t.device.type == "meta" for t in state.values()):
            problems.append(f"{what}: its state is on the meta device and holds no values; give the model its base "
                            "state first (model.load_state_dict(state, assign=True), or model.to_empty(device=...) "
                            "and load it), then load the adapters")
            continue
        if set(state) != set(expected):
            missing, extra = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
            problems.append(f"{what}: state keys differ: the model has {missing} that the file lacks, the file has "
                            f"{extra} that the model lacks")
            continue
        for key, t in state.items():
            file_key = f"{name}.{key}"
            if file_key not in stored:
                problems.append(f"{what}: tensor {file_key} missing from the file")
                continue
            shape, floating = stored[file_key]
            if list(shape) != list(t.shape):
                problems.append(f"{what}: tensor {file_key} has shape {list(shape)} in the file, expected "
                                f"{list(t.shape)}")
            elif floating != t.is_floating_point():
                problems.append(f"{what}: tensor {file_key} is {'a floating' if floating else 'an integer'} tensor "
                                f"in the file, the model's is {t.dtype}")
        plan[name] = state
    return problems, plan, keys


@torch.no_grad()
def apply_load(model: nn.Module, plan: dict, tensors: dict) -> None:
    """Copies the planned state in (checked by :func:`plan_load`) and marks the modules."""
    for name, state in plan.items():
        for key, t in state.items():
            t.copy_(tensors[f"{name}.{key}"])
    mark(model, list(plan))
