"""For users of the papers' code: every numeric point of the README's "Coming from the official code"
section, and the loaders of the official adapter state dicts, on synthetic state dicts built in the
official key layout. The official forwards are written here from their formulas (float64):

- FLoRA: ``y = layer(x) + op_zero_padded(dropout(x), scale * dW)``,
  ``dW[o, i, k..] = sum G[p, q, s..] U_in[i, p] U_out[o, q] U_k[k, s]..`` with ``G`` (r_in, r_out, r_k..);
- LieRA: ``y = F.linear(x, W, b) + dropout(x) @ (W * (B @ A * alpha / r)).T``.
"""
from __future__ import annotations

import copy
import math
import string
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrtensor_kernels as lk
from oracle import F64, rel_err
from test_serialization import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("reference_backend")

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ----------------------------------------------------------------------------------------------
# the official forwards, from their formulas
# ----------------------------------------------------------------------------------------------
def official_flora_delta(g, params):
    """dW (out, in, k..) from the official G (r_in, r_out, r_k..) and param_0 (in, r_in), param_1 (out, r_out), .."""
    n = g.dim()
    ranks, dims = string.ascii_lowercase[:n], string.ascii_lowercase[n:2 * n]
    spec = ranks + "," + ",".join(d + r for d, r in zip(dims, ranks)) + "->" + dims[1] + dims[0] + dims[2:]
    return torch.einsum(spec, g.to(F64), *[p.to(F64) for p in params])


def official_flora_forward(module, g, params, scale, x):
    delta = scale * official_flora_delta(g, params)
    if isinstance(module, nn.Linear):
        return module(x) + F.linear(x, delta)
    return module(x) + CONV[delta.dim() - 2](x, delta, None, module.stride, module.padding, module.dilation,
                                            module.groups)


def official_liera_forward(linear, a, b, alpha, x, dropped=None):
    scaling = alpha / a.shape[0]
    dropped = x if dropped is None else dropped
    return F.linear(x, linear.weight, linear.bias) + dropped @ (linear.weight * (b @ a * scaling)).T


def official_flora_state(prefix, in_dim, out_dim, kernel, ranks, seed):
    """param_G (r_in, r_out, r_k..) and param_0.. (dims [in, out, k..]) with random values, official keys."""
    g = torch.Generator().manual_seed(seed)
    dims = [in_dim, out_dim, *kernel]
    state = {f"{prefix}.flora_layer.param_G": 0.3 * torch.randn(ranks, generator=g)}
    for i, (d, r) in enumerate(zip(dims, ranks)):
        state[f"{prefix}.flora_layer.param_{i}"] = torch.randn(d, r, generator=g) / math.sqrt(d)
    state[f"{prefix}.base_layer.weight"] = torch.zeros(out_dim, in_dim, *kernel)  # ignored by the loader
    return state


def flora_parts(state, prefix):
    g = state[f"{prefix}.flora_layer.param_G"]
    params = [state[f"{prefix}.flora_layer.param_{i}"] for i in range(g.dim())]
    return g, params


# ----------------------------------------------------------------------------------------------
# LieRA: first_order is the official code; exp drifts from it
# ----------------------------------------------------------------------------------------------
def liera_state(prefix, in_f, out_f, rank, seed, b_std=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(rank, in_f)
    torch.manual_seed(seed)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return {f"{prefix}.lora_A": a, f"{prefix}.lora_B": b_std * torch.randn(out_f, rank, generator=g),
            f"{prefix}.weight": torch.zeros(out_f, in_f), f"{prefix}.bias": torch.zeros(out_f)}


def test_liera_first_order_reproduces_the_official_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)).to(F64)
    plain = copy.deepcopy(model)
    state = {**liera_state("0", 24, 16, 4, 1), **liera_state("2", 16, 8, 2, 2)}
    assert lk.load_official_liera(model, state, alpha=8.0) == ["0", "2"]
    assert type(model[0]) is lk.LieRALinear and (model[0].mode, model[0].delta, model[0].rank) == ("first_order",
                                                                                                   "lora", 4)
    x = torch.randn(5, 24, dtype=F64)
    h = official_liera_forward(plain[0], state["0.lora_A"].to(F64), state["0.lora_B"].to(F64), 8.0, x)
    expected = official_liera_forward(plain[2], state["2.lora_A"].to(F64), state["2.lora_B"].to(F64), 8.0,
                                      torch.relu(h))
    assert rel_err(model(x), expected) < 1e-13
    assert rel_err(model(x), plain(x)) > 1e-3  # the adapters act


