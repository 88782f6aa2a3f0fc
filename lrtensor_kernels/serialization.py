"""Adapter files: tensors in safetensors, configuration in JSON. No pickle.

``save_adapters`` replaces the directory's pair of files all or nothing, and saves into one
directory wait for each other (:mod:`lrtensor_kernels.adapter_files`: the config, written last,
names the tensors file it goes with).

``load_adapters`` reads in four steps and changes the model only after the last: the JSON
config (checked field by field), the safetensors header (names, dtypes, shapes and offsets;
no tensor data), the model (every layer the config describes is built on the meta device, from
the model's own weight shape, so nothing is allocated and each tensor shape follows from the
model and the config), and, once all three agree, the tensors themselves, from the file opened
in the second step. Whatever goes wrong raises AdapterFileError naming the file; the model and
the files are left as they were.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import adapter_files, suggestions, trainable
from ._version import __version__
from .adapter_files import CONFIG_FILE, LEGACY_TENSORS_FILE, is_shape as _is_shape, shown as _shown
from .errors import AdapterConfigError, AdapterError, AdapterFileError, AdapterTypeError, NonFiniteError
from .adapter_layer import DEFAULT_ADAPTER, AdapterLayer, oversized_adapters_collected
from .layers import LAYERS
from .surgery import (adaptable_type, adapter_layers, build_all, build_stored_all, freeze_all_but_adapters, install,
                      names_by_module)
from . import validation
from .validation import count_nonfinite

FORMAT_VERSION = 3  # 2 added "trainable_modules"; 3 "files" (the tensors file by its content's hash)
READABLE_VERSIONS = (1, 2, 3)
MODULE_TYPES = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear}
# the floating dtypes that are loaded (converted to the layer's adapter dtype: exact from 16-bit
# floats, rounded to nearest from float64 into float32)
LOADED_DTYPES = ("F16", "BF16", "F32", "F64")


def tensor_key(layer_name: str, key: str) -> str:
    """``"<layer>.<tensor>"``; a root-level layer (the model is the adapter layer) has bare tensor names."""
    return f"{layer_name}.{key}" if layer_name else key


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------
def _saved_adapters(model: nn.Module, adapter_name) -> list:
    """``(layer name, layer, adapter name)`` of what ``save_adapters`` writes: every layer's active
    adapter, or every layer's adapter ``adapter_name``."""
    layers = adapter_layers(model)
    if not layers:
        raise AdapterConfigError(f"save_adapters: {type(model).__name__} has no adapter layer; call inject first")
    if adapter_name is None:
        saved = [(n, layer, layer.active_adapter) for n, layer in layers if layer.active_adapter is not None]
        if not saved:
            raise AdapterConfigError(f"save_adapters: no adapter layer of {type(model).__name__} has an active "
                                     "adapter; give adapter_name, or lk.set_adapter first")
        return saved
    from .named_adapters import _holding

    return [(n, layer, adapter_name) for n, layer in _holding(model, adapter_name, "save_adapters")]


