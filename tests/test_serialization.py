"""save_adapters / load_adapters: safetensors + JSON round trips and validation before any change."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lrtensor_kernels as lk
from oracle import F64, randomize_adapter, rel_err

CONFIG = "adapter_config.json"
TENSORS_NAME = r"adapters-[0-9a-f]{16}\.safetensors"  # the tensors file, named by its content


def tensors_name(directory) -> str:
    """The name of the tensors file the config in ``directory`` names."""
    return json.loads((Path(directory) / CONFIG).read_text())["files"]["tensors"]


def tensors_file(directory) -> Path:
    return Path(directory) / tensors_name(directory)


pytestmark = pytest.mark.usefixtures("reference_backend")


class Block(nn.Module):
    def __init__(self, mid=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, mid, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, 4, 3, padding=1, groups=2, padding_mode="circular")

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class Net(nn.Module):
    def __init__(self, head_out=5, mid=4):
        super().__init__()
        self.pre = nn.Conv3d(1, 3, (2, 1, 1))
        self.block = Block(mid)
        self.seq = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())
        self.head = nn.Linear(4, head_out)

    def forward(self, x):  # (N, 1, 2, 5, 5)
        h = self.block(self.pre(x).squeeze(2))
        return self.head(self.seq(h.flatten(2)).mean(-1))


NAMES = ["pre", "block.conv1", "block.conv2", "seq.0", "head"]
BASE_NAME = {"pre": "Conv3d", "block.conv1": "Conv2d", "block.conv2": "Conv2d", "seq.0": "Conv1d", "head": "Linear"}
METHOD_KWARGS = [
    ("flora", {}),
    ("flora", dict(ranks=(2, 3, 1, 2), scale=0.7)),
    ("lora", dict(rank=3, alpha=5.0, dropout=0.1)),
    ("liera", dict(rank=3, alpha=5.0)),
    ("liera", dict(rank=2, alpha=3.0, mode="first_order", delta="tucker", dropout=0.1)),
    ("ssl", {}),
    ("ssb", {}),
]
MK_IDS = ["flora", "flora-kwargs", "lora", "liera-lora", "liera-tucker", "ssl", "ssb"]


def make_net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Net(**kwargs).eval()


def net_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 2, 5, 5, generator=g)


def adapted_net(method, kwargs, targets=None, seed=0):
    """An adapted net with random adapter tensors, and its base state before injection."""
    net = make_net(seed)
    base_state = copy.deepcopy(net.state_dict())
    if method == "flora" and "ranks" in kwargs:
        # tuple ranks fit the 4-d conv weights only
        targets = targets or ["block.conv1", "block.conv2"]
    names = lk.inject(net, method, target_modules=targets, **kwargs)
    for i, (_, layer) in enumerate(lk.adapter_layers(net)):
        randomize_adapter(layer, 100 + i, std=0.2)
    return net, base_state, names


def fresh_like(base_state, **kwargs):
    net = make_net(seed=99, **kwargs)  # other random weights, then the base weights copied in
    net.load_state_dict(base_state)
    return net


def snapshot(model):
    return dict(
        modules={n: (id(m), type(m)) for n, m in model.named_modules()},
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        grad={n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["grad"] == snap["grad"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, kwargs", METHOD_KWARGS, ids=MK_IDS)
def test_round_trip_into_fresh_model(tmp_path, method, kwargs):
    net, base_state, names = adapted_net(method, kwargs)
    x = net_input()
    y = net(x)
    lk.save_adapters(net, str(tmp_path / "ad"))

    fresh = fresh_like(base_state)
    assert lk.load_adapters(fresh, str(tmp_path / "ad")) == names
    assert torch.equal(fresh(x), y)
    for n, layer in lk.adapter_layers(net):
        other = fresh.get_submodule(n)
        assert type(other) is type(layer)
        assert other.adapter_name == n
        assert other.adapter_config() == layer.adapter_config()
        assert other.training is False
        for key, t in layer.adapter_state().items():
            assert torch.equal(other.adapter_state()[key], t)
    # the same parameters are trainable as after inject
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in net.named_parameters() if p.requires_grad} != set()
    # and the adapters make a difference (the equality above can fail)
    assert rel_err(fresh(x), make_net()(x)) > 1e-4


@pytest.mark.parametrize("method, kwargs", METHOD_KWARGS, ids=MK_IDS)
def test_round_trip_into_model_injected_with_same_config(tmp_path, method, kwargs):
    net, base_state, names = adapted_net(method, kwargs)
    x = net_input()
    lk.save_adapters(net, str(tmp_path))
    fresh = fresh_like(base_state)
    lk.inject(fresh, method, target_modules=names, **kwargs)
    layers_before = {n: m for n, m in lk.adapter_layers(fresh)}
    assert lk.load_adapters(fresh, str(tmp_path)) == names
    assert {n: m for n, m in lk.adapter_layers(fresh)} == layers_before  # loaded in place, same objects
    assert torch.equal(fresh(x), net(x))


def test_round_trip_partial_targets_and_train_mode(tmp_path):
    net, base_state, names = adapted_net("liera", dict(rank=2), targets=["head", "seq.0"])
    assert names == ["head", "seq.0"]  # in the order of target_modules
    lk.save_adapters(net, str(tmp_path))
    fresh = fresh_like(base_state).train()
    assert lk.load_adapters(fresh, str(tmp_path)) == ["seq.0", "head"]  # in the model's order
    assert type(fresh.block.conv1) is nn.Conv2d and type(fresh.head) is lk.LieRALinear
    assert fresh.head.training
    fresh.eval()
    assert torch.equal(fresh(net_input()), net(net_input()))


def test_load_into_float64_model(tmp_path):
    net, base_state, _ = adapted_net("flora", {})
    lk.save_adapters(net, str(tmp_path))
    fresh = fresh_like(base_state).double()
    lk.load_adapters(fresh, str(tmp_path))
    assert fresh.head.core.dtype == F64
    assert rel_err(fresh(net_input().double()), net(net_input()).double()) <= 1e-6


def test_files_are_safetensors_and_json(tmp_path):
    net, _, names = adapted_net("liera", dict(rank=3, alpha=5.0))
    lk.save_adapters(net, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([tensors_name(tmp_path), CONFIG])
    assert re.fullmatch(TENSORS_NAME, tensors_name(tmp_path))

    raw = tensors_file(tmp_path).read_bytes()
    assert tensors_name(tmp_path) == f"adapters-{hashlib.sha256(raw).hexdigest()[:16]}.safetensors"
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # neither pickle nor torch.save zip
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    expected_keys = {f"{n}.{k}" for n, layer in lk.adapter_layers(net) for k in layer.adapter_state()}
    assert set(header) - {"__metadata__"} == expected_keys
    with safe_open(str(tensors_file(tmp_path)), framework="pt") as f:
        assert set(f.keys()) == expected_keys
        for n, layer in lk.adapter_layers(net):
            for k, t in layer.adapter_state().items():
                assert torch.equal(f.get_tensor(f"{n}.{k}"), t.detach())

    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["package_version"] == lk.__version__
    assert config["format_version"] == 3
    assert config["files"] == {"tensors": tensors_name(tmp_path)}
    assert config["trainable_modules"] == {}
    assert list(config["layers"]) == names
    for n, layer in lk.adapter_layers(net):
        entry = config["layers"][n]
        assert entry["method"] == "liera"
        assert entry["kwargs"] == dict(rank=3, alpha=5.0, mode="exp", delta="lora", dropout=0.0)
        assert entry["module_type"] == BASE_NAME[n]
        assert entry["weight_shape"] == list(layer.weight.shape)
        assert entry["tensors"] == {k: list(t.shape) for k, t in layer.adapter_state().items()}
    assert config["layers"]["block.conv1"]["tensors"] == {"lora_A": [3, 27], "lora_B": [4, 3]}


def test_save_without_adapters_raises(tmp_path):
    with pytest.raises(ValueError, match="has no adapter layer"):
        lk.save_adapters(make_net(), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# validation: every problem is found before the model changes
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def saved_flora(tmp_path):
    net, base_state, _ = adapted_net("flora", {})
    lk.save_adapters(net, str(tmp_path))
    return tmp_path, base_state


def rewrite_tensors(directory, change):
    tensors = load_file(str(tensors_file(directory)))
    change(tensors)
    save_file(tensors, str(tensors_file(directory)))


def check_fails_unchanged(model, directory, match, error=ValueError):
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        lk.load_adapters(model, str(directory))
    assert_unchanged(model, snap)


def test_wrong_weight_shape(saved_flora):
    directory, base_state = saved_flora
    model = make_net(head_out=6)  # the last layer differs: the earlier ones must not be replaced
    check_fails_unchanged(model, directory, r"layer 'head': weight shape \[6, 4\] in the model, \[5, 4\] in adapter_config\.json")
    assert type(model.pre) is nn.Conv3d


def test_wrong_weight_shape_in_the_middle(saved_flora):
    directory, _ = saved_flora
    model = make_net(mid=6)
    check_fails_unchanged(model, directory, r"layer 'block\.conv1': weight shape")


def test_missing_layer(saved_flora):
    directory, base_state = saved_flora
    model = fresh_like(base_state)
    model.block.conv3 = model.block.conv2
    del model.block.conv2
    check_fails_unchanged(model, directory, r"layer 'block\.conv2': no such module in Net")


def test_layer_name_held_by_a_module_without_weight(saved_flora):
    directory, base_state = saved_flora
    model = fresh_like(base_state)
    model.head = nn.ReLU()
    check_fails_unchanged(model, directory, r"layer 'head'")


def test_layer_name_held_by_other_module_type(saved_flora):
    directory, base_state = saved_flora
    model = fresh_like(base_state)
    model.head = nn.Conv1d(4, 5, 1)
    model.head.weight.data = model.head.weight.data.reshape(5, 4)  # same weight shape, other type
    check_fails_unchanged(model, directory, r"layer 'head': a Conv1d in the model, an adapted Linear \(flora\)")


def test_extra_tensor(saved_flora):
    directory, base_state = saved_flora
    rewrite_tensors(directory, lambda t: t.__setitem__("head.extra", torch.zeros(3)))
    check_fails_unchanged(fresh_like(base_state), directory,
                          rf"tensor head\.extra in {TENSORS_NAME} belongs to no adapter")


def test_missing_tensor(saved_flora):
    directory, base_state = saved_flora
    rewrite_tensors(directory, lambda t: t.pop("head.factors.1"))
    check_fails_unchanged(fresh_like(base_state), directory, r"layer 'head': tensor head\.factors\.1 missing")


def test_wrong_tensor_shape(saved_flora):
    directory, base_state = saved_flora
    rewrite_tensors(directory, lambda t: t.__setitem__("block.conv1.core", torch.zeros(2, 2, 2, 2)))
    model = fresh_like(base_state)
    check_fails_unchanged(model, directory,
                          r"layer 'block\.conv1': tensor block\.conv1\.core has shape \[2, 2, 2, 2\] in "
                          rf"{TENSORS_NAME}, "
                          r"expected \[4, 3, 2, 2\]")
    # the same file problem with a model that already has the adapters
    lk.inject(model, "flora")
    check_fails_unchanged(model, directory, r"block\.conv1\.core has shape")


def test_wrong_method_on_adapted_layer(saved_flora):
    directory, base_state = saved_flora
    model = fresh_like(base_state)
    lk.inject(model, "ssl")
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, i)
    check_fails_unchanged(model, directory, r"layer 'pre': a SSLConv3d in the model, an adapted Conv3d \(flora\)")
    with pytest.raises(ValueError, match=r"layer 'head': a SSLLinear"):  # every problem is listed
        lk.load_adapters(model, str(directory))


def test_same_method_other_config_on_adapted_layer(saved_flora):
    directory, base_state = saved_flora
    model = fresh_like(base_state)
    lk.inject(model, "flora", ranks=1)
    check_fails_unchanged(model, directory, r"layer 'block\.conv1'")


def test_merged_layer(saved_flora):
    directory, base_state = saved_flora
    model = fresh_like(base_state)
    lk.inject(model, "flora")
    randomize_adapter(model.head, 0)
    lk.merge(model)
    check_fails_unchanged(model, directory, r"layer 'head': merged; unmerge before loading")


def test_bad_kwargs_in_config(saved_flora):
    directory, base_state = saved_flora
    config = json.loads((directory / CONFIG).read_text())
    config["layers"]["seq.0"]["kwargs"]["ranks"] = [0, 1, 1]
    (directory / CONFIG).write_text(json.dumps(config))
    check_fails_unchanged(fresh_like(base_state), directory, r"layer 'seq\.0'.*ranks? must be an integer >= 1")


def test_format_version_and_missing_files(saved_flora, tmp_path_factory):
    directory, base_state = saved_flora
    empty = tmp_path_factory.mktemp("empty")
    check_fails_unchanged(fresh_like(base_state), empty, CONFIG + " does not exist", error=lk.AdapterFileError)
    config = json.loads((directory / CONFIG).read_text())
    config["format_version"] = 4
    (directory / CONFIG).write_text(json.dumps(config))
    check_fails_unchanged(fresh_like(base_state), directory, r"format_version 4, expected one of \(1, 2, 3\)")
