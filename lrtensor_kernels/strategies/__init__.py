"""Execution strategies: which convolutions and matmuls compute an adapted layer.

The math is :mod:`lrtensor_kernels.methods`'; a strategy only decides how ``op(x, W')`` is
computed, never its value (up to rounding), the parameters or what is saved to adapter files.

- ``"merged"`` (any method): ``W'`` built in one weight-sized pass, one op on it; the backward
  takes the full weight gradient ``dL/dW'`` and projects it onto the adapter tensors.
- ``"two_branch"`` (any method): ``op(x, W) + op(x, W' - W)``; keeps a small update's precision in
  bfloat16/float16 at the cost of one more op forward and backward.
- ``"bypass"`` (FLoRA, LoRA, SSL, SSB): the frozen op on ``W`` plus an exact cheap path for the
  update, with no full weight gradient: FLoRA's Tucker chain and LoRA's A-then-B chain
  (:mod:`.tucker_bypass`), SSL/SSB's scaled activations (:mod:`.scale_bypass`).
- ``"hybrid"`` (FLoRA, LoRA): the forward and the input gradient through ``W'`` as merged, the
  adapter gradients through the low-rank chain as bypass (:mod:`.tucker_hybrid`); no full weight
  gradient.
- ``"fused"`` (any method, triton backend): the adapter math inside the convolution's or matmul's
  own tiles, Triton implicit-GEMM kernels for every op (:mod:`.fused`); FLoRA and LoRA may run
  their low-rank chain there instead, with the up-projection in the frozen op's epilogue.
- ``"auto"`` (default): chosen by the cost model (:mod:`.cost`) once per layer call signature; on
  the CPU it also picks the backend (native or reference) it estimates faster for the layer, when
  the backend in force is "auto".

Each strategy runs on every backend: in plain PyTorch on "reference", through custom ops on the
fused backends. Layers hold a strategy name and hand it here with their tensors; they know nothing
of backends: :func:`adapted_forward` asks :mod:`..backend` which ones may run the call and the cost
model which of them does.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import backend, methods
from . import cost, fused, merged, scale_bypass, tucker_bypass, tucker_hybrid
from .call import AdaptedCall

STRATEGIES = ("auto", "merged", "two_branch", "bypass", "hybrid", "fused")


def check_strategy(strategy, math: methods.AdapterMath) -> str:
    """``strategy`` if it names a strategy that can run ``math``; else a ValueError saying why."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy not in ("auto", "fused") and strategy not in cost.applicable(math):
        why = "it has no low-rank bypass" if strategy == "bypass" else "hybrid needs an additive Tucker or LoRA update"
        expected = ("auto",) + cost.applicable(math) + ("fused",)
        raise ValueError(f"strategy {strategy!r} cannot run a {math.combine!r} update of a {math.delta!r} delta "
                         f"({why}); expected one of {expected}")
    return strategy


def cannot_run(strategy: str, device: torch.device) -> str:
    """Why ``strategy`` cannot run on tensors on ``device`` with the backend in force ("" if it can):
    "fused" needs the triton backend."""
    if strategy == "fused":
        impl = backend.resolve(device)
        if impl != "triton":
            return (f"strategy 'fused' runs on the 'triton' backend (its implicit-GEMM kernels), but the backend in "
                    f"force for tensors on {device} is {impl!r}: use lk.use_backend('triton') (CUDA tensors, or the "
                    f"CPU with TRITON_INTERPRET=1) or another strategy")
    return ""


def _run_bypass(call: AdaptedCall, decision: cost.Decision) -> Tensor:
    if call.math.delta in ("tucker", "lora"):
        return tucker_bypass.run(call, decision.input_grad_via_weight, decision.folded, decision.under_autograd)
    return scale_bypass.run(call)


def _run_hybrid(call: AdaptedCall, decision: cost.Decision) -> Tensor:
    if call.dropped_x is not None:  # the update acts on the dropped input: bypass's form
        return tucker_bypass.run(call, False, decision.folded, decision.under_autograd)
    return tucker_hybrid.run(call, decision.folded)


_RUN = {
    "merged": lambda call, decision: merged.run_merged(call),
    "two_branch": lambda call, decision: merged.run_two_branch(call),
    "bypass": _run_bypass,
    "hybrid": _run_hybrid,
    "fused": lambda call, decision: fused.run(call, decision.fused_form, decision.folded),
}


def adapted_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    adapter: Sequence[Tensor],
    math: methods.AdapterMath,
    scale: float,
    geometry: tuple = ((), (), (), 1),
    dropped_x: Optional[Tensor] = None,
    strategy: str = "auto",
) -> Tensor:
    """The adapted layer's output ``op(x, W', bias)`` by ``strategy`` on the backend in force.

    ``geometry`` is ``(stride, padding, dilation, groups)`` of a convolution (ignored for linear);
    ``x`` is batched (conv) or 2-D (linear) and already padded as the layer's padding mode asks.
    ``dropped_x``: adapter dropout applied to ``x``; the update then acts on it alone,
    ``op(x, W, bias) + op(dropped_x, W' - W)``.

    Under autocast the adapter math still runs in float32; the ops run in the autocast dtype,
    as autocast would run the plain layer.
    """
    device_type = x.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and x.dtype != torch.float64:  # autocast leaves float64 alone
        dtype = torch.get_autocast_dtype(device_type)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        with torch.autocast(device_type, enabled=False):
            return adapted_forward(cast(x), weight, cast(bias), adapter, math, scale, geometry, cast(dropped_x),
                                   strategy)
    stride, padding, dilation, groups = geometry
    impls = backend.candidates(weight.device)
    call = AdaptedCall(x, weight, bias, adapter, math, float(scale), list(stride), list(padding), list(dilation),
                       groups, dropped_x, impls[0])
    decision = decide(call, strategy, impls)
    if decision.impl is not None:
        call.impl = decision.impl
    if _observers:
        _notify(call, decision)
    return _RUN[decision.strategy](call, decision)


# observers of each thread's decisions (lk.plan), by thread id: a forward tells those of its own
# thread only, so a plan never sees, nor disturbs, the forwards other threads run meanwhile
_observers: dict = {}
_observers_lock = threading.Lock()


@torch.compiler.disable
def _notify(call: AdaptedCall, decision: cost.Decision) -> None:
    for observer in _observers.get(threading.get_ident(), ()):
        observer(call, decision)


@contextlib.contextmanager
def observing(observer: Callable[[AdaptedCall, cost.Decision], None]):
    """Within the block, ``observer(call, decision)`` is told of every decision the calling thread makes."""
    thread = threading.get_ident()
    with _observers_lock:
        _observers[thread] = _observers.get(thread, ()) + (observer,)
    try:
        yield
    finally:
        with _observers_lock:
            left = tuple(o for o in _observers[thread] if o is not observer)
            if left:
                _observers[thread] = left
            else:
                del _observers[thread]


def decide(call: AdaptedCall, strategy: str = "auto", impls: tuple = ()) -> cost.Decision:
    """The strategy ``call`` runs under ``strategy`` (the cost model's choice for "auto"), and with
    several backends in ``impls`` the one it runs on (``decision.impl``); made once per call
    signature (shapes, dtypes, geometry, gradients needed, backend) and backends: a lookup on later
    calls; under torch.compile a constant of the graph (:func:`cost.decision`)."""
    return cost.decision(cost.signature(call), strategy, tuple(impls))
