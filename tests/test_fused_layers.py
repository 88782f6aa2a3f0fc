"""Adapter layers on the fused backends ("triton", "native"): outputs and gradients against the
float64 oracle, what autograd keeps for backward, the custom op's registration, and torch.compile."""
from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from forms import chain_form, flora_strategies, strategy_and_form
from fused import FUSED_BACKENDS, compiled_matches_eager, fused_kernels
from oracle import (F64, assert_accuracy, effective_weight64, forward64, layer_oracle, plain_twin, randomize_adapter,
                    rel_err)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# under the interpreter, tf32 dots and bfloat16 casts round as on a GPU (conftest, gpu_rounding.py)
DTYPES = {"triton": [torch.float32, torch.float16, torch.bfloat16],
          "native": [torch.float32, torch.float64, torch.float16, torch.bfloat16]}
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _chain_form(request):
    """A test parametrized with a strategy such as "bypass:folded" runs in that chain form
    (tests/forms.py); ``_build`` sets the strategy itself."""
    params = getattr(request.node, "callspec", None)
    strategy = params.params.get("strategy", "") if params else ""
    with chain_form(strategy_and_form(strategy)[1] if isinstance(strategy, str) else ""):
        yield


@pytest.fixture(autouse=True)
def _poisoned_workspace(monkeypatch):
    """Every scratch tensor the fused ops borrow starts as NaN: an element a kernel does not write
    shows, instead of a stale value from an earlier call."""
    from lrtensor_kernels.kernels import workspace

    monkeypatch.setattr(workspace, "fill_on_borrow", float("nan"))


@pytest.fixture(params=FUSED_BACKENDS)
def fused(request):
    """The name of a fused backend, its kernels built or importable (else skipped / failed as
    tests/fused.py says)."""
    fused_kernels(request.param)
    return request.param

LAYERS = {
    "flora_conv2d_groups": lambda: lk.FLoRAConv2d(6, 20, 3, stride=2, padding=1, groups=2),
    "flora_conv2d_reflect": lambda: lk.FLoRAConv2d(5, 7, (3, 2), padding="same", padding_mode="reflect", bias=False),
    "flora_conv1d_dilated": lambda: lk.FLoRAConv1d(4, 9, 3, dilation=2, padding=2),
    "flora_conv3d": lambda: lk.FLoRAConv3d(3, 6, 2, padding="valid"),
    "flora_linear": lambda: lk.FLoRALinear(40, 24),
    "lora_conv2d_groups": lambda: lk.LoRAConv2d(6, 20, 3, stride=2, padding=1, groups=2, rank=4, alpha=6.0),
    "lora_depthwise": lambda: lk.LoRAConv2d(8, 8, 5, padding=2, groups=8, rank=3),
    "lora_conv1d_dilated": lambda: lk.LoRAConv1d(4, 9, 3, dilation=2, padding=2, padding_mode="reflect"),
    "lora_conv3d": lambda: lk.LoRAConv3d(3, 6, 2, padding="valid", rank=4),
    "lora_linear": lambda: lk.LoRALinear(40, 24, rank=4),
    "liera_exp_conv2d": lambda: lk.LieRAConv2d(6, 20, 3, padding=1, rank=4),
    "liera_first_order_depthwise": lambda: lk.LieRAConv2d(8, 8, 5, padding=2, groups=8, mode="first_order"),
    "liera_tucker_conv2d": lambda: lk.LieRAConv2d(6, 10, 3, delta="tucker", rank=4),
    "liera_linear": lambda: lk.LieRALinear(40, 24, rank=4),
    "ssl_conv2d": lambda: lk.SSLConv2d(6, 10, 3, padding="same", padding_mode="circular"),
    "ssb_linear": lambda: lk.SSBLinear(40, 24),
    "ssb_conv2d_groups": lambda: lk.SSBConv2d(6, 8, 3, padding=1, groups=2, padding_mode="reflect"),
}


def _input(layer, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (3, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels) + (7,) * (
        layer.weight.dim() - 2)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype).to(DEVICE)


def _build(name, dtype, seed, strategy="auto"):
    torch.manual_seed(seed)  # the base weights too: the same layer whatever ran before
    layer = randomize_adapter(LAYERS[name](), seed)
    layer.strategy = strategy_and_form(strategy)[0]
    return layer.to(DEVICE).to(dtype) if dtype != torch.float32 else layer.to(DEVICE)


def _strategies(name) -> list:
    method = name.split("_")[0]
    if method == "flora":
        return flora_strategies()
    if method == "lora":
        return ["merged", "two_branch", "bypass", "hybrid"]
    return ["merged", "two_branch"] + (["bypass"] if method in ("ssl", "ssb") else [])


