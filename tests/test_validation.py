"""Hyperparameters, input dtypes and the adapter dtype promise, for every one of the sixteen layer classes.

Each test runs one class and loops over every variant of its problem (a pytest case per variant
would cost more in collection than the checks themselves); a failure names the variant.
"""
from __future__ import annotations

import json
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from lrtensor_kernels.layers import LAYERS
from models import make_net
from oracle import forward64, randomize_adapter, rel_err
from test_bad_input import inject_fails

pytestmark = pytest.mark.usefixtures("reference_backend")

# (constructor args, input shape) of each nn base
GEOMETRY = {
    nn.Linear: ((4, 3), (2, 4)),
    nn.Conv1d: ((3, 4, 3), (2, 3, 6)),
    nn.Conv2d: ((3, 4, 3), (2, 3, 5, 5)),
    nn.Conv3d: ((2, 3, 2), (1, 2, 3, 4, 3)),
}
CLASSES = [(method, base, cls) for method, by_base in LAYERS.items() for base, cls in by_base.items()]
REAL_PARAM = {"flora": "scale", "lora": "alpha", "liera": "alpha"}  # the real-valued hyperparameter of each method


def classes(*methods):
    picked = [c for c in CLASSES if not methods or c[0] in methods]
    return pytest.mark.parametrize("method, base, cls", picked, ids=[c[2].__name__ for c in picked])


def build(cls, base, **kwargs):
    return cls(*GEOMETRY[base][0], **kwargs)


def modes(base) -> int:
    return 2 if base is nn.Linear else int(base.__name__[-2]) + 2


def refused(cls, base, match, **kwargs):
    """The constructor and from_module both raise AdapterConfigError; the plain module is untouched."""
    with pytest.raises(lk.AdapterConfigError, match=match) as info:
        build(cls, base, **kwargs)
    assert isinstance(info.value, ValueError)
    plain = base(*GEOMETRY[base][0])
    weight, before = plain.weight, plain.weight.detach().clone()
    with pytest.raises(lk.AdapterConfigError, match=match):
        cls.from_module(plain, **kwargs)
    assert plain.weight is weight and torch.equal(plain.weight, before)


# ----------------------------------------------------------------------------------------------
# class 1: hyperparameters
# ----------------------------------------------------------------------------------------------
BAD_REALS = [float("nan"), float("inf"), -float("inf"), 10**400, "abc", "1.5", True, [1.0], 1 + 1j,
             torch.tensor([1.0, 2.0]), torch.tensor(float("nan")), torch.tensor(True), torch.tensor(1 + 1j)]
GOOD_REALS = [2, -3, np.float32(1.5), np.float64(-0.25), np.int64(3), torch.tensor(1.5), torch.tensor(2),
              Fraction(3, 2), 1e-3, 0.0]


@classes("flora", "lora", "liera")
def test_real_hyperparameter(method, base, cls):
    name = REAL_PARAM[method]
    for value in BAD_REALS + ([None] if name == "alpha" else []):  # scale=None is the default scale
        refused(cls, base, rf"^{cls.__name__}: {name} must be a finite real number, got {re.escape(repr(value))}$",
                **{name: value})
    for value in GOOD_REALS:
        layer = build(cls, base, **{name: value})
        stored = getattr(layer, name)
        assert type(stored) is float and stored == float(value), value
        json.dumps(layer.adapter_config())  # numpy and torch scalars would not serialise


BAD_RANKS = [0, -1, 2.0, np.float64(2.0), True, np.bool_(True), torch.tensor(True), torch.tensor(2.0), "2", None,
             [2], torch.tensor([2, 2]), 1 + 0j]
GOOD_RANKS = [np.int64(2), np.int32(2), np.uint8(2), torch.tensor(2), torch.tensor(2, dtype=torch.int16)]


