"""The strategy decision is made once per layer call signature and remembered: a training step after
the first runs no cost model, and everything the cost model reads is in the signature (a call that
differs in any of it gets its own decision)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from lrtensor_kernels import strategies
from lrtensor_kernels.strategies import cost
from lrtensor_kernels.strategies.call import AdaptedCall
from oracle import randomize_adapter

pytestmark = pytest.mark.usefixtures("reference_backend")

DECIDE = cost.decide


@pytest.fixture
def decisions(monkeypatch):
    """The workloads the cost model is run on, from a cleared memo."""
    made = []
    monkeypatch.setattr(cost, "decide", lambda w, requested: made.append((w, requested)) or DECIDE(w, requested))
    cost._decision_cached.cache_clear()
    yield made
    cost._decision_cached.cache_clear()


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    lk.inject(model, "flora", target_modules=["0", "2", "4"])
    lk.inject(model, "ssb", target_modules=["6"])
    for i, (_, layer) in enumerate(lk.adapter_layers(model)):
        randomize_adapter(layer, i, std=0.2)
    return model


def test_a_training_step_after_the_first_runs_no_cost_model(decisions):
    model = small_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 3, 6, 6)
    for step in range(4):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
        if step == 0:
            first = list(decisions)
    # layers "2" and "4" make the same call: one decision serves both
    assert len(first) == 3 and len({w for w, _ in first}) == 3
    assert decisions == first
    model(torch.randn(3, 3, 6, 6)).sum().backward()  # a new batch size: a new signature per layer
    assert len(decisions) == 6


def _call(layer, x, impl="reference", dropped=False):
    return AdaptedCall(x, layer.weight, layer.bias, layer.adapter_tensors(), layer.adapter_math, layer.scale,
                       list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups,
                       x if dropped else None, impl)


def workload(call) -> cost.Workload:
    """The call's workload read off its tensors directly (not through the signature)."""
    needs = call.needs()
    return cost.Workload(tuple(call.weight.shape), tuple(call.x.shape), tuple(call.stride), tuple(call.padding),
                         tuple(call.dilation), call.groups, call.x.dtype, call.weight.dtype, call.weight.device.type,
                         call.math.key, tuple(tuple(t.shape) for t in call.adapter), needs["input"],
                         needs["weight"], needs["bias"], needs["adapter"], call.dropped_x is not None, call.impl)


def _variants():
    """(name, base call, changed call) where the two differ in one thing the cost model reads."""
    layer = randomize_adapter(lk.FLoRAConv2d(64, 64, 3, padding=1), 0)
    wide = randomize_adapter(lk.FLoRAConv2d(64, 64, 3, padding=1, ranks=48), 0)
    strided = randomize_adapter(lk.FLoRAConv2d(64, 64, 3, padding=1, stride=2), 0)
    x = torch.randn(4, 64, 16, 16)
    base = _call(layer, x)
    yield "input shape", base, _call(layer, torch.randn(64, 64, 16, 16))
    yield "adapter ranks", base, _call(wide, x)
    yield "stride", base, _call(strided, x)
    yield "dtype", base, _call(layer.to(torch.bfloat16), x.bfloat16())
    layer.float()
    yield "backend", base, _call(layer, x, impl="native")
    yield "dropout", base, _call(layer, x, dropped=True)
    yield "input gradient needed", base, _call(layer, x.clone().requires_grad_())
    frozen = randomize_adapter(lk.FLoRAConv2d(64, 64, 3, padding=1), 0).requires_grad_(False)
    yield "adapter gradients needed", base, _call(frozen, x)
    lora = randomize_adapter(lk.LoRAConv2d(64, 64, 3, padding=1, rank=8), 0)
    yield "method", base, _call(lora, x)
    yield "LoRA rank", _call(lora, x), _call(randomize_adapter(lk.LoRAConv2d(64, 64, 3, padding=1, rank=32), 0), x)


def test_every_input_of_the_cost_model_is_in_the_signature(decisions):
    """Each pair below gets different decisions when decided afresh; the memo must not hand the
    first one's to the second."""
    checked = 0
    for name, base, changed in _variants():
        fresh = [DECIDE(workload(call), "auto") for call in (base, changed)]
        costs = [{s: c.seconds(cost.DEVICES["cpu"], call.x.dtype) for s, c in d.costs.items()}
                 for d, call in zip(fresh, (base, changed))]
        assert costs[0] != costs[1], f"{name}: the variant does not change the cost model's estimates"
        strategies.decide(base)
        remembered = strategies.decide(changed)
        assert remembered.strategy == fresh[1].strategy, name
        assert {s: c.seconds(cost.DEVICES["cpu"], changed.x.dtype) for s, c in remembered.costs.items()} \
            == costs[1], name
        checked += 1
    assert checked == 10


def test_grad_mode_is_part_of_the_key(decisions):
    layer = randomize_adapter(lk.FLoRAConv2d(64, 64, 3, padding=1), 0)
    call = _call(layer, torch.randn(4, 64, 16, 16))
    training = strategies.decide(call)
    with torch.no_grad():
        inference = strategies.decide(call)
        assert inference.costs["merged"].flops < training.costs["merged"].flops
    assert len(decisions) == 2


def test_the_requested_strategy_is_part_of_the_key(decisions):
    layer = randomize_adapter(lk.FLoRAConv2d(8, 8, 3), 0)
    call = _call(layer, torch.randn(2, 8, 6, 6))
    assert [strategies.decide(call, s).strategy for s in ("merged", "bypass", "two_branch", "merged")] == [
        "merged", "bypass", "two_branch", "merged"]
    assert [requested for _, requested in decisions] == ["merged", "bypass", "two_branch"]


def test_the_backends_offered_are_part_of_the_key(decisions):
    """With several backends offered, the cost model runs once per backend on the first call of a
    signature (the workload with that backend) and not again; the decision names the backend it
    estimates faster. Offering one backend only is another key: decided afresh, on that backend."""
    layer = randomize_adapter(lk.FLoRAConv2d(64, 64, 3, padding=1), 0)
    call = _call(layer, torch.randn(4, 64, 16, 16), impl="native")
    both = [strategies.decide(call, "auto", ("native", "reference")) for _ in range(3)]
    assert [w.impl for w, _ in decisions] == ["native", "reference"]
    assert all(d is both[0] for d in both) and both[0].impl in ("native", "reference")
    assert set(both[0].backend_seconds) == {"native", "reference"}
    assert both[0].impl == min(both[0].backend_seconds, key=both[0].backend_seconds.get)
    alone = strategies.decide(call, "auto", ("native",))
    assert [w.impl for w, _ in decisions] == ["native", "reference", "native"]
    assert alone.impl is None and alone is not both[0]
