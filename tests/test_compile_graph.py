"""What dynamo traces of an injected model, without compiling code (``torch._dynamo.explain``,
seconds): one graph and no break on the paths eager tests alone cannot see, such as ``auto``
falling back to the reference backend where the native one does not build. The inductor
compiles are in tests/test_compile.py (slow)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from lrtensor_kernels import backend
from oracle import randomize_adapter


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))
    lk.inject(model, "flora", target_modules=["0"])
    lk.inject(model, "lora", target_modules=["2"], rank=2)
    lk.inject(model, "ssb", target_modules=["4"])
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, i, std=0.2)
    return model


def graphs(model, x) -> tuple:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    return explanation.graph_count, explanation.graph_break_count


def test_auto_without_the_native_backend_traces_in_one_graph(monkeypatch):
    """The first trace warns that the native backend is unavailable (under the warning's lock,
    which dynamo cannot trace) and still makes one graph."""
    from lrtensor_kernels.kernels import native_build

    monkeypatch.setattr(backend, "native_available", lambda: False)
    monkeypatch.setattr(backend, "_warned_native", False)
    monkeypatch.setattr(native_build, "unavailable_reason", lambda: "planted")
    model = small_model()
    with lk.use_backend("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert graphs(model, torch.randn(2, 3, 6, 6)) == (1, 0)
    assert len([w for w in caught if "planted" in str(w.message)]) == 1


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
def test_a_training_step_traces_in_one_graph(backend_name):
    model = small_model()
    with lk.use_backend(backend_name):
        assert graphs(model, torch.randn(2, 3, 6, 6)) == (1, 0)
