"""load_adapters on malformed, corrupt, hostile and root-level adapter files: one error type naming
the file, and the model and the files bit for bit unchanged. Ends with a hypothesis test that
feeds random malformed configs and random corruptions of a saved directory."""
from __future__ import annotations

import copy
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lrtensor_kernels as lk
from lrtensor_kernels.layers import LAYERS
from oracle import randomize_adapter
from test_serialization import (CONFIG, TENSORS_NAME, assert_unchanged, make_net, net_input, snapshot, tensors_file,
                                tensors_name)

pytestmark = pytest.mark.usefixtures("reference_backend")

NAMES = ["pre", "block.conv1", "block.conv2", "seq.0", "head"]


def saved(directory, method="liera", **kwargs):
    """A net with random adapters saved to ``directory``; the plain base state to load into."""
    net = make_net()
    base_state = copy.deepcopy(net.state_dict())
    lk.inject(net, method, **kwargs)
    for i, (_, layer) in enumerate(lk.adapter_layers(net)):
        randomize_adapter(layer, 100 + i, std=0.2)
    lk.save_adapters(net, str(directory))
    return net, base_state


def fresh(base_state):
    net = make_net(seed=99)
    net.load_state_dict(base_state)
    return net


def files_of(directory):
    if not directory.is_dir():
        return directory.read_bytes() if directory.exists() else None
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def load_fails(model, directory, match, path=None):
    """load_adapters raises AdapterFileError naming ``path``; the model and the files are unchanged."""
    snap, files = snapshot(model), files_of(directory)
    with pytest.raises(lk.AdapterFileError, match=match) as info:
        lk.load_adapters(model, str(directory))
    assert isinstance(info.value, ValueError)
    expected = str(directory if path is None else directory / path)
    assert info.value.path == expected and expected in str(info.value)
    assert_unchanged(model, snap)
    assert files_of(directory) == files
    return info.value


def edit_config(directory, change):
    config = json.loads((directory / CONFIG).read_text())
    change(config)
    (directory / CONFIG).write_text(json.dumps(config))


def head(config):
    return config["layers"]["head"]


# ----------------------------------------------------------------------------------------------
# class 3: malformed configs
# ----------------------------------------------------------------------------------------------
RAW_CONFIGS = {
    "empty": (b"", r"the config is not valid JSON \(Expecting value at line 1, column 1\)"),
    "truncated": (None, r"the config is not valid JSON"),
    "not-utf8": (b"\xff\xfe{}", r"the config is not UTF-8 text"),
    "top-level-list": (b"[1, 2]", r"expected a JSON object at the top level, found a list \(\[1, 2\]\)"),
    "top-level-null": (b"null", r"expected a JSON object at the top level, found null"),
    "deep": (b"[" * 100000 + b"]" * 100000, r"nested too deeply|not valid JSON"),
}


@pytest.mark.parametrize("kind", list(RAW_CONFIGS))
def test_unparseable_config(tmp_path, kind):
    _, base_state = saved(tmp_path)
    raw, match = RAW_CONFIGS[kind]
    if raw is None:
        raw = (tmp_path / CONFIG).read_bytes()[:-40]
    (tmp_path / CONFIG).write_bytes(raw)
    load_fails(fresh(base_state), tmp_path, match, CONFIG)