def save_adapters(model: nn.Module, directory: str, adapter_name: str = None) -> None:
    """Write every adapter layer's tensors (keys ``"<layer>.<tensor>"``) to a safetensors file and
    ``directory/adapter_config.json`` (per layer: method, keyword arguments, base module type,
    weight shape and tensor shapes, and the adapter's name unless it is "default"; package version;
    the tensors file's name, ``adapters-<hash>.safetensors``), and the whole state of every module
    trained in full (``inject(..., trainable_modules=...)``; keys ``"<module>.<state key>"``,
    parameters and persistent buffers) with its type, shapes and dtypes under ``"trainable_modules"``.

    The adapters written are each layer's active one, or with ``adapter_name`` the adapter of that
    name of every layer holding it (active or not). Refuses (NonFiniteError, nothing written)
    adapter tensors holding inf or NaN, and (AdapterConfigError) tensors on the meta device, which
    hold no values. All or nothing: the directory holds the old pair of files or the new one, never
    a mix, also when the call fails or is interrupted, and concurrent saves into one directory
    (threads or processes) run one after the other (:mod:`lrtensor_kernels.adapter_files`). Files
    get the permissions the umask gives any new file.
    """
    validation.model(model, "save_adapters")
    tensors, config = {}, {}
    for name, layer, adapter in _saved_adapters(model, adapter_name):
        state = layer.adapter_state_of(adapter)
        for key, t in state.items():
            _check_savable(f"{layer._label()}: tensor {key}", t)
            tensors[tensor_key(name, key)] = t.detach().contiguous().cpu()
        config[name] = dict(
            method=layer.adapter_method,
            kwargs=layer.adapter_config_of(adapter),
            module_type=layer._nn_base().__name__,
            weight_shape=list(layer.weight.shape),
            tensors={key: list(t.shape) for key, t in state.items()},
        )
        if adapter != DEFAULT_ADAPTER:
            config[name]["adapter_name"] = adapter
    for name, module in trainable.marked_modules(model):
        for key, t in module.state_dict().items():
            _check_savable(f"trainable module tensor {name}.{key}", t)
    extra_tensors, extra_config = trainable.file_entries(model)
    tensors.update(extra_tensors)
    adapter_files.write_pair(os.fspath(directory), tensors, {"format": "lrtensor_kernels"},
                             dict(format_version=FORMAT_VERSION, package_version=__version__, layers=config,
                                  trainable_modules=extra_config))


def _check_savable(what: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise AdapterConfigError(f"save_adapters: {what} is on the meta device and holds no values; materialise "
                                 "the model first (to_empty, then load or initialise its state); nothing was written")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise NonFiniteError(f"save_adapters: {what} holds {count_nonfinite(t)} non-finite values; nothing was "
                             "written")


# ----------------------------------------------------------------------------------------------
# load, step 1: the config
# ----------------------------------------------------------------------------------------------
def _parse_json(raw: bytes, path: str, what: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"load_adapters: {path}: {what} is not UTF-8 text ({err.reason} at byte "
                               f"{err.start})", path) from None
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"load_adapters: {path}: {what} is not valid JSON ({err.msg} at line {err.lineno}, "
                               f"column {err.colno})", path) from None
    except RecursionError:
        raise AdapterFileError(f"load_adapters: {path}: {what} is nested too deeply to be a config", path) from None


def _entry_problems(name: str, entry) -> list:
    if not isinstance(entry, dict):
        return [f"layer '{name}': expected an object, found {_shown(entry)}"]
    problems = []
    fields = {
        "method": (lambda v: isinstance(v, str) and v in LAYERS, f"one of {list(LAYERS)}"),
        "kwargs": (lambda v: isinstance(v, dict), "an object of keyword arguments"),
        "module_type": (lambda v: isinstance(v, str) and v in MODULE_TYPES, f"one of {list(MODULE_TYPES)}"),
        "weight_shape": (lambda v: _is_shape(v) and len(v) >= 2, "a list of at least 2 sizes (integers >= 0)"),
        "tensors": (lambda v: isinstance(v, dict) and v and all(_is_shape(s) for s in v.values()),
                    "an object mapping tensor names to shapes (lists of integers >= 0)"),
    }
    for field, (valid, expected) in fields.items():
        if field not in entry:
            problems.append(f"layer '{name}': missing field '{field}' (expected {expected})")
        elif not valid(entry[field]):
            problems.append(f"layer '{name}': field '{field}': expected {expected}, found {_shown(entry[field])}")
    if "adapter_name" in entry and not _is_adapter_name(entry["adapter_name"]):
        problems.append(f"layer '{name}': field 'adapter_name': expected a non-empty string without dots, found "
                        f"{_shown(entry['adapter_name'])}")
    return problems


def _is_adapter_name(value) -> bool:
    from .named_adapters import check_adapter_name

    try:
        check_adapter_name(value, "")
    except AdapterConfigError:
        return False
    return True