def test_liera_first_order_dropout_is_the_official_two_branch_form():
    torch.manual_seed(0)
    linear = nn.Linear(12, 6).to(F64)
    state = liera_state("", 12, 6, 3, 4)
    state = {k.lstrip("."): v for k, v in state.items()}
    layer = lk.LieRALinear.from_module(copy.deepcopy(linear), rank=3, alpha=6.0, mode="first_order", dropout=0.5)
    with torch.no_grad():
        layer.lora_A.copy_(state["lora_A"])
        layer.lora_B.copy_(state["lora_B"])
    x = torch.randn(4, 12, dtype=F64)
    torch.manual_seed(7)
    got = layer.train()(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, True)
    expected = official_liera_forward(linear, state["lora_A"].to(F64), state["lora_B"].to(F64), 6.0, x, dropped)
    assert rel_err(got, expected) < 1e-13


def liera_drift(max_e, shape=(64, 64), rank=8, seed=0):
    """||adapter output of exp - that of first_order|| / ||that of first_order||, same tensors, E scaled to
    max|E| = max_e (adapter output: the layer's output less the frozen layer's)."""
    torch.manual_seed(seed)
    linear = nn.Linear(shape[1], shape[0]).to(F64)
    layers = {mode: lk.LieRALinear.from_module(linear, rank=rank, alpha=float(rank), mode=mode)
              for mode in ("exp", "first_order")}
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(shape[0], rank, generator=g, dtype=F64)
    a = layers["exp"].lora_A.detach().clone()
    b *= max_e / (b @ a).abs().max()  # alpha = rank: E = B @ A
    x = torch.randn(32, shape[1], generator=g, dtype=F64)
    outs = {}
    for mode, layer in layers.items():
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            outs[mode] = layer(x) - linear(x)
    e = (b @ a).abs().max().item()
    assert abs(e - max_e) < 1e-12
    return rel_err(outs["exp"], outs["first_order"])


# measured with liera_drift's setting (Linear 64x64, rank 8, kaiming-uniform A, Gaussian B); the README states them
MEASURED_DRIFT = {0.06: 0.0126, 0.83: 0.178}


@pytest.mark.parametrize("max_e", sorted(MEASURED_DRIFT))
def test_liera_exp_drift_from_first_order(max_e):
    drift = liera_drift(max_e)
    assert drift == pytest.approx(MEASURED_DRIFT[max_e], rel=0.02)
    # per element |expm1(E) - E| / |E| <= (e^m - 1 - m) / m for |E| <= m: the drift never exceeds that
    assert drift <= (math.exp(max_e) - 1 - max_e) / max_e
    # and it is first order in E: halving max|E| roughly halves it
    assert 0.4 < liera_drift(max_e / 2) / drift < 0.6


