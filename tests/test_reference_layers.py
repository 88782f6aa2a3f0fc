"""Every adapter layer x method x geometry x dtype against the float64 oracle (reference backend, CPU).

Outputs and every gradient (input, base weight, bias and each adapter tensor) are compared with
float64 autograd through formulas written in this file from explicit float64 leaf tensors; the
package's own math (``lrtensor_kernels.methods``) is never used for expected values.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lrtensor_kernels as lk
from forms import chain_form, flora_strategies, strategy_and_form
from oracle import F64, effective_weight64, forward64, randomize_adapter, rel_err, tucker64

pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
              pytest.mark.usefixtures("reference_backend")]

# ----------------------------------------------------------------------------------------------
# the matrix
# ----------------------------------------------------------------------------------------------
# (id, nn base class, constructor kwargs, input shape)
GEOMETRIES = [
    ("linear", nn.Linear, dict(in_features=5, out_features=4), (3, 5)),
    ("linear-3d-input", nn.Linear, dict(in_features=5, out_features=4), (2, 3, 5)),
    ("linear-1d-input", nn.Linear, dict(in_features=6, out_features=3), (6,)),
    ("linear-nobias", nn.Linear, dict(in_features=6, out_features=7, bias=False), (4, 6)),
    ("conv1d", nn.Conv1d, dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 7)),
    ("conv1d-stride2-pad1-dil2", nn.Conv1d,
     dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, dilation=2), (2, 3, 7)),
    ("conv1d-unbatched", nn.Conv1d, dict(in_channels=3, out_channels=5, kernel_size=2, padding=1), (3, 6)),
    ("conv1d-circular", nn.Conv1d,
     dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"), (2, 2, 6)),
    ("conv1d-same-even-k", nn.Conv1d, dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"), (2, 3, 7)),
    ("conv2d", nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 6, 6)),
    ("conv2d-stride-tuplepad", nn.Conv2d,
     dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)), (2, 3, 7, 5)),
    ("conv2d-same-dil", nn.Conv2d,
     dict(in_channels=3, out_channels=4, kernel_size=(2, 3), padding="same", dilation=(1, 2)), (2, 3, 6, 7)),
    ("conv2d-valid", nn.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"), (2, 2, 5, 6)),
    ("conv2d-groups2", nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
     (2, 4, 5, 5)),
    ("conv2d-depthwise", nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding=1),
     (2, 4, 5, 5)),
    ("conv2d-nobias", nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, bias=False), (2, 3, 5, 5)),
    ("conv2d-1x1", nn.Conv2d, dict(in_channels=5, out_channels=6, kernel_size=1), (2, 5, 4, 4)),
    ("conv2d-reflect", nn.Conv2d,
     dict(in_channels=3, out_channels=4, kernel_size=3, padding=(1, 2), padding_mode="reflect"), (2, 3, 5, 6)),
    ("conv2d-replicate-stride", nn.Conv2d,
     dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, padding_mode="replicate"),
     (2, 3, 6, 5)),
    ("conv2d-circular-same", nn.Conv2d,
     dict(in_channels=2, out_channels=4, kernel_size=3, padding="same", padding_mode="circular"), (2, 2, 5, 5)),
    ("conv2d-unbatched", nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (3, 5, 5)),
    ("conv3d", nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 2), padding=1), (2, 2, 4, 5, 4)),
    ("conv3d-replicate-stride", nn.Conv3d,
     dict(in_channels=2, out_channels=4, kernel_size=3, stride=(1, 2, 1), padding=1, padding_mode="replicate"),
     (1, 2, 4, 5, 4)),
    ("conv3d-depthwise-unbatched", nn.Conv3d,
     dict(in_channels=3, out_channels=3, kernel_size=2, groups=3), (3, 4, 3, 4)),
]
GEOM_IDS = [g[0] for g in GEOMETRIES]

# (id, class prefix, constructor kwargs)
METHODS = [
    ("flora-default", "FLoRA", {}),
    ("flora-r2-s1.5", "FLoRA", dict(ranks=2, scale=1.5)),
    ("lora-default", "LoRA", {}),
    ("lora-r3-a6", "LoRA", dict(rank=3, alpha=6.0)),
    ("liera-exp-lora", "LieRA", dict(mode="exp", delta="lora", rank=3, alpha=6.0)),
    ("liera-first_order-lora", "LieRA", dict(mode="first_order", delta="lora", rank=3, alpha=6.0)),
    ("liera-exp-tucker", "LieRA", dict(mode="exp", delta="tucker", rank=2, alpha=3.0)),
    ("liera-first_order-tucker", "LieRA", dict(mode="first_order", delta="tucker", rank=2, alpha=3.0)),
    ("ssl", "SSL", {}),
    ("ssb", "SSB", {}),
]
METHOD_IDS = [m[0] for m in METHODS]


def applicable_strategies(method) -> tuple:
    """The strategies that can run ``method`` (bypass: FLoRA, LoRA, SSL, SSB; hybrid: FLoRA, LoRA),
    FLoRA's chain strategies in both forms (tests/forms.py)."""
    if method[1] == "FLoRA":
        return tuple(flora_strategies())
    if method[1] == "LoRA":
        return ("merged", "two_branch", "bypass", "hybrid")
    return ("merged", "two_branch", "bypass") if method[1] in ("SSL", "SSB") else ("merged", "two_branch")


