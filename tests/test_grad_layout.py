"""Every adapter gradient comes back with exactly its parameter's strides (DDP's bucket views need
that; size-1 modes included), on every backend that runs here, for contiguous and channels_last
parameters."""
from __future__ import annotations

import pytest
import torch

import lrtensor_kernels as lk
from lrtensor_kernels import methods
from oracle import randomize_adapter

BACKENDS = ["reference", "triton"]

LAYERS = {
    "flora_conv2d_1x1": lambda: lk.FLoRAConv2d(64, 128, 1),  # core (16, 16, 1, 1): the case DDP warned on
    "flora_conv2d_1x1_one_in": lambda: lk.FLoRAConv2d(1, 16, 1),
    "flora_conv1d_k1": lambda: lk.FLoRAConv1d(8, 16, 1),
    "flora_conv3d_k1": lambda: lk.FLoRAConv3d(8, 16, 1),
    "flora_conv2d_3x3": lambda: lk.FLoRAConv2d(8, 16, 3, padding=1),
    "flora_linear": lambda: lk.FLoRALinear(8, 16),
    "liera_tucker_1x1": lambda: lk.LieRAConv2d(8, 16, 1, rank=4, delta="tucker"),
    "liera_lora_1x1": lambda: lk.LieRAConv2d(8, 16, 1, rank=4),
    "ssb_depthwise": lambda: lk.SSBConv2d(8, 8, 3, groups=8),
}


def _input(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(3, layer.in_features, generator=g)
    n = layer.weight.dim() - 2
    return torch.randn(2, layer.in_channels, *([5] * n), generator=g)


def _grad_layouts(layer, backend):
    layer.zero_grad(set_to_none=True)
    with lk.use_backend(backend):
        layer(_input(layer)).square().sum().backward()
    return {name: (p.stride(), p.grad.stride()) for name, p in layer.named_parameters() if p.grad is not None}


# the Tucker kernel core built mode by mode (tensordot, then movedim) leaves the core's gradient a
# stride of 256 on a size-1 mode; built with the Kronecker product of the kernel factors, it does not
CONTRACTIONS = {"kronecker": methods.KRONECKER_LIMIT, "mode_by_mode": 0}


@pytest.mark.parametrize("contraction", list(CONTRACTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_adapter_gradients_have_the_parameter_strides(name, backend, contraction, monkeypatch):
    monkeypatch.setattr(methods, "KRONECKER_LIMIT", CONTRACTIONS[contraction])
    torch.manual_seed(0)
    layer = randomize_adapter(LAYERS[name](), 3)
    layouts = _grad_layouts(layer, backend)
    assert set(layer.adapter_state()) <= set(layouts)  # every adapter tensor got a gradient
    for param, (want, got) in layouts.items():
        assert got == want, f"{name} on {backend}: {param}.grad strides {got}, parameter strides {want}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_parameters_get_channels_last_gradients(backend):
    torch.manual_seed(0)
    layer = randomize_adapter(lk.FLoRAConv2d(8, 16, 3, padding=1, ranks=(4, 4, 3, 3)), 4)
    layer = layer.to(memory_format=torch.channels_last)
    assert not layer.core.is_contiguous()  # the 4-d adapter tensors are channels_last now
    for param, (want, got) in _grad_layouts(layer, backend).items():
        assert got == want, f"{param}.grad strides {got}, parameter strides {want}"


def test_gradient_values_are_unchanged_by_the_relayout(monkeypatch):
    monkeypatch.setattr(methods, "KRONECKER_LIMIT", 0)  # the contraction whose gradient needs the relayout
    torch.manual_seed(0)
    layer = randomize_adapter(lk.FLoRAConv2d(64, 128, 1), 5)
    x = _input(layer)
    with lk.use_backend("reference"):
        layer(x).square().sum().backward()
        # the same function without the layer's forward, hence without the relayout
        expected = torch.autograd.grad(torch.nn.functional.conv2d(x, layer.effective_weight(), layer.bias).square().sum(),
                                       layer.core)[0]
    assert expected.stride() != layer.core.stride()  # the case the relayout exists for
    # the layer may compute by another route (a strategy other than building W'): equal up to rounding
    torch.testing.assert_close(layer.core.grad, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("case", ["expanded-linear-input", "channels_last-conv-input"])
def test_input_gradient_of_odd_layouts_matches_reference(case):
    """The fused op returns its input gradient in the layout of empty_like(input): an expanded input
    (stride 0, overlapping) gets a contiguous gradient, not one written into overlapping memory."""
    torch.manual_seed(0)
    if case == "expanded-linear-input":
        layer = randomize_adapter(lk.LieRALinear(8, 4, rank=2), 1)
        base = torch.randn(1, 8, requires_grad=True)
        make = lambda: base.expand(5, 8)  # noqa: E731
    else:
        layer = randomize_adapter(lk.FLoRAConv2d(3, 4, 3), 2)
        base = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
        make = lambda: base  # noqa: E731
    grads = {}
    for backend in BACKENDS:
        base.grad = None
        with lk.use_backend(backend):
            layer(make()).square().sum().backward()
        grads[backend] = base.grad.clone()
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-5, atol=1e-5)


def test_torch_func_per_sample_gradients_pass_through():
    """vmap(grad(...)) over an adapter layer (per-sample gradients) equals a loop of backward calls."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = randomize_adapter(lk.FLoRAConv2d(4, 8, 1), 6)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 4, 5, 5)

    def loss(p, sample):
        return functional_call(layer, p, (sample.unsqueeze(0),)).square().sum()

    with lk.use_backend("reference"):
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
        for i in range(3):
            layer.zero_grad(set_to_none=True)
            layer(x[i:i + 1]).square().sum().backward()
            for name, p in layer.named_parameters():
                if p.grad is not None or name in layer.adapter_state():  # a frozen base has no .grad
                    torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5,
                                               atol=1e-5 * p.grad.abs().max())
