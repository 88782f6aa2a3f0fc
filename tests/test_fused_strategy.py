"""Strategy "fused": the implicit-GEMM kernels with the adapter math in their tiles.

Every method on every layer type and geometry under ``strategy="fused"`` against the float64
oracle, outputs and every gradient, with every buffer the kernels write poisoned (NaN); FLoRA in
both forms (W' in the tiles, the Tucker chain with its up-projection in the epilogue). The GPU
launch plans (every autotune candidate, the weight gradient's splits) run under the interpreter
too. What autograd keeps, which aten ops run (no library convolution or matmul on activations or
weights, no weight-shaped tensor), the errors, auto's rule and the cost model's counts.
Under TRITON_INTERPRET=1 (set in conftest) on a machine without CUDA.
"""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lrtensor_kernels as lk
from fused import compiled_matches_eager, fused_kernels
from lrtensor_kernels.strategies import cost
from oracle import F64, assert_accuracy, effective_weight64, layer_oracle, plain_twin, randomize_adapter, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (layer, input shape): channel counts not multiples of 16, batch 1 and odd sizes, every geometry
LAYERS = {
    "flora_conv2d_groups_stride": (lambda: lk.FLoRAConv2d(6, 10, 3, stride=2, padding=1, groups=2), (1, 6, 7, 7)),
    "flora_conv1d_dilated": (lambda: lk.FLoRAConv1d(5, 9, 3, dilation=2, padding=2), (2, 5, 11)),
    "flora_conv3d_strided": (lambda: lk.FLoRAConv3d(3, 5, (2, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1)),
                             (1, 3, 4, 5, 4)),
    "flora_linear": (lambda: lk.FLoRALinear(19, 13), (5, 19)),
    "flora_stride_over_kernel": (lambda: lk.FLoRAConv2d(4, 6, 2, stride=3, bias=False), (1, 4, 8, 8)),
    "liera_exp_conv2d_reflect": (lambda: lk.LieRAConv2d(5, 7, (3, 2), padding="same", padding_mode="reflect", rank=3),
                                 (1, 5, 6, 5)),
    "liera_first_order_depthwise": (lambda: lk.LieRAConv2d(6, 6, 3, padding=1, groups=6, mode="first_order"),
                                    (2, 6, 5, 5)),
    "liera_tucker_conv1d_stride": (lambda: lk.LieRAConv1d(4, 7, 3, delta="tucker", rank=3, stride=2), (1, 4, 9)),
    "liera_linear_3d_input": (lambda: lk.LieRALinear(21, 11, rank=5), (2, 3, 21)),
    "liera_patchify": (lambda: lk.LieRAConv2d(3, 5, 4, stride=4, rank=2), (1, 3, 9, 9)),
    "ssl_conv2d_circular": (lambda: lk.SSLConv2d(5, 6, 3, padding="same", padding_mode="circular"), (1, 5, 5, 7)),
    "ssb_conv3d_dilated": (lambda: lk.SSBConv3d(3, 4, 2, dilation=(1, 1, 2)), (1, 3, 3, 4, 5)),
    "ssb_linear": (lambda: lk.SSBLinear(17, 9), (4, 17)),
    "ssb_conv2d_unbatched": (lambda: lk.SSBConv2d(3, 5, 3, padding=1), (3, 6, 5)),
    "lora_conv2d_groups_dilated": (lambda: lk.LoRAConv2d(6, 8, 3, padding=2, dilation=2, groups=2, rank=3),
                                   (1, 6, 7, 6)),
    "lora_linear": (lambda: lk.LoRALinear(19, 13, rank=4), (5, 19)),
}
HALF = ["flora_conv2d_groups_stride", "flora_linear", "liera_exp_conv2d_reflect", "liera_linear_3d_input",
        "ssl_conv2d_circular", "lora_conv2d_groups_dilated"]
DOUBLE = ["flora_conv1d_dilated", "liera_tucker_conv1d_stride", "ssb_linear"]


