"""Short adapter training runs on scikit-learn's bundled 8x8 digits (no download), reference backend on CPU.

The base CNN is pre-trained briefly (20 Adam steps) on other samples, so the frozen net is not random but far
from done; the adapters are then trained on the first 300 digits: the loss must clearly go down and the accuracy
up, while every base parameter stays bit for bit the same.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrtensor_kernels as lk

sklearn_datasets = pytest.importorskip("sklearn.datasets")

pytestmark = pytest.mark.usefixtures("reference_backend")

STEPS = 40


def tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def digits():
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


@pytest.fixture(scope="module")
def base_model(digits):
    """Fixed-seed CNN pre-trained 20 steps on samples 1000-1399 (disjoint from the adapter training set)."""
    x, y = digits
    xs, ys = x[1000:1400], y[1000:1400]
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with lk.use_backend("reference"):
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("method, kwargs, lr", [
    ("flora", {}, 3e-3),
    ("flora", dict(ranks=4, dropout=0.1), 3e-3),
    ("lora", dict(rank=4, alpha=4.0), 1e-2),
    ("liera", dict(rank=4, alpha=4.0), 1e-2),
    ("liera", dict(rank=4, alpha=4.0, mode="first_order", delta="tucker"), 1e-2),
    ("ssl", {}, 3e-2),
    ("ssb", {}, 3e-2),
], ids=["flora", "flora-r4-dropout", "lora", "liera-exp-lora", "liera-first_order-tucker", "ssl", "ssb"])
def test_adapter_training_reduces_loss_and_keeps_base_frozen(digits, base_model, method, kwargs, lr):
    x, y = digits
    xs, ys = x[:300], y[:300]
    model = copy.deepcopy(base_model).train()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    names = lk.inject(model, method, **kwargs)
    assert names == ["0", "2", "5"]
    adapter = {f"{n}.{k}": t for n, layer in lk.adapter_layers(model) for k, t in layer.adapter_state().items()}
    adapter_start = {k: t.detach().clone() for k, t in adapter.items()}
    # every parameter goes to the optimiser: only requires_grad keeps the base frozen
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    losses = []
    with lk.use_backend("reference"):
        model.eval()
        with torch.no_grad():
            start = F.cross_entropy(model(xs), ys).item()
            start_acc = (model(xs).argmax(1) == ys).float().mean().item()
        model.train()
        torch.manual_seed(1)
        for _ in range(STEPS):
            opt.zero_grad()
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            end = F.cross_entropy(model(xs), ys).item()
            end_acc = (model(xs).argmax(1) == ys).float().mean().item()

    assert all(math.isfinite(v) for v in losses)
    assert 0.5 < start < 3.0  # the frozen net is neither random nor done
    assert end < 0.6 * start, f"loss {start:.3f} -> {end:.3f}"
    assert end_acc > start_acc + 0.05, f"accuracy {start_acc:.3f} -> {end_acc:.3f}"

    # base parameters bit for bit unchanged, and never given a gradient
    state = model.state_dict()
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key
    for _, layer in lk.adapter_layers(model):
        assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    # every adapter tensor was trained
    for key, t in adapter.items():
        assert not torch.equal(t.detach(), adapter_start[key]), f"{key} did not change"
        assert t.grad is not None

    # merged, the trained adapters give the same predictions
    with torch.no_grad():
        before_merge = model(xs)
        lk.merge(model)
        torch.testing.assert_close(model(xs), before_merge, rtol=1e-4, atol=1e-4)
        lk.unmerge(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