def _read_config(raw: bytes, path: str) -> tuple:
    """``((layers, trainable_modules), tensors file name)`` of the config, every field checked;
    AdapterFileError listing what is wrong."""
    config = _parse_json(raw, path, "the config")
    if not isinstance(config, dict):
        raise AdapterFileError(f"load_adapters: {path}: expected a JSON object at the top level, found "
                               f"{_shown(config)}", path)
    version = config.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        found = "no field 'format_version'" if "format_version" not in config else \
            f"format_version {json.dumps(version)[:60]}"
        raise AdapterFileError(f"load_adapters: {path} has {found}, expected one of {READABLE_VERSIONS}", path)
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        found = "no field 'layers'" if "layers" not in config else f"'layers' {_shown(layers)}"
        raise AdapterFileError(f"load_adapters: {path} has {found}; expected an object with one entry per adapter "
                               "layer", path)
    problems = [p for name, entry in layers.items() for p in _entry_problems(name, entry)]
    extras = config.get("trainable_modules", {})
    if not isinstance(extras, dict):
        problems.append(f"field 'trainable_modules': expected an object, found {_shown(extras)}")
    tensors_name = LEGACY_TENSORS_FILE
    if version >= 3:
        files = config.get("files")
        tensors_name = files.get("tensors") if isinstance(files, dict) else None
        if not adapter_files.is_tensors_file_name(tensors_name):
            problems.append("field 'files': expected an object naming the tensors file (\"tensors\": a file name in "
                            f"the directory, ending in .safetensors), found {_shown(files)}")
    if problems:
        raise AdapterFileError(f"load_adapters: {path} is malformed:\n  " + "\n  ".join(problems), path)
    return (layers, extras), tensors_name


# ----------------------------------------------------------------------------------------------
# load, step 3: the plan, built on the meta device
# ----------------------------------------------------------------------------------------------
def _meta_layer(module: nn.Module, entry: dict) -> AdapterLayer:
    """The layer the entry describes around ``module``'s geometry, on the meta device."""
    cls = LAYERS[entry["method"]][MODULE_TYPES[entry["module_type"]]]
    with oversized_adapters_collected():  # the sizes a file was trained at are not news
        return cls(**cls._base_kwargs(module), device="meta", dtype=module.weight.dtype, **entry["kwargs"])


def _plan_layer(name: str, entry: dict, modules: dict, model: nn.Module, header: dict, adapter: str,
                tensors_name: str, trained: list):
    """``((module, how, {tensor name: file key}), [])``, or ``(None, problems)``; ``how``: "inject" (a
    plain module), "in place" (the adapter layer holds ``adapter``) or "add" (it gets ``adapter``).
    ``trained``: the names of the model's modules trained in full."""
    module = modules.get(name)
    if module is None:
        return None, [f"layer '{name}': no such module in {type(model).__name__}"
                      + suggestions.closest_phrase(name, [n for n in modules if n])]
    owner = trainable.owner_of(name, trained)
    if owner is not None:
        return None, [f"layer '{name}': trains in full in the model (trainable_modules: '{owner}'); it cannot "
                      "also get an adapter"]
    if any(t.device.type == "meta" for t in module.parameters(recurse=False)):
        return None, [f"layer '{name}': its weight is on the meta device and holds no values; give the model its "
                      "base weights first (model.load_state_dict(state, assign=True), or model.to_empty(device=...) "
                      "and load them), then load the adapters"]
    adapter_layer, base_type = isinstance(module, AdapterLayer), MODULE_TYPES[entry["module_type"]]
    held = module._nn_base() if adapter_layer else adaptable_type(module)
    if held is not base_type:
        return None, [f"layer '{name}': a {type(module).__name__} in the model, an adapted {entry['module_type']} "
                      f"({entry['method']}) in {CONFIG_FILE}"]
    if list(module.weight.shape) != entry["weight_shape"]:
        return None, [f"layer '{name}': weight shape {list(module.weight.shape)} in the model, "
                      f"{entry['weight_shape']} in {CONFIG_FILE}"]
    if not name and not adapter_layer:
        cls = LAYERS[entry["method"]][base_type].__name__
        return None, [f"layer '': the file holds a root-level adapter, and the model itself is a "
                      f"{type(module).__name__}, which load_adapters cannot replace: load into "
                      f"lk.{cls}.from_module(model, **kwargs) instead"]
    try:
        meta = _meta_layer(module, entry)
    except (AdapterError, TypeError) as err:
        return None, [f"layer '{name}': field 'kwargs' {_shown(entry['kwargs'])}: {err}"]
    except (RuntimeError, OverflowError) as err:  # sizes too large even to describe
        return None, [f"layer '{name}': field 'kwargs' {_shown(entry['kwargs'])} describes tensors too large to "
                      f"build: {str(err)[:120]}"]
    how = "inject" if not adapter_layer else "in place" if adapter in module.held_adapters() else "add"
    problems = _in_place_problems(name, module, meta, adapter, how) if adapter_layer else []
    problems = problems or _tensor_problems(name, entry, {k: tuple(t.shape) for k, t in meta.adapter_state().items()},
                                            header, tensors_name)
    if problems:
        return None, problems
    return (module, how, {key: tensor_key(name, key) for key in meta.adapter_state()}), []


