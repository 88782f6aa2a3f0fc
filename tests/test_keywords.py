"""What a first use gets wrong: PEFT's keywords, misspelt names, ranks too large for their layers.
Each error names our keyword or the closest existing names; an adapter larger than its layer warns
once, with the numbers, before anything is allocated."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from models import make_net
from test_bad_input import assert_unchanged, snapshot


def inject_refused(model, error, match, *args, **kwargs):
    snap = snapshot(model)
    with pytest.raises(error, match=match) as info:
        lk.inject(model, *args, **kwargs)
    assert_unchanged(model, snap)
    return str(info.value)


@pytest.mark.parametrize("method, kwargs, expected", [
    ("liera", dict(r=8, lora_alpha=16), [r"'r' \(PEFT's name; LieRA's is rank\)",
                                         r"'lora_alpha' \(PEFT's name; LieRA's is alpha \(scale = alpha / rank"]),
    ("flora", dict(r=4, lora_alpha=8, lora_dropout=0.1), [
        r"'r' \(PEFT's name; FLoRA's is ranks \(an int sets both channel modes",
        r"'lora_alpha' \(PEFT's name; FLoRA's is scale, the update's multiplier itself \(PEFT's lora_alpha / r\)",
        r"'lora_dropout' \(PEFT's name; here: dropout\)"]),
    ("ssb", dict(r=4), [r"'r' \(PEFT's name; the scalings have no rank\)"]),
    ("ssl", dict(modules_to_save=["head"]), [r"'modules_to_save' \(PEFT's name; here: inject\(\.\.\., "
                                            r"trainable_modules=\.\.\.\)\)"]),
    ("liera", dict(use_dora=True), [r"'use_dora' \(PEFT's name; no equivalent here\)"]),
], ids=["liera-r-alpha", "flora-r-alpha-dropout", "ssb-r", "modules_to_save", "use_dora"])
def test_peft_keywords_name_ours(method, kwargs, expected):
    message = inject_refused(make_net(), lk.AdapterTypeError, r"^module 'pre': ", method, **kwargs)
    for pattern in expected:
        assert pytest.importorskip("re").search(pattern, message), (pattern, message)


def test_peft_bias_keyword_and_geometry_keywords_are_refused_clearly():
    inject_refused(make_net(), lk.AdapterTypeError, r"from_module: 'bias' given, which come from the module .*"
                                                    r"PEFT's bias='none'\|'all'\|'lora_only' has no equivalent here",
                   "liera", bias="none")
    inject_refused(make_net(), lk.AdapterTypeError, r"from_module: 'in_channels' given", "ssl", in_channels=3)


def test_misspelt_keywords_name_the_closest_and_layers_name_theirs():
    inject_refused(make_net(), TypeError, r"unexpected keyword argument 'rnak'; closest: 'rank'", "liera", rnak=2)
    with pytest.raises(lk.AdapterTypeError, match=r"^LieRAConv2d: unexpected keyword argument 'r' \(PEFT's name; "
                                                  r"LieRA's is rank\)\. Its keywords: rank, alpha, mode, delta, "
                                                  r"dropout, strategy and nn\.Conv2d's$"):
        lk.LieRAConv2d(3, 4, 3, r=2)


@pytest.mark.parametrize("what, spec, match", [
    ("target_modules", ["conv"], r"target_modules entry 'conv' matched no module of Net; closest: 'conv2', 'conv1'$"),
    ("target_modules", ["blok.conv2"], r"closest: 'block\.conv2'"),
    ("target_modules", ["zzz"], r"matched no module of Net; the candidates are 'pre', 'block\.conv1', "
                                r"'block\.conv2', 'conv1', 'seq\.0', \.\.\. \(6 in all\)"),
    ("exclude_modules", ["haed"], r"exclude_modules entry 'haed' matched no module of Net; closest: 'head'"),
    ("trainable_modules", ["bn2"], r"trainable_modules entry 'bn2' matched no module of Net; closest: 'bn'"),
    ("target_modules", r"onv\d", r"regex 'onv\\\\d' matched no module of Net \(a regex matches whole dotted "
                                  r"names\); closest: "),
])
def test_names_that_match_nothing_list_the_closest(what, spec, match):
    inject_refused(make_net(), lk.AdapterConfigError, match, "ssl", **{what: spec})


def test_load_names_the_closest_module(tmp_path):
    model = make_net()
    lk.inject(model, "ssl", target_modules=["head"])
    lk.save_adapters(model, str(tmp_path))
    other = make_net()
    other.heads = other.head
    del other.head
    with pytest.raises(lk.AdapterFileError, match=r"layer 'head': no such module in Net; closest: 'heads'"):
        lk.load_adapters(other, str(tmp_path))


# ----------------------------------------------------------------------------------------------
# adapters larger than their layers
# ----------------------------------------------------------------------------------------------
def test_an_adapter_larger_than_its_layer_warns_with_the_numbers():
    with pytest.warns(lk.OversizedAdapterWarning, match=r"^LieRALinear \(rank=64\): 768 adapter numbers for 32 "
                                                        r"weights: the adapter trains more numbers than"):
        lk.LieRALinear(8, 4, rank=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.LieRALinear(8, 4, rank=2)  # 24 numbers for 32: nothing to say
        lk.SSBLinear(8, 4)


def test_inject_warns_once_for_every_oversized_layer_and_load_does_not(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(256, 256))
    with pytest.warns(lk.OversizedAdapterWarning) as caught:
        lk.inject(model, "liera", rank=64)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "2 adapter layers train more numbers than the weights they adapt hold: LieRALinear '0' (rank=64): 768 adapter "
        "numbers for 32 weights; LieRALinear '2' (rank=64): 512 adapter numbers for 16 weights. A lower rank, or "
        "training such a layer in full (trainable_modules), trains fewer")
    lk.save_adapters(model, str(tmp_path))
    fresh = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(256, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.load_adapters(fresh, str(tmp_path))
        lk.ranks_for_budget(nn.Sequential(nn.Linear(8, 4)), "liera", budget=10 ** 4)


def test_the_warning_as_an_error_refuses_before_allocating():
    """A rank that would need 48 GB: with the warning made an error, the layer is refused before
    its adapter is allocated (an allocation first would fail in the allocator, or take the memory),
    and inject leaves the model unchanged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=lk.OversizedAdapterWarning)
        with pytest.raises(lk.OversizedAdapterWarning, match=r"12000000000 adapter numbers for 32 weights"):
            lk.LieRALinear(8, 4, rank=10 ** 9)
        model = make_net()
        before = copy.deepcopy(model)
        snap = snapshot(model)
        with pytest.raises(lk.OversizedAdapterWarning):
            lk.inject(model, "liera", rank=10 ** 9)
        assert_unchanged(model, snap)
        assert str(model) == str(before)
