"""Shared modules and tied weights; merged state in the state dict; non-finite W' refused; the
opt-in check of non-finite outputs; inject's messages."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import lrtensor_kernels as lk
from models import make_net
from oracle import randomize_adapter, rel_err
from test_bad_input import assert_unchanged, inject_fails, snapshot

pytestmark = pytest.mark.usefixtures("reference_backend")

METHODS = [("flora", {}), ("flora", dict(ranks=2, scale=1.5)), ("lora", dict(rank=3, alpha=2.0)),
           ("liera", dict(rank=3, alpha=2.0)),
           ("liera", dict(rank=2, mode="first_order", delta="tucker")), ("ssl", {}), ("ssb", dict(dropout=0.1))]
M_IDS = ["flora", "flora-kwargs", "lora", "liera-lora", "liera-tucker-first_order", "ssl", "ssb"]
methods = pytest.mark.parametrize("method, kwargs", METHODS, ids=M_IDS)


def randomize_all(model, seed=10):
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, seed + i, std=0.2)
    return model


def net_input(seed=1):
    return torch.randn(3, 1, 2, 5, 5, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# class 5: a module registered under two names
# ----------------------------------------------------------------------------------------------
class Shared(nn.Module):
    """``a`` and ``b`` are one Linear; ``p`` and ``q`` one Sequential holding a conv; ``c`` is separate."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.p = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU())
        self.q = self.p
        self.c = nn.Linear(4, 2)

    def forward(self, x):  # (N, 4, L)
        h = self.q(self.p(x)).transpose(1, 2)
        return self.c(self.b(self.a(h))).mean(1)


def shared_input():
    return torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))


def make_shared(seed=0):
    torch.manual_seed(seed)
    return Shared().eval()


@methods
@pytest.mark.parametrize("targets", [None, ["b", "q.0"], r"(b|q\.0|c)", ["a", "b", "p.0", "q.0"]],
                         ids=["default", "second-names", "regex", "both-names"])
def test_shared_module_gets_one_adapter_under_all_names(method, kwargs, targets):
    model = make_shared()
    plain = copy.deepcopy(model)
    names = lk.inject(model, method, target_modules=targets, **kwargs)
    assert names == (["a", "p.0", "c"] if targets is None or isinstance(targets, str) else ["a", "p.0"])
    assert isinstance(model.a, lk.AdapterLayer) and model.a is model.b
    assert isinstance(model.p[0], lk.AdapterLayer) and model.p is model.q
    assert [n for n, _ in lk.adapter_layers(model)] == names
    assert model.a.adapter_name == "a" and model.p[0].adapter_name == "p.0"
    randomize_all(model)
    x = shared_input()
    y = model(x)
    assert rel_err(y, plain(x)) > 1e-3
    lk.merge(model)
    assert rel_err(model(x), y) < 1e-5  # each shared layer merged once, used twice
    lk.unmerge(model)
    assert torch.equal(model(x), y)
    lk.unload(model)
    assert type(model.a) is nn.Linear and model.a is model.b and type(model.p[0]) is nn.Conv1d
    assert rel_err(model(x), y) < 1e-5


def test_excluding_any_name_of_a_shared_module_excludes_it():
    model = make_shared()
    assert lk.inject(model, "flora", exclude_modules=["b"]) == ["p.0", "c"]
    assert type(model.a) is nn.Linear and model.a is model.b
    inject_fails(make_shared(), lk.AdapterConfigError, r"^no module to adapt: exclude_modules removed every target "
                 r"\(a\)$", "ssl", target_modules=["a"], exclude_modules=["b"])


@methods
def test_shared_module_round_trip_through_adapter_files(method, kwargs, tmp_path):
    model = make_shared()
    lk.inject(model, method, **kwargs)
    randomize_all(model)
    lk.save_adapters(model, str(tmp_path))
    fresh = make_shared()
    assert lk.load_adapters(fresh, str(tmp_path)) == ["a", "p.0", "c"]
    assert fresh.a is fresh.b and isinstance(fresh.a, lk.AdapterLayer) and fresh.p is fresh.q
    assert torch.equal(fresh(shared_input()), model(shared_input()))


# ----------------------------------------------------------------------------------------------
# class 5: tied weights
# ----------------------------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self, tie_bias=False):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=True)
        self.head.weight = self.emb.weight
        if tie_bias:
            self.mid.bias = nn.Parameter(torch.zeros(4))
            self.other = nn.Linear(4, 4)
            self.other.bias = self.mid.bias

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