CONFIG_EDITS = {
    "no-format-version": (lambda c: c.pop("format_version"),
                          r"has no field 'format_version', expected one of \(1, 2, 3\)"),
    "format-version-str": (lambda c: c.update(format_version="1"), r"has format_version \"1\", expected one of"),
    "format-version-bool": (lambda c: c.update(format_version=True), r"has format_version true, expected one of"),
    "format-version-float": (lambda c: c.update(format_version=1.0), r"has format_version 1\.0, expected one of"),
    "format-version-4": (lambda c: c.update(format_version=4), r"has format_version 4, expected one of \(1, 2, 3\)"),
    "files-missing": (lambda c: c.pop("files"), r"field 'files': expected an object naming the tensors file"),
    "files-path": (lambda c: c.update(files={"tensors": "../elsewhere.safetensors"}),
                   r"field 'files': expected an object naming the tensors file .*found an object"),
    "no-layers": (lambda c: c.pop("layers"), r"has no field 'layers'; expected an object"),
    "layers-list": (lambda c: c.update(layers=list(c["layers"])), r"has 'layers' a list \(\[\"pre\""),
    "layers-empty": (lambda c: c.update(layers={}), r"has 'layers' an object \(\{\}\)"),
    "entry-str": (lambda c: c["layers"].update(head="x"), r"layer 'head': expected an object, found a string"),
    **{f"no-{field}": ((lambda f: lambda c: head(c).pop(f))(field), rf"layer 'head': missing field '{field}'")
       for field in ("method", "kwargs", "module_type", "weight_shape", "tensors")},
    "method-int": (lambda c: head(c).update(method=5), r"field 'method': expected one of \['flora', 'lora', "
                                                       r"'liera', 'ssl', 'ssb'\], found an integer \(5\)"),
    "method-unknown": (lambda c: head(c).update(method="loha"), r"field 'method': expected one of .*found a string"),
    "kwargs-list": (lambda c: head(c).update(kwargs=[1]), r"field 'kwargs': expected an object of keyword arguments, "
                                                          r"found a list"),
    "module-type": (lambda c: head(c).update(module_type="Conv4d"), r"field 'module_type': expected one of"),
    "weight-shape-1d": (lambda c: head(c).update(weight_shape=[5]), r"field 'weight_shape': expected a list of at "
                                                                    r"least 2 sizes"),
    "weight-shape-negative": (lambda c: head(c).update(weight_shape=[-5, 4]), r"field 'weight_shape'"),
    "weight-shape-float": (lambda c: head(c).update(weight_shape=[5.0, 4]), r"field 'weight_shape'"),
    "weight-shape-bool": (lambda c: head(c).update(weight_shape=[True, 4]), r"field 'weight_shape'"),
    "tensors-list": (lambda c: head(c).update(tensors=[]), r"field 'tensors': expected an object mapping"),
    "tensors-bad-shape": (lambda c: head(c).update(tensors={"lora_A": "3x4"}), r"field 'tensors'"),
}


@pytest.mark.parametrize("kind", list(CONFIG_EDITS))
def test_malformed_config_fields(tmp_path, kind):
    _, base_state = saved(tmp_path)
    change, match = CONFIG_EDITS[kind]
    edit_config(tmp_path, change)
    load_fails(fresh(base_state), tmp_path, match, CONFIG)


def test_every_malformed_entry_is_listed(tmp_path):
    _, base_state = saved(tmp_path)
    edit_config(tmp_path, lambda c: (head(c).pop("method"), c["layers"]["pre"].update(kwargs=None)))
    err = load_fails(fresh(base_state), tmp_path, "is malformed", CONFIG)
    assert "layer 'pre': field 'kwargs'" in str(err) and "layer 'head': missing field 'method'" in str(err)


KWARG_EDITS = {
    "rank-float": ({"rank": 8.0}, r"rank must be an integer >= 1, got 8\.0"),
    "rank-str": ({"rank": "8"}, r"rank must be an integer >= 1, got '8'"),
    "rank-zero": ({"rank": 0}, r"rank must be an integer >= 1, got 0"),
    "alpha-nan": ({"alpha": float("nan")}, r"alpha must be a finite real number, got nan"),
    "alpha-inf": ({"alpha": float("inf")}, r"alpha must be a finite real number, got inf"),
    "dropout": ({"dropout": 2}, r"dropout must be in \[0, 1\), got 2"),
    "mode": ({"mode": "log"}, r"unknown mode 'log'"),
    "unknown-kwarg": ({"rnk": 3}, r"unexpected keyword argument 'rnk'"),
    "base-kwarg": ({"bias": False}, r"multiple values for keyword argument 'bias'"),
    "rank-huge": ({"rank": 10**30}, r"too large to build|rank"),
}