def _tensor_problems(name: str, entry: dict, shapes: dict, header: dict, tensors_name: str) -> list:
    """The config's ``tensors`` field and the header against the shapes the layer really has."""
    problems = []
    if {k: list(s) for k, s in shapes.items()} != entry["tensors"]:
        problems.append(f"layer '{name}': field 'tensors' {_shown(entry['tensors'])} in {CONFIG_FILE}, but the "
                        f"layer its kwargs describe has {json.dumps({k: list(s) for k, s in shapes.items()})}")
    for key, shape in shapes.items():
        file_key = tensor_key(name, key)
        if file_key not in header:
            problems.append(f"layer '{name}': tensor {file_key} missing from {tensors_name}")
        elif header[file_key][1] != shape:
            problems.append(f"layer '{name}': tensor {file_key} has shape {list(header[file_key][1])} in "
                            f"{tensors_name}, expected {list(shape)}")
        elif header[file_key][0] not in LOADED_DTYPES:
            problems.append(f"layer '{name}': tensor {file_key} has dtype {header[file_key][0]} in {tensors_name}, "
                            f"expected a floating dtype (one of {list(LOADED_DTYPES)})")
    return problems


def _in_place_problems(name: str, module: AdapterLayer, meta: AdapterLayer, adapter: str, how: str) -> list:
    if module.adapter_method != meta.adapter_method:
        return [f"layer '{name}': a {type(module).__name__} in the model, an adapted {meta._nn_base().__name__} "
                f"({meta.adapter_method}) in {CONFIG_FILE} (a layer holds adapters of one method)"]
    if how == "add":
        return []
    ours, theirs = module.adapter_config_of(adapter), meta.adapter_config()
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        return [f"layer '{name}': the model's {type(module).__name__} has "
                + ", ".join(f"{k}={ours.get(k)!r}" for k in differ) + f"; {CONFIG_FILE} has "
                + ", ".join(f"{k}={theirs.get(k)!r}" for k in differ)
                + ("" if adapter == DEFAULT_ADAPTER else f" for adapter {adapter!r}")
                + " (load into a model without adapters on this layer, or inject with the file's configuration)"]
    if module.merged:
        return [f"layer '{name}': merged; unmerge before loading adapters"]
    return []


def _plan(model: nn.Module, layers: dict, extras: dict, header: dict, directory: str, adapters: dict,
          tensors_name: str) -> tuple:
    modules = dict(model.named_modules(remove_duplicate=False))
    problems, plan, owner = [], {}, {}
    trained = [n for n, _ in trainable.marked_modules(model)]
    for name, entry in layers.items():
        result, found = _plan_layer(name, entry, modules, model, header, adapters[name], tensors_name, trained)
        if found:
            problems += found
            continue
        module = result[0]
        if id(module) in owner:
            problems.append(f"layer '{name}': the same module as layer '{owner[id(module)]}' (registered under both "
                            f"names); {CONFIG_FILE} may describe it once")
            continue
        owner[id(module)] = name
        plan[name] = result
    stored = {k: (shape, dtype in LOADED_DTYPES) for k, (dtype, shape) in header.items()}
    extra_problems, extra_plan, extra_keys = trainable.plan_load(model, extras, stored, list(layers))
    problems += extra_problems
    known = {key for _, _, keys in plan.values() for key in keys.values()} | extra_keys
    described = {tensor_key(n, k) for n, e in layers.items() for k in e["tensors"]}
    problems += [f"tensor {k} in {tensors_name} belongs to no adapter layer or trainable module of {CONFIG_FILE}"
                 for k in header if k not in known | described]
    if problems:
        raise AdapterFileError(f"load_adapters: the adapters in {directory} do not match {type(model).__name__}:\n  "
                               + "\n  ".join(problems), directory)
    return plan, extra_plan