TOKENS = torch.tensor([[0, 3, 5, 1], [2, 2, 4, 0]])


@methods
def test_merge_refuses_a_tied_weight_and_changes_nothing(method, kwargs):
    torch.manual_seed(0)
    model = Tied().eval()
    lk.inject(model, method, **kwargs)
    randomize_all(model)
    emb = model.emb.weight
    y = model(TOKENS)
    snap = snapshot(model)
    with pytest.raises(lk.SharedWeightError, match=r"^merge refused: the weight of \w+Linear 'head' is also "
                                                   r"'emb\.weight'\. .*Nothing was merged\.$"):
        lk.merge(model)
    assert_unchanged(model, snap)
    assert not any(layer.merged for _, layer in lk.adapter_layers(model))  # 'mid' was not merged either
    assert torch.equal(model(TOKENS), y)
    # unload(merge=True) gives head its own Parameter holding W' and leaves the embedding alone
    emb_before = emb.detach().clone()
    lk.unload(model, merge=True)
    assert type(model.head) is nn.Linear and model.head.weight is not emb and model.emb.weight is emb
    assert torch.equal(model.emb.weight, emb_before)
    assert rel_err(model(TOKENS), y) < 1e-5


def test_merge_works_once_untied_as_the_message_says():
    torch.manual_seed(0)
    model = Tied()
    lk.inject(model, "flora")
    randomize_all(model)
    y = model(TOKENS)
    model.head.weight = nn.Parameter(model.head.weight.detach().clone(), requires_grad=False)
    emb = model.emb.weight.detach().clone()
    lk.merge(model)
    assert rel_err(model(TOKENS), y) < 1e-5 and torch.equal(model.emb.weight, emb)


@pytest.mark.parametrize("adapt", [["l1", "l2"], ["l1"]], ids=["both-adapted", "one-adapted"])
def test_merge_refuses_a_weight_tied_between_two_linears(adapt):
    model = nn.Module()
    model.l1, model.l2 = nn.Linear(3, 3), nn.Linear(3, 3)
    model.l2.weight = model.l1.weight
    lk.inject(model, "liera", target_modules=adapt)
    randomize_all(model)
    snap = snapshot(model)
    expected = (r"the weight of LieRALinear 'l1' is also 'l2\.weight'; the weight of LieRALinear 'l2' is also "
                r"'l1\.weight'" if len(adapt) == 2 else r"the weight of LieRALinear 'l1' is also 'l2\.weight'\.")
    with pytest.raises(lk.SharedWeightError, match=expected):
        lk.merge(model)
    assert_unchanged(model, snap)


def test_a_tied_bias_does_not_stop_merge():
    torch.manual_seed(0)
    model = Tied(tie_bias=True)
    lk.inject(model, "ssb", target_modules=["mid"])
    randomize_all(model)
    y = model(TOKENS)
    lk.merge(model)
    assert model.mid.merged and rel_err(model(TOKENS), y) < 1e-5


# ----------------------------------------------------------------------------------------------
# class 6: the state dict says whether a layer is merged
# ----------------------------------------------------------------------------------------------
def injected(method, kwargs, seed):
    net = make_net(seed)
    lk.inject(net, method, **kwargs)
    return randomize_all(net, seed=10 * seed)


