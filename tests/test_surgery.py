"""inject / merge / unmerge / unload on layers and on a small mixed CNN (reference backend, CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from models import Block, Net, make_net  # noqa: F401
from oracle import F64, effective_weight64, forward64, randomize_adapter, rel_err


pytestmark = pytest.mark.usefixtures("reference_backend")


ADAPTABLE = ["pre", "block.conv1", "block.conv2", "conv1", "seq.0", "head"]
BASE_OF = {"pre": nn.Conv3d, "block.conv1": nn.Conv2d, "block.conv2": nn.Conv2d, "conv1": nn.Conv2d,
           "seq.0": nn.Conv1d, "head": nn.Linear}
PREFIX = {"flora": "FLoRA", "lora": "LoRA", "liera": "LieRA", "ssl": "SSL", "ssb": "SSB"}
SUFFIX = {nn.Linear: "Linear", nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Conv3d: "Conv3d"}


def net_input(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 2, 5, 5, generator=g, dtype=F64).to(dtype)


def randomize_all(model, seed=10):
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, seed + i, std=0.2)


def trainable_ids(model):
    return {id(p) for p in model.parameters() if p.requires_grad}


def adapter_ids(model):
    return {id(p) for _, layer in lk.adapter_layers(model) for p in layer.adapter_parameters()}


METHOD_KWARGS = [
    ("flora", {}),
    ("flora", dict(ranks=2, scale=1.5)),
    ("lora", dict(rank=2, alpha=3.0)),
    ("liera", {}),
    ("liera", dict(rank=2, alpha=3.0, mode="first_order", delta="tucker")),
    ("ssl", {}),
    ("ssb", dict(dropout=0.2)),
]
MK_IDS = ["flora", "flora-kwargs", "lora", "liera", "liera-kwargs", "ssl", "ssb-dropout"]


# ----------------------------------------------------------------------------------------------
# inject
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, kwargs", METHOD_KWARGS, ids=MK_IDS)
def test_inject_default_targets(method, kwargs):
    net = make_net()
    original = copy.deepcopy(net)
    x = net_input()
    base_params = {n: net.get_submodule(n).weight for n in ADAPTABLE}
    out_proj = net.attn.out_proj

    names = lk.inject(net, method, **kwargs)

    assert names == ADAPTABLE
    assert [n for n, _ in lk.adapter_layers(net)] == ADAPTABLE
    for n in ADAPTABLE:
        m = net.get_submodule(n)
        assert type(m) is getattr(lk, PREFIX[method] + SUFFIX[BASE_OF[n]])
        assert m.adapter_name == n
        assert m.weight is base_params[n]  # shared, not copied
        assert m.weight.requires_grad is False
        if m.bias is not None:
            assert m.bias.requires_grad is False
    assert net.attn.out_proj is out_proj and type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert trainable_ids(net) == adapter_ids(net) != set()
    assert not net.block.bn.weight.requires_grad and not net.attn.in_proj_weight.requires_grad
    # fresh adapters compute the original model exactly (no_grad: with frozen parameters and grad
    # enabled, nn.MultiheadAttention would take its fast path in one model and not in the other)
    with torch.no_grad():
        assert torch.equal(net(x), original(x))
    # the keyword arguments reached every layer
    for n in ADAPTABLE:
        m = net.get_submodule(n)
        for key, value in kwargs.items():
            if key == "ranks":
                shape = tuple(m.weight.shape)
                wanted = (value, value) + tuple(min(k, 2) for k in shape[2:])
                assert m.ranks == tuple(min(r, d) for r, d in zip(wanted, shape))
            else:
                assert getattr(m, key) == value
    # random adapters: the adapted model equals the model holding W' (checked against the oracle)
    randomize_all(net)
    twin = copy.deepcopy(original).double()
    with torch.no_grad():
        for n in ADAPTABLE:
            twin.get_submodule(n).weight.copy_(effective_weight64(net.get_submodule(n)))
    net.eval()
    assert rel_err(net(x), twin(x.double())) <= 1e-5
    assert rel_err(net(x), original(x)) > 1e-4


def test_inject_keeps_training_mode():
    net = make_net().train()
    lk.inject(net, "flora")
    assert all(m.training for m in net.modules())
    net = make_net().eval()
    lk.inject(net, "liera")
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("target, expected", [
    (["head"], ["head"]),
    (["conv1"], ["block.conv1", "conv1"]),
    (["block.conv1"], ["block.conv1"]),
    (["seq.0", "pre"], ["seq.0", "pre"]),
    (["0", "head", "seq.0"], ["seq.0", "head"]),
    (("conv2", "head"), ["block.conv2", "head"]),
    (r"block\.conv\d", ["block.conv1", "block.conv2"]),
    ("conv1", ["conv1"]),  # a regex string matches the whole name: not block.conv1
    (r".*conv1", ["block.conv1", "conv1"]),
    (r"pre|head", ["pre", "head"]),
], ids=["exact", "suffix-two-hits", "dotted-exact", "list-order", "suffix-dedup", "tuple", "regex",
        "regex-full-match-only", "regex-prefix", "regex-alternation"])
def test_inject_target_modules(target, expected):
    net = make_net()
    names = lk.inject(net, "flora", target_modules=target)
    assert names == expected
    adapted = {n for n, _ in lk.adapter_layers(net)}
    assert adapted == set(expected)
    for n in ADAPTABLE:
        assert isinstance(net.get_submodule(n), lk.AdapterLayer) == (n in expected)
    assert trainable_ids(net) == adapter_ids(net)


@pytest.mark.parametrize("exclude, expected", [
    (["block.conv2", "head"], ["pre", "block.conv1", "conv1", "seq.0"]),
    (["conv1"], ["pre", "block.conv2", "seq.0", "head"]),
    (r"block\..*", ["pre", "conv1", "seq.0", "head"]),
], ids=["list", "suffix", "regex"])
def test_inject_exclude_modules(exclude, expected):
    net = make_net()
    assert lk.inject(net, "ssb", exclude_modules=exclude) == expected
    assert {n for n, _ in lk.adapter_layers(net)} == set(expected)


def test_inject_target_and_exclude():
    net = make_net()
    assert lk.inject(net, "ssl", target_modules=r".*conv\d", exclude_modules=["block.conv1"]) == [
        "block.conv2", "conv1"]


def test_inject_twice_adapts_the_rest_and_keeps_both_trainable():
    net = make_net()
    assert lk.inject(net, "flora", target_modules=["head"]) == ["head"]
    head = net.head
    assert lk.inject(net, "ssl") == [n for n in ADAPTABLE if n != "head"]
    assert net.head is head and type(head) is lk.FLoRALinear
    assert type(net.block.conv1) is lk.SSLConv2d
    assert trainable_ids(net) == adapter_ids(net)
    assert {id(p) for p in head.adapter_parameters()} <= trainable_ids(net)


def test_multihead_attention_out_proj_not_adapted_by_default():
    net = nn.Sequential(nn.Linear(4, 4))
    net.add_module("attn", nn.MultiheadAttention(4, 1))
    assert lk.inject(net, "liera") == ["0"]
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


# ----------------------------------------------------------------------------------------------
# merge / unmerge on single layers
# ----------------------------------------------------------------------------------------------
LAYER_METHODS = [
    ("flora", {}), ("lora", dict(rank=3)), ("liera-exp-lora", dict(mode="exp", delta="lora", rank=3)),
    ("liera-first_order-tucker", dict(mode="first_order", delta="tucker", rank=2)), ("ssl", {}), ("ssb", {}),
]
PLAINS = [
    ("conv2d", lambda dt: nn.Conv2d(4, 6, 3, padding=1, groups=2, dtype=dt), (2, 4, 5, 5)),
    ("conv1d-circular", lambda dt: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular", dtype=dt), (2, 3, 6)),
    ("conv3d", lambda dt: nn.Conv3d(2, 3, 2, dtype=dt), (1, 2, 3, 4, 3)),
    ("linear", lambda dt: nn.Linear(5, 4, dtype=dt), (2, 3, 5)),
]
MERGE_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def adapted_layer(plain_id_make, method, dtype, seed=0):
    _, make, _ = plain_id_make
    name, kwargs = method
    torch.manual_seed(seed)
    plain = make(dtype)
    cls = getattr(lk, PREFIX[name.split("-")[0]] + SUFFIX[type(plain)])
    layer = cls.from_module(plain, **kwargs)
    randomize_adapter(layer, seed + 1)
    return plain, layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("method", LAYER_METHODS, ids=[m[0] for m in LAYER_METHODS])
@pytest.mark.parametrize("plain_spec", PLAINS, ids=[p[0] for p in PLAINS])
def test_merge_unmerge_layer(plain_spec, method, dtype):
    plain, layer = adapted_layer(plain_spec, method, dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(plain_spec[2], generator=g).to(dtype)
    weight_param = layer.weight
    base = layer.weight.detach().clone()
    base_ptr = layer.weight.data_ptr()
    w_eff = layer.effective_weight().detach()
    y = layer(x)
    y64 = forward64(layer, x)

    # unmerge of an unmerged layer is a no-op
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, base) and layer.weight.data_ptr() == base_ptr

    layer.merge()
    assert layer.merged
    assert layer.weight is weight_param and plain.weight is weight_param
    assert layer.weight.dtype == dtype
    assert torch.equal(layer.weight, w_eff)
    assert not torch.equal(layer.weight, base)
    # W' is computed from the kept base weight, not from the merged one
    assert torch.equal(layer.effective_weight(), w_eff)
    y_merged = layer(x)
    assert rel_err(y_merged, y) <= MERGE_TOL[dtype]
    assert rel_err(y_merged, y64) <= MERGE_TOL[dtype]

    # merging twice is a no-op
    layer.merge()
    assert torch.equal(layer.weight, w_eff)

    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, base) and layer.weight.dtype == dtype
    assert layer.weight.data_ptr() == base_ptr
    assert torch.equal(layer(x), y)
    layer.unmerge()
    assert torch.equal(layer.weight, base)


def test_merged_forward_ignores_adapter_changes_until_unmerge():
    _, layer = adapted_layer(PLAINS[0], LAYER_METHODS[0], torch.float32)
    x = torch.randn(2, 4, 5, 5)
    layer.merge()
    y = layer(x)
    with torch.no_grad():
        layer.core.mul_(2)
    assert torch.equal(layer(x), y)
    layer.unmerge()
    assert not torch.allclose(layer(x), y)


def test_unmerge_after_dtype_conversion_restores_converted_base():
    _, layer = adapted_layer(PLAINS[0], LAYER_METHODS[0], torch.float32)
    base = layer.weight.detach().clone()
    layer.merge()
    layer.to(torch.float64)
    layer.unmerge()
    assert layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, base.double())


# ----------------------------------------------------------------------------------------------
# merge / unmerge / unload on a model
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, kwargs", METHOD_KWARGS, ids=MK_IDS)
def test_model_merge_unmerge(method, kwargs):
    net = make_net()
    lk.inject(net, method, **kwargs)
    randomize_all(net)
    x = net_input()
    y = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lk.merge(net)
    assert all(layer.merged for _, layer in lk.adapter_layers(net))
    assert rel_err(net(x), y) <= 1e-5
    assert not torch.equal(net.block.conv1.weight, before["block.conv1.weight"])
    lk.merge(net)
    assert rel_err(net(x), y) <= 1e-5
    lk.unmerge(net)
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(net(x), y)


@pytest.mark.parametrize("premerge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("method, kwargs", METHOD_KWARGS, ids=MK_IDS)
def test_unload_merge_true(method, kwargs, premerge):
    net = make_net()
    original = copy.deepcopy(net)
    lk.inject(net, method, **kwargs)
    randomize_all(net)
    x = net_input()
    y = net(x)
    w_eff = {n: m.effective_weight().detach().clone() for n, m in lk.adapter_layers(net)}
    biases = {n: m.bias for n, m in lk.adapter_layers(net)}
    w64 = {n: effective_weight64(m) for n, m in lk.adapter_layers(net)}
    if premerge:
        lk.merge(net)
    assert lk.unload(net, merge=True) is net
    assert lk.adapter_layers(net) == []
    for n in ADAPTABLE:
        m, o = net.get_submodule(n), original.get_submodule(n)
        assert type(m) is BASE_OF[n]
        assert torch.equal(m.weight, w_eff[n])
        assert m.bias is biases[n]
        assert rel_err(m.weight, w64[n]) <= 1e-5
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "in_channels", "in_features"):
            assert getattr(m, attr, None) == getattr(o, attr, None)
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert rel_err(net(x), y) <= 1e-5
    assert not any(isinstance(m, lk.AdapterLayer) for m in net.modules())


@pytest.mark.parametrize("premerge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("method, kwargs", METHOD_KWARGS, ids=MK_IDS)
def test_unload_merge_false(method, kwargs, premerge):
    net = make_net()
    original = copy.deepcopy(net)
    lk.inject(net, method, **kwargs)
    randomize_all(net)
    x = net_input()
    if premerge:
        lk.merge(net)
    lk.unload(net, merge=False)
    for n in ADAPTABLE:
        m = net.get_submodule(n)
        assert type(m) is BASE_OF[n]
        assert torch.equal(m.weight, original.get_submodule(n).weight)
    assert net.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        assert torch.equal(net(x), original(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["f16", "bf16", "f64"])
def test_unload_keeps_dtype_and_matches_oracle(dtype):
    plain, layer = adapted_layer(PLAINS[0], LAYER_METHODS[1], dtype)
    model = nn.Sequential(layer)
    ref = effective_weight64(layer)
    lk.unload(model)
    assert type(model[0]) is nn.Conv2d and model[0].weight.dtype == dtype
    assert rel_err(model[0].weight, ref) <= MERGE_TOL[dtype]