# every method with every strategy that can run it
METHOD_STRATEGIES = [pytest.param(m, st, id=f"{m[0]}-{st}") for m in METHODS for st in applicable_strategies(m)]


SUFFIX = {nn.Linear: "Linear", nn.Conv1d: "Conv1d", nn.Conv2d: "Conv2d", nn.Conv3d: "Conv3d"}

# relative error tolerances against float64, for outputs and gradients
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def adapter_class(prefix: str, base: type) -> type:
    return getattr(lk, prefix + SUFFIX[base])


def build(geom, method, dtype, seed=0, randomize=True, strategy="auto"):
    """The adapter layer of ``method`` with ``geom``'s geometry in ``dtype`` (float16/bfloat16 by
    ``.to(dtype)`` of a float32 layer), with random (non-zero) adapter tensors."""
    _, base, kwargs, _ = geom
    _, prefix, mkwargs = method
    torch.manual_seed(seed)
    build_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    layer = adapter_class(prefix, base)(**kwargs, **mkwargs, dtype=build_dtype, strategy=strategy)
    if build_dtype != dtype:
        layer = layer.to(dtype)
    if randomize:
        randomize_adapter(layer, seed + 1)
    return layer


def random_input(shape, dtype, seed=123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


# ----------------------------------------------------------------------------------------------
# the differentiable float64 oracle, from explicit leaf tensors
# ----------------------------------------------------------------------------------------------
def oracle_weight(layer, w, t):
    """W' in float64 from the base weight ``w`` and adapter tensors ``t`` (name -> float64 tensor),
    straight from the formulas; ``layer`` only supplies the configuration (scale, mode, delta)."""
    if isinstance(layer, lk.layers.FLoRAMixin):
        return w + layer.scale * tucker64(t["core"], [t[f"factors.{i}"] for i in range(w.dim())])
    if isinstance(layer, lk.layers.LoRAMixin):
        return w + layer.scale * (t["lora_B"] @ t["lora_A"]).reshape(w.shape)
    if isinstance(layer, lk.layers.LieRAMixin):
        if layer.delta == "tucker":
            d = tucker64(t["core"], [t[f"factors.{i}"] for i in range(w.dim())])
        else:
            d = (t["lora_B"] @ t["lora_A"]).reshape(w.shape)
        e = layer.scale * d
        return w * torch.exp(e) if layer.mode == "exp" else w * (1 + e)
    if isinstance(layer, lk.layers.SSBMixin):
        rest = (1,) * (w.dim() - 2)
        return t["out_scale"].reshape((-1, 1) + rest) * w * t["in_scale"].reshape((1, -1) + rest)
    if isinstance(layer, lk.layers.SSLMixin):
        return w * t["in_scale"].reshape((1, -1) + (1,) * (w.dim() - 2))
    raise TypeError(type(layer))


def oracle_leaves(layer):
    """Float64 leaf copies of the layer's base weight, bias and adapter tensors."""
    w = layer.weight.detach().to(F64).requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().to(F64).requires_grad_()
    t = {k: v.detach().to(F64).requires_grad_() for k, v in layer.adapter_state().items()}
    return w, b, t


def oracle_forward(geom, layer, x64, w, b, t):
    """The float64 output through a plain nn twin (nn's own padding/geometry logic) holding W'."""
    _, base, kwargs, _ = geom
    twin = base(**kwargs, dtype=F64, device="meta")
    params = {"weight": oracle_weight(layer, w, t)}
    if b is not None:
        params["bias"] = b
    return functional_call(twin, params, (x64,))


# ----------------------------------------------------------------------------------------------
# output and every gradient against the oracle
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("method, strategy", METHOD_STRATEGIES)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOM_IDS)
def test_output_and_gradients_match_oracle(geom, method, strategy, dtype):
    """Every strategy, with the base weight and bias made trainable again (the frozen default is
    the same computation without their gradients; test_strategies checks it)."""
    strategy, form = strategy_and_form(strategy)
    with lk.use_backend("reference"), chain_form(form):
        layer = build(geom, method, dtype, strategy=strategy)
        layer.weight.requires_grad_(True)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
        x = random_input(geom[3], dtype).requires_grad_()
        y = layer(x)
        g = random_input(y.shape, dtype, seed=7)
        (y * g).sum().backward()

    x64 = x.detach().to(F64).requires_grad_()
    w, b, t = oracle_leaves(layer)
    y64 = oracle_forward(geom, layer, x64, w, b, t)
    (y64 * g.to(F64)).sum().backward()

    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == y64.shape
    assert rel_err(y, y64) <= tol, f"output: {rel_err(y, y64):.2e}"
    # the independent oracle of tests/oracle.py agrees with this file's leaf-tensor oracle
    assert rel_err(forward64(layer, x.detach()), y64) <= 1e-12
    assert rel_err(x.grad, x64.grad) <= tol, "grad x"
    assert rel_err(layer.weight.grad, w.grad) <= tol, "grad weight"
    if b is not None:
        assert rel_err(layer.bias.grad, b.grad) <= tol, "grad bias"
    state = layer.adapter_state()
    assert sorted(state) == sorted(t) and len(state) >= 1
    conditioning = adapter_grad_conditioning(geom, layer, x64, g) if strategy in ("bypass", "hybrid") and dtype in (
        torch.float16, torch.bfloat16) else {}
    for name, p in state.items():
        assert p.grad is not None, f"no gradient for {name}"
        assert p.grad.dtype == p.dtype
        bound = tol * conditioning.get(name, 1.0)
        assert rel_err(p.grad, t[name].grad) <= bound, f"grad {name}: {rel_err(p.grad, t[name].grad):.2e} > {bound:.1e}"


