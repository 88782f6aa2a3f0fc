"""What the native path keeps for backward, per layer, at the strategies issue's layer shapes
(batch cut to one image / 128 tokens for the CPU): every method at most 1.25x the frozen layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from fused import fused_kernels
from oracle import randomize_adapter

LAYERS = {  # name: (plain layer, input shape)
    "3x3_64-64_56": (lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (1, 64, 56, 56)),
    "3x3_256-256_14": (lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (1, 256, 14, 14)),
    "3x3_512-512_7": (lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (1, 512, 7, 7)),
    "3x3_640-640_32": (lambda: nn.Conv2d(640, 640, 3, padding=1, bias=False), (1, 640, 32, 32)),
    "linear_1024-2816": (lambda: nn.Linear(1024, 2816, bias=False), (128, 1024)),
}
METHODS = {
    "flora": lambda base: lk.layers.LAYERS["flora"][type(base)].from_module(base),
    "liera_exp": lambda base: lk.layers.LAYERS["liera"][type(base)].from_module(base),
    "liera_first_order": lambda base: lk.layers.LAYERS["liera"][type(base)].from_module(base, mode="first_order"),
    "ssl": lambda base: lk.layers.LAYERS["ssl"][type(base)].from_module(base),
    "ssb": lambda base: lk.layers.LAYERS["ssb"][type(base)].from_module(base),
}


def saved_bytes(module, x, backend="auto") -> int:
    """Bytes of the distinct storages autograd keeps from the forward for the backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with lk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.fixture(scope="module")
def frozen_bytes():
    """The frozen layer's bytes per shape: the plain layer, weight frozen, input requiring grad."""
    out = {}
    for name, (make, shape) in LAYERS.items():
        torch.manual_seed(0)
        base = make().requires_grad_(False)
        out[name] = saved_bytes(base, torch.randn(shape).requires_grad_())
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", list(LAYERS))
def test_native_layer_keeps_at_most_a_quarter_more_than_the_frozen_layer(shape, method, frozen_bytes):
    fused_kernels("native")
    make, input_shape = LAYERS[shape]
    torch.manual_seed(0)
    layer = randomize_adapter(METHODS[method](make().requires_grad_(False)), 1)
    x = torch.randn(input_shape).requires_grad_()
    ratio = saved_bytes(layer, x, "native") / frozen_bytes[shape]
    assert ratio <= 1.25, f"{method} at {shape}: {ratio:.3f}x the frozen layer's bytes saved for backward"


def test_the_bound_can_fail():
    """The reference path of LieRA keeps W' and exp(E) (two weight-sized tensors): the same
    measurement finds it far above the bound at the 512->512 3x3 layer."""
    make, input_shape = LAYERS["3x3_512-512_7"]
    base = make().requires_grad_(False)
    frozen = saved_bytes(base, torch.randn(input_shape).requires_grad_())
    layer = randomize_adapter(METHODS["liera_exp"](make().requires_grad_(False)), 1)
    assert saved_bytes(layer, torch.randn(input_shape).requires_grad_(), "reference") / frozen > 1.5