# ----------------------------------------------------------------------------------------------
# load, step 4: the tensors, then the model
# ----------------------------------------------------------------------------------------------
def _read_tensors(handle, path: str, header: adapter_files.Header, keys: list) -> dict:
    tensors = adapter_files.read_tensors(handle, path, header, keys)
    bad = [f"tensor {k} holds {count_nonfinite(t)} non-finite values" for k, t in tensors.items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"load_adapters: {path}: " + "; ".join(bad), path)
    return tensors


def load_adapters(model: nn.Module, directory: str, adapter_name: str = None) -> list:
    """Load adapters saved by :func:`save_adapters` into ``model``, injecting layers where needed.

    Each layer's adapter is loaded under ``adapter_name``, or the name the file gives it
    ("default" when it gives none): into a plain module, as the adapter layer's only (active)
    adapter; into an adapter layer holding that name, in place (same configuration); into an
    adapter layer of the same method without it, as a new inactive adapter (``lk.set_adapter``).
    Every layer name, module type, weight shape, method, configuration, tensor name, shape and
    dtype is checked before anything is allocated or changed; any mismatch raises one
    AdapterFileError listing all of them; so is the state of every module trained in full
    (``trainable_modules``), which is then loaded and stays trainable. A module registered under
    several names gets its layer under all of them. The tensors may be stored in any floating
    dtype; they are converted to the layer's adapter dtype. Returns the adapter layer names.
    """
    validation.model(model, "load_adapters")
    try:
        directory = os.fspath(directory)
    except TypeError:
        raise AdapterTypeError(f"load_adapters: directory must be a path, got {directory!r}") from None
    if not os.path.isdir(directory):
        raise AdapterFileError(f"load_adapters: {directory} " + ("is not a directory" if os.path.exists(directory)
                                                                 else "does not exist"), directory)
    if adapter_name is not None:
        from .named_adapters import check_adapter_name

        check_adapter_name(adapter_name, "load_adapters")
    (layers, extras), tensors_path, handle = adapter_files.open_pair(directory, _read_config)
    with handle:
        header = adapter_files.read_header(handle, tensors_path)
        adapters = {name: adapter_name or entry.get("adapter_name", DEFAULT_ADAPTER) for name, entry in layers.items()}
        plan, extra_plan = _plan(model, layers, extras, header.tensors, directory, adapters,
                                 os.path.basename(tensors_path))
        extra_keys = [f"{name}.{key}" for name, state in extra_plan.items() for key in state]
        tensors = _read_tensors(handle, tensors_path, header,
                                [key for _, _, keys in plan.values() for key in keys.values()] + extra_keys)
    with oversized_adapters_collected():  # the sizes a file was trained at are not news
        added = build_stored_all(model, {name: layers[name]["kwargs"] for name, (_, how, _) in plan.items()
                                         if how == "add"})
    by_adapter = {}
    for name, (_, how, _) in plan.items():
        if how == "inject":
            by_adapter.setdefault(adapters[name], {})[name] = (layers[name]["method"], layers[name]["kwargs"])
    built = {}
    for adapter, specs in by_adapter.items():
        built.update(build_all(model, specs, adapter, warn_oversized=False))
    with torch.no_grad():
        for name, (module, how, keys) in plan.items():
            state = (built[name].adapter_state() if how == "inject" else dict(added[name].named_parameters())
                     if how == "add" else module.adapter_state_of(adapters[name]))
            for key, t in state.items():
                t.copy_(tensors[keys[key]])
    aliases = names_by_module(model)
    for name, (module, how, _) in plan.items():
        if how == "inject":
            install(model, module, built[name], aliases)
        elif how == "add":
            module._add_stored(adapters[name], added[name])
    trainable.apply_load(model, extra_plan, tensors)
    freeze_all_but_adapters(model)
    return list(plan)
