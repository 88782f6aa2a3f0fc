"""How much of a small update each strategy applies in bfloat16 and float16.

At ``|dW|`` about ``1e-3 |W|`` (an adapter early in training), rounding ``W' = W + dW`` to a
16-bit dtype loses most of ``dW``. This measures the update a layer really applies,
``W_applied - W``, against the float64 update, as a relative error, two ways:

- **as applied**: every op computed exactly (float64) from the operands the strategy rounds to
  the dtype (``W'``, ``W' - W``, the chain's factors, ``x * d_in``...): the update the strategy
  itself keeps or loses;
- **at the output**: the ops in the dtype, as they run; the 16-bit output's own rounding then
  also swallows a contribution below half an ulp of the frozen output, whatever the strategy.

``W_applied`` is found by least squares over 4096 random inputs of a Linear layer (exact where the
layer is linear in its input; rounding of activations averages out). Run: ``python -m bench.precision``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import lrtensor_kernels as lk
from lrtensor_kernels import ops

F64 = torch.float64
METHODS = {"flora": {}, "lora": {}, "liera": {"mode": "exp"}, "ssl": {}, "ssb": {}}
UPDATE_SIZE = 1e-3
_BASE_OP = ops.base_op


def _exact_base_op(x, weight, bias, stride, padding, dilation, groups):
    """``ops.base_op`` in float64 from its (already rounded) operands."""
    return _BASE_OP(x.to(F64), weight.to(F64), None if bias is None else bias.to(F64), stride, padding, dilation,
                    groups)


def small_update_layer(method: str, dtype: torch.dtype, in_features: int = 48, out_features: int = 40,
                       seed: int = 0) -> lk.AdapterLayer:
    """A Linear adapter layer in ``dtype`` whose update has ``|dW| = UPDATE_SIZE * |W|`` (Frobenius)."""
    torch.manual_seed(seed)
    layer = lk.layers.LAYERS[method][nn.Linear](in_features, out_features, **METHODS[method])
    with torch.no_grad():
        if method in ("ssl", "ssb"):
            for p in layer.adapter_parameters():
                p.copy_(1 + UPDATE_SIZE * torch.randn_like(p))
        else:
            for p in layer.adapter_parameters():
                p.normal_()
            first = layer.core if method == "flora" else layer.lora_B
            for _ in range(4):  # LieRA's exp is not linear in its scale: a few rescalings converge
                size = (layer.effective_weight() - layer.weight).norm() / layer.weight.norm()
                first.mul_(UPDATE_SIZE / size)
    return layer.to(dtype)


def exact_update(layer: lk.AdapterLayer) -> torch.Tensor:
    """``W' - W`` in float64 from the layer's (rounded) base weight and its adapter tensors."""
    w = layer.weight.detach().to(F64)
    with lk.use_backend("reference"):
        w_eff = lk.methods.effective_weight(w, [t.detach().to(F64) for t in layer.adapter_tensors()],
                                            layer.adapter_math, layer.scale)
    return w_eff - w


def applied_update(layer: lk.AdapterLayer, x: torch.Tensor, exact_ops: bool) -> torch.Tensor:
    """``W_applied - W`` by least squares over the rows of ``x`` (see the module doc)."""
    patch = mock.patch.object(ops, "base_op", _exact_base_op) if exact_ops else mock.patch.object(ops, "base_op",
                                                                                                  _BASE_OP)
    with patch, torch.no_grad(), lk.use_backend("reference"):
        y = layer(x).to(F64)
    if layer.bias is not None:
        y = y - layer.bias.to(F64)
    return torch.linalg.lstsq(x.to(F64), y).solution.t() - layer.weight.to(F64)


def update_error(layer: lk.AdapterLayer, strategy: str, exact_ops: bool = True, rows: int = 4096) -> float:
    """Relative error of the update ``layer`` applies under ``strategy``."""
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(1)).to(layer.weight.dtype)
    previous, layer.strategy = layer.strategy, strategy
    try:
        want = exact_update(layer)
        return float((applied_update(layer, x, exact_ops) - want).norm() / want.norm())
    finally:
        layer.strategy = previous


def table() -> str:
    lines = [f"Relative error of the applied update at |dW| = {UPDATE_SIZE:g} |W| (Linear 48->40, 4096 inputs); "
             "as applied / at the output.", "",
             "| method | dtype | auto picks | merged | two_branch | bypass |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        for dtype in (torch.bfloat16, torch.float16):
            layer = small_update_layer(method, dtype)
            x = torch.randn(8, layer.in_features).to(dtype)
            auto = lk.plan(nn.Sequential(layer), x.requires_grad_())[0].strategy
            cells = []
            for strategy in ("merged", "two_branch", "bypass"):
                if strategy not in lk.strategies.cost.applicable(layer.adapter_math):
                    cells.append("-")
                    continue
                cells.append(f"{update_error(layer, strategy):.2%} / {update_error(layer, strategy, False):.1%}")
            lines.append(f"| {method} | {str(dtype).replace('torch.', '')} | {auto} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
