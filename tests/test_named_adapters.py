"""Named adapters (inject(adapter_name=...), set_adapter, delete_adapter, a weighted merge, save/load by
name), disable_adapters and trainable_summary, against the float64 oracle and the base model."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from oracle import F64, effective_weight64, forward64, randomize_adapter, rel_err, tucker64
from test_serialization import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("reference_backend")


def base_model(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 4)).to(dtype)


def x_input(dtype=F64):
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)


def two_adapters(method="lora", first=None, second=None, dtype=F64):
    """A base model, and the same model with adapters "default" and "b" of ``method`` (all random)."""
    plain = base_model(dtype=dtype)
    model = copy.deepcopy(plain)
    lk.inject(model, method, **(first or {}))
    lk.inject(model, method, adapter_name="b", **(second or {}))
    randomize_all(model)
    return plain, model


def randomize_all(model, seed=3):
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        for j, name in enumerate(layer.held_adapters()):
            with layer._activated(name):
                randomize_adapter(layer, seed + 10 * i + j)


def layers(model):
    return [layer for _, layer in lk.adapter_layers(model)]


def oracle_delta(layer, name):
    """``s dW`` of adapter ``name`` in float64, from the formulas (tests/oracle.py)."""
    with layer._activated(name):
        if isinstance(layer, lk.layers.FLoRAMixin):
            return layer.scale * tucker64(layer.core, list(layer.factors))
        return layer.scale * (layer.lora_B.to(F64) @ layer.lora_A.to(F64)).reshape(layer.weight.shape)


# ----------------------------------------------------------------------------------------------
# one adapter: exactly as before
# ----------------------------------------------------------------------------------------------
def test_one_adapter_model_keys_repr_and_files_are_unchanged(tmp_path):
    model = base_model()
    lk.inject(model, "lora")
    assert sorted(model.state_dict()) == sorted(
        [f"{i}.{k}" for i in (0, 2, 5) for k in ("weight", "bias", "lora_A", "lora_B")])
    assert "inactive_adapters" not in repr(model) and "active_adapter" not in repr(model)
    assert all(layer.held_adapters() == ["default"] and layer.active_adapter == "default" for layer in layers(model))
    lk.save_adapters(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all("adapter_name" not in entry for entry in config["layers"].values())
    # a named single adapter records its name, and loads under it
    named = base_model()
    lk.inject(named, "lora", adapter_name="style")
    lk.save_adapters(named, tmp_path / "named")
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert {entry["adapter_name"] for entry in config["layers"].values()} == {"style"}
    fresh = base_model()
    lk.load_adapters(fresh, tmp_path / "named")
    assert {layer.active_adapter for layer in layers(fresh)} == {"style"}


# ----------------------------------------------------------------------------------------------
# inject(adapter_name=...), set_adapter
# ----------------------------------------------------------------------------------------------
def test_inject_adds_an_inactive_frozen_adapter_and_set_adapter_switches():
    plain, model = two_adapters(first=dict(rank=2), second=dict(rank=3, alpha=6.0))
    x = x_input()
    for layer in layers(model):
        assert layer.held_adapters() == ["default", "b"] and layer.active_adapter == "default"
        assert layer.rank == 2
        stored = layer.inactive_adapters["b"]
        assert stored.config == dict(rank=3, alpha=6.0, dropout=0.0)
        assert not any(p.requires_grad for p in stored.parameters())
        assert all(p.requires_grad for p in layer.adapter_parameters())
    y_default = model(x)
    assert lk.set_adapter(model, "b") == ["0", "2", "5"]
    for layer in layers(model):
        assert layer.active_adapter == "b" and layer.rank == 3 and layer.scale == 2.0
        assert not any(p.requires_grad for p in layer.inactive_adapters["default"].parameters())
    y_b = model(x)
    # each against the float64 oracle of the whole model with that adapter's weights
    for name, y in (("default", y_default), ("b", y_b)):
        twin = copy.deepcopy(plain)
        for i, layer in zip((0, 2, 5), layers(model)):
            with layer._activated(name), torch.no_grad():
                twin[i].weight.copy_(effective_weight64(layer))
        assert rel_err(y, twin(x)) < 1e-12
    assert rel_err(y_b, y_default) > 1e-3


def test_switching_moves_parameters_and_an_optimiser_leaves_the_inactive_adapter_alone():
    _, model = two_adapters()
    x = x_input()
    default = {id(p): p.detach().clone() for layer in layers(model) for p in layer.adapter_parameters()}
    b_params = [p for layer in layers(model) for p in layer.inactive_adapters["b"].parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.1)  # every parameter, as a user may pass them
    lk.set_adapter(model, "b")
    assert [p for layer in layers(model) for p in layer.adapter_parameters()] == b_params  # the same objects
    before_b = [p.detach().clone() for p in b_params]
    model(x).square().sum().backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(b_params, before_b))
    lk.set_adapter(model, "default")
    now = {id(p): p for layer in layers(model) for p in layer.adapter_parameters()}
    assert now.keys() == default.keys() and all(torch.equal(now[k], v) for k, v in default.items())


def test_layers_without_the_adapter_run_their_base_layer():
    plain = base_model()
    model = copy.deepcopy(plain)
    lk.inject(model, "lora")
    lk.inject(model, "lora", adapter_name="head_only", target_modules=["5"])
    randomize_all(model)
    lk.set_adapter(model, "head_only")
    assert [layer.active_adapter for layer in layers(model)] == [None, None, "head_only"]
    assert model[0].adapter_state() == {} and "no active adapter" in repr(model[0])
    h = plain[:5](x_input())
    torch.testing.assert_close(model[:5](x_input()), h, rtol=0, atol=0)  # the plain op on the plain weight
    assert rel_err(model[5](h), forward64(model[5], h)) < 1e-12
    assert lk.mpc_loss(model).item() == pytest.approx(lk.mpc_loss(nn.Sequential(model[5])).item())


def test_mixed_methods_on_one_layer_are_refused_and_change_nothing():
    model = base_model()
    lk.inject(model, "flora", target_modules=["0"])
    snap = snapshot(model)
    with pytest.raises(lk.AdapterConfigError, match=r"module '0' is already a FLoRAConv2d; a layer holds adapters of "
                                                    r"one method \('flora'\), so a 'lora' adapter cannot be added"):
        lk.inject(model, "lora", adapter_name="b", target_modules=["0", "2"])
    assert_unchanged(model, snap)
    assert isinstance(model[2], nn.Conv2d) and not isinstance(model[2], lk.AdapterLayer)
    # by default, layers of another method are left out: the LoRA adapter goes to the plain layers
    assert lk.inject(model, "lora", adapter_name="b") == ["2", "5"]
    assert model[0].held_adapters() == ["default"]


@pytest.mark.parametrize("name", ["", "a.b", 3, "keys", "training"])
def test_bad_adapter_names_are_refused(name):
    model = base_model()
    with pytest.raises(lk.AdapterConfigError, match="adapter_name must be a non-empty string without dots"):
        lk.inject(model, "lora", adapter_name=name)
    assert not lk.adapter_layers(model)


def test_existing_name_and_unknown_name_errors():
    _, model = two_adapters()
    with pytest.raises(lk.AdapterConfigError, match=r"module '0' is already a LoRAConv2d holding an adapter named 'b'"):
        lk.inject(model, "lora", adapter_name="b", target_modules=["0"])
    for call in (lk.set_adapter, lk.delete_adapter):
        with pytest.raises(lk.AdapterConfigError, match=r"no layer of Sequential holds an adapter named 'c'; the "
                                                        r"adapters held are \['b', 'default'\]"):
            call(model, "c")
    with pytest.raises(lk.AdapterTypeError, match="module '0': LoRAConv2d: unexpected keyword"):
        lk.inject(model, "lora", adapter_name="c", ranks=3)
    assert all(layer.held_adapters() == ["default", "b"] for layer in layers(model))


def test_merged_layers_refuse_switching_and_deleting():
    _, model = two_adapters()
    lk.merge(model)
    weights = [layer.weight.detach().clone() for layer in layers(model)]
    for call in (lk.set_adapter, lk.delete_adapter):
        with pytest.raises(lk.AdapterConfigError, match=r"merged; unmerge first.*Nothing was changed"):
            call(model, "b")
    assert all(torch.equal(layer.weight, w) and layer.active_adapter == "default"
               for layer, w in zip(layers(model), weights))
    lk.unmerge(model)
    lk.set_adapter(model, "b")


def test_half_keeps_inactive_adapters_in_float32():
    _, model = two_adapters(dtype=torch.float32)
    model.half()
    for layer in layers(model):
        assert layer.weight.dtype == torch.float16
        assert {p.dtype for p in layer.inactive_adapters["b"].parameters()} == {torch.float32}
        assert {p.dtype for p in layer.adapter_parameters()} == {torch.float32}


def test_state_dict_round_trip_with_two_adapters():
    _, model = two_adapters()
    lk.set_adapter(model, "b")
    state = model.state_dict()
    assert "0.inactive_adapters.default.lora_A" in state and "0.lora_A" in state
    _, other = two_adapters()
    randomize_all(other, seed=99)
    lk.set_adapter(other, "b")
    other.load_state_dict(state)
    torch.testing.assert_close(other(x_input()), model(x_input()), rtol=0, atol=0)
    # another active adapter is another structure: a strict load says so
    lk.set_adapter(other, "default")
    with pytest.raises(RuntimeError, match="inactive_adapters"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# delete_adapter
# ----------------------------------------------------------------------------------------------
def test_delete_adapter():
    plain, model = two_adapters()
    x = x_input()
    lk.set_adapter(model, "b")
    y_b = model(x)
    assert lk.delete_adapter(model, "default") == ["0", "2", "5"]
    assert all(layer.held_adapters() == ["b"] and "inactive_adapters" not in layer._modules for layer in layers(model))
    torch.testing.assert_close(model(x), y_b, rtol=0, atol=0)
    # deleting the active adapter leaves the base layer running
    lk.inject(model, "lora", adapter_name="c", target_modules=["5"])
    lk.delete_adapter(model, "b")
    assert isinstance(model[0], nn.Conv2d) and not isinstance(model[0], lk.AdapterLayer)
    assert model[0].weight is not None and torch.equal(model[0].weight, plain[0].weight)
    assert model[5].held_adapters() == ["c"] and model[5].active_adapter is None
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# the weighted merge
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, first, second", [
    ("lora", dict(rank=2), dict(rank=3, alpha=5.0)),
    ("flora", dict(ranks=2, scale=1.5), dict(ranks=3, scale=0.5)),
])
def test_weighted_merge_of_additive_adapters_against_the_oracle(method, first, second):
    _, model = two_adapters(method, first, second)
    bases = [layer.weight.detach().clone() for layer in layers(model)]
    weights = {"default": 0.7, "b": -1.25}
    lk.merge(model, adapter_weights=weights)
    for layer, base in zip(layers(model), bases):
        assert layer.merged
        want = base + sum(w * oracle_delta(layer, n) for n, w in weights.items())
        assert rel_err(layer.weight, want) < 1e-13
    lk.unmerge(model)
    assert all(torch.equal(layer.weight, base) and not layer.merged for layer, base in zip(layers(model), bases))


def test_unload_after_a_weighted_merge_keeps_the_merged_weight():
    _, model = two_adapters()
    lk.merge(model, adapter_weights={"default": 0.5, "b": 0.5})
    merged = [layer.weight.detach().clone() for layer in layers(model)]
    y = model(x_input())
    plain = lk.unload(model, merge=True)
    assert not lk.adapter_layers(plain)
    assert all(torch.equal(plain[i].weight, w) for i, w in zip((0, 2, 5), merged))
    torch.testing.assert_close(plain(x_input()), y, rtol=0, atol=0)


def test_one_adapter_at_weight_one_merges_what_merge_does():
    _, model = two_adapters(dtype=torch.float32)
    reference = copy.deepcopy(model)
    lk.merge(reference)
    lk.merge(model, adapter_weights={"default": 1.0})
    for a, b in zip(layers(model), layers(reference)):
        assert torch.equal(a.weight, b.weight)


def test_weighted_merge_of_liera_and_layers_holding_none():
    plain = base_model()
    model = copy.deepcopy(plain)
    lk.inject(model, "liera", rank=2, alpha=3.0)
    lk.inject(model, "liera", adapter_name="b", rank=3, target_modules=["0", "2"])
    randomize_all(model)
    lk.merge(model, adapter_weights={"b": 0.5, "default": 2.0})
    for layer in layers(model)[:2]:
        exponent = sum(w * oracle_delta(layer, n) for n, w in (("b", 0.5), ("default", 2.0)))
        assert rel_err(layer.weight, layer.base_weight().to(F64) * torch.exp(exponent)) < 1e-13
    lk.unmerge(model)
    # the head holds only "default": merging "b" alone leaves it at W exactly
    lk.merge(model, adapter_weights={"b": 1.0})
    assert model[5].merged and torch.equal(model[5].weight, plain[5].weight)


def test_weighted_merge_refusals_change_nothing():
    model = base_model()
    lk.inject(model, "ssb")
    lk.inject(model, "ssb", adapter_name="b")
    snap = snapshot(model)
    with pytest.raises(lk.AdapterConfigError, match=r"SSBConv2d '0': a weighted merge of ssb adapters has no stated "
                                                    r"meaning.*Nothing was merged"):
        lk.merge(model, adapter_weights={"default": 0.5, "b": 0.5})
    assert_unchanged(model, snap)
    assert not any(layer.merged for layer in layers(model))
    mixed = base_model()
    lk.inject(mixed, "liera", mode="exp", target_modules=["0"])
    lk.inject(mixed, "liera", mode="first_order", adapter_name="b", target_modules=["0"])
    with pytest.raises(lk.AdapterConfigError, match=r"holds adapters of modes \['exp', 'first_order'\]"):
        lk.merge(mixed, adapter_weights={"default": 1.0, "b": 1.0})
    _, lora = two_adapters()
    for bad, error, match in [({"default": float("nan")}, lk.AdapterConfigError, "must be a finite real number"),
                              ({"c": 1.0}, lk.AdapterConfigError, "holds an adapter named 'c'"),
                              ({}, lk.AdapterTypeError, "non-empty mapping"),
                              (["default"], lk.AdapterTypeError, "non-empty mapping")]:
        with pytest.raises(error, match=match):
            lk.merge(lora, adapter_weights=bad)
    assert not any(layer.merged for layer in layers(lora))
    lk.merge(lora, adapter_weights={"b": 1.0})
    with pytest.raises(lk.AdapterConfigError, match="merged; unmerge first"):
        lk.merge(lora, adapter_weights={"b": 1.0})


# ----------------------------------------------------------------------------------------------
# disable_adapters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(lk.layers.LAYERS))
def test_disable_adapters_gives_the_base_model_bit_for_bit(method):
    plain = base_model(dtype=torch.float32)
    model = copy.deepcopy(plain)
    lk.inject(model, method)
    randomize_all(model)
    x = x_input(torch.float32).requires_grad_()
    adapted = model(x)
    with lk.disable_adapters(model):
        inside = model(x)
        inside.sum().backward()
        with lk.disable_adapters(model):  # nesting
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(inside, plain(x), rtol=0, atol=0)
    assert all(p.grad is None for layer in layers(model) for p in layer.adapter_parameters())
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
    assert not torch.equal(adapted, inside)  # the adapters do change the output: the check can fail
    # merged layers: the base weight their merge kept, and they stay merged
    lk.merge(model)
    with lk.disable_adapters(model):
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert all(layer.merged for layer in layers(model))
    assert rel_err(model(x), adapted) < 1e-5


# ----------------------------------------------------------------------------------------------
# save and load by name
# ----------------------------------------------------------------------------------------------
def test_save_and_load_by_name(tmp_path):
    plain, model = two_adapters(first=dict(rank=2), second=dict(rank=3))
    x = x_input()
    lk.save_adapters(model, tmp_path / "b", adapter_name="b")  # inactive: saved all the same
    lk.save_adapters(model, tmp_path / "default")
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert {e["adapter_name"] for e in config["layers"].values()} == {"b"}
    assert {e["kwargs"]["rank"] for e in config["layers"].values()} == {3}
    lk.set_adapter(model, "b")
    y_b = model(x)
    # into a plain model: the file's name, active
    fresh = copy.deepcopy(plain)
    lk.load_adapters(fresh, tmp_path / "b")
    assert all(layer.held_adapters() == ["b"] and layer.active_adapter == "b" for layer in layers(fresh))
    torch.testing.assert_close(fresh(x), y_b, rtol=0, atol=0)
    # a second file into the same model: added inactive under its name
    lk.load_adapters(fresh, tmp_path / "default")
    assert all(layer.held_adapters() == ["b", "default"] for layer in layers(fresh))
    torch.testing.assert_close(fresh(x), y_b, rtol=0, atol=0)
    lk.set_adapter(model, "default")
    lk.set_adapter(fresh, "default")
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # under another name, and in place into a held inactive adapter
    lk.load_adapters(fresh, tmp_path / "b", adapter_name="again")
    with torch.no_grad():
        for layer in layers(fresh):
            for t in layer.adapter_state_of("b").values():
                t.zero_()
    lk.load_adapters(fresh, tmp_path / "b")
    lk.set_adapter(fresh, "again")
    torch.testing.assert_close(fresh(x), y_b, rtol=0, atol=0)
    lk.set_adapter(fresh, "b")
    torch.testing.assert_close(fresh(x), y_b, rtol=0, atol=0)
    # a held name with another configuration, and another method, are refused before anything changes
    snap = snapshot(fresh)
    with pytest.raises(lk.AdapterFileError, match=r"has rank=3; adapter_config\.json has rank=2 for adapter 'b'"):
        lk.load_adapters(fresh, tmp_path / "default", adapter_name="b")
    flora = base_model()
    lk.inject(flora, "flora")
    lk.save_adapters(flora, tmp_path / "flora")
    with pytest.raises(lk.AdapterFileError, match=r"a LoRAConv2d in the model, an adapted Conv2d \(flora\).*one "
                                                   r"method"):
        lk.load_adapters(fresh, tmp_path / "flora", adapter_name="f")
    assert_unchanged(fresh, snap)
    with pytest.raises(lk.AdapterConfigError, match="holds an adapter named 'zzz'"):
        lk.save_adapters(fresh, tmp_path / "none", adapter_name="zzz")


# ----------------------------------------------------------------------------------------------
# trainable_summary
# ----------------------------------------------------------------------------------------------
def test_trainable_summary_counts():
    model = base_model(dtype=torch.float32)
    lk.inject(model, "lora", rank=2, target_modules=["0", "2"], trainable_modules=["5"])
    lk.inject(model, "lora", adapter_name="b", rank=4, target_modules=["0"])
    model[2].weight.requires_grad_(True)  # trained by hand
    summary = lk.trainable_summary(model)
    a0 = 2 * (27 + 8)
    a2 = 2 * (4 * 9 + 8)  # groups=2: A has in/groups * k columns
    b0 = 4 * (27 + 8)
    head = 200 * 4 + 4
    total = sum(p.numel() for p in model.parameters())
    assert total == (8 * 27 + 8) + (8 * 36 + 8) + head + a0 + a2 + b0
    assert summary.trainable == a0 + a2 + head + 8 * 36
    assert summary.total == total and summary.percent == pytest.approx(100 * summary.trainable / total)
    assert summary.adapters == (lk.summary.AdapterCount("default", "lora", 2, a0 + a2, a0 + a2, 2),
                                lk.summary.AdapterCount("b", "lora", 1, b0, 0, 0))
    assert summary.trained_in_full == (("5", head),) and summary.other_trainable == 8 * 36
    assert summary.by_method() == {"lora": a0 + a2 + b0}
    text = str(summary)
    assert text.splitlines()[0] == (f"trainable params: {summary.trainable:,} || all params: {total:,} || "
                                    f"trainable%: {summary.percent:.4f}")
    assert "trained in full" in text and "2 of 2" in text and "0 of 1" in text
    plain = lk.trainable_summary(base_model())
    assert plain.trainable == plain.total and plain.adapters == () and str(plain).splitlines()[-1].startswith("other")
