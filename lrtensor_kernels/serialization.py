"""Adapter files: tensors in safetensors, configuration in JSON. No pickle."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import trainable
from ._version import __version__
from .layers import AdapterLayer
from .surgery import replace_module, adapter_layers, adaptable_type, build_adapter, freeze_all_but_adapters

TENSORS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 2  # 2 added "trainable_modules"
READABLE_VERSIONS = (1, 2)


def save_adapters(model: nn.Module, directory: str) -> None:
    """Write every adapter layer's tensors to ``directory/adapters.safetensors`` (keys
    ``"<layer>.<tensor>"``) and ``directory/adapter_config.json`` (per layer: method, keyword
    arguments, base module type, weight shape and tensor shapes; package version), and the whole
    state of every module trained in full (``inject(..., trainable_modules=...)``; keys
    ``"<module>.<state key>"``, parameters and persistent buffers) with its type and shapes under
    ``"trainable_modules"``."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"save_adapters: {type(model).__name__} has no adapter layer; call inject first")
    tensors, config = {}, {}
    for name, layer in layers:
        state = layer.adapter_state()
        for key, t in state.items():
            tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        config[name] = dict(
            method=layer.adapter_method,
            kwargs=layer.adapter_config(),
            module_type=layer._nn_base().__name__,
            weight_shape=list(layer.weight.shape),
            tensors={key: list(t.shape) for key, t in state.items()},
        )
    extra_tensors, extra_config = trainable.file_entries(model)
    tensors.update(extra_tensors)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, TENSORS_FILE), metadata={"format": "lrtensor_kernels"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dict(format_version=FORMAT_VERSION, package_version=__version__, layers=config,
                       trainable_modules=extra_config), f, indent=2)


def _read(directory: str):
    config_path = os.path.join(directory, CONFIG_FILE)
    tensors_path = os.path.join(directory, TENSORS_FILE)
    for path in (config_path, tensors_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_adapters: {path} does not exist")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"load_adapters: {config_path} has format_version {config.get('format_version')!r}, "
                         f"expected one of {READABLE_VERSIONS}")
    return config["layers"], load_file(tensors_path), config.get("trainable_modules", {})


def load_adapters(model: nn.Module, directory: str) -> list:
    """Load adapters saved by :func:`save_adapters` into ``model``, injecting layers where needed.

    Every layer name, module type, weight shape, method and tensor shape, and the same of every
    module trained in full, is checked before the model changes; any mismatch raises a ValueError
    listing all of them. Modules trained in full get their saved state and stay trainable.
    Returns the adapter layer names.
    """
    layers, tensors, extras = _read(directory)
    modules = dict(model.named_modules())
    problems, plan = [], {}
    for name, entry in layers.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"layer '{name}': no such module in {type(model).__name__}")
            continue
        type_mismatch = (f"layer '{name}': a {type(module).__name__} in the model, an adapted "
                         f"{entry['module_type']} ({entry['method']}) in the file")
        if adaptable_type(module) is None and not isinstance(module, AdapterLayer):
            problems.append(type_mismatch)
            continue
        if list(module.weight.shape) != entry["weight_shape"]:
            problems.append(f"layer '{name}': weight shape {list(module.weight.shape)} in the model, "
                            f"{entry['weight_shape']} in the file")
            continue
        try:
            if getattr(module, "adapter_method", None) == entry["method"] and \
                    module.adapter_config() == entry["kwargs"]:
                if module.merged:
                    problems.append(f"layer '{name}': merged; unmerge before loading adapters")
                    continue
                layer, replace = module, False
            elif adaptable_type(module) is not None and adaptable_type(module).__name__ == entry["module_type"]:
                layer, replace = build_adapter(module, entry["method"], name, **entry["kwargs"]), True
            else:
                problems.append(type_mismatch)
                continue
        except (TypeError, ValueError) as err:
            problems.append(f"layer '{name}': {err}")
            continue
        state = layer.adapter_state()
        expected = {f"{name}.{k}": list(t.shape) for k, t in state.items()}
        for key, shape in expected.items():
            if key not in tensors:
                problems.append(f"layer '{name}': tensor {key} missing from the file")
            elif list(tensors[key].shape) != shape:
                problems.append(f"layer '{name}': tensor {key} has shape {list(tensors[key].shape)} in the file, "
                                f"expected {shape}")
        plan[name] = (layer, replace)
    known = {f"{n}.{k}" for n, (layer, _) in plan.items() for k in layer.adapter_state()}
    stored = {k: (tuple(t.shape), t.is_floating_point()) for k, t in tensors.items()}
    extra_problems, extra_plan, extra_keys = trainable.plan_load(model, extras, stored, list(layers))
    problems += extra_problems
    known |= extra_keys
    problems += [f"tensor {k} in the file belongs to no adapter layer or trainable module"
                 for k in tensors if k not in known]
    if problems:
        raise ValueError("load_adapters: the file does not match the model:\n  " + "\n  ".join(problems))
    for name, (layer, replace) in plan.items():
        with torch.no_grad():
            for key, t in layer.adapter_state().items():
                t.copy_(tensors[f"{name}.{key}"])
        if replace:
            replace_module(model, name, layer)
    trainable.apply_load(model, extra_plan, tensors)
    freeze_all_but_adapters(model)
    return list(plan)