def _has_chain(name: str) -> bool:
    """Whether the layer's method has the chain form (FLoRA, LoRA)."""
    return name.split("_")[0] in ("flora", "lora")


def _forms(name: str) -> list:
    return ["prologue", "chain"] if _has_chain(name) else ["prologue"]


def _cases(names, dtype):
    return [pytest.param(n, form, dtype, id=f"{n}-{form}-{str(dtype)[6:]}") for n in names for form in _forms(n)]


# bfloat16 on a GPU only: the interpreter's dot on bfloat16 operands is wrong (errors of 1e10 measured;
# numpy has no bfloat16), though conftest makes its casts round as a GPU's
CASES = _cases(LAYERS, torch.float32) + _cases(HALF, torch.float16) + _cases(DOUBLE, F64) + (
    _cases(HALF, torch.bfloat16) if DEVICE == "cuda" else [])


@pytest.fixture
def kernels(monkeypatch):
    """The fused kernels' module with every buffer it writes starting as NaN."""
    fused_kernels("triton")  # skips without triton
    from lrtensor_kernels.kernels import fused_conv

    monkeypatch.setattr(fused_conv, "_new_buffer",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    return fused_conv


@pytest.fixture
def form(monkeypatch):
    """``form(name)``: strategy "fused" runs that form from now on (the cost model's choice replaced)."""

    def force(name: str):
        def forced(w):
            if name == "chain":
                return "chain", cost.fused_chain_cost(w)
            return "prologue", cost.fused_prologue_cost(w)

        monkeypatch.setattr(cost, "fused_form", forced)
        cost._decision_cached.cache_clear()

    yield force
    cost._decision_cached.cache_clear()


def _build(name: str, dtype=torch.float32, seed: int = 0):
    make, shape = LAYERS[name]
    torch.manual_seed(seed)
    layer = randomize_adapter(make(), seed)
    layer.strategy = "fused"
    layer = layer.to(DEVICE)
    if dtype != torch.float32:
        layer = layer.to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=g, dtype=F64).to(dtype).to(DEVICE)
    return layer, x


def _step(layer, x, grad_out, backend, strategy=None):
    """Output and gradients (input, then every adapter tensor) of one step on ``backend``."""
    for p in layer.adapter_parameters():
        p.grad = None
    previous = layer.strategy
    if strategy is not None:
        layer.strategy = strategy
    try:
        x = x.detach().clone().requires_grad_()
        with lk.use_backend(backend):
            y = layer(x)
        y.backward(grad_out)
    finally:
        layer.strategy = previous
    return y.detach(), [x.grad] + [p.grad for p in layer.adapter_parameters()]


def _check_against_oracle(layer, x, plain_strategy, what, dtype):
    with torch.no_grad(), lk.use_backend("triton"):
        grad_out = torch.randn_like(layer(x), dtype=F64).to(dtype)
    got_y, got_g = _step(layer, x, grad_out, "triton")
    plain_y, plain_g = _step(layer, x, grad_out, "reference", plain_strategy)
    ref_y, ref_g = layer_oracle(layer, x, grad_out)
    _, magnitude_g = layer_oracle(layer, x, grad_out, absolute=True)
    assert_accuracy(f"{what} output", got_y, plain_y, ref_y, FLOOR[dtype])
    for n, g, p, r, m in zip(["input"] + list(layer.adapter_state()), got_g, plain_g, ref_g, magnitude_g):
        assert g is not None and g.shape == r.shape, n
        assert_accuracy(f"{what} grad {n}", g, p, r, FLOOR[dtype], magnitude=m)


@pytest.mark.parametrize("name, fused_form, dtype", CASES)
def test_fused_matches_the_oracle(name, fused_form, dtype, kernels, form):
    """Outputs and every gradient within twice plain PyTorch's error in the same dtype (merged for
    the W'-in-the-tiles form, which rounds W' as merged does; bypass for FLoRA's chain form)."""
    form(fused_form)
    layer, x = _build(name, dtype, zlib.crc32(f"{name}-{dtype}".encode()))
    _check_against_oracle(layer, x, "bypass" if fused_form == "chain" else "merged", f"{name} {fused_form}", dtype)
    with lk.use_backend("triton"):
        assert lk.plan(nn.Sequential(layer), x)[0].strategy == "fused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rank", [3, 20], ids=["narrow_rank", "wide_rank"])