LAYER_STRATEGIES = [pytest.param(n, st, id=f"{n}-{st}") for n in LAYERS for st in _strategies(n)]


def _run(layer, x, backend, grad_out, input_grad=True):
    for p in layer.adapter_parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(input_grad)
    with lk.use_backend(backend):
        y = layer(x)
    y.backward(grad_out)
    grads = [x.grad] if input_grad else []
    return y.detach(), grads + [p.grad for p in layer.adapter_parameters()]


@pytest.mark.parametrize("backend,dtype", [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in FUSED_BACKENDS
                                           for d in DTYPES[b]])
@pytest.mark.parametrize("name, strategy", LAYER_STRATEGIES)
def test_layer_forward_backward_matches_oracle(name, strategy, backend, dtype):
    """Each strategy on each fused backend against the same strategy on the reference backend
    (plain PyTorch in the same dtype) and the float64 oracle."""
    fused_kernels(backend)
    seed = zlib.crc32(f"{name}-{dtype}".encode())  # the same seed in every run
    layer = _build(name, dtype, seed, strategy)
    x = _input(layer, dtype, seed + 1)
    with torch.no_grad():
        grad_out = torch.randn_like(layer(x), dtype=F64).to(dtype)
    got_y, got_g = _run(layer, x, backend, grad_out)
    plain_y, plain_g = _run(layer, x, "reference", grad_out)
    ref_y, ref_g = layer_oracle(layer, x, grad_out)
    _, magnitude_g = layer_oracle(layer, x, grad_out, absolute=True)
    assert_accuracy(f"{name} output", got_y, plain_y, ref_y, FLOOR[dtype])
    names = ["input"] + list(layer.adapter_state())
    for n, g, p, r, m in zip(names, got_g, plain_g, ref_g, magnitude_g):
        assert g is not None and g.shape == r.shape, n
        assert_accuracy(f"{name} grad {n}", g, p, r, FLOOR[dtype], magnitude=m)


def test_input_gradient_is_skipped_when_not_needed(fused, monkeypatch):
    layer = _build("flora_conv2d_groups", torch.float32, 0, "merged")
    x = _input(layer, torch.float32, 1)
    calls = []
    real = torch.ops.aten.convolution_backward

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", spy)
    with lk.use_backend(fused):
        layer(x).sum().backward()
    assert calls == [[False, True, False]]
    assert all(p.grad is not None for p in layer.adapter_parameters())


@pytest.mark.parametrize("strategy", _strategies("flora"))
def test_trainable_bias_gets_its_gradient(fused, strategy):
    layer = _build("flora_conv2d_groups", torch.float32, 0, strategy)
    layer.bias.requires_grad_(True)
    x = _input(layer, torch.float32, 1)
    grads = []
    for backend in ("reference", fused):
        layer.bias.grad = None
        with lk.use_backend(backend):
            layer(x).square().sum().backward()
        grads.append(layer.bias.grad)
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_no_adapter_gradient_skips_weight_gradient(fused, monkeypatch):
    layer = _build("liera_exp_conv2d", torch.float32, 0, "merged")
    for p in layer.adapter_parameters():
        p.requires_grad_(False)
    x = _input(layer, torch.float32, 1).requires_grad_()
    calls = []
    real = torch.ops.aten.convolution_backward
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", lambda *a: calls.append(a[-1]) or real(*a))
    with lk.use_backend(fused):
        layer(x).sum().backward()
    assert calls == [[True, False, False]] and x.grad is not None