@classes("liera", "lora")
def test_lora_and_liera_rank(method, base, cls):
    for delta_kwargs in ([dict(delta="lora"), dict(delta="tucker")] if method == "liera" else [{}]):
        for value in BAD_RANKS:
            refused(cls, base, rf"^{cls.__name__}: rank must be an integer >= 1, got {re.escape(repr(value))}$",
                    rank=value, **delta_kwargs)
        for value in GOOD_RANKS:
            layer = build(cls, base, rank=value, **delta_kwargs)
            assert type(layer.rank) is int and layer.rank == 2 and layer.scale == 4.0, value
            json.dumps(layer.adapter_config())


@classes("flora")
def test_flora_ranks(method, base, cls):
    n = modes(base)
    bad = {
        0: "ranks must be an integer >= 1, got 0",
        2.0: r"ranks must be an integer >= 1, got 2\.0",
        True: "ranks must be an integer >= 1, got True",
        "3": "ranks must be an integer >= 1, got '3'",
        torch.tensor(True): r"ranks must be an integer >= 1, got tensor\(True\)",
        torch.tensor(2.0): r"ranks must be an integer >= 1, got tensor\(2\.\)",
    }
    for value, match in bad.items():
        refused(cls, base, rf"^{cls.__name__}: {match}$", ranks=value)
    refused(cls, base, rf"^{cls.__name__}: ranks must be an integer >= 1, got \{{2: 2\}}$", ranks={2: 2})
    for entry, shown in ((1.5, r"1\.5"), (True, "True"), (0, "0"), (-2, "-2"), ("2", "'2'"), (None, "None")):
        for ranks in ([2, entry] + [1] * (n - 2), (entry,) * n):
            refused(cls, base, rf"^{cls.__name__}: every entry of ranks must be an integer >= 1, got {shown}$",
                    ranks=ranks)
    for ranks in ([2], [2] * (n + 1), np.full(n + 1, 2), []):
        refused(cls, base, rf"^{cls.__name__}: ranks needs one entry per weight mode \(.*\) \({n} entries\), got ",
                ranks=ranks)
    for value in GOOD_RANKS:
        layer = build(cls, base, ranks=value)
        assert all(type(r) is int for r in layer.ranks) and layer.ranks[:2] == (2, 2), value
        for sequence in ([value] * n, np.full(n, 2), torch.full((n,), 2), tuple([value] * n), range(2, 2 + n)):
            assert build(cls, base, ranks=sequence).ranks == tuple(min(r, d) for r, d in zip(sequence, layer.weight.shape))
        json.dumps(layer.adapter_config())