@methods
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_merged_state_dict_into_fresh_injected_model(method, kwargs, strict):
    a = injected(method, kwargs, 0)
    x = net_input()
    y_unmerged = a(x)
    base = {n: layer.weight.detach().clone() for n, layer in lk.adapter_layers(a)}
    lk.merge(a)
    y_merged = a(x)
    state = a.state_dict()
    for n, layer in lk.adapter_layers(a):
        assert torch.equal(state[f"{n}.base_weight"], base[n]) and torch.equal(state[f"{n}.weight"], layer.weight)
    b = injected(method, kwargs, 1)  # other base weights, other adapters
    result = b.load_state_dict(state, strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(layer.merged for _, layer in lk.adapter_layers(b))
    assert torch.equal(b(x), y_merged)
    lk.unmerge(b)
    for n, layer in lk.adapter_layers(b):
        assert torch.equal(layer.weight, base[n]), n
    assert torch.equal(b(x), y_unmerged)
    assert not any(k.endswith("base_weight") for k in b.state_dict())


@methods
def test_unmerged_state_dict_into_merged_model(method, kwargs):
    a = injected(method, kwargs, 0)
    b = injected(method, kwargs, 1)
    lk.merge(b)
    b.load_state_dict(a.state_dict())  # strict: base_weight is never required
    assert not any(layer.merged for _, layer in lk.adapter_layers(b))
    assert torch.equal(b(net_input()), a(net_input()))


@methods
def test_plain_base_checkpoint_into_injected_models(method, kwargs):
    checkpoint = make_net(5).state_dict()
    for premerge in (False, True):
        model = injected(method, kwargs, 0)
        if premerge:
            lk.merge(model)
        result = model.load_state_dict(checkpoint, strict=False)
        adapter_keys = {f"{n}.{k}" for n, layer in lk.adapter_layers(model) for k in layer.adapter_state()}
        assert set(result.missing_keys) == adapter_keys and not result.unexpected_keys
        for n, layer in lk.adapter_layers(model):  # the checkpoint holds base weights: the layers are unmerged
            assert not layer.merged and torch.equal(layer.weight, checkpoint[f"{n}.weight"]), (premerge, n)
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*core|lora|in_scale"):
            model.load_state_dict(checkpoint)


def test_state_dict_without_the_weight_keeps_the_merged_state():
    model = injected("flora", {}, 0)
    lk.merge(model)
    y = model(net_input())
    model.load_state_dict({"head.core": model.head.core.detach().clone()}, strict=False)
    assert model.head.merged and torch.equal(model(net_input()), y)


def test_merged_state_dict_into_plain_model_gives_merged_weights():
    """A plain model holding W' computes what the merged model computes, bit for bit where both run
    the same kernels on the same layouts: every merged layer is its plain twin, and the model with
    the same parameters trainable. nn.MultiheadAttention takes its fused path only when none of its
    parameters requires grad: with other flags the two attentions run different kernels, and the
    outputs agree to rounding only."""
    a = injected("liera", {}, 0)
    lk.merge(a)
    plain = make_net(3)
    result = plain.load_state_dict(a.state_dict(), strict=False)
    assert "head.base_weight" in result.unexpected_keys
    x = net_input()
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0]))
             for n, layer in lk.adapter_layers(a)]
    y = a(x)
    for h in hooks:
        h.remove()
    for name, layer in lk.adapter_layers(a):
        assert torch.equal(layer(inputs[name]), plain.get_submodule(name)(inputs[name])), name
    assert rel_err(plain(x), y) < 1e-6  # every parameter of the plain model trainable: other attention kernels
    trainable = {n: p.requires_grad for n, p in a.named_parameters()}
    for n, p in plain.named_parameters():
        p.requires_grad_(trainable[n])
    assert torch.equal(plain(x), y)


def test_bad_merged_entries_are_load_errors_and_keep_the_layer():
    model = injected("flora", {}, 0)
    lk.merge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weight, base = model.head.weight.detach().clone(), model.head._merged_base.clone()
    for change, match in [
        (lambda s: s.pop("head.weight"), r"head\.base_weight \(the base weight of a merged layer\) given without "
                                         r"head\.weight"),
        (lambda s: s.__setitem__("head.base_weight", torch.zeros(5, 3)), r"head\.base_weight: expected a tensor of "
                                                                         r"shape \(5, 4\).*got \(5, 3\)"),
        (lambda s: s.__setitem__("head.weight", torch.zeros(2)), r"head\.weight: expected a tensor of shape"),
    ]:
        bad = dict(state)
        change(bad)
        with pytest.raises(RuntimeError, match=match):
            model.load_state_dict(bad)
        assert model.head.merged and torch.equal(model.head.weight, weight)
        assert torch.equal(model.head._merged_base, base)


@pytest.mark.parametrize("how", ["torch-save", "safetensors", "assign"])
def test_merged_state_dict_through_files_and_assign(how):
    a = injected("liera", dict(delta="tucker", rank=2), 0)
    base = {n: layer.weight.detach().clone() for n, layer in lk.adapter_layers(a)}
    lk.merge(a)
    state = a.state_dict()
    if how == "torch-save":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    elif how == "safetensors":
        state = st_load(st_save({k: v.contiguous() for k, v in state.items()}))
    b = injected("liera", dict(delta="tucker", rank=2), 1)
    b.load_state_dict(state, assign=how == "assign")
    assert torch.equal(b(net_input()), a(net_input()))
    lk.unmerge(b)
    assert all(torch.equal(layer.weight, base[n]) for n, layer in lk.adapter_layers(b))