def test_every_gpu_launch_plan_under_the_interpreter(dtype, rank, kernels):
    """Each kind's GPU tiles for the rank's class (every autotune candidate: blocks, warps, stages)
    and the GPU's split of the weight gradient (planned as on an H100), run under the interpreter
    against the oracle."""
    from lrtensor_kernels.kernels import conv_plan
    from lrtensor_kernels.kernels.launch import as_on_gpu

    tiles = {kind: conv_plan.gpu_tiles(kind, dtype.itemsize, 16 if rank <= 16 else 32) for kind in conv_plan.KINDS}
    torch.manual_seed(3)
    conv = randomize_adapter(lk.LieRAConv2d(5, 7, (3, 2), padding="same", padding_mode="reflect", rank=rank), 3)
    linear = randomize_adapter(lk.LieRALinear(19, 13, rank=rank), 4)
    layers = []
    for layer, shape in ((conv, (1, 5, 6, 5)), (linear, (700, 19))):
        layer.strategy = "fused"
        layers.append((layer.to(DEVICE).to(dtype), torch.randn(shape, dtype=F64).to(dtype).to(DEVICE)))
    for i in range(max(len(t) for t in tiles.values())):
        plan = {kind: t[i % len(t)] for kind, t in tiles.items()}
        with as_on_gpu(132), conv_plan.forced(**plan):
            for layer, x in layers:
                _check_against_oracle(layer, x, "merged", f"GPU plan {plan}", dtype)


def test_gpu_plans_split_the_weight_gradient():
    """The GPU plan cuts a long reduction (the case above's 700 tokens) into several splits."""
    from lrtensor_kernels.kernels import conv_plan

    problem = conv_plan.problem_of((700, 19), (13, 19), [], [], [], 1)
    for t in conv_plan.gpu_tiles("weight_grad", 2):
        splits, per_split = conv_plan.weight_grad_splits(problem, t, conv_plan.target_programs(132))
        assert splits > 1 and per_split % t.block_k == 0 and (splits - 1) * per_split < 700 <= splits * per_split


@pytest.mark.parametrize("name", ["flora_conv2d_groups_stride", "liera_exp_conv2d_reflect", "ssb_linear"])
@pytest.mark.parametrize("fused_form", ["prologue", "chain"])
def test_trainable_bias_and_base_weight_and_dropout(name, fused_form, kernels, form):
    """A re-enabled bias and base weight get the reference backend's gradients; adapter dropout
    computes ``op(x, W) + op(dropout(x), W' - W)`` with every gradient."""
    if fused_form == "chain" and not _has_chain(name):
        pytest.skip("the chain form is FLoRA's and LoRA's")
    form(fused_form)
    layer, x = _build(name, torch.float32, 5)
    layer.weight.requires_grad_(True)
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
    layer.dropout = 0.3
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for backend, strategy in (("reference", "merged"), ("triton", "fused")):
        layer.strategy = strategy
        for p in params:
            p.grad = None
        xg = x.detach().clone().requires_grad_()
        torch.manual_seed(7)
        with lk.use_backend(backend):
            layer(xg).square().sum().backward()
        results.append([xg.grad] + [p.grad for p in params])
    for got, want in zip(*results[::-1]):
        assert rel_err(got, want) < 1e-5


class _CallShape:
    """What ``tucker_chain.factors_of_call`` reads of an adapted call, from the layer."""

    def __init__(self, layer):
        self.adapter, self.scale, self.weight = layer.adapter_tensors(), float(layer.scale), layer.weight
        self.math, self.x = layer.adapter_math, layer.weight