def adapter_grad_conditioning(geom, layer, x64, g) -> dict:
    """Per adapter tensor, the condition number ``||gradient of the absolute values|| / ||gradient||``
    (at least 1) of its float64 gradient: the factor by which cancellation in the gradient's sums
    amplifies rounding. The bypass and hybrid strategies reduce over activations rounded to the op's
    16-bit dtype (merged reduces over the weight gradient, accumulated in float32), so in 16-bit
    dtypes their adapter gradients are held to the dtype's tolerance times this number."""
    grads = []
    for absolute in (False, True):
        w, b, t = oracle_leaves(layer)
        leaves = {n: (v.detach().abs().requires_grad_() if absolute else v) for n, v in t.items()}
        inp = x64.detach().abs() if absolute else x64.detach()
        weight = w.detach().abs() if absolute else w.detach()
        bias = None if b is None else (b.detach().abs() if absolute else b.detach())
        out = oracle_forward(geom, layer, inp, weight, bias, leaves)
        grads.append(torch.autograd.grad((out * (g.to(F64).abs() if absolute else g.to(F64))).sum(),
                                         list(leaves.values())))
    names = list(layer.adapter_state())
    return {n: max(1.0, (m.norm() / r.norm().clamp_min(1e-300)).item()) for n, r, m in zip(names, *grads)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("geom", [g for g in GEOMETRIES if g[0] in ("linear", "conv2d-depthwise", "conv3d")],
                         ids=lambda g: g[0])
def test_effective_weight_matches_oracle(geom, method, dtype):
    layer = build(geom, method, dtype)
    got = layer.effective_weight()
    assert got.dtype == dtype and got.shape == layer.weight.shape
    assert rel_err(got, effective_weight64(layer)) <= TOL[dtype]


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("limit", [lk.methods.KRONECKER_LIMIT, 0], ids=["kronecker", "mode_by_mode"])
@pytest.mark.parametrize("core_shape", [(16, 16, 2, 2), (4, 5, 3), (4, 5, 1, 1), (3, 4, 2, 3, 2), (6, 7), (2, 3, 4, 1, 2),
                                        (1, 1, 2, 2)])
def test_tucker_product_of_any_trailing_modes_matches_einsum(core_shape, limit, transposed, monkeypatch):
    """``core x_m U_m`` over the modes from every first mode on, the trailing ones contracted at once
    with their Kronecker product or one by one, against an einsum in float64; factors contiguous or
    transposed views (as the gradient formulas pass them)."""
    monkeypatch.setattr(lk.methods, "KRONECKER_LIMIT", limit)
    g = torch.Generator().manual_seed(len(core_shape))
    core = torch.randn(core_shape, generator=g, dtype=F64)
    sizes = [3, 9, 1, 5, 2]
    full = [torch.randn(r, d, generator=g, dtype=F64).t() if transposed else torch.randn(d, r, generator=g, dtype=F64)
            for d, r in zip(sizes, core_shape)]
    for first in range(len(core_shape)):
        factors = [torch.eye(r, dtype=F64) for r in core_shape[:first]] + full[first:]
        got = lk.tucker_product(core, full[first:], first_mode=first)
        torch.testing.assert_close(got, tucker64(core, factors), rtol=1e-12, atol=1e-12)


def test_reference_backend_is_selectable_on_cpu():
    """"auto" picks the native backend on the CPU where it builds (tests/test_native_build.py);
    the reference path stays selectable."""
    with lk.use_backend("reference"):
        assert lk.get_backend() == "reference"
        assert lk.backend.resolve(torch.device("cpu")) == "reference"


# ----------------------------------------------------------------------------------------------
# gradcheck with the adapter tensors (and the input) as the inputs
# ----------------------------------------------------------------------------------------------
GRADCHECK_GEOMS = [
    ("linear", nn.Linear, dict(in_features=3, out_features=2), (2, 3)),
    ("conv1d-reflect-stride", nn.Conv1d,
     dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1, padding_mode="reflect"), (1, 2, 5)),
    ("conv2d-groups", nn.Conv2d, dict(in_channels=2, out_channels=2, kernel_size=2, groups=2, padding=1),
     (1, 2, 3, 3)),
    ("conv3d", nn.Conv3d, dict(in_channels=1, out_channels=2, kernel_size=2), (1, 1, 3, 2, 3)),
]