BAD_DROPOUTS = [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.1", True, None, [0.1], torch.tensor([0.1, 0.2])]
GOOD_DROPOUTS = [0, np.float32(0.25), torch.tensor(0.25), Fraction(1, 4), 0.999]


@classes()
def test_dropout(method, base, cls):
    for value in BAD_DROPOUTS:
        refused(cls, base, rf"^{cls.__name__}: dropout must be in \[0, 1\), got {re.escape(repr(value))}$",
                dropout=value)
    for value in GOOD_DROPOUTS:
        layer = build(cls, base, dropout=value)
        assert type(layer.dropout) is float and layer.dropout == float(value), value
        json.dumps(layer.adapter_config())


@classes("liera")
def test_liera_mode_and_delta(method, base, cls):
    options = {"mode": r"\('exp', 'first_order'\)", "delta": r"\('lora', 'tucker'\)"}
    for name, value in [("mode", "EXP"), ("mode", None), ("mode", ["exp"]), ("mode", 1), ("delta", "LoRA"),
                        ("delta", None), ("delta", ("tucker",))]:
        refused(cls, base, rf"^{cls.__name__}: unknown {name} {re.escape(repr(value))}; expected one of "
                           rf"{options[name]}$", **{name: value})


@pytest.mark.parametrize("method, kwargs, match", [
    ("flora", dict(scale=float("nan")), r"^module 'pre': FLoRAConv3d: scale must be a finite real number, got nan$"),
    ("flora", dict(scale="abc"), r"^module 'pre': FLoRAConv3d: scale must be a finite real number, got 'abc'$"),
    ("liera", dict(alpha=float("inf")), r"^module 'pre': LieRAConv3d: alpha must be a finite real number, got inf$"),
    ("liera", dict(rank=2.0), r"^module 'pre': LieRAConv3d: rank must be an integer >= 1, got 2\.0$"),
    ("ssb", dict(dropout="0.1"), r"^module 'pre': SSBConv3d: dropout must be in \[0, 1\), got '0\.1'$"),
], ids=["flora-nan", "flora-str", "liera-inf", "liera-float-rank", "ssb-str-dropout"])
def test_inject_refuses_bad_hyperparameters_and_changes_nothing(method, kwargs, match):
    inject_fails(make_net(), lk.AdapterConfigError, match, method, **kwargs)


def test_inject_accepts_numpy_scalars():
    net = make_net()
    lk.inject(net, "liera", rank=np.int64(2), alpha=np.float32(4.0))
    assert all(layer.rank == 2 and layer.scale == 2.0 for _, layer in lk.adapter_layers(net))


# ----------------------------------------------------------------------------------------------
# class 2: input dtypes (nn's rule: the weight's dtype, or what autocast casts)
# ----------------------------------------------------------------------------------------------
def layer_and_input(cls, base, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = cls(*GEOMETRY[base][0], bias=bias, dtype=dtype)
    randomize_adapter(layer, seed + 1)
    x = torch.randn(GEOMETRY[base][1], dtype=torch.float64)
    return layer, x


def variants_of_layer(cls, base, weight_dtype=torch.float32):
    """The layer with and without bias, unmerged and merged."""
    for bias in (True, False):
        for merged in (False, True):
            layer, x = layer_and_input(cls, base, bias=bias)
            layer.to(weight_dtype)
            if merged:
                layer.merge()
            yield layer, x


@classes()
def test_non_floating_or_misplaced_input_refused(method, base, cls):
    for layer, x in variants_of_layer(cls, base):
        for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64):
            with pytest.raises(lk.AdapterTypeError, match=rf"^{cls.__name__}: expected a floating-point input, got "
                                                           rf"dtype {re.escape(str(dtype))}$"):
                layer((x.abs() * 3).to(dtype))
    with pytest.raises(lk.AdapterTypeError, match=rf"^{cls.__name__}: expected a tensor input, got list$"):
        layer(x.tolist())
    on_meta = cls(*GEOMETRY[base][0], device="meta")
    with pytest.raises(lk.AdapterTypeError, match=rf"^{cls.__name__}: input on cpu, weight on meta; move one of them$"):
        on_meta(x.float())


@classes()
def test_input_of_another_float_dtype_refused(method, base, cls):
    for weight_dtype, in_dtypes in [(torch.float32, (torch.float64, torch.float16, torch.bfloat16)),
                                    (torch.float64, (torch.float32,)), (torch.float16, (torch.float32,)),
                                    (torch.bfloat16, (torch.float16,))]:
        for layer, x in variants_of_layer(cls, base, weight_dtype):
            weight, merged = layer.weight.detach().clone(), layer.merged
            for in_dtype in in_dtypes:
                with pytest.raises(lk.AdapterTypeError, match=rf"^{cls.__name__}: input dtype "
                                   rf"{re.escape(str(in_dtype))} differs from the weight's "
                                   rf"{re.escape(str(weight_dtype))}; convert the input or the layer"):
                    layer(x.to(in_dtype))
            assert torch.equal(layer.weight, weight) and layer.merged == merged


@classes()
def test_autocast_takes_what_it_casts_and_refuses_float64_mismatch(method, base, cls):
    layer, x = layer_and_input(cls, base)
    ref = forward64(layer, x)
    for in_dtype in (torch.float32, torch.float16, torch.bfloat16):
        layer.unmerge()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.to(in_dtype))
            layer.merge()
            y_merged = layer(x.to(in_dtype))
        assert y.dtype == y_merged.dtype == torch.bfloat16, in_dtype
        assert rel_err(y, ref) < 2e-2 and rel_err(y_merged, ref) < 2e-2, in_dtype
    # autocast leaves float64 tensors alone, so nn's own layer fails on these; ours says why
    for weight_dtype, in_dtype in [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                   (torch.bfloat16, torch.float64)]:
        for layer, x in variants_of_layer(cls, base, weight_dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
                    lk.AdapterTypeError, match=rf"^{cls.__name__}: input dtype {re.escape(str(in_dtype))} differs "
                    rf"from the weight's {re.escape(str(weight_dtype))}, and autocast leaves float64"):
                layer(x.to(in_dtype))


