"""torch.compile of injected models. A small model with every method, on every backend that runs
here, and FLoRA on torchvision's resnet18 and timm's convnext_atto (or their stand-ins), compiled by
inductor with fullgraph: forward and every gradient matching eager within the oracle's tolerance,
gradients in their parameters' layouts. The real models under every strategy, each model holding
every method that runs it, traced by dynamo without compiling code: one graph for a training
step. A training loop without fullgraph: one compile per input shape, the cost model run only
while tracing. Marked slow: inductor compiles C++ on the CPU (about 20-150 s
per model on 2 cores); CI runs them (`pytest -m slow`), on torch 2.13 and 2.14."""
from __future__ import annotations

import copy
import importlib
import re

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import lrtensor_kernels as lk
import models
from lrtensor_kernels import backend as lk_backend
from lrtensor_kernels.strategies import cost
from models import optional_import
from oracle import F64, assert_accuracy, layer_oracle, project64, randomize_adapter, rel_err

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONCRETE_BACKENDS = [b for b in lk.BACKENDS if b != "auto"]
FLOOR = 1e-6
DECIDE_BACKEND = cost.decide_backend


def require(backend_name: str) -> None:
    """Skips unless ``backend_name`` can run on this machine's device."""
    try:
        with lk.use_backend(backend_name):
            lk_backend.resolve(torch.device(DEVICE))
    except RuntimeError as err:
        pytest.skip(f"backend {backend_name!r} does not run here: {err}")


def injected_model():
    """Every method once: FLoRA on a padded conv, LieRA on a grouped conv, LoRA on a 1x1 conv, SSB and SSL on linears."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 5 * 5, 12), nn.ReLU(), nn.Linear(12, 4)).to(DEVICE)
    lk.inject(model, "flora", target_modules=["0"])
    lk.inject(model, "liera", target_modules=["2"], rank=3)
    lk.inject(model, "lora", target_modules=["4"], rank=3)
    lk.inject(model, "ssb", target_modules=["6"])
    lk.inject(model, "ssl", target_modules=["8"])
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, 20 + i, std=0.2)
    return model


def _keep_input_and_output_grad(layer, inputs, output):
    layer.seen_input = inputs[0].detach()
    output.retain_grad()
    layer.seen_output = output


def compiled_plain(model, model64, x, loss) -> tuple:
    """The same model with W' merged into plain layers, compiled by inductor: its output and, by
    trainable tensor name, its gradients, those of the adapter tensors being the float64
    projection of its gradient w.r.t. W' (what a compiled plain model and exact adapter math give)."""
    plain = lk.unload(copy.deepcopy(model), merge=True)
    adapted = dict(lk.adapter_layers(model64))
    for name in adapted:
        plain.get_submodule(name).weight.requires_grad_(True)
    torch._dynamo.reset()
    out = torch.compile(plain, fullgraph=True, backend="inductor")(x)
    loss(out).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, layer in adapted.items():
        grad_weight = grads.pop(f"{name}.weight" if name else "weight")
        grads.update({f"{name}.{k}" if name else k: g for k, g in zip(layer.adapter_state(),
                                                                        project64(layer, grad_weight))})
    return out, grads


