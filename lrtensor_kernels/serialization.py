"""Adapter files: tensors in safetensors, configuration in JSON. No pickle.

``load_adapters`` reads in four steps and changes the model only after the last: the JSON
config (checked field by field), the safetensors header (names, dtypes, shapes and offsets;
no tensor data), the model (every layer the config describes is built on the meta device, from
the model's own weight shape, so nothing is allocated and each tensor shape follows from the
model and the config), and, once all three agree, the tensors themselves. Whatever goes wrong
raises AdapterFileError naming the file; the model and the files are left as they were.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import trainable
from ._version import __version__
from .errors import AdapterConfigError, AdapterError, AdapterFileError, AdapterTypeError, NonFiniteError
from .adapter_layer import DEFAULT_ADAPTER, AdapterLayer
from .layers import LAYERS
from .surgery import (adaptable_type, adapter_layers, build_all, build_stored_all, freeze_all_but_adapters, install,
                      names_by_module)
from . import validation
from .validation import count_nonfinite

TENSORS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 2  # 2 added "trainable_modules"
READABLE_VERSIONS = (1, 2)
MODULE_TYPES = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear}
# bytes per element of every safetensors dtype; the floating ones are loaded (converted to the
# layer's adapter dtype: exact from 16-bit floats, rounded to nearest from float64 into float32)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
LOADED_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


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
    """Write every adapter layer's tensors to ``directory/adapters.safetensors`` (keys
    ``"<layer>.<tensor>"``) and ``directory/adapter_config.json`` (per layer: method, keyword
    arguments, base module type, weight shape and tensor shapes, and the adapter's name unless it is
    "default"; package version), and the whole state of every module trained in full
    (``inject(..., trainable_modules=...)``; keys ``"<module>.<state key>"``, parameters and
    persistent buffers) with its type, shapes and dtypes under ``"trainable_modules"``.

    The adapters written are each layer's active one, or with ``adapter_name`` the adapter of that
    name of every layer holding it (active or not). Refuses (NonFiniteError, nothing written)
    adapter tensors holding inf or NaN. Each file is written to a temporary name and renamed, so a
    reader never sees half a file.
    """
    validation.model(model, "save_adapters")
    tensors, config = {}, {}
    for name, layer, adapter in _saved_adapters(model, adapter_name):
        state = layer.adapter_state_of(adapter)
        for key, t in state.items():
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"save_adapters: {layer._label()}: tensor {key} holds {count_nonfinite(t)} "
                                     f"non-finite values; nothing was written")
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
    extra_tensors, extra_config = trainable.file_entries(model)
    for key, t in extra_tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"save_adapters: trainable module tensor {key} holds {count_nonfinite(t)} "
                                 "non-finite values; nothing was written")
    tensors.update(extra_tensors)
    os.makedirs(directory, exist_ok=True)
    text = json.dumps(dict(format_version=FORMAT_VERSION, package_version=__version__, layers=config,
                           trainable_modules=extra_config), indent=2)
    _write_atomically(os.path.join(directory, TENSORS_FILE),
                      lambda path: save_file(tensors, path, metadata={"format": "lrtensor_kernels"}))
    _write_atomically(os.path.join(directory, CONFIG_FILE), lambda path: _write_text(path, text))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _write_atomically(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# ----------------------------------------------------------------------------------------------
# load, step 1: the config
# ----------------------------------------------------------------------------------------------
def _shown(value) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return f"{kind} ({text[:60]}{'...' if len(text) > 60 else ''})"


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def _read_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise AdapterFileError(f"load_adapters: {path} cannot be read: {err.strerror or err}", path) from err
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


def _read_config(path: str) -> tuple:
    """The ``layers`` and ``trainable_modules`` of the config, every field checked; AdapterFileError
    listing what is wrong."""
    config = _read_json(path, "the config")
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
    if problems:
        raise AdapterFileError(f"load_adapters: {path} is malformed:\n  " + "\n  ".join(problems), path)
    return layers, extras


# ----------------------------------------------------------------------------------------------
# load, step 2: the safetensors header (no tensor data)
# ----------------------------------------------------------------------------------------------
def _read_header(path: str) -> dict:
    """``{name: (dtype, shape)}`` from the header, checked as the safetensors format requires:
    known dtypes, offsets that tile the data section exactly, sizes that match the shapes."""
    def fail(problem):
        return AdapterFileError(f"load_adapters: {path}: {problem}", path)

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise fail(f"not a safetensors file: {size} bytes, fewer than the 8 of the header length")
            length = struct.unpack("<Q", prefix)[0]
            if length > min(size - 8, _MAX_HEADER):
                raise fail(f"the header length field says {length} bytes, but "
                           + (f"the file holds {size - 8} after it (truncated or not safetensors)"
                              if length > size - 8 else f"headers are limited to {_MAX_HEADER}"))
            raw = f.read(length)
    except OSError as err:
        raise AdapterFileError(f"load_adapters: {path} cannot be read: {err.strerror or err}", path) from err
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise fail(f"the header is not valid JSON ({type(err).__name__}: {str(err)[:100]})") from None
    if not isinstance(header, dict):
        raise fail(f"the header must be a JSON object, found {_shown(header)}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail(f"'__metadata__' must map names to strings, found {_shown(metadata)}")
    data_size, spans, found = size - 8 - length, [], {}
    for name, info in header.items():
        fields_ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _ITEMSIZE \
            and _is_shape(info.get("shape")) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(type(o) is int for o in info["data_offsets"])
        if not fields_ok:
            raise fail(f"tensor {name}: expected dtype (one of {list(_ITEMSIZE)}), shape and data_offsets, found "
                       f"{_shown(info)}")
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * _ITEMSIZE[info["dtype"]]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise fail(f"tensor {name}: data_offsets {info['data_offsets']} do not hold its {nbytes} bytes "
                       f"({info['dtype']} {info['shape']}) within the {data_size}-byte data section")
        spans.append((begin, end, name))
        found[name] = (info["dtype"], tuple(info["shape"]))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise fail(f"tensor {name} starts at byte {begin} of the data section, expected {position} "
                       "(tensors must tile the data section without gaps or overlaps)")
        position = end
    if position != data_size:
        raise fail(f"the tensors end at byte {position} of the {data_size}-byte data section")
    return found


# ----------------------------------------------------------------------------------------------
# load, step 3: the plan, built on the meta device
# ----------------------------------------------------------------------------------------------
def _meta_layer(module: nn.Module, entry: dict) -> AdapterLayer:
    """The layer the entry describes around ``module``'s geometry, on the meta device."""
    cls = LAYERS[entry["method"]][MODULE_TYPES[entry["module_type"]]]
    return cls(**cls._base_kwargs(module), device="meta", dtype=module.weight.dtype, **entry["kwargs"])


