"""The benchmark's LoRA baselines (plain PyTorch, and the real PEFT and LyCORIS layers where they
are installed) against their oracles, and the bytes-kept figure of ``bench.timing`` against
tensors whose sizes are known."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from bench import external, suite, timing, verify

CTX = suite.Context(torch.device("cpu"), torch.float32)
CTX64 = suite.Context(torch.device("cpu"), torch.float64)  # the checks: the oracle's other route agrees to ~1e-15
CONV = suite.conv("test/3x3_12-10_9", 12, 10, 9, 2, bias=True)
STRIDED = suite.conv("test/3x3s2_8-8_10", 8, 8, 10, 2, stride=2)
DEPTHWISE = suite.conv("test/dw5x5_12_9", 12, 12, 9, 2, kernel=5, groups=12)
LINEAR = suite.linear("test/24-20_t7", 24, 20, 7, bias=True)
LORA_PROVIDERS = {"torch_lora": suite.setup_torch_lora, **external.SETUPS}


def _setup(name: str):
    package = external.PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (the 'compare' extra)")
    return LORA_PROVIDERS[name]


def _check(name: str, shape: suite.Shape) -> verify.Check:
    prepared = _setup(name)(shape, CTX64)
    return verify.check_provider(shape.name, name, prepared, *suite.make_inputs(shape, CTX64), torch.float64)


@pytest.mark.parametrize("shape", [CONV, STRIDED, LINEAR], ids=lambda s: s.name)
@pytest.mark.parametrize("name", list(LORA_PROVIDERS))
def test_lora_provider_matches_its_oracle(name, shape):
    check = _check(name, shape)
    assert check.status == "ok", check
    assert max(check.output, check.grad_input, check.grad_params) < 1e-12


@pytest.mark.parametrize("name", list(LORA_PROVIDERS))
def test_oracle_applies_the_scaling_the_bench_asked_for(name, monkeypatch):
    """A layer built with another alpha than the oracle's scaling is a mismatch: the oracle does
    not read the layer's own scaling."""
    _setup(name)
    monkeypatch.setattr(suite, "LORA_BASELINE_ALPHA", suite.LORA_BASELINE_ALPHA / 2)
    assert _check(name, CONV).status == "MISMATCH"


def test_peft_refuses_a_depthwise_layer_and_the_row_says_so():
    setup = _setup("peft_lora")
    with pytest.raises(suite.ProviderUnavailable, match="PEFT refuses this layer"):
        setup(DEPTHWISE, CTX64)


@pytest.mark.parametrize("name", ["lycoris_locon", "lycoris_locon:bypass", "torch_lora"])
def test_depthwise_layer_matches_its_oracle(name):
    check = _check(name, DEPTHWISE)
    assert check.status == "ok", check


@pytest.mark.parametrize("name, dense, depthwise", [
    ("lycoris_locon", "two_branch", "two_branch"),
    ("lycoris_locon:bypass", "bypass", "two_branch"),  # LyCORIS rebuilds the weight for a grouped conv
    ("peft_lora", "bypass", None),
    ("torch_lora", "bypass", "bypass"),
])
def test_strategy_column_says_what_ran(name, dense, depthwise):
    setup = _setup(name)
    x = suite.make_inputs(CONV, CTX)[0]
    assert setup(CONV, CTX).strategy_of(x) == dense
    if depthwise is not None:
        assert setup(DEPTHWISE, CTX).strategy_of(suite.make_inputs(DEPTHWISE, CTX)[0]) == depthwise


def test_external_providers_listed_only_where_installed(monkeypatch):
    monkeypatch.setattr(external, "_installed", lambda package: package == "peft")
    assert list(external.providers()) == ["peft_lora"]
    assert external.missing() == ["lycoris-lora"]
    providers = suite.providers_for(torch.device("cpu"), ("auto",), external.providers())
    assert list(providers)[:4] == ["frozen", "full_ft", "torch_lora", "peft_lora"]


# ---------------------------------------------------------------------------------------------
# bytes kept for backward
# ---------------------------------------------------------------------------------------------


def _kept(module, x) -> timing.KeptBytes:
    return timing.kept_for_backward(timing.Step(module, x, None, []))


def test_frozen_layer_keeps_its_input_and_weight():
    conv = nn.Conv2d(6, 5, 3).requires_grad_(False)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    kept = _kept(conv, x)
    assert kept.saved == x.nbytes + conv.weight.nbytes
    assert kept.saved_beyond_inputs == 0 and kept.held == 0
    linear = nn.Linear(6, 5).requires_grad_(False)  # saves a transposed view of the weight, not the Parameter
    kept = _kept(linear, torch.randn(3, 6, requires_grad=True))
    assert kept.saved == linear.weight.nbytes and kept.saved_beyond_inputs == 0


class _Hidden(torch.autograd.Function):
    """Keeps a tensor for its backward on ``ctx`` instead of ``save_for_backward``."""

    @staticmethod
    def forward(ctx, x):
        ctx.twice = x * 2
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.twice / ctx.twice


def test_memory_kept_outside_autograd_is_found():
    x = torch.randn(4, 50, requires_grad=True)
    kept = _kept(_Hidden.apply, x)
    assert kept.saved == 0  # saved_tensors_hooks alone do not see it
    assert kept.held == x.nbytes
    assert _kept(lambda t: t * 2, x).held == 0  # an output is not counted as held


def test_a_weight_sized_tensor_kept_for_backward_shows():
    # 128 channels: bypass keeps the chain's factors (M and scale * U_1, rank 8: 1/8 of this weight
    # together), which at 64 channels come to a quarter of the weight without being weight-sized
    shape = suite.linear("test/128-128_t4", 128, 128, 4)
    x, grad = suite.make_inputs(shape, CTX)
    weight_bytes = 128 * 128 * 4
    merged = suite.setup_reference(shape, CTX, "flora", "merged")
    bypass = suite.setup_reference(shape, CTX, "flora", "bypass")
    assert timing.kept_for_backward(timing.Step(merged.forward, x, grad, merged.trainable)).saved_beyond_inputs \
        >= weight_bytes
    assert timing.kept_for_backward(timing.Step(bypass.forward, x, grad, bypass.trainable)).saved_beyond_inputs \
        < weight_bytes / 4