def assert_compiled_matches_eager(model, x, backend_name, loss=lambda out: out.square().sum(),
                                  compiled_baseline=False):
    """Inductor, fullgraph, against eager on ``backend_name``, both float32, within twice plain
    PyTorch's error against the float64 model on the reference backend (plus a small floor): the
    output and the gradient of every trainable tensor, each in its parameter's layout. Plain
    PyTorch is eager; with ``compiled_baseline``, eager or the same model merged into plain layers
    and compiled by inductor, whichever is further from float64 (inductor's own reordering of a
    deep network's sums: a plain resnet18 compiled is 2x further from float64 than eager).
    Returns the compiled output."""
    trained = [p for p in model.parameters() if p.requires_grad]
    model64 = copy.deepcopy(model).to(F64)
    magnitudes = {}  # per adapter tensor: the layer's float64 gradient from absolute values (its terms' size)
    hooks = [layer.register_forward_hook(_keep_input_and_output_grad) for _, layer in lk.adapter_layers(model64)]
    with lk.use_backend("reference"):
        ref = model64(x.to(F64))
        loss(ref).backward()
    for h in hooks:
        h.remove()
    for name, layer in lk.adapter_layers(model64):
        _, grads = layer_oracle(layer, layer.seen_input, layer.seen_output.grad, absolute=True)
        magnitudes.update({f"{name}.{k}" if name else k: g for k, g in zip(layer.adapter_state(), grads[1:])})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref_grads = [p.grad for p in model64.parameters() if p.requires_grad]
    with lk.use_backend(backend_name):
        eager = model(x)
        loss(eager).backward()
        eager_grads = [p.grad.clone() for p in trained]
        model.zero_grad(set_to_none=True)

        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        out = compiled(x)
        loss(out).backward()
    baselines = [(eager, eager_grads)]
    if compiled_baseline:
        plain_out, plain_grads = compiled_plain(model, model64, x, loss)
        baselines.append((plain_out, [plain_grads[n] for n in names]))

    def plain(i, reference):  # the baseline further from float64
        values = [out if i is None else grads[i] for out, grads in baselines]
        return max(values, key=lambda v: rel_err(v, reference))

    # float32 both: within twice plain PyTorch's error against float64, plus a small floor. A
    # gradient is a sum whose terms can be far larger than the (cancelling) result: the floor is
    # scaled by the condition number from the layer's gradient computed on absolute values
    # (oracle's ``magnitude``)
    assert_accuracy("output", out, plain(None, ref), ref, FLOOR)
    for i, (n, p, ref_grad) in enumerate(zip(names, trained, ref_grads)):
        assert p.grad is not None
        assert_accuracy(f"gradient of {n}", p.grad, plain(i, ref_grad), ref_grad, FLOOR, magnitude=magnitudes.get(n))
        assert p.grad.stride() == p.stride()
    return out


@pytest.mark.parametrize("backend_name", CONCRETE_BACKENDS)
def test_inductor_fullgraph_matches_eager(backend_name):
    require(backend_name)
    model = injected_model()
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_compiled_matches_eager(model, x, backend_name)
    # the comparison can fail: the adapters change the output
    with torch.no_grad(), lk.use_backend(backend_name):
        lk.merge(model)
        merged = model(x)
        lk.unload(model, merge=False)
        assert rel_err(model(x), merged) > 1e-3


# ----------------------------------------------------------------------------------------------
# torchvision's resnet18 and timm's convnext_atto; where those do not import (beside the CPU torch
# wheel), the same layers written out in tests/models.py
# ----------------------------------------------------------------------------------------------
def _standin(real_module: str, make):
    def build():
        try:
            importlib.import_module(real_module)
        except Exception:  # noqa: BLE001 (a wrong torch build raises more than ImportError)
            return make()
        pytest.skip(f"{real_module} imports here: the real model is tested instead")
    return build


REAL_MODELS = {
    "torchvision_resnet18": (lambda: optional_import("torchvision.models").resnet18(weights=None, num_classes=10),
                             r"fc|.*bn\d|.*downsample\.1"),
    "timm_convnext_atto": (lambda: optional_import("timm").create_model("convnext_atto", pretrained=False,
                                                                          num_classes=10), ["head"]),
    "resnet18_standin": (_standin("torchvision.models", lambda: models.ResNet18(num_classes=10)),
                         r"fc|.*bn\d|.*downsample\.1"),
    "convnext_atto_standin": (_standin("timm", lambda: models.ConvNeXtAtto(num_classes=10)), ["head"]),
}
METHOD_KWARGS = {"flora": {}, "liera": dict(rank=4), "lora": dict(rank=4), "ssl": {}, "ssb": {}}
STRATEGIES = ("auto", "merged", "two_branch", "bypass", "hybrid")


def methods_running(strategy: str) -> list:
    """The methods that can run ``strategy`` (every one under auto)."""
    return [method for method, kwargs in METHOD_KWARGS.items() if strategy == "auto" or strategy in
            cost.applicable(lk.layers.LAYERS[method][nn.Conv2d](4, 4, 1, **kwargs).adapter_math)]


# One model per strategy, its layers shared out among the methods that run it, on the reference
# backend, whose strategies trace as plain torch ops. On the native backend they trace to its
# custom ops: auto (merged's adapted_op, and FLoRA's bypass) and bypass cover each of them
# (two_branch is adapted_op again). Triton's interpreter is too slow for whole models (the small
# model above runs it).
ONE_GRAPH_CASES = [pytest.param(strategy, backend_name, id=f"{strategy}-{backend_name}")
                   for backend_name in ("reference", "native") for strategy in STRATEGIES
                   if backend_name == "reference" or strategy in ("auto", "bypass")]