# ----------------------------------------------------------------------------------------------
# class 8: merge refuses a non-finite W'; the opt-in check of forward outputs
# ----------------------------------------------------------------------------------------------
def overflowing(kind):
    """A layer whose W' overflows (or whose base weight is already broken), with its name."""
    torch.manual_seed(0)
    if kind == "flora-scale-f32":
        layer = lk.FLoRALinear(4, 3, scale=1e39)  # finite as a Python float, inf in float32
    elif kind == "liera-exp-f32":
        layer = lk.LieRAConv2d(3, 4, 3, rank=2, alpha=2e3)
    elif kind == "liera-exp-f16":
        layer = lk.LieRAConv1d(3, 4, 3, rank=2, alpha=40.0).half()
    elif kind == "ssb-f16":
        layer = lk.SSBConv3d(2, 3, 2).half()
    elif kind == "nan-base":
        layer = lk.SSLLinear(4, 3)
    randomize_adapter(layer, 1, std=1.0)
    with torch.no_grad():
        if kind == "ssb-f16":
            layer.out_scale.fill_(1e6)
        if kind == "nan-base":
            layer.weight[0, 0] = float("nan")
    layer.adapter_name = "blk.layer"
    return layer


KINDS = ["flora-scale-f32", "liera-exp-f32", "liera-exp-f16", "ssb-f16", "nan-base"]


@pytest.mark.parametrize("kind", KINDS)
def test_merge_refuses_non_finite_weight(kind):
    layer = overflowing(kind)
    weight, ptr = layer.weight.detach().clone(), layer.weight.data_ptr()
    cause = "the base weight already holds non-finite values" if kind == "nan-base" else "the adapter update overflows"
    for call, action in [(layer.merge, "merge"), (layer.to_plain, r"unload\(merge=True\)")]:
        with pytest.raises(lk.NonFiniteError, match=rf"^{type(layer).__name__} 'blk\.layer': {action} refused: W' "
                                                    rf"would hold \d+ non-finite values of \d+; {cause}"):
            call()
        assert not layer.merged and layer.weight.data_ptr() == ptr
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
def test_model_merge_and_unload_are_all_or_nothing(kind):
    model = nn.Sequential()
    model.add_module("good", lk.SSBLinear(3, 3).to(overflowing(kind).weight.dtype))
    randomize_adapter(model.good, 0)
    model.add_module("blk", nn.Module())
    model.blk.layer = overflowing(kind)
    snap = snapshot(model)
    for call in (lk.merge, lk.unload):
        with pytest.raises(lk.NonFiniteError, match=r"'blk\.layer': (merge|unload\(merge=True\)) refused"):
            call(model)
        if kind != "nan-base":  # NaN != NaN: checked below instead
            assert_unchanged(model, snap)
        assert not model.good.merged and isinstance(model.blk.layer, lk.AdapterLayer)
        assert torch.equal(model.good.weight, snap["params"]["good.weight"][1])
        torch.testing.assert_close(model.blk.layer.weight, snap["params"]["blk.layer.weight"][1], rtol=0, atol=0,
                                   equal_nan=True)


def test_detect_nonfinite_names_the_layer_off_by_default():
    hooks = torch.nn.modules.module._global_forward_hooks
    n_hooks = len(hooks)
    assert not lk.is_detect_nonfinite_enabled()
    model = nn.Sequential()
    model.add_module("blk", nn.Module())
    model.blk.layer = overflowing("liera-exp-f32")
    x = torch.randn(1, 3, 5, 5)
    assert not torch.isfinite(model.blk.layer(x)).all()  # off: no check, no hook
    with lk.detect_nonfinite():
        assert lk.is_detect_nonfinite_enabled() and len(hooks) == n_hooks + 1
        with pytest.raises(lk.NonFiniteError, match=r"^LieRAConv2d 'blk\.layer': forward output holds \d+ "
                                                    r"non-finite values of 36; its input was finite$"):
            model.blk.layer(x)
        with pytest.raises(lk.NonFiniteError, match=r"its input already held non-finite values$"):
            model.blk.layer(torch.full_like(x, float("inf")))
        with lk.detect_nonfinite(False):
            assert not lk.is_detect_nonfinite_enabled()
            model.blk.layer(x)
        assert lk.is_detect_nonfinite_enabled()
        nn.Linear(2, 2)(torch.tensor([[float("nan"), 0.0]]))  # plain layers are not checked
        good = lk.FLoRALinear(3, 2)
        assert torch.isfinite(good(torch.randn(2, 3))).all()
        good.merge()
        with pytest.raises(lk.NonFiniteError, match=r"^FLoRALinear: forward output"):
            with torch.no_grad():
                good.weight.fill_(float("inf"))
            good(torch.randn(2, 3))
    assert not lk.is_detect_nonfinite_enabled() and len(hooks) == n_hooks
    lk.set_detect_nonfinite(True)
    try:
        with pytest.raises(lk.NonFiniteError):
            model.blk.layer(x)
    finally:
        lk.set_detect_nonfinite(False)
    assert len(hooks) == n_hooks