def _factor_bytes(layer, folded: bool, params: set) -> int:
    """Bytes of the chain's factors of ``layer`` and of what autograd keeps to build them, less the
    storages in ``params``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        factors = lk.strategies.tucker_chain.factors_of_call(_CallShape(layer), folded)
    for f in factors:
        storages[f.untyped_storage().data_ptr()] = f.untyped_storage().nbytes()
    return sum(n for ptr, n in storages.items() if ptr not in params)


def _saved_bytes(module, x, backend="triton") -> int:
    """Bytes of the distinct storages autograd keeps for one forward (saved_tensors_hooks)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with lk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("name", ["flora_conv2d_groups_stride", "liera_exp_conv2d_reflect", "liera_linear_3d_input",
                                  "ssb_linear", "ssl_conv2d_circular", "lora_linear"])
@pytest.mark.parametrize("fused_form", ["prologue", "chain"])
def test_saved_for_backward_is_the_frozen_layers_plus_the_adapter(name, fused_form, form):
    """Exactly what the frozen layer's op keeps to produce a weight gradient (its input, padded as
    its padding mode asks, and its weight, referenced) plus the adapter tensors; the chain form also
    the chain's factors (rank-sized) and its small ``u``, ``z`` (at most a quarter of x together).
    Nothing else activation-sized."""
    fused_kernels("triton")
    if fused_form == "chain" and not _has_chain(name):
        pytest.skip("the chain form is FLoRA's and LoRA's")
    form(fused_form)
    layer, x = _build(name, torch.float32, 6)
    x.requires_grad_()
    frozen = plain_twin(layer, layer.weight.detach(), torch.float32)  # weight and bias trainable: keeps x and W
    # the adapter tensors and the bias, referenced (every fused op keeps its tensor inputs for a
    # differentiable backward; a parameter kept costs no memory)
    referenced = [*layer.adapter_parameters(), *([layer.bias] if layer.bias is not None else [])]
    adapter_bytes = sum(p.numel() * p.element_size() for p in referenced)
    fused = _saved_bytes(layer, x)
    extra = fused - _saved_bytes(frozen, x, "reference") - adapter_bytes
    if fused_form == "chain":
        # the chain's factors (rank-sized, built from the adapter tensors under autograd: K, scale * U_1
        # and what building them keeps) and u, z
        params = {p.untyped_storage().data_ptr() for p in referenced}
        factor_bytes = max(_factor_bytes(layer, folded, params) for folded in (False, True))
        assert 0 <= extra <= factor_bytes + 0.25 * x.numel() * x.element_size(), (extra, factor_bytes)
    else:
        assert extra == 0, extra
    if name.startswith("lora") or fused_form == "chain":
        # LoRA's merged keeps W' instead of W (W' = W + s B A needs no W for its gradients); the chain's
        # factors on this small layer (a full-rank core, K as large as W) are as large as W'
        return
    # the check can fail: the reference backend's merged strategy keeps W' besides
    layer.strategy = "merged"
    assert _saved_bytes(layer, x, "reference") - fused >= 0.9 * layer.weight.numel() * layer.weight.element_size()


LIBRARY_OPS = ("convolution", "convolution_backward", "mm", "addmm", "bmm", "linear", "matmul", "_convolution",
               "cudnn_convolution", "mkldnn_convolution", "baddbmm")