@pytest.mark.parametrize("kind", list(KWARG_EDITS))
def test_bad_kwargs_name_the_layer_and_the_field(tmp_path, kind):
    _, base_state = saved(tmp_path)
    change, match = KWARG_EDITS[kind]
    edit_config(tmp_path, lambda c: head(c)["kwargs"].update(change))
    load_fails(fresh(base_state), tmp_path, rf"layer 'head': field 'kwargs' an object \(.*\): .*{match}")


def test_tensors_field_disagreeing_with_the_kwargs(tmp_path):
    _, base_state = saved(tmp_path)
    edit_config(tmp_path, lambda c: head(c)["tensors"].update(lora_A=[3, 9]))
    load_fails(fresh(base_state), tmp_path, r"layer 'head': field 'tensors' .* in adapter_config\.json, but the layer "
                                            r"its kwargs describe has \{\"lora_A\": \[8, 4\]")


# ----------------------------------------------------------------------------------------------
# class 3: corrupt safetensors files
# ----------------------------------------------------------------------------------------------
def header_of(raw):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header, data):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def edit_header(change):
    def edit(raw):
        header, data = header_of(raw)
        change(header)
        return with_header(header, data)
    return edit


def first_tensor(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


TENSOR_CORRUPTIONS = {
    "empty": (lambda raw: b"", r"not a safetensors file: 0 bytes"),
    "four-bytes": (lambda raw: raw[:4], r"not a safetensors file: 4 bytes"),
    "length-huge": (lambda raw: struct.pack("<Q", 2**63) + raw[8:], r"the header length field says 9223372036854775808 "
                                                                     r"bytes, but the file holds"),
    "truncated-header": (lambda raw: raw[:60], r"the header length field says \d+ bytes, but the file holds 52"),
    "truncated-data": (lambda raw: raw[:-3], r"the tensors end at byte \d+ of the \d+-byte data section|do not hold"),
    "appended": (lambda raw: raw + b"\0" * 8, r"the tensors end at byte \d+ of the \d+-byte data section"),
    "header-not-json": (lambda raw: raw[:8] + b"!" + raw[9:], r"the header is not valid JSON"),
    "header-list": (lambda raw: with_header([1], header_of(raw)[1]), r"the header must be a JSON object, found a list"),
    "metadata": (edit_header(lambda h: h.update(__metadata__={"a": 1})), r"'__metadata__' must map names to strings"),
    "dtype": (edit_header(lambda h: first_tensor(h).update(dtype="F17")), r"expected dtype \(one of"),
    "shape-negative": (edit_header(lambda h: first_tensor(h).update(shape=[-1, 4])), r"expected dtype .*shape"),
    "offsets-past-end": (edit_header(lambda h: first_tensor(h).update(data_offsets=[0, 10**12])),
                         r"data_offsets \[0, 1000000000000\] do not hold its \d+ bytes"),
    "offsets-overlap": (edit_header(lambda h: h[sorted(k for k in h if k != "__metadata__")[1]].update(
        data_offsets=[0, first_tensor(h)["data_offsets"][1] - first_tensor(h)["data_offsets"][0]])),
        r"must tile the data section|do not hold"),
    "offsets-str": (edit_header(lambda h: first_tensor(h).update(data_offsets=["0", "4"])), r"expected dtype"),
}


@pytest.mark.parametrize("kind", list(TENSOR_CORRUPTIONS))
def test_corrupt_tensor_file(tmp_path, kind):
    _, base_state = saved(tmp_path)
    corrupt, match = TENSOR_CORRUPTIONS[kind]
    tensors_file(tmp_path).write_bytes(corrupt(tensors_file(tmp_path).read_bytes()))
    load_fails(fresh(base_state), tmp_path, match, tensors_name(tmp_path))


def rewrite_tensors(directory, change):
    tensors = load_file(str(tensors_file(directory)))
    change(tensors)
    save_file(tensors, str(tensors_file(directory)))


@pytest.mark.parametrize("dtype, name", [(torch.int64, "I64"), (torch.int8, "I8"), (torch.bool, "BOOL"),
                                         (torch.float8_e4m3fn, "F8_E4M3")])
def test_non_floating_tensor_refused(tmp_path, dtype, name):
    _, base_state = saved(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"head.lora_B": t["head.lora_B"].to(dtype)}))
    load_fails(fresh(base_state), tmp_path, rf"tensor head\.lora_B has dtype {name} in {TENSORS_NAME}, "
                                            r"expected a floating dtype \(one of \['F16', 'BF16', 'F32', 'F64'\]\)")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor_refused(tmp_path, value):
    _, base_state = saved(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t["block.conv1.lora_A"].view(-1)[3].fill_(value))
    load_fails(fresh(base_state), tmp_path, r"tensor block\.conv1\.lora_A holds 1 non-finite values",
               tensors_name(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_floating_tensors_of_any_width_are_converted(tmp_path, dtype, model_dtype):
    _, base_state = saved(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    stored = load_file(str(tensors_file(tmp_path)))
    model = fresh(base_state).to(model_dtype)
    lk.load_adapters(model, str(tmp_path))
    for n, layer in lk.adapter_layers(model):
        for k, t in layer.adapter_state().items():
            assert t.dtype == model_dtype and torch.equal(t, stored[f"{n}.{k}"].to(model_dtype))


def test_save_refuses_non_finite_adapters(tmp_path):
    net, _ = saved(tmp_path / "ok")
    with torch.no_grad():
        net.seq[0].lora_B[0, 0] = float("nan")
    with pytest.raises(lk.NonFiniteError, match=r"^save_adapters: LieRAConv1d 'seq\.0': tensor lora_B holds 1 "
                                                r"non-finite values; nothing was written$"):
        lk.save_adapters(net, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_missing_directory_and_files(tmp_path):
    model = make_net()
    load_fails(model, tmp_path / "nowhere", r"nowhere does not exist")
    (tmp_path / "file").write_text("x")
    load_fails(model, tmp_path / "file", r"file is not a directory")
    _, base_state = saved(tmp_path / "d")
    name = tensors_name(tmp_path / "d")
    os.remove(tmp_path / "d" / name)
    load_fails(model, tmp_path / "d", rf"{TENSORS_NAME} \(named by adapter_config\.json\) does not exist", name)
    with pytest.raises(lk.AdapterTypeError, match=r"^load_adapters: directory must be a path, got 3$"):
        lk.load_adapters(model, 3)


# ----------------------------------------------------------------------------------------------
# class 10: a file cannot make the loader allocate beyond what the model and the file hold
# ----------------------------------------------------------------------------------------------
def big_model():
    return nn.Sequential(nn.Linear(512, 512))


@pytest.mark.parametrize("forge_header", [False, True], ids=["config-edited", "config-and-header-edited"])
def test_edited_rank_allocates_nothing(tmp_path, monkeypatch, forge_header):
    model = big_model()
    lk.inject(model, "liera", rank=8)
    lk.save_adapters(model, str(tmp_path))
    rank = 10**12  # 2 TB of lora_A: a loader that built it first would fail in the allocator, not here
    edit_config(tmp_path, lambda c: c["layers"]["0"].update(kwargs={**c["layers"]["0"]["kwargs"], "rank": rank},
                                                             tensors={"lora_A": [rank, 512], "lora_B": [512, rank]}))
    if forge_header:
        raw = tensors_file(tmp_path).read_bytes()
        header, data = header_of(raw)
        header["0.lora_A"]["shape"] = [rank, 512]
        tensors_file(tmp_path).write_bytes(with_header(header, data))
    built = []
    monkeypatch.setattr(lk.surgery, "build_adapter", lambda *a, **k: built.append(a))
    match = (r"tensor 0\.lora_A: data_offsets .* do not hold its 2048000000000000 bytes" if forge_header else
             rf"layer '0': tensor 0\.lora_A has shape \[8, 512\] in {TENSORS_NAME}, expected \[{rank}, 512\]")
    load_fails(big_model(), tmp_path, match, tensors_name(tmp_path) if forge_header else None)
    assert built == []


def test_sizes_come_from_the_model_not_the_file(tmp_path):
    """weight_shape and the tensor shapes in the file describe a bigger layer than the model's: refused."""
    model = big_model()
    lk.inject(model, "flora", ranks=4)
    lk.save_adapters(model, str(tmp_path))
    edit_config(tmp_path, lambda c: c["layers"]["0"].update(weight_shape=[10**9, 512]))
    load_fails(big_model(), tmp_path, r"layer '0': weight shape \[512, 512\] in the model, \[1000000000, 512\] in "
                                      r"adapter_config\.json")


# ----------------------------------------------------------------------------------------------
# class 4: root-level adapters; class 11: the message names what differs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, kwargs", [("flora", {}), ("liera", dict(delta="tucker", rank=2)), ("ssb", {})])
@pytest.mark.parametrize("base, args, shape", [(nn.Linear, (4, 3), (2, 4)), (nn.Conv2d, (3, 4, 3), (2, 3, 5, 5))],
                         ids=["linear", "conv2d"])
def test_root_level_adapter(tmp_path, method, kwargs, base, args, shape):
    cls = LAYERS[method][base]
    torch.manual_seed(0)
    layer = cls(*args, **kwargs)
    randomize_adapter(layer, 1)
    lk.save_adapters(layer, str(tmp_path))
    config = json.loads((tmp_path / CONFIG).read_text())
    assert list(config["layers"]) == [""]
    with safe_open(str(tensors_file(tmp_path)), framework="pt") as f:
        assert set(f.keys()) == set(layer.adapter_state())  # "core", not ".core"
    torch.manual_seed(0)
    target = cls(*args, **kwargs)  # same base weight, fresh adapter
    assert lk.load_adapters(target, str(tmp_path)) == [""]
    x = torch.randn(shape)
    assert torch.equal(target(x), layer(x))
    torch.manual_seed(0)
    plain = base(*args)
    load_fails(plain, tmp_path, rf"layer '': the file holds a root-level adapter, and the model itself is a "
                                rf"{base.__name__}, which load_adapters cannot replace: load into "
                                rf"lk\.{cls.__name__}\.from_module\(model, \*\*kwargs\) instead")
    assert dict(plain.named_children()) == {}
    wrapped = cls.from_module(plain, **kwargs)
    lk.load_adapters(wrapped, str(tmp_path))
    assert torch.equal(wrapped(x), layer(x))


def test_load_into_model_injected_with_another_config_names_the_difference(tmp_path):
    _, base_state = saved(tmp_path, rank=3, alpha=5.0)
    model = fresh(base_state)
    lk.inject(model, "liera", rank=2, alpha=5.0, mode="first_order")
    err = load_fails(model, tmp_path, r"layer 'pre': the model's LieRAConv3d has mode='first_order', rank=2; "
                                      r"adapter_config\.json has mode='exp', rank=3 \(load into a model without "
                                      r"adapters on this layer, or inject with the file's configuration\)")
    assert all(f"layer '{n}'" in str(err) for n in NAMES)


def test_two_entries_for_one_shared_module(tmp_path):
    model = nn.Module()
    model.a = nn.Linear(3, 3)
    model.b = model.a
    other = nn.Module()
    other.a, other.b = nn.Linear(3, 3), nn.Linear(3, 3)
    lk.inject(other, "ssl")
    lk.save_adapters(other, str(tmp_path))
    load_fails(model, tmp_path, r"layer 'b': the same module as layer 'a' \(registered under both names\)")


# ----------------------------------------------------------------------------------------------
# random malformed configs and random corruptions of a saved directory
# ----------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


@st.composite
def json_edit(draw, tree):
    """``tree`` with one random edit at the end of a random walk from the root (so every depth of
    the config is reached as often): a value replaced, a key deleted or renamed, an entry added."""
    tree = copy.deepcopy(tree)
    parent, key, node = None, None, tree
    while isinstance(node, (dict, list)) and node and (parent is None or draw(st.integers(0, 3)) > 0):
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        parent, node = node, node[key]
    if parent is None:
        return draw(json_values)
    action = draw(st.sampled_from(["replace", "delete", "rename", "add"]))
    if action == "replace" or isinstance(parent, list) and action == "rename":
        parent[key] = draw(json_values)
    elif action == "delete":
        del parent[key]
    elif action == "rename":
        parent[draw(st.text(max_size=6))] = parent.pop(key)
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return tree


@st.composite
def edited_config(draw, files):
    """The saved files with one to three random edits of the config's JSON."""
    config = json.loads(files[CONFIG])
    for _ in range(draw(st.integers(1, 3))):
        config = draw(json_edit(config))
    return {**files, CONFIG: json.dumps(config).encode()}


@st.composite
def corrupted(draw, files):
    """The saved files with one or two random corruptions of their bytes or of the tensors' header."""
    files = dict(files)
    for _ in range(draw(st.integers(1, 2))):
        tensors = next(name for name in files if name != CONFIG)
        name = draw(st.sampled_from([CONFIG, tensors]))
        raw = files[name]
        kind = draw(st.sampled_from(["header", "truncate", "flip", "splice", "length", "append"]))
        if kind == "header" and name == tensors and len(raw) >= 8 and 8 + struct.unpack("<Q", raw[:8])[0] <= len(raw):
            try:
                header, data = header_of(raw)
            except ValueError:
                continue
            raw = with_header(draw(json_edit(header)), data)
        elif kind == "truncate":
            raw = raw[:draw(st.integers(0, max(len(raw) - 1, 0)))]
        elif kind == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        elif kind == "splice":
            i = draw(st.integers(0, len(raw)))
            raw = raw[:i] + draw(st.binary(max_size=12)) + raw[i + draw(st.integers(0, 12)):]
        elif kind == "length" and name == tensors:
            raw = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
        else:
            raw = raw + draw(st.binary(min_size=1, max_size=16))
        files[name] = raw
    return files


@pytest.fixture(scope="module")
def saved_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    _, base_state = saved(directory, "flora", ranks=2)
    return files_of(directory), base_state


def loaded_matches_files(model, files, directory):
    """A load that succeeded put exactly the file's tensors and configuration into the model."""
    config = json.loads(files[CONFIG])
    with safe_open(str(directory / config["files"]["tensors"]), framework="pt") as f:
        for name, entry in config["layers"].items():
            layer = model.get_submodule(name)
            assert layer.adapter_method == entry["method"] and not layer.merged
            for key, t in layer.adapter_state().items():
                assert torch.equal(t, f.get_tensor(f"{name}.{key}").to(t.dtype)), (name, key)


RANDOM = settings(max_examples=100, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def load_gives_clear_error_or_exact_result(files, base_state, directory, target):
    """Either AdapterFileError naming one of the files with the model unchanged, or a load that put
    exactly what the files hold into the model; the files unchanged either way."""
    for name, raw in files.items():
        (directory / name).write_bytes(raw)
    model = fresh(base_state)
    if target != "plain":
        lk.inject(model, "flora", ranks=2)
        if target == "merged":
            lk.merge(model)
    snap = snapshot(model)
    try:
        lk.load_adapters(model, str(directory))
    except lk.AdapterFileError as err:
        event("refused: " + ("the model" if err.path == str(directory) else os.path.basename(err.path)))
        # the directory, one of its files, or a file the (edited) config names there and that is
        # missing (a config edited to format 1 names the format-1 tensors file)
        assert err.path == str(directory) or os.path.dirname(err.path) == str(directory), err.path
        assert err.path in str(err)
        assert_unchanged(model, snap)
    else:
        event("loaded")
        loaded_matches_files(model, files, directory)
        model(net_input())
    assert files_of(directory) == files


TARGETS = st.sampled_from(["plain", "injected", "merged"])


@pytest.mark.parametrize("damage", [edited_config, corrupted], ids=["config-edits", "file-corruptions"])
@RANDOM
@given(data=st.data(), target=TARGETS)
def test_random_damage_gives_a_clear_error_and_changes_nothing(saved_directory, tmp_path_factory, damage, data,
                                                               target):
    files, base_state = saved_directory
    load_gives_clear_error_or_exact_result(data.draw(damage(files)), base_state, tmp_path_factory.mktemp("damaged"),
                                           target)
