"""Operands of ``channel_dot`` (every fused backend): ``out[c] = sum of a * b over every dim but c``."""
from __future__ import annotations

import math

import torch


def channel_operands(a: torch.Tensor, b: torch.Tensor, channel_dim: int):
    """``(a, b, dim)``: contiguous views of ``a`` and ``b`` and where the channel dim is in them.

    A sum over every dim but one does not depend on the order of the dims, so the dims are put in
    memory order: a dense layout that both share (channels_last) costs no copy; anything else is
    copied to contiguous. The kernels read the result as ``(outer, channels, inner)``."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"channel_dot: a and b must have one shape, dtype and device, got {tuple(a.shape)} {a.dtype} "
                         f"{a.device} and {tuple(b.shape)} {b.dtype} {b.device}")
    if a.dim() == 0 or not -a.dim() <= channel_dim < a.dim():
        raise ValueError(f"channel_dot: channel_dim {channel_dim} out of range for a of shape {tuple(a.shape)}")
    dim = channel_dim % a.dim()
    if a.stride() == b.stride() and not a.is_contiguous():
        order = sorted(range(a.dim()), key=lambda d: (-a.stride(d), d))
        pa, pb = a.permute(order), b.permute(order)
        if pa.is_contiguous() and pb.is_contiguous():
            return pa, pb, order.index(dim)
    return a.contiguous(), b.contiguous(), dim


def channel_layout(shape, dim: int) -> tuple:
    """``(outer, channels, inner)`` of a contiguous tensor of ``shape`` around ``dim``."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