class _AtenLog(TorchDispatchMode):
    """Every aten op called outside the kernels' launches (the interpreter's own handling of the
    arguments is the kernel), with the shapes of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, [tuple(t.shape) for t in tensors],
                           [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)
                            if isinstance(t, torch.Tensor)]))
        return out


def _library_calls_on_big_operands(layer, x, backend, monkeypatch):
    """(library convolutions/matmuls touching a tensor of the weight's or the input's size, ops
    producing a tensor of the weight's shape) in one forward and backward."""
    from lrtensor_kernels.kernels import fused_conv

    x = x.detach().clone().requires_grad_()
    limit = min(layer.weight.numel(), x.numel())
    log = _AtenLog()
    launch = fused_conv._launch

    def paused_launch(*args, **kwargs):
        log.paused = True
        try:
            launch(*args, **kwargs)
        finally:
            log.paused = False

    monkeypatch.setattr(fused_conv, "_launch", paused_launch)
    with lk.use_backend(backend), log:
        layer(x).sum().backward()
    big = [(op, shapes) for op, shapes, _ in log.calls
           if op in LIBRARY_OPS and any(torch.Size(s).numel() >= limit for s in shapes)]
    weight_shaped = [op for op, _, outs in log.calls if tuple(layer.weight.shape) in outs]
    return big, weight_shaped


# layers whose adapters are smaller than their weight and input (ranks below the channel counts),
# so that the adapter's own contractions are told apart from the layer's op
LEAN_LAYERS = {
    "flora_conv2d": (lambda: lk.FLoRAConv2d(12, 20, 3, stride=2, padding=1, groups=2, ranks=(4, 3, 2, 2)),
                     (1, 12, 9, 9)),
    "liera_exp_conv2d_reflect": (lambda: lk.LieRAConv2d(10, 14, 3, padding=1, padding_mode="reflect", rank=3),
                                 (1, 10, 8, 8)),
    "liera_tucker_conv1d": (lambda: lk.LieRAConv1d(8, 12, 3, delta="tucker", rank=3, stride=2), (2, 8, 15)),
    "ssb_conv3d": (lambda: lk.SSBConv3d(4, 6, 2, dilation=(1, 1, 2)), (1, 4, 4, 5, 6)),
    "liera_linear": (lambda: lk.LieRALinear(24, 16, rank=3), (2, 5, 24)),
    "lora_conv2d": (lambda: lk.LoRAConv2d(10, 14, 3, padding=1, rank=3), (1, 10, 8, 8)),
}


@pytest.mark.parametrize("name", list(LEAN_LAYERS))
@pytest.mark.parametrize("fused_form", ["prologue", "chain"])
def test_no_library_convolution_or_matmul_and_no_weight_shaped_tensor(name, fused_form, form, monkeypatch):
    """Under "fused" the layer's forward and backward call no aten convolution or matmul on an
    activation or the weight (the adapter's own small contractions, r x C_g k at most, may use
    them), and no op produces a tensor of the weight's shape: W' and dW' exist in the tiles only."""
    fused_kernels("triton")
    if fused_form == "chain" and not _has_chain(name):
        pytest.skip("the chain form is FLoRA's and LoRA's")
    form(fused_form)
    make, shape = LEAN_LAYERS[name]
    torch.manual_seed(8)
    layer = randomize_adapter(make(), 8)
    layer.strategy = "fused"
    x = torch.randn(shape)
    big, weight_shaped = _library_calls_on_big_operands(layer, x, "triton", monkeypatch)
    assert not big and not weight_shaped, (big, weight_shaped)
    # the check can fail: merged on the same backend builds W' and calls the library op on it
    layer.strategy = "merged"
    big, weight_shaped = _library_calls_on_big_operands(layer, x, "triton", monkeypatch)
    assert big and weight_shaped


def test_fused_needs_the_triton_backend_and_says_so():
    layer, x = _build("liera_exp_conv2d_reflect")
    net = nn.Sequential(nn.Identity(), layer)
    layer.adapter_name = "1"
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for backend in ("reference", "native"):
        if backend == "native":
            fused_kernels("native")
        with lk.use_backend(backend), pytest.raises(lk.AdapterConfigError, match=(
                rf"LieRAConv2d '1': strategy 'fused' runs on the 'triton' backend .* is '{backend}'")):
            net(x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(lk.AdapterConfigError, match="strategy 'fused' runs on the 'triton' backend only"):
        w = cost.Workload((7, 5, 3, 2), (1, 5, 6, 5), (1, 1), (1, 0), (1, 1), 1, torch.float32, torch.float32,
                          "cpu", layer.adapter_math.key, ((7, 3), (3, 30)), True, False, False, True, False, "native")
        cost.decide(w, "fused")


def test_inject_with_fused_and_every_method_accepts_it():
    fused_kernels("triton")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    names = lk.inject(net, "liera", strategy="fused", rank=2)
    assert {net.get_submodule(n).strategy for n in names} == {"fused"}
    for _, layer in lk.adapter_layers(net):
        randomize_adapter(layer, 1)
    x = torch.randn(2, 3, 4, 4)
    with lk.use_backend("triton"):
        y = net(x)
        rows = lk.plan(net, x)
    with lk.use_backend("reference"):
        for _, layer in lk.adapter_layers(net):
            layer.strategy = "merged"
        assert rel_err(y, net(x)) < 1e-5
    assert all(r.strategy == "fused" and r.reason == "set on the layer" for r in rows)
    for method in lk.layers.LAYERS:
        layer = lk.layers.LAYERS[method][nn.Conv2d](3, 4, 3)
        layer.strategy = "fused"
        assert layer.strategy == "fused"


def _workload(device_type="cuda", dtype=torch.bfloat16, math=("lora", "exp"), triton=True):
    adapter = ((1280, 8), (8, 1280 * 9)) if math[0] == "lora" else ((16, 16, 2, 2), (1280, 16), (1280, 16), (3, 2),
                                                                    (3, 2))
    return cost.Workload((1280, 1280, 3, 3), (4, 1280, 16, 16), (1, 1), (1, 1), (1, 1), 1, dtype, dtype, device_type,
                         lk.AdapterMath(*math).key, adapter, True, False, False, True, False,
                         "triton" if triton else "native")


def test_auto_considers_fused_only_on_a_calibrated_cuda_device(monkeypatch):
    """Until a measurement run calibrates the CUDA constants, auto keeps today's choice and says why."""
    cost._decision_cached.cache_clear()
    decision = cost.decide(_workload(), "auto")
    assert decision.strategy == "merged" and "fused" in decision.costs
    assert "fused not considered: the CUDA cost constants are not yet calibrated" in decision.reason
    cpu = cost.decide(_workload("cpu", torch.float32), "auto")
    assert "fused not considered: Triton is interpreted on the CPU" in cpu.reason
    assert "fused" not in cost.decide(_workload(triton=False), "auto").costs
    monkeypatch.setitem(cost.DEVICES, "cuda", cost.DEVICES["cuda"].__class__(
        **{**cost.DEVICES["cuda"].__dict__, "calibrated": True}))
    cost._decision_cached.cache_clear()
    try:
        # first order: fused saves merged's weight-sized passes and adds only E's products
        calibrated = cost.decide(_workload(math=("lora", "first_order")), "auto")
        assert calibrated.strategy == "fused" and "fused is the cheapest exact form" in calibrated.reason
        # exp: the tiles' exponentials (one per weight element and pixel tile) are counted too
        exp = cost.decide(_workload(), "auto")
        times = {k: c.seconds(cost.DEVICES["cuda"], torch.bfloat16) for k, c in exp.costs.items()}
        assert exp.strategy == min(("merged", "fused"), key=times.__getitem__) and exp.costs["fused"].exp_elements > 0
        # FLoRA in bfloat16: the W'-in-the-tiles form would round the update; the chain form is allowed
        flora = cost.decide(_workload(math=("tucker", "add")), "auto")
        assert "fused" in flora.costs and (flora.strategy != "fused" or flora.fused_form == "chain")
    finally:
        cost._decision_cached.cache_clear()


def test_cost_model_counts_no_weight_sized_pass_for_fused():
    """Fused LieRA: the FLOPs of full fine-tuning (3 passes) plus the tiles' E; none of merged's
    weight-sized passes (W' built twice, dW' written and read, the projection's reads)."""
    w = _workload()
    fused = cost.fused_prologue_cost(w)
    merged = cost.merged_cost(w)
    s = cost._Sizes(w)
    tiles = 4 * 16 * 16 // cost.FUSED_PIXEL_TILE  # the pixel tiles W' is formed for, forward and input gradient
    prologue = 2 * (2 * 16 * s.weight * tiles)  # E at rank 8 padded to 16, twice
    epilogue = 6 * 16 * s.weight  # H @ R^T, L^T @ H and E again for exp
    assert fused.flops == pytest.approx(3 * s.conv + prologue + epilogue, rel=1e-9)
    assert fused.exp_elements == 2 * s.weight * tiles + s.weight
    weight_bytes = s.weight * s.e
    assert merged.bytes - fused.bytes >= 5 * weight_bytes, (merged.bytes, fused.bytes, weight_bytes)
    assert fused.ops == 3 and merged.ops > fused.ops
    # the chain form pays no output-sized add: its bytes are bypass's less three output passes (each
    # chain form, three ops or folded)
    flora = _workload(math=("tucker", "add"))
    for folded in (False, True):
        bypass, chain = cost._tucker_bypass_form(flora, folded), cost._fused_chain_form(flora, folded)
        assert bypass.bytes - chain.bytes >= 3 * s.y * s.e, folded


def test_plan_shows_fused_column_only_where_fused_can_run():
    fused_kernels("triton")
    layer, x = _build("flora_linear")
    layer.strategy = "auto"
    with lk.use_backend("triton"):
        text = str(lk.plan(nn.Sequential(layer), x))
    assert "fused (x frozen)" in text and "fused not considered" in text
    with lk.use_backend("reference"):
        assert "fused" not in str(lk.plan(nn.Sequential(layer), x))


def test_weight_gradient_is_bitwise_reproducible(kernels):
    layer, x = _build("liera_linear_3d_input", seed=9)
    x = torch.randn(300, 21)
    grads = []
    for _ in range(2):
        _, g = _step(layer, x, torch.ones(300, 11), "triton")
        grads.append(g)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_autocast_runs_the_ops_in_the_autocast_dtype(kernels):
    """float32 weights and adapters under autocast: the kernels round W' tiles to the autocast dtype
    (the weight is read in float32, never copied), the adapter math in float32."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    layer, x = _build("liera_exp_conv2d_reflect", torch.float32, 10)
    with torch.no_grad(), lk.use_backend("triton"):
        grad_out = torch.randn_like(layer(x))
    results = {}
    for backend, strategy in (("reference", "merged"), ("triton", "fused")):
        layer.strategy = strategy
        with torch.autocast(DEVICE, dtype=dtype):
            results[backend] = _step(layer, x, grad_out.to(dtype), backend)
        assert results[backend][0].dtype == dtype
    ref_y, ref_g = layer_oracle(layer, x, grad_out)
    assert_accuracy("autocast output", results["triton"][0], results["reference"][0], ref_y, FLOOR[dtype])
    for i, (g, p, r) in enumerate(zip(results["triton"][1], results["reference"][1], ref_g)):
        assert_accuracy(f"autocast grad {i}", g, p, r, FLOOR[dtype])


def test_custom_ops_pass_opcheck():
    fused_kernels("triton")
    layer, x = _build("liera_exp_conv2d_reflect", seed=11)
    x, padding = layer._conv_input(x.requires_grad_())
    args = (x, None, layer.weight, layer.bias, layer.adapter_tensors(), layer.adapter_math.key, float(layer.scale),
            list(layer.stride), padding, list(layer.dilation), layer.groups)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lrtensor.fused_conv.default, args, test_utils=checks)
    flora, xf = _build("flora_conv2d_groups_stride", seed=12)
    for folded in (False, True):
        factors = [f.detach().requires_grad_() for f in
                   lk.strategies.tucker_chain.chain_factors(flora.adapter_tensors(), float(flora.scale), xf.dtype,
                                                            folded)]
        args = (xf.detach().requires_grad_(), None, flora.weight, flora.bias, factors, list(flora.stride),
                list(flora.padding), list(flora.dilation), flora.groups)
        torch.library.opcheck(torch.ops.lrtensor.fused_tucker_chain.default, args, test_utils=checks)


def test_compile_fullgraph_matches_eager(form):
    fused_kernels("triton")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2), nn.Flatten(),
                          nn.Linear(6 * 3 * 3, 4)).to(DEVICE)
    lk.inject(model, "flora", strategy="fused")
    for _, layer in lk.adapter_layers(model):
        randomize_adapter(layer, 1)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    for fused_form in ("prologue", "chain"):
        form(fused_form)
        compiled_matches_eager(model, x, DEVICE, "triton")


@pytest.mark.parametrize("name", ["flora_conv2d_groups", "lora_conv2d_groups", "flora_linear", "lora_linear"])
@pytest.mark.parametrize("fused_form", ["prologue", "chain"])
def test_torch_func_forward_ad_and_double_backward_in_both_forms(name, fused_form, form):
    """Both forms of FLoRA and LoRA (tests/test_higher_order.py runs the cost model's choice): the
    torch.func transforms, forward-mode AD and a gradient penalty against the float64 oracle."""
    import test_higher_order as higher

    form(fused_form)
    higher.test_forward_mode_ad_with_dual_tensors(name, "fused", "triton")
    higher.test_gradients_of_gradients_match_the_oracle(name, "fused", "triton")
    higher.test_torch_func_transforms_match_the_oracle(name, "fused", "triton")


def test_dropout_is_the_two_branch_form(kernels):
    layer, x = _build("liera_exp_conv2d_reflect", seed=13)
    layer.dropout = 0.3
    torch.manual_seed(11)
    with lk.use_backend("triton"):
        got = layer(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, 0.3, True)
    w = layer.weight.detach().to(F64)
    frozen = plain_twin(layer, w)(x.to(F64))
    twin = plain_twin(layer, effective_weight64(layer) - w)
    twin.bias = None
    assert rel_err(got, frozen + twin(dropped.to(F64))) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(48))
def test_random_geometries_against_the_oracle(seed, kernels, form):
    """Random layer types, channels, groups, kernels, strides, paddings, dilations, padding modes,
    methods (LieRA in both modes and deltas), batch sizes and dtypes (float32, float16)."""
    g = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    method = pick("flora", "liera", "ssl", "ssb", "lora")
    spatial = pick(0, 1, 2, 3)
    groups = pick(1, 1, 2, 3)
    c_in, c_out = groups * pick(1, 2, 5), groups * pick(1, 3, 4)
    options = dict(rank=pick(1, 3, 17), mode=pick("exp", "first_order"), delta=pick("lora", "tucker")) \
        if method == "liera" else dict(rank=pick(1, 3, 17)) if method == "lora" else {}
    if spatial == 0:
        layer = lk.layers.LAYERS[method][nn.Linear](c_in, c_out, **options)
        shape = (pick(1, 7, 40), c_in)
    else:
        cls = lk.layers.LAYERS[method][(nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]]
        kernel = tuple(pick(1, 2, 3) for _ in range(spatial))
        stride = tuple(pick(1, 2, 3) for _ in range(spatial))
        dilation = tuple(pick(1, 2) for _ in range(spatial))
        padding = tuple(pick(0, 1, 2) for _ in range(spatial))
        layer = cls(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=pick("zeros", "zeros", "circular", "reflect"), **options)
        size = [max(k * d + 2 * p + 1, int(torch.randint(3, 9, (1,), generator=g)))
                for k, d, p in zip(kernel, dilation, padding)]
        shape = (pick(1, 2), c_in, *size)
    dtype = pick(torch.float32, torch.float16)
    torch.manual_seed(seed)
    randomize_adapter(layer, seed).strategy = "fused"
    layer = layer.to(dtype)
    x = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    for fused_form in (["prologue", "chain"] if method in ("flora", "lora") else ["prologue"]):
        form(fused_form)
        _check_against_oracle(layer, x, "bypass" if fused_form == "chain" else "merged",
                              f"seed {seed} {layer} {fused_form} {dtype}", dtype)