# ----------------------------------------------------------------------------------------------
# class 11: messages that blame the right thing
# ----------------------------------------------------------------------------------------------
def test_inject_twice_says_everything_is_adapted():
    net = make_net()
    lk.inject(net, "flora")
    inject_fails(net, lk.AdapterConfigError, r"^no module to adapt: Net has no Conv1d, Conv2d, Conv3d or Linear "
                 r"submodule that is not adapted already \(adapted: pre, block\.conv1, block\.conv2, conv1, seq\.0, "
                 r"head\)$", "ssl")


@pytest.mark.parametrize("method, expected", [("flora", "FLoRALinear"), ("ssb", "SSBLinear")])
def test_inject_into_a_bare_layer_points_to_from_module(method, expected):
    inject_fails(nn.Linear(3, 3), lk.AdapterConfigError, rf"the model itself is a Linear, which inject cannot "
                 rf"replace: use lk\.{expected}\.from_module\(model\)$", method)
    layer = lk.SSLLinear(3, 3)
    inject_fails(layer, lk.AdapterConfigError, r"not adapted already \(adapted: the model itself\)$", method)


@pytest.mark.parametrize("key", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("value, error, match", [
    (5, lk.AdapterTypeError, r"must be a list of module names or one regex string, got 5$"),
    (3.5, lk.AdapterTypeError, r"must be a list of module names or one regex string, got 3\.5$"),
    ({"head": 1}, lk.AdapterTypeError, r"must be a list of module names or one regex string, got \{'head': 1\}$"),
    (b"head", lk.AdapterTypeError, r"must be a list of module names or one regex string, got b'head'$"),
    (["head", 3], lk.AdapterTypeError, r"entries must be module names \(str\), got 3$"),
    ([None], lk.AdapterTypeError, r"entries must be module names \(str\), got None$"),
    ([], lk.AdapterConfigError, r"is an empty list; pass None for (every adaptable module|no exclusion)$"),
], ids=["int", "float", "dict", "bytes", "list-with-int", "list-with-none", "empty"])
def test_inject_target_spec_of_the_wrong_kind(key, value, error, match):
    inject_fails(make_net(), error, rf"^{key} {match}", "flora", **{key: value})


def test_inject_accepts_any_sequence_or_set_of_names():
    for spec in (("head",), {"head"}, ["head"]):
        net = make_net()
        assert lk.inject(net, "flora", target_modules=spec) == ["head"]


@pytest.mark.parametrize("method", [["flora"], None, 3, "FLoRA"], ids=["list", "none", "int", "case"])
def test_inject_unknown_method_of_any_type(method):
    inject_fails(make_net(), lk.AdapterConfigError, rf"^unknown method {re.escape(repr(method))}; expected one of",
                 method)


@pytest.mark.parametrize("name, call", [
    ("inject", lambda m, d: lk.inject(m, "flora")), ("merge", lambda m, d: lk.merge(m)),
    ("unmerge", lambda m, d: lk.unmerge(m)), ("unload", lambda m, d: lk.unload(m)),
    ("adapter_layers", lambda m, d: lk.adapter_layers(m)), ("save_adapters", lambda m, d: lk.save_adapters(m, d)),
    ("load_adapters", lambda m, d: lk.load_adapters(m, d)),
])
@pytest.mark.parametrize("model", [None, {"head": nn.Linear(2, 2)}, [nn.Linear(2, 2)]], ids=["none", "dict", "list"])
def test_surgery_and_files_refuse_what_is_not_a_module(tmp_path, name, call, model):
    with pytest.raises(lk.AdapterTypeError, match=rf"^{name}: expected an nn\.Module, got {type(model).__name__}$"):
        call(model, str(tmp_path))
    assert list(tmp_path.iterdir()) == []
