"""The "merged" and "two_branch" strategies: ops on a materialised ``W'`` or ``W' - W``.

- merged: ``op(x, W', bias)``, one op on ``W'`` built in one weight-sized pass; the backward
  takes the full weight gradient ``dL/dW'`` and projects it onto the adapter tensors.
- two_branch: ``op(x, W, bias) + op(x, W' - W)``. ``W' - W`` is computed without cancellation
  and stored in the op's dtype, so in bfloat16/float16 the update keeps its own precision,
  where ``W'`` rounded to the base dtype loses most of a small update. It costs one more op in
  the forward and one more input-gradient op in the backward.

With adapter dropout both run the two-branch form, the update acting on the dropped input.
On the reference backend ``W'`` comes from :func:`methods.effective_weight` under autograd;
on a fused backend from the custom op :func:`ops.adapted_op`.
"""
from __future__ import annotations

from torch import Tensor

from .. import ops
from .call import AdaptedCall


def _adapted(call: AdaptedCall, inp: Tensor, bias, delta_only: bool) -> Tensor:
    """``op(inp, W', bias)`` or, with ``delta_only``, ``op(inp, W' - W, bias)``."""
    stride, padding, dilation, groups = call.geometry
    run = ops.reference_adapted_op if call.impl == "reference" else ops.adapted_op
    return run(inp, call.weight, bias, list(call.adapter), call.math.key, float(call.scale), list(stride),
               list(padding), list(dilation), groups, delta_only, call.impl)


def run_two_branch(call: AdaptedCall) -> Tensor:
    frozen = ops.base_op(call.x, call.weight.to(call.x.dtype), call.bias, *call.geometry)
    update_input = call.x if call.dropped_x is None else call.dropped_x
    return frozen + _adapted(call, update_input, None, True)


def run_merged(call: AdaptedCall) -> Tensor:
    if call.dropped_x is not None:
        return run_two_branch(call)
    return _adapted(call, call.x, call.bias, False)
