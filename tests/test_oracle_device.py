"""The float64 oracle (tests/oracle.py) on the device of the layer it checks: on a GPU the fused
layers' tests compare a CUDA layer with its float64 twin, so every tensor and module the oracle
builds must live on the layer's device. The meta device stands in for a second device here: a
helper that builds on the default device (the CPU) mixes devices and fails."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from oracle import F64, effective_weight64, layer_oracle, plain_twin, randomize_adapter

LAYERS = {
    "flora_conv2d_groups": lambda: lk.FLoRAConv2d(6, 8, 3, padding=1, groups=2),
    "flora_conv1d_dilated": lambda: lk.FLoRAConv1d(4, 6, 3, dilation=2, padding=2),
    "lora_depthwise_reflect": lambda: lk.LoRAConv2d(4, 4, 3, padding=1, groups=4, rank=2, padding_mode="reflect"),
    "liera_conv3d": lambda: lk.LieRAConv3d(3, 4, 2, rank=2, bias=False),
    "ssb_linear": lambda: lk.SSBLinear(5, 4),
}


def _on(device, name):
    layer = randomize_adapter(LAYERS[name](), 0).to(device)
    shape = (2, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels) + (5,) * (
        layer.weight.dim() - 2)
    return layer, torch.randn(shape, device=device)


@pytest.mark.parametrize("name", LAYERS)
def test_plain_twin_lives_on_the_weights_device(name):
    layer, _ = _on("meta", name)
    twin = plain_twin(layer, effective_weight64(layer))
    assert twin.weight.device.type == "meta" and twin.weight.dtype == F64
    if layer.bias is not None:
        assert twin.bias.device.type == "meta"


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_oracle_runs_on_the_layers_device(name, absolute):
    layer, x = _on("meta", name)
    with torch.no_grad():
        grad_out = torch.empty_like(layer(x))
    y, grads = layer_oracle(layer, x, grad_out, absolute=absolute)
    assert y.device.type == "meta" and y.shape == grad_out.shape
    assert [g.device.type for g in grads] == ["meta"] * (1 + len(layer.adapter_state()))