@pytest.mark.parametrize("method, strategy", METHOD_STRATEGIES)
@pytest.mark.parametrize("geom", GRADCHECK_GEOMS, ids=lambda g: g[0])
def test_gradcheck(geom, method, strategy):
    strategy, form = strategy_and_form(strategy)
    layer = build(geom, method, torch.float64, strategy=strategy)
    names = list(layer.adapter_state())
    x = random_input(geom[3], F64).requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() for p in layer.adapter_state().values())

    def fn(inp, *tensors):
        with lk.use_backend("reference"), chain_form(form):
            return functional_call(layer, dict(zip(names, tensors)), (inp,))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------------------------
# fresh layers, defaults, initialisation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("method, strategy", METHOD_STRATEGIES)
@pytest.mark.parametrize("geom", [g for g in GEOMETRIES if g[0] in
                                  ("linear-3d-input", "conv1d-circular", "conv2d-same-dil", "conv2d-depthwise",
                                   "conv3d-replicate-stride", "conv2d-unbatched")], ids=lambda g: g[0])
def test_fresh_layer_equals_plain_layer_exactly(geom, method, strategy, dtype):
    """A freshly built layer (zero core / zero lora_B / unit scales) computes the plain layer bit for bit,
    both when constructed directly (same seed) and via from_module, whatever the strategy."""
    strategy, form = strategy_and_form(strategy)
    _, base, kwargs, shape = geom
    torch.manual_seed(5)
    plain = base(**kwargs, dtype=dtype)
    torch.manual_seed(5)
    layer = adapter_class(method[1], base)(**kwargs, **method[2], dtype=dtype, strategy=strategy)
    assert torch.equal(layer.weight, plain.weight)
    x = random_input(shape, dtype)
    with lk.use_backend("reference"), chain_form(form):
        assert torch.equal(layer(x), plain(x))
        wrapped = adapter_class(method[1], base).from_module(plain, **method[2], strategy=strategy)
        assert torch.equal(wrapped(x), plain(x))
    # and a random adapter makes a difference (the check above can fail)
    randomize_adapter(wrapped, 3)
    assert not torch.allclose(wrapped(x).float(), plain(x).float())