def test_every_method_and_strategy_is_compiled():
    """The one-graph cases: auto (every method) and each strategy any method can run."""
    assert set(METHOD_KWARGS) == set(lk.layers.LAYERS) == set(methods_running("auto"))
    assert {s for m, kw in METHOD_KWARGS.items()
            for s in cost.applicable(lk.layers.LAYERS[m][nn.Conv2d](4, 4, 1, **kw).adapter_math)} | {"auto"} \
        == set(STRATEGIES)


def real_model(name: str, method: str, strategy: str = "auto", seed: int = 0):
    """The model injected with ``method`` under ``strategy``, adapter tensors random, the listed
    modules trained in full, in train mode."""
    make, trainable = REAL_MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DEVICE)
    lk.inject(model, method, strategy=strategy, trainable_modules=trainable, **METHOD_KWARGS[method])
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, seed + i, std=0.05)
    return model.train()


def mixed_model(name: str, strategy: str, seed: int = 0):
    """The model with its adaptable layers shared out in turn among the methods that run
    ``strategy``, all under ``strategy``, adapter tensors random, the listed modules trained in full,
    in train mode: one model, and one trace, for every method a strategy applies to."""
    make, trainable = REAL_MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DEVICE)
    targets = lk.inject(copy.deepcopy(model), "ssl", trainable_modules=trainable)
    methods = methods_running(strategy)
    for i, method in enumerate(methods):
        mine = targets[i::len(methods)]
        lk.inject(model, method, strategy=strategy, trainable_modules=trainable,
                  target_modules="|".join(re.escape(n) for n in mine), **METHOD_KWARGS[method])
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, seed + i, std=0.05)
    method_of = {cls: method for method, classes in lk.layers.LAYERS.items() for cls in classes.values()}
    assert {method_of[type(layer)] for _, layer in lk.adapter_layers(model)} == set(methods)
    return model.train()


def images(batch: int, size: int = 32, seed: int = 1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("strategy, backend_name", ONE_GRAPH_CASES)
@pytest.mark.parametrize("model_name", REAL_MODELS)
def test_real_model_compiles_in_one_graph(model_name, strategy, backend_name):
    """fullgraph, traced by dynamo without compiling code: one graph for the training step's forward
    of a model holding every method that runs ``strategy``, no break, no recompile on the next step."""
    require(backend_name)
    model = mixed_model(model_name, strategy)
    trained = [p for p in model.parameters() if p.requires_grad]
    x = images(2)
    counter = CompileCounter()
    with lk.use_backend(backend_name):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        for _ in range(2):
            compiled(x).square().mean().backward()
    assert counter.frame_count == 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("model_name", REAL_MODELS)
def test_real_model_inductor_matches_eager(model_name):
    """FLoRA under auto (merged and bypass layers in one model) on the default backend."""
    model = real_model(model_name, "flora")
    chosen = {row.strategy for row in lk.plan(model, images(4))}
    assert chosen == {"merged", "bypass"}, chosen
    assert_compiled_matches_eager(model, images(4), "auto", loss=lambda out: out.square().mean(),
                                  compiled_baseline=True)


@pytest.mark.parametrize("model_name", ["torchvision_resnet18", "resnet18_standin"])
def test_training_loop_compiles_once_per_input_shape(model_name, monkeypatch):
    """torch.compile without fullgraph over a training loop (AdamW): one compile for five steps of
    one batch shape, one more for a last smaller batch, none when the first shape comes back; the
    cost model runs only while tracing, once per distinct layer call signature."""
    model = real_model(model_name, "flora")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    decisions = []
    monkeypatch.setattr(cost, "decide_backend",  # once per signature, whatever the backends offered
                        lambda w, requested, impls: decisions.append(w) or DECIDE_BACKEND(w, requested, impls))
    cost._decision_cached.cache_clear()
    counter = CompileCounterWithBackend("aot_eager")  # forward and backward graphs traced
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        compiled(images(batch, seed=batch)).square().mean().backward()
        optimizer.step()

    step(4)
    first = len(decisions)
    layers = len(lk.adapter_layers(model))
    assert 0 < first <= layers and len(set(decisions)) == first  # each signature decided once
    for _ in range(4):
        step(4)
    assert counter.frame_count == 1 and len(decisions) == first
    step(3)
    assert counter.frame_count == 2 and len(decisions) > first
    after_small = len(decisions)
    step(4)
    assert counter.frame_count == 2 and len(decisions) == after_small
