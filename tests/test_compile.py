"""torch.compile with inductor, fullgraph, of an injected model on every backend that runs here:
one graph, no break, forward and every gradient matching eager, gradients in their parameters'
layouts. Marked slow: inductor compiles C++ on the CPU (about 20-60 s per model on 2 cores); CI runs
them (`pytest -m slow`)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from lrtensor_kernels import backend as lk_backend
from oracle import F64, assert_accuracy, layer_oracle, randomize_adapter, rel_err

pytestmark = pytest.mark.slow

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONCRETE_BACKENDS = [b for b in lk.BACKENDS if b != "auto"]
FLOOR = 1e-6


def require(backend_name: str) -> None:
    """Skips unless ``backend_name`` can run on this machine's device."""
    try:
        with lk.use_backend(backend_name):
            lk_backend.resolve(torch.device(DEVICE))
    except RuntimeError as err:
        pytest.skip(f"backend {backend_name!r} does not run here: {err}")


def injected_model():
    """Every method once: FLoRA on a padded conv and a 1x1 conv, LieRA on a grouped conv, SSB and SSL on linears."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 5 * 5, 12), nn.ReLU(), nn.Linear(12, 4)).to(DEVICE)
    lk.inject(model, "flora", target_modules=["0", "4"])
    lk.inject(model, "liera", target_modules=["2"], rank=3)
    lk.inject(model, "ssb", target_modules=["6"])
    lk.inject(model, "ssl", target_modules=["8"])
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, 20 + i, std=0.2)
    return model


def _keep_input_and_output_grad(layer, inputs, output):
    layer.seen_input = inputs[0].detach()
    output.retain_grad()
    layer.seen_output = output


@pytest.mark.parametrize("backend_name", CONCRETE_BACKENDS)
def test_inductor_fullgraph_matches_eager(backend_name):
    require(backend_name)
    model = injected_model()
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    trained = [p for p in model.parameters() if p.requires_grad]
    model64 = copy.deepcopy(model).to(F64)
    magnitudes = {}  # per adapter tensor: the layer's float64 gradient from absolute values (its terms' size)
    hooks = [layer.register_forward_hook(_keep_input_and_output_grad) for _, layer in lk.adapter_layers(model64)]
    with lk.use_backend("reference"):
        ref = model64(x.to(F64))
        ref.square().sum().backward()
    for h in hooks:
        h.remove()
    for name, layer in lk.adapter_layers(model64):
        _, grads = layer_oracle(layer, layer.seen_input, layer.seen_output.grad, absolute=True)
        magnitudes.update({f"{name}.{k}": g for k, g in zip(layer.adapter_state(), grads[1:])})
    ref_grads = [p.grad for p in model64.parameters() if p.requires_grad]
    with lk.use_backend(backend_name):
        eager = model(x)
        eager.square().sum().backward()
        eager_grads = [p.grad.clone() for p in trained]
        model.zero_grad(set_to_none=True)

        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons

        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        out = compiled(x)
        out.square().sum().backward()
    # float32 both: within twice eager's error against float64, plus a small floor. A gradient is a
    # sum whose terms can be far larger than the (cancelling) result: the floor is scaled by the
    # condition number from the layer's gradient computed on absolute values (oracle's ``magnitude``)
    assert_accuracy("output", out, eager, ref, FLOOR)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, p, eager_grad, ref_grad in zip(names, trained, eager_grads, ref_grads):
        assert p.grad is not None
        assert_accuracy(f"gradient of {n}", p.grad, eager_grad, ref_grad, FLOOR, magnitude=magnitudes[n])
        assert p.grad.stride() == p.stride()
    # the comparison can fail: the adapters change the output
    with torch.no_grad(), lk.use_backend(backend_name):
        lk.merge(model)
        merged = model(x)
        lk.unload(model, merge=False)
        assert rel_err(model(x), merged) > 1e-3
