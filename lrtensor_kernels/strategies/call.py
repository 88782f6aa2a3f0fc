"""One call of an adapted layer, as every strategy and the cost model see it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import methods


@dataclass
class AdaptedCall:
    """``op(x, W', bias)`` to compute, ``W' = combine(W, scale * delta(adapter))``.

    x: (N, C_in, *spatial), already padded as the layer's padding mode asks, or (M, in) for
    linear. weight: (C_out, C_in/groups, *k) or (out, in). ``padding`` is what the convolution
    itself still pads (zeros). ``dropped_x``: adapter dropout applied to ``x``; the update then
    acts on it alone: ``op(x, W, bias) + op(dropped_x, W' - W)``. ``impl``: the concrete
    backend ("reference", "triton", ...).
    """

    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    adapter: Sequence[Tensor]
    math: methods.AdapterMath
    scale: float
    stride: list
    padding: list
    dilation: list
    groups: int
    dropped_x: Optional[Tensor]
    impl: str

    @property
    def is_linear(self) -> bool:
        return self.weight.dim() == 2

    @property
    def geometry(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups

    def needs(self) -> dict:
        """Which gradients a backward of this call must produce (all False without autograd)."""
        grad = torch.is_grad_enabled()
        inputs = [self.x] if self.dropped_x is None else [self.x, self.dropped_x]
        return dict(
            input=grad and any(t.requires_grad for t in inputs),
            weight=grad and self.weight.requires_grad,
            bias=grad and self.bias is not None and self.bias.requires_grad,
            adapter=grad and any(t.requires_grad for t in self.adapter),
        )