# ----------------------------------------------------------------------------------------------
# FLoRA: rank order, core transposition, clipped ranks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, in_dim, out_dim, kernel, ranks", [
    ("conv2d", 6, 10, (3, 3), (4, 5, 2, 2)),
    ("conv3d", 3, 4, (2, 3, 1), (2, 3, 2, 2, 1)),
    ("conv1d", 5, 7, (3,), (3, 2, 2)),  # the official code has no Conv1d; the same mapping holds
    ("linear", 12, 9, (), (5, 3)),
], ids=["conv2d", "conv3d", "conv1d", "linear"])
def test_flora_official_layout_loads_exactly(kind, in_dim, out_dim, kernel, ranks):
    torch.manual_seed(0)
    module = {"conv2d": lambda: nn.Conv2d(in_dim, out_dim, kernel, padding=1),
              "conv3d": lambda: nn.Conv3d(in_dim, out_dim, kernel),
              "conv1d": lambda: nn.Conv1d(in_dim, out_dim, kernel, padding=1),
              "linear": lambda: nn.Linear(in_dim, out_dim)}[kind]().to(F64)
    model = nn.Sequential(copy.deepcopy(module))
    state = official_flora_state("model.0", in_dim, out_dim, kernel, ranks, seed=3)
    assert lk.load_official_flora(model, state, scale=4.0) == ["0"]  # the wrapper's "model." prefix removed
    layer = model[0]
    # ours: (out, in, k..) ranks, the core with its first two modes swapped
    assert layer.ranks == (ranks[1], ranks[0], *ranks[2:])
    g, params = flora_parts(state, "model.0")
    assert torch.equal(layer.core.detach(), g.transpose(0, 1).to(F64))
    assert torch.equal(layer.factors[0].detach(), params[1].to(F64))
    assert torch.equal(layer.factors[1].detach(), params[0].to(F64))
    x = torch.randn(2, in_dim, *([6] * len(kernel)), dtype=F64) if kernel else torch.randn(3, in_dim, dtype=F64)
    expected = official_flora_forward(module, g, params, 4.0, x)
    assert rel_err(model(x), expected) < 1e-13
    assert rel_err(model(x), module(x)) > 1e-3


def test_flora_ranks_above_the_mode_size_are_folded():
    """Official nominal ranks [16, 16, 2, 2] on Conv2d(3, 8, 3): ours clip to (8, 3, 2, 2), the same weights."""
    torch.manual_seed(0)
    module = nn.Conv2d(3, 8, 3, padding=1).to(F64)
    model = nn.Sequential(copy.deepcopy(module))
    state = official_flora_state("0", 3, 8, (3, 3), (16, 16, 2, 2), seed=5)
    g, params = flora_parts(state, "0")
    official_count = g.numel() + sum(p.numel() for p in params)
    lk.load_official_flora(model, state, scale=4.0)
    layer = model[0]
    assert layer.ranks == (8, 3, 2, 2)
    ours = sum(p.numel() for p in layer.adapter_parameters())
    assert (official_count, ours) == (16 * 16 * 4 + 3 * 16 + 8 * 16 + 2 * 3 * 2, 8 * 3 * 4 + 8 * 8 + 3 * 3 + 2 * 3 * 2)
    # our layer built from the same nominal ranks has the same shapes: clipped ranks are the default rule
    assert lk.FLoRAConv2d(3, 8, 3, ranks=(16, 16, 2, 2)).ranks == (8, 3, 2, 2)
    delta = (layer.effective_weight() - module.weight) / 4.0
    assert rel_err(delta, official_flora_delta(g, params)) < 1e-13
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    assert rel_err(model(x), official_flora_forward(module, g, params, 4.0, x)) < 1e-13


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_padding_modes_official_branch_vs_ours(padding_mode):
    """The official branch zero-pads dW's conv whatever the padding mode; ours pads for W' as a whole,
    i.e. it is the plain layer on W' (what merge gives). Equal inside, different at the borders."""
    torch.manual_seed(0)
    module = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode).to(F64)
    model = nn.Sequential(copy.deepcopy(module))
    state = official_flora_state("0", 3, 4, (3, 3), (2, 2, 2, 2), seed=6)
    with pytest.warns(UserWarning, match=rf"layer '0' has padding_mode='{padding_mode}'; the official adapter branch"):
        lk.load_official_flora(model, state, scale=2.0)
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    ours = model(x)
    official = official_flora_forward(module, *flora_parts(state, "0"), 2.0, x)
    merged = copy.deepcopy(model)
    lk.merge(merged)
    assert rel_err(ours, merged(x)) < 1e-13
    assert rel_err(ours[..., 1:-1, 1:-1], official[..., 1:-1, 1:-1]) < 1e-13
    assert (ours - official).abs().amax(dim=(0, 1))[0].max() > 1e-3  # the border rows differ
    zeros = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1).to(F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.load_official_flora(zeros, state, scale=2.0)  # zero padding: no warning, and the same output
    plain = nn.Conv2d(3, 4, 3, padding=1).to(F64)
    plain.load_state_dict({k: v for k, v in zeros[0].state_dict().items() if k in ("weight", "bias")})
    assert rel_err(zeros(x), official_flora_forward(plain, *flora_parts(state, "0"), 2.0, x)) < 1e-13


# ----------------------------------------------------------------------------------------------
# loader checks: everything before any change
# ----------------------------------------------------------------------------------------------
def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 8, 1), nn.Flatten(), nn.Linear(8, 3))