def _outputs_with_same_dropout(layer, x, fused, seed, autocast_dtype=None):
    """The layer's output on the reference and the fused backend, with the same dropout mask."""
    outs = []
    for backend in ("reference", fused):
        torch.manual_seed(seed)
        autocast = torch.autocast(DEVICE, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with lk.use_backend(backend), autocast:
            outs.append(layer(x))
    return outs


@pytest.mark.parametrize("name, strategy", [p for p in LAYER_STRATEGIES if p.values[0] in (
    "flora_conv2d_groups", "lora_conv2d_groups", "liera_linear", "ssb_linear")])
def test_dropout_two_branch_form(name, strategy, fused):
    """With adapter dropout every strategy computes ``op(x, W) + op(dropout(x), W' - W)``."""
    layer = _build(name, torch.float32, 2, strategy)
    layer.dropout = 0.3
    x = _input(layer, torch.float32, 3)
    outs = _outputs_with_same_dropout(layer, x, fused, 11)
    torch.manual_seed(11)
    mask_x = nn.functional.dropout(x, 0.3, True)
    w = layer.weight.detach().to(F64)
    w_eff = effective_weight64(layer)
    frozen = plain_twin(layer, w)(x.to(F64))
    twin = plain_twin(layer, w_eff - w)
    twin.bias = None
    ref = frozen + twin(mask_x.to(F64))
    assert_accuracy(f"{name} dropout", outs[1], outs[0], ref, FLOOR[torch.float32])


def _saved_tensors(layer, x, backend):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with lk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    return y, saved


@pytest.mark.parametrize("name, strategy", [p for p in LAYER_STRATEGIES if p.values[0] in (
    "flora_conv2d_groups", "lora_conv2d_groups", "liera_exp_conv2d", "liera_linear", "ssb_linear")])
def test_no_weight_sized_tensor_saved_for_backward(name, strategy, fused):
    layer = _build(name, torch.float32, 4, strategy)
    x = _input(layer, torch.float32, 5).requires_grad_()
    n = layer.weight.numel()
    _, saved = _saved_tensors(layer, x, fused)
    extra = [t for t in saved if t.numel() >= n and t.data_ptr() != layer.weight.data_ptr()
             and t.data_ptr() != x.data_ptr()]
    assert not extra, [tuple(t.shape) for t in extra]
    # the check can fail: the reference path's merged strategy keeps W' for backward
    layer.strategy = "merged"
    _, saved_ref = _saved_tensors(layer, x, "reference")
    assert any(t.numel() >= n and t.data_ptr() != layer.weight.data_ptr() for t in saved_ref)


@pytest.mark.parametrize("name, strategy", [p for p in LAYER_STRATEGIES if p.values[0] in (
    "flora_conv2d_groups", "lora_conv2d_groups", "liera_exp_conv2d", "liera_first_order_depthwise", "ssb_linear")])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_trainable_base_weight_gets_its_gradient(name, strategy, dropout, fused):
    """A base weight made trainable again gets the same gradient on both backends, every strategy."""
    layer = _build(name, torch.float32, 12, strategy)
    layer.weight.requires_grad_(True)
    layer.dropout = dropout
    x = _input(layer, torch.float32, 13)
    grads = []
    for backend in ("reference", fused):
        layer.weight.grad = None
        torch.manual_seed(3)
        with lk.use_backend(backend):
            layer(x).square().sum().backward()
        grads.append(layer.weight.grad)
    assert rel_err(grads[1], grads[0]) < 1e-5


@pytest.mark.parametrize("name", ["flora_conv2d_groups", "liera_exp_conv2d"])
def test_a_base_weight_gradient_is_never_a_pooled_buffer(name, fused):
    """The merged backward keeps dL/dW' as the scratch buffer of the next call, except where it is
    (add rule) or may be the base weight's gradient: the next forward must not overwrite W.grad."""
    layer = _build(name, torch.float32, 14, "merged")
    layer.weight.requires_grad_(True)
    x = _input(layer, torch.float32, 15)
    with lk.use_backend(fused):
        grad_w, = torch.autograd.grad(layer(x).square().sum(), [layer.weight])  # the tensor the op returned
        kept = grad_w.clone()
        layer(x)
    assert torch.equal(grad_w, kept)


@pytest.mark.parametrize("name", ["flora_conv2d_groups", "liera_exp_conv2d"])
def test_steps_after_the_first_reuse_the_kept_buffer_exactly(name, fused):
    """Three merged training steps in a row, the later ones on the buffer the earlier backward kept
    (poisoned when lent): the same outputs and gradients as the first."""
    from lrtensor_kernels.kernels import workspace

    layer = _build(name, torch.float32, 16, "merged")
    x = _input(layer, torch.float32, 17)
    grad_out = torch.randn_like(layer(x))
    workspace.clear()
    steps = [_run(layer, x, fused, grad_out) for _ in range(3)]
    for y, grads in steps[1:]:
        assert torch.equal(y, steps[0][0])
        assert all(torch.equal(g, want) for g, want in zip(grads, steps[0][1], strict=True))


@pytest.mark.parametrize("name", ["flora_conv2d_groups", "liera_tucker_conv2d", "lora_conv2d_groups"])
def test_an_adapter_written_through_data_is_seen_by_the_next_forward(name, fused):
    """A write through ``.data`` (as gradcheck and hand-written updates make) changes no version
    counter: the next forward must still compute with the new values, not a form a backend built
    from the old ones."""
    layer = _build(name, torch.float32, 18, "merged")
    x = _input(layer, torch.float32, 19)
    with lk.use_backend(fused):
        layer(x).sum().backward()
        for p in layer.adapter_parameters():
            p.data.mul_(1.5).add_(0.25)
        y = layer(x)
    assert rel_err(y, forward64(layer, x)) <= 1e-5


def test_auto_backend_resolution(monkeypatch):
    from lrtensor_kernels import backend

    assert backend.resolve(torch.device("cpu")) == ("native" if backend.native_available() else "reference")
    if backend.triton_available():
        assert backend.resolve(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with lk.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.resolve(torch.device("cpu"))


def _op_args(layer, x, impl):
    return (x, layer.weight, layer.bias, layer.adapter_tensors(), layer.adapter_math.key, float(layer.scale),
            list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups, False, impl)


def _opcheck_utils(fused):
    """opcheck's default checks where the op runs natively (CUDA, or native on the CPU); the
    interpreted Triton op is too slow for the AOT dispatch check."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    return checks + ("test_aot_dispatch_dynamic",) if DEVICE == "cuda" or fused == "native" else checks


@pytest.mark.parametrize("name", ["flora_conv2d_groups", "liera_exp_conv2d"])
def test_opcheck(name, fused):
    layer = _build(name, torch.float32, 6)
    x = _input(layer, torch.float32, 7).requires_grad_()
    torch.library.opcheck(torch.ops.lrtensor.adapted_op.default, _op_args(layer, x, fused),
                          test_utils=_opcheck_utils(fused))


def test_opcheck_linear(fused):
    layer = _build("liera_linear", torch.float32, 8)
    x = _input(layer, torch.float32, 9).requires_grad_()
    args = (x, layer.weight, layer.bias, layer.adapter_tensors(), layer.adapter_math.key, float(layer.scale),
            [], [], [], 1, True, fused)
    torch.library.opcheck(torch.ops.lrtensor.adapted_op.default, args, test_utils=_opcheck_utils(fused))


# torch 2.11's Dynamo cannot unpack the generator that nn.ParameterList.__iter__ returns
# (`[core, *factors]` in layers.py: InternalTorchDynamoError, NotImplementedError in
# LocalGeneratorObjectVariable.unpack_var_sequence, on the first GPU run); torch 2.13 traces it.
@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 13),
                    reason="torch < 2.13: Dynamo cannot unpack an nn.ParameterList into a list (the package needs "
                           "torch >= 2.13 for torch.compile)")
def test_compile_fullgraph_has_no_graph_break(fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 4)).to(DEVICE)
    lk.inject(model, "flora")
    for _, layer in lk.adapter_layers(model):
        randomize_adapter(layer, 1)
    compiled_matches_eager(model, torch.randn(2, 3, 7, 7, device=DEVICE), DEVICE, fused)


@pytest.mark.gpu
def test_auto_is_triton_on_cuda():
    layer = _build("flora_linear", torch.bfloat16, 10)
    x = _input(layer, torch.bfloat16, 11)
    _, saved = _saved_tensors(layer, x.requires_grad_(), "auto")
    assert not [t for t in saved if t.numel() >= layer.weight.numel() and t.data_ptr() != layer.weight.data_ptr()]


def test_interpreter_is_on_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"


AUTOCAST_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.parametrize("name, strategy", [p for p in LAYER_STRATEGIES if p.values[0] in (
    "flora_conv2d_groups", "lora_conv2d_groups", "liera_exp_conv2d", "liera_linear", "ssb_linear")])
def test_autocast_runs_the_op_in_the_autocast_dtype(name, strategy, fused):
    """Mixed precision: float32 weights and adapters, the conv/matmul in the autocast dtype, the
    adapter math in float32; outputs and gradients within the accuracy rule against float64."""
    layer = _build(name, torch.float32, 14, strategy)
    x = _input(layer, torch.float32, 15)
    with torch.no_grad():
        grad_out = torch.randn_like(layer(x))
    results = {}
    for backend in ("reference", fused):
        with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE):
            results[backend] = _run(layer, x, backend, grad_out.to(AUTOCAST_DTYPE))
        assert results[backend][0].dtype == AUTOCAST_DTYPE
        assert all(g.dtype == torch.float32 for g in results[backend][1])
    ref_y, ref_g = layer_oracle(layer, x, grad_out)
    floor = FLOOR[AUTOCAST_DTYPE]
    assert_accuracy(f"{name} autocast output", results[fused][0], results["reference"][0], ref_y, floor)
    for i, (g, p, r) in enumerate(zip(results[fused][1], results["reference"][1], ref_g)):
        assert_accuracy(f"{name} autocast grad {i}", g, p, r, floor)


@pytest.mark.parametrize("name, strategy", [p for p in LAYER_STRATEGIES if p.values[0] in (
    "flora_conv2d_groups", "liera_linear")])
def test_autocast_with_dropout_matches_reference(name, strategy, fused):
    layer = _build(name, torch.float32, 16, strategy)
    layer.dropout = 0.3
    x = _input(layer, torch.float32, 17)
    outs = _outputs_with_same_dropout(layer, x, fused, 5, AUTOCAST_DTYPE)
    assert outs[1].dtype == AUTOCAST_DTYPE
    assert rel_err(outs[1], outs[0]) < 1e-2


def test_workspace_lends_one_buffer_per_shape_and_thread(monkeypatch):
    import threading

    from lrtensor_kernels.kernels import workspace

    workspace.clear()
    with workspace.borrowed((3, 4), torch.float32, torch.device("cpu")) as first:
        assert torch.isnan(first).all()  # poisoned (the fixture above)
        with workspace.borrowed((3, 4), torch.float32, torch.device("cpu")) as nested:
            assert nested is not first  # never lent twice at once
    with workspace.borrowed((3, 4), torch.float32, torch.device("cpu")) as again:
        assert again is first or again is nested
    seen = []

    def other_thread():
        with workspace.borrowed((3, 4), torch.float32, torch.device("cpu")) as t:
            seen.append(t)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen[0] is not first and seen[0] is not nested
    with workspace.borrowed((3, 4), torch.float32, torch.device("meta")) as none:
        assert none is None
    monkeypatch.setattr(workspace, "LIMIT_BYTES", 100)
    with workspace.borrowed((30,), torch.float32, torch.device("cpu")) as too_big:
        assert too_big is None
    with workspace.borrowed((5,), torch.float32, torch.device("cpu")):
        pass
    with workspace.borrowed((6,), torch.float32, torch.device("cpu")):
        pass  # 24 + 20 + the (3, 4) pair's 96 bytes > 100: the least recently used go
    assert sum(t.nbytes for t in workspace._pool().values()) <= 100
    workspace.clear()


def test_workspace_keeps_only_tensors_it_can_lend():
    from lrtensor_kernels.kernels import workspace

    workspace.clear()
    kept = torch.randn(3, 4)
    workspace.keep(kept)
    with workspace.borrowed((3, 4), torch.float32, torch.device("cpu")) as lent:
        assert lent is kept
    whole = torch.randn(6, 4)
    for other in (whole[:3], whole.t()[:, :3].t(), torch.randn(4, 3).t(), torch.randn(3, 4, requires_grad=True),
                  torch.randn(3, 4, device="meta")):
        workspace.keep(other)
        with workspace.borrowed((3, 4), torch.float32, torch.device("cpu")) as lent:
            assert lent is kept, other.shape
    workspace.clear()


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
@pytest.mark.parametrize("form, channels", [("three", 96), ("three", 24), ("folded", 96)])
def test_bypass_keeps_the_small_chain_activations_and_is_exact(backend, form, channels):
    """A wide layer keeps u and z (its backward runs no op of the forward again), a narrower one u
    alone (z recomputed), a folded chain z: against the float64 oracle each way. Where the op would
    keep all the chain's activations (u and z, or the folded chain's z), the same ops run under
    plain autograd instead, which keeps the same tensors; a narrower layer runs the op."""
    if backend != "reference":
        fused_kernels(backend)
    torch.manual_seed(3)
    layer = randomize_adapter(lk.FLoRAConv2d(channels, channels, 3, padding=1, ranks=4, strategy="bypass"), 4, 0.1)
    x = _input(layer, torch.float32, 5)
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t

    with chain_form(form), lk.use_backend(backend):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x.clone().requires_grad_())
        grad_out = torch.randn_like(y)
        got_y, got_g = _run(layer, x, backend, grad_out)
    activation = (2, 4, 7, 7)  # u and z: 4 channels at the input's 7x7
    want = {"three": 2 if channels == 96 else 1, "folded": 1}[form]
    assert kept.count(activation) == want, kept
    assert (type(y.grad_fn).__name__ == "EagerOpBackward") == (channels == 24), type(y.grad_fn)
    # against the oracle alone (the reference backend runs these same ops, the op or autograd)
    ref_y, ref_g = layer_oracle(layer, x, grad_out)
    assert rel_err(got_y, ref_y) < 1e-5
    for n, g, r in zip(["input"] + list(layer.adapter_state()), got_g, ref_g):
        assert rel_err(g, r) < 1e-5, n