def test_flora_conv_default_ranks_and_scale():
    layer = lk.FLoRAConv2d(32, 24, 3)
    assert layer.ranks == (16, 16, 2, 2)
    assert layer.scale == 4.0
    assert tuple(layer.core.shape) == (16, 16, 2, 2)
    assert [tuple(u.shape) for u in layer.factors] == [(24, 16), (32, 16), (3, 2), (3, 2)]
    assert lk.FLoRAConv1d(20, 20, 5).ranks == (16, 16, 2)
    assert lk.FLoRAConv3d(20, 20, (1, 2, 3)).ranks == (16, 16, 1, 2, 2)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(in_channels=8, out_channels=8, kernel_size=3, groups=8), (8, 1, 2, 2)),  # depthwise: in/groups = 1
    (dict(in_channels=4, out_channels=6, kernel_size=1), (6, 4, 1, 1)),  # 1x1: kernel ranks 1, channels clipped
    (dict(in_channels=32, out_channels=3, kernel_size=(1, 5)), (3, 16, 1, 2)),
    (dict(in_channels=6, out_channels=20, kernel_size=3, groups=2), (16, 3, 2, 2)),
], ids=["depthwise", "1x1", "k1x5", "groups2"])
def test_flora_conv_default_ranks_clipped(kwargs, expected):
    layer = lk.FLoRAConv2d(**kwargs)
    assert layer.ranks == expected
    assert tuple(layer.core.shape) == expected
    assert [tuple(u.shape) for u in layer.factors] == [(d, r) for d, r in zip(layer.weight.shape, expected)]


def test_flora_linear_defaults():
    layer = lk.FLoRALinear(40, 30)
    assert layer.ranks == (8, 8) and layer.scale == 2.0
    assert [tuple(u.shape) for u in layer.factors] == [(30, 8), (40, 8)]
    assert lk.FLoRALinear(5, 3).ranks == (3, 5)


@pytest.mark.parametrize("ranks, expected", [
    (4, (4, 4, 2, 2)),
    (100, (8, 6, 2, 2)),
    ((2, 3, 1, 3), (2, 3, 1, 3)),
    ([5, 1, 2, 1], (5, 1, 2, 1)),
    ((100, 100, 100, 100), (8, 6, 3, 3)),
], ids=["int", "int-clipped", "tuple", "list", "tuple-clipped"])
def test_flora_explicit_ranks(ranks, expected):
    layer = lk.FLoRAConv2d(6, 8, 3, ranks=ranks, scale=0.5)
    assert layer.ranks == expected
    assert tuple(layer.core.shape) == expected
    assert layer.scale == 0.5