def load_fails(loader, model, state, match, **kwargs):
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        loader(model, state, **kwargs)
    assert_unchanged(model, snap)


def test_official_flora_loader_errors():
    good = official_flora_state("2", 6, 8, (1, 1), (2, 2, 1, 1), seed=1)
    grouped = official_flora_state("0", 4, 6, (3, 3), (2, 2, 2, 2), seed=2)  # official dims use in_channels
    load_fails(lk.load_official_flora, small_net(), {**good, **grouped},
               r"layer '0': param_G \[2, 2, 2, 2\] and factors .* do not fit the weight \[6, 2, 3, 3\], which needs "
               r"factor rows \[2, 6, 3, 3\] \(in, out, k\.\.\.\) \(a conv with groups=2: the official code has none\)",
               scale=1.0)
    missing = {k: v for k, v in good.items() if not k.endswith("param_3")}
    load_fails(lk.load_official_flora, small_net(), missing, r"layer '2': tensors \['0', '1', '2', 'G'\], expected "
               r"param_\{G, 0, 1, 2, 3\}", scale=1.0)
    load_fails(lk.load_official_flora, small_net(), official_flora_state("5", 6, 8, (1, 1), (2, 2, 1, 1), 1),
               r"layer '5': no such module in Sequential", scale=1.0)
    load_fails(lk.load_official_flora, small_net(), official_flora_state("1", 6, 8, (1, 1), (2, 2, 1, 1), 1),
               r"layer '1': a ReLU in the model; expected Conv1d or Conv2d or Conv3d or Linear", scale=1.0)
    load_fails(lk.load_official_flora, small_net(), {"0.weight": torch.zeros(1)}, r"no adapter tensor in the state dict",
               scale=1.0)
    # and a good one loads, the other layers untouched
    model = small_net()
    assert lk.load_official_flora(model, good, scale=1.0) == ["2"]
    assert type(model[0]) is nn.Conv2d and type(model[2]) is lk.FLoRAConv2d


def test_official_liera_loader_errors():
    load_fails(lk.load_official_liera, small_net(), liera_state("4", 9, 3, 2, 1),
               r"layer '4': lora_A \[2, 9\] and lora_B \[3, 2\] do not fit Linear\(8, 3\): expected \[r, 8\] and "
               r"\[3, r\]", alpha=2.0)
    load_fails(lk.load_official_liera, small_net(), liera_state("2", 6, 8, 2, 1),
               r"layer '2': a Conv2d in the model; expected Linear", alpha=2.0)
    only_a = {k: v for k, v in liera_state("4", 8, 3, 2, 1).items() if k.endswith("lora_A")}
    load_fails(lk.load_official_liera, small_net(), only_a, r"layer '4': tensors \['lora_A'\], expected lora_A and "
               r"lora_B", alpha=2.0)
    model = small_net()
    assert lk.load_official_liera(model, liera_state("4", 8, 3, 2, 1), alpha=2.0) == ["4"]
    assert model[4].scale == 1.0 and {n for n, p in model.named_parameters() if p.requires_grad} == {
        "4.lora_A", "4.lora_B"}