# ----------------------------------------------------------------------------------------------
# class 7: adapter tensors stay at least float32 through dtype conversions
# ----------------------------------------------------------------------------------------------
CONVERSIONS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "to-f16": lambda m: m.to(torch.float16),
    "to-device-bf16": lambda m: m.to("cpu", torch.bfloat16),
    "to-kwarg-f16": lambda m: m.to(dtype=torch.float16),
    "apply-to-f16": lambda m: m._apply(lambda t: t.to(torch.float16) if t.is_floating_point() else t),
}


@classes()
def test_narrow_conversion_keeps_adapters_float32(method, base, cls):
    for start in (torch.float32, torch.float64):
        for name, convert in CONVERSIONS.items():
            layer, x = layer_and_input(cls, base, dtype=start)
            layer(x.to(start)).sum().backward()
            before = {k: (t.detach().clone(), t.grad.clone()) for k, t in layer.adapter_state().items()}
            weight = layer.weight.detach().clone()
            convert(layer)
            narrow = layer.weight.dtype
            assert narrow in (torch.float16, torch.bfloat16) and torch.equal(layer.weight, weight.to(narrow)), name
            for k, t in layer.adapter_state().items():
                value, grad = before[k]
                assert t.dtype == torch.float32 and t.grad.dtype == torch.float32, (name, start, k)
                # converted once from the original, not through 16 bits
                assert torch.equal(t, value.float()) and torch.equal(t.grad, grad.float()), (name, start, k)
            y = layer(x.to(narrow))
            assert y.dtype == narrow
            assert rel_err(y, forward64(layer, x)) < (5e-3 if narrow == torch.float16 else 3e-2), (name, start)
            layer.double()  # and back up: float64 beside a float64 weight
            assert {t.dtype for t in layer.adapter_state().values()} == {torch.float64}
            layer.float()
            assert {t.dtype for t in layer.adapter_state().values()} == {torch.float32}


@classes()
def test_to_empty_from_meta_keeps_adapter_dtype(method, base, cls):
    layer = cls(*GEOMETRY[base][0], device="meta", dtype=torch.float16)
    layer.to_empty(device="cpu")
    assert layer.weight.dtype == torch.float16 and layer.weight.device.type == "cpu"
    assert {p.dtype for p in layer.adapter_parameters()} == {torch.float32}


def test_injected_model_half_keeps_adapters_float32_and_merges():
    net = make_net()
    lk.inject(net, "flora")
    for i, (_, layer) in enumerate(lk.adapter_layers(net)):
        randomize_adapter(layer, i, std=0.2)
    x = torch.randn(3, 1, 2, 5, 5)
    y = net(x)
    net.half()
    assert {p.dtype for _, layer in lk.adapter_layers(net) for p in layer.adapter_parameters()} == {torch.float32}
    assert net.head.weight.dtype == torch.float16
    assert rel_err(net(x.half()), y) < 1e-2
    lk.merge(net)
    assert rel_err(net(x.half()), y) < 1e-2