def test_flora_init_statistics():
    layer = lk.FLoRALinear(3000, 2500, ranks=8)
    assert torch.count_nonzero(layer.core) == 0
    for u in layer.factors:
        expected = math.sqrt(0.5 / 8)
        assert abs(u.std().item() - expected) < 0.03 * expected
        assert abs(u.mean().item()) < 0.03 * expected
    conv = lk.FLoRAConv2d(128, 96, 3)
    for u in list(conv.factors)[:2]:
        expected = math.sqrt(0.5 / u.shape[1])
        assert abs(u.std().item() - expected) < 0.1 * expected


def test_liera_init_and_scale():
    layer = lk.LieRAConv2d(16, 12, 3, rank=8, alpha=4.0)
    n = 16 * 9
    assert layer.scale == 0.5
    assert tuple(layer.lora_A.shape) == (8, n) and tuple(layer.lora_B.shape) == (12, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(n)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3), bound sqrt(3) * gain / sqrt(fan_in)
    assert layer.lora_A.abs().max().item() <= bound
    assert layer.lora_A.abs().max().item() > 0.95 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.06 * bound
    default = lk.LieRALinear(10, 7)
    assert (default.rank, default.alpha, default.scale, default.mode, default.delta) == (8, 8.0, 1.0, "exp", "lora")
    tucker = lk.LieRAConv2d(6, 4, 3, rank=5, alpha=2.5, delta="tucker", mode="first_order")
    assert tucker.ranks == (4, 5, 2, 2) and tucker.scale == 0.5
    assert torch.count_nonzero(tucker.core) == 0


def test_scaling_init():
    ssl = lk.SSLConv2d(6, 4, 3, groups=2)
    assert tuple(ssl.in_scale.shape) == (3,) and torch.equal(ssl.in_scale, torch.ones(3))
    assert not hasattr(ssl, "out_scale")
    ssb = lk.SSBLinear(5, 7)
    assert torch.equal(ssb.in_scale, torch.ones(5)) and torch.equal(ssb.out_scale, torch.ones(7))