def _plan_layer(name: str, entry: dict, modules: dict, model: nn.Module, header: dict, adapter: str):
    """``((module, how, {tensor name: file key}), [])``, or ``(None, problems)``; ``how``: "inject" (a
    plain module), "in place" (the adapter layer holds ``adapter``) or "add" (it gets ``adapter``)."""
    module = modules.get(name)
    if module is None:
        return None, [f"layer '{name}': no such module in {type(model).__name__}"]
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
                                            header)
    if problems:
        return None, problems
    return (module, how, {key: tensor_key(name, key) for key in meta.adapter_state()}), []


def _tensor_problems(name: str, entry: dict, shapes: dict, header: dict) -> list:
    """The config's ``tensors`` field and the header against the shapes the layer really has."""
    problems = []
    if {k: list(s) for k, s in shapes.items()} != entry["tensors"]:
        problems.append(f"layer '{name}': field 'tensors' {_shown(entry['tensors'])} in {CONFIG_FILE}, but the "
                        f"layer its kwargs describe has {json.dumps({k: list(s) for k, s in shapes.items()})}")
    for key, shape in shapes.items():
        file_key = tensor_key(name, key)
        if file_key not in header:
            problems.append(f"layer '{name}': tensor {file_key} missing from {TENSORS_FILE}")
        elif header[file_key][1] != shape:
            problems.append(f"layer '{name}': tensor {file_key} has shape {list(header[file_key][1])} in "
                            f"{TENSORS_FILE}, expected {list(shape)}")
        elif header[file_key][0] not in LOADED_DTYPES:
            problems.append(f"layer '{name}': tensor {file_key} has dtype {header[file_key][0]} in {TENSORS_FILE}, "
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


def _plan(model: nn.Module, layers: dict, extras: dict, header: dict, directory: str, adapters: dict) -> tuple:
    modules = dict(model.named_modules(remove_duplicate=False))
    problems, plan, owner = [], {}, {}
    for name, entry in layers.items():
        result, found = _plan_layer(name, entry, modules, model, header, adapters[name])
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
    problems += [f"tensor {k} in {TENSORS_FILE} belongs to no adapter layer or trainable module of {CONFIG_FILE}"
                 for k in header if k not in known | described]
    if problems:
        raise AdapterFileError(f"load_adapters: the adapters in {directory} do not match {type(model).__name__}:\n  "
                               + "\n  ".join(problems), directory)
    return plan, extra_plan


# ----------------------------------------------------------------------------------------------
# load, step 4: the tensors, then the model
# ----------------------------------------------------------------------------------------------
def _read_tensors(path: str, keys: list) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in keys}
    except Exception as err:  # the parser's own error types
        raise AdapterFileError(f"load_adapters: {path} cannot be read: {type(err).__name__}: {err}", path) from err
    bad = [f"tensor {k} holds {count_nonfinite(t)} non-finite values" for k, t in tensors.items()
           if not torch.isfinite(t).all()]
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
    config_path, tensors_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, TENSORS_FILE)
    for path in (config_path, tensors_path):
        if not os.path.isfile(path):
            raise AdapterFileError(f"load_adapters: {path} does not exist", path)
    if adapter_name is not None:
        from .named_adapters import check_adapter_name

        check_adapter_name(adapter_name, "load_adapters")
    layers, extras = _read_config(config_path)
    adapters = {name: adapter_name or entry.get("adapter_name", DEFAULT_ADAPTER) for name, entry in layers.items()}
    plan, extra_plan = _plan(model, layers, extras, _read_header(tensors_path), directory, adapters)
    extra_keys = [f"{name}.{key}" for name, state in extra_plan.items() for key in state]
    tensors = _read_tensors(tensors_path, [key for _, _, keys in plan.values() for key in keys.values()] + extra_keys)
    added = build_stored_all(model, {name: layers[name]["kwargs"] for name, (_, how, _) in plan.items()
                                     if how == "add"})
    by_adapter = {}
    for name, (_, how, _) in plan.items():
        if how == "inject":
            by_adapter.setdefault(adapters[name], {})[name] = (layers[name]["method"], layers[name]["kwargs"])
    built = {}
    for adapter, specs in by_adapter.items():
        built.update(build_all(model, specs, adapter))
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
