"""The meta device: adapter layers, lk.plan and merge run on meta tensors (shapes only); adapter
files neither load into nor save from a model without values, and say what to do instead."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from fused import fused_kernels
from lrtensor_kernels.strategies import cost

LAYERS = {
    "flora_conv2d": lambda **kw: lk.FLoRAConv2d(4, 6, 3, padding=1, groups=2, **kw),
    "flora_linear": lambda **kw: lk.FLoRALinear(5, 4, **kw),
    "lora_conv2d": lambda **kw: lk.LoRAConv2d(4, 6, 3, padding=1, groups=2, rank=2, **kw),
    "liera_conv1d": lambda **kw: lk.LieRAConv1d(3, 4, 3, padding=1, padding_mode="reflect", rank=2, **kw),
    "ssl_conv3d": lambda **kw: lk.SSLConv3d(2, 3, 2, **kw),
    "ssb_linear": lambda **kw: lk.SSBLinear(5, 4, **kw),
}


def _cases():
    for name, make in LAYERS.items():
        for strategy in ("auto",) + cost.applicable(make(device="meta").adapter_math):
            for backend in ("reference", "native", "triton"):
                yield pytest.param(name, strategy, backend, id=f"{name}-{strategy}-{backend}")
        yield pytest.param(name, "fused", "triton", id=f"{name}-fused-triton")  # fused runs on triton alone


def _input(layer, device):
    shape = (2, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels) + (6,) * (
        layer.weight.dim() - 2)
    return torch.randn(shape, device=device)


@pytest.mark.parametrize("name, strategy, backend", list(_cases()))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_forward_and_backward_on_meta_tensors(name, strategy, backend, dropout):
    if backend != "reference":
        fused_kernels(backend)
    layer = LAYERS[name](device="meta", strategy=strategy, dropout=dropout).train()
    x = _input(layer, "meta").requires_grad_()
    with lk.use_backend(backend):
        y = layer(x)
        y.sum().backward()
    plain = layer._nn_base()(**layer._base_kwargs(layer), device="meta")
    assert y.device.type == "meta" and y.shape == plain(x).shape
    assert x.grad.shape == x.shape
    for p in layer.adapter_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.device.type == "meta"


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("method", ["flora", "lora", "liera", "ssb"])
def test_plan_and_merge_on_a_meta_model(method):
    with torch.device("meta"):
        model = small_model()
    names = lk.inject(model, method, trainable_modules=["1"])
    x = torch.randn(2, 3, 10, 10, device="meta")
    plan = lk.plan(model, x)
    assert [row.name for row in plan] == names
    assert all(row.strategy in cost.applicable(row_layer.adapter_math)
               for row, (_, row_layer) in zip(plan, lk.adapter_layers(model)))
    assert model(x).shape == (2, 4)
    lk.merge(model)
    assert all(layer.merged for _, layer in lk.adapter_layers(model)) and model(x).shape == (2, 4)
    lk.unmerge(model)
    plain = lk.unload(model, merge=True)
    assert not lk.adapter_layers(plain) and plain(x).shape == (2, 4)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    base_state = copy.deepcopy(model.state_dict())
    lk.inject(model, "flora", trainable_modules=["1"], ranks=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    lk.save_adapters(model, str(tmp_path))
    return model.eval(), base_state, tmp_path


def test_load_into_a_meta_model_is_refused_and_changes_nothing(saved):
    _, _, directory = saved
    with torch.device("meta"):
        model = small_model()
    before = copy.deepcopy(model)
    with pytest.raises(lk.AdapterFileError) as info:
        lk.load_adapters(model, str(directory))
    message = str(info.value)
    for layer in ("'0'", "'3'", "'6'"):
        assert f"layer {layer}: its weight is on the meta device and holds no values" in message
    assert "trainable module '1': its state is on the meta device" in message
    assert "load_state_dict(state, assign=True)" in message
    assert str(model) == str(before) and not lk.adapter_layers(model)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in before.parameters()]


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_a_meta_model_given_its_base_state_then_loads(saved, how):
    trained, base_state, directory = saved
    with torch.device("meta"):
        model = small_model()
    if how == "assign":
        model.load_state_dict(base_state, assign=True)
    else:
        model.to_empty(device="cpu")
        model.load_state_dict(base_state)
    lk.load_adapters(model, str(directory))
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(model.eval()(x), trained(x))


def test_save_of_a_meta_model_is_refused(tmp_path):
    with torch.device("meta"):
        model = small_model()
    lk.inject(model, "ssl")
    with pytest.raises(lk.AdapterConfigError, match=r"save_adapters: SSLConv2d '0': tensor in_scale is on the meta "
                                                    r"device and holds no values.*nothing was written"):
        lk.save_adapters(model, str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d")