@pytest.mark.parametrize("dtype, adapter_dtype", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64),
], ids=["f16", "bf16", "f32", "f64"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_adapter_dtype(method, dtype, adapter_dtype):
    direct = adapter_class(method[1], nn.Conv2d)(3, 4, 3, dtype=dtype, **method[2])
    wrapped = adapter_class(method[1], nn.Linear).from_module(nn.Linear(3, 4, dtype=dtype), **method[2])
    for layer in (direct, wrapped):
        assert layer.weight.dtype == dtype
        assert {p.dtype for p in layer.adapter_parameters()} == {adapter_dtype}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("base, args", [(nn.Conv2d, (3, 4, 3)), (nn.Linear, (3, 4)), (nn.Conv1d, (2, 2, 1))],
                         ids=["conv2d", "linear", "conv1d"])
def test_from_module_shares_weight_and_mode(base, args, method, training):
    plain = base(*args)
    plain.train(training)
    layer = adapter_class(method[1], base).from_module(plain, **method[2])
    assert layer.weight is plain.weight and layer.bias is plain.bias
    assert layer.weight.data_ptr() == plain.weight.data_ptr()
    assert layer.training is training
    assert type(layer) is adapter_class(method[1], base)
    assert isinstance(layer, base)


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------
DROPOUT_GEOMS = [
    ("linear", nn.Linear, dict(in_features=6, out_features=5), (8, 6)),
    ("conv2d-pad1", nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (4, 3, 5, 5)),
    ("conv1d-stride", nn.Conv1d, dict(in_channels=3, out_channels=2, kernel_size=3, stride=2), (4, 3, 7)),
]


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("geom", DROPOUT_GEOMS, ids=lambda g: g[0])
def test_dropout_train_mode(geom, method):
    """train: y = op(x, W, b) + op(dropout(x), W' - W), with the mask reproduced from the seed."""
    _, base, kwargs, shape = geom
    torch.manual_seed(0)
    layer = adapter_class(method[1], base)(**kwargs, **method[2], dropout=0.4)
    randomize_adapter(layer, 1)
    layer.train()
    x = random_input(shape, torch.float32)
    with lk.use_backend("reference"):
        torch.manual_seed(42)
        y = layer(x)
    torch.manual_seed(42)
    mask = F.dropout(torch.ones_like(x), 0.4, True)  # the same draw as dropout(x): values 0 or 1/(1-p)
    assert 0 < torch.count_nonzero(mask) < mask.numel()

    twin = base(**kwargs, dtype=F64, device="meta")
    w64, w_eff = layer.weight.detach().to(F64), effective_weight64(layer)
    bias = {} if layer.bias is None else {"bias": layer.bias.detach().to(F64)}
    frozen = functional_call(twin, {"weight": w64, **bias}, (x.to(F64),))
    twin_nobias = base(**{**kwargs, "bias": False}, dtype=F64, device="meta")
    update = functional_call(twin_nobias, {"weight": w_eff - w64}, ((x * mask).to(F64),))
    assert rel_err(y, frozen + update) <= 1e-5
    # without the mask the result would differ (the check can fail)
    assert rel_err(y, forward64(layer, x)) > 1e-3

    # eval: exactly the no-dropout layer
    layer.eval()
    no_dropout = copy.deepcopy(layer)
    no_dropout.dropout = 0.0
    with lk.use_backend("reference"):
        assert torch.equal(layer(x), no_dropout(x))
        assert rel_err(layer(x), forward64(layer, x)) <= 1e-5
        # train mode with dropout 0 is the plain adapted output
        no_dropout.train()
        assert torch.equal(no_dropout(x), layer(x))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_dropout_with_nonzero_padding_mode_is_dropout_of_x(padding_mode):
    """op(dropout(x), W' - W) pads the dropped input: a padded copy of x[j] must be dropped with x[j].

    A delta with a single kernel tap (offset 0) makes the update output at position t equal to
    padded(dropout(x))[t]. With padding 2 on a length-6 input, padded position 0 holds x[2] (reflect),
    x[0] (replicate) or x[4] (circular), which also sit at padded positions 4, 2 and 6.
    """
    layer = lk.FLoRAConv1d(1, 1, 3, padding=2, padding_mode=padding_mode, ranks=(1, 1, 3), dropout=0.5)
    with torch.no_grad():
        layer.core.zero_()
        layer.core[0, 0, 0] = 1.0
        layer.factors[0].fill_(1.0)
        layer.factors[1].fill_(1.0)
        layer.factors[2].copy_(torch.eye(3))
    layer.train()
    x = random_input((64, 1, 6), torch.float32) + 3.0
    with lk.use_backend("reference"):
        torch.manual_seed(0)
        y = layer(x)
    plain = F.conv1d(F.pad(x, (2, 2), mode=padding_mode), layer.weight, layer.bias)
    upd = (y - plain)[:, 0].detach()
    assert upd.shape == (64, 8)
    source = {"reflect": 4, "replicate": 2, "circular": 6}[padding_mode]
    # sanity of the construction: without dropout the two positions agree
    layer.eval()
    with torch.no_grad():
        clean = (layer(x) - plain)[:, 0]
    torch.testing.assert_close(clean[:, 0], clean[:, source])
    # with dropout, a dropped x[j] must be dropped in its padded copy too
    torch.testing.assert_close(upd[:, 0], upd[:, source])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")], ids=["neg", "one", "1.5", "nan"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_dropout_out_of_range_raises(method, p):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        adapter_class(method[1], nn.Conv2d)(3, 4, 3, dropout=p, **method[2])
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        adapter_class(method[1], nn.Linear).from_module(nn.Linear(3, 4), dropout=p, **method[2])
