"""The cost model behind strategy "auto": the estimated time of each strategy for one layer call.

    time = flops / flop_rate(dtype) + bytes / bandwidth + ops * op_overhead
           (+ ops * adapter_op_overhead for an adapter strategy's ops)

counted from the call's shapes alone (nothing runs): the FLOPs of every convolution or matmul a
strategy calls in the forward and in the backward autograd will run for this call (only the
gradients it needs), the bytes of every activation- or weight-sized tensor those ops and the
elementwise passes read or write, and the number of ops. The per-device constants are in
``DEVICES``, the one place to calibrate them.

"auto" takes the cheapest applicable strategy, with two rules before cost:
- LieRA (multiplicative ``exp``/``first_order``) runs merged: it has no bypass, its floor is full
  fine-tuning; two_branch is offered for precision, not picked.
- FLoRA, LoRA and SSL/SSB in bfloat16/float16 never run merged: rounding ``W'`` to the op's dtype loses
  most of a small update (see the README's precision table), which bypass and two_branch keep.
- "fused" (the Triton implicit-GEMM kernels, triton backend only) is considered only on a CUDA
  device whose ``DeviceModel`` was calibrated by a measurement run (``calibrated``; none is yet):
  until then auto keeps the other strategies' choices and says why. In bfloat16/float16 its
  ``W'``-in-the-tiles form rounds like merged and follows merged's rule; FLoRA's chain form keeps
  the update.
"""
from __future__ import annotations

import functools
import math as pymath
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import methods
from ..errors import AdapterConfigError
from .call import AdaptedCall

REDUCED_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DeviceModel:
    """Throughputs of one device type. ``flops``: dense conv/matmul FLOP/s per dtype;
    ``bandwidth``: bytes/s of a large elementwise pass (read + write); ``op_overhead``: seconds
    per op launched from Python (dispatch, launch, small-op latency); ``grouped``: FLOP/s of a
    grouped convolution's forward and input gradient, ``grouped_weight_grad``: of its weight
    gradient (None: the dense rate); ``conv_overhead``: seconds a convolution call costs beyond
    ``op_overhead``; ``matmul_flops``: FLOP/s of a linear layer's matmuls per dtype (None, or a dtype
    not in it: ``flops``); ``adapter_op_overhead``: host seconds each op of an adapter strategy costs
    beyond ``op_overhead`` (this package's Python around the op: autograd.Function, the launchers,
    the strategy's bookkeeping; not charged to the frozen layer); ``exp_rate``: exponentials per
    second of the units kernels compute them on (None: counted as FLOPs); ``calibrated``: the
    constants were fitted to a measurement run of this package's strategies on the device, fused
    kernels included (auto considers "fused" only then)."""

    flops: dict
    bandwidth: float
    op_overhead: float
    grouped: Optional[float] = None
    grouped_weight_grad: Optional[float] = None
    conv_overhead: float = 0.0
    matmul_flops: Optional[dict] = None
    adapter_op_overhead: float = 0.0
    exp_rate: Optional[float] = None
    calibrated: bool = False

    def flop_rate(self, dtype: torch.dtype) -> float:
        return self.flops.get(dtype, self.flops[torch.float32])

    def matmul_rate(self, dtype: torch.dtype) -> float:
        return (self.matmul_flops or {}).get(dtype, self.flop_rate(dtype))


DEVICES = {
    # 2-core AMD EPYC CI machine, one torch thread: fp32 convolutions 40-80 GFLOP/s, copies of
    # tensors above the last-level cache 15-20 GB/s, about 5 us per small op; oneDNN's bf16/fp16
    # convolutions run at 1.4/2.4 GFLOP/s there (no native 16-bit units); depthwise convolutions
    # far below the dense rate, by kernel size: forward and input gradient 3.5 GFLOP/s (3x3,
    # 64 channels, 32x32) to 14 GFLOP/s (7x7), weight gradient 5 GFLOP/s (3x3) to 0.6-1.7 GFLOP/s
    # (7x7; bench rows convnext_t/dw7x7_*); one geometric middle each. A convolution call has a
    # fixed cost of its own: 70-120 us at 4 channels and batches of 2-32 (oneDNN's setup); 40 us
    # beside the small op's 6 us gave auto's choices the least excess time over the bench's
    # forced strategies (commit 7ec1398's CPU run).
    "cpu": DeviceModel(flops={torch.float32: 60e9, torch.float64: 30e9, torch.bfloat16: 1.5e9,
                              torch.float16: 2.5e9},
                       bandwidth=15e9, op_overhead=6e-6, grouped=7e9, grouped_weight_grad=2.5e9,
                       conv_overhead=40e-6),
    # NVIDIA H200 (sm_90, 132 multiprocessors), torch 2.11.0+cu130, cuDNN 9.19, triton 3.6.0,
    # measured at commit 28b8496 (bench/results/h200_28b8496): the rates, bandwidth and per-call
    # costs by bench/calibrate.py (calibrate.json; convolutions: the median over its five shapes,
    # float32 convolutions in TF32 as cuDNN runs them by default, float32 matmuls in full float32
    # as torch does by default; float64 not measured: the H100 sheet's figure kept). The adapter
    # ops' host cost fitted by bench/cuda_fit.py to the layer rows (layers.json): the median of
    # (measured step - the model's device time) / ops over this package's rows. Exponentials: 16 per
    # clock and multiprocessor on the special-function units at 1.75 GHz (the data sheet's; not
    # measured). Not calibrated for strategy "fused": that run had no fused kernels.
    "cuda": DeviceModel(flops={torch.float32: 146e12, torch.float64: 50e12, torch.bfloat16: 374e12,
                               torch.float16: 361e12},
                        bandwidth=4.10e12, op_overhead=8.1e-6, grouped=2.02e12, grouped_weight_grad=1.24e12,
                        conv_overhead=6.18e-6,
                        matmul_flops={torch.float32: 50.6e12, torch.bfloat16: 785e12, torch.float16: 755e12},
                        adapter_op_overhead=200e-6, exp_rate=3.7e12),
}


@dataclass(frozen=True)
class Workload:
    """What the cost model needs of one call: shapes, dtypes, geometry, ranks, needed gradients."""

    weight_shape: tuple
    input_shape: tuple
    output_shape: tuple
    groups: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    device_type: str
    math: methods.AdapterMath
    adapter_shapes: tuple
    need_input: bool
    need_weight: bool
    need_bias: bool
    need_adapter: bool
    dropout: bool
    fused: bool
    triton: bool = False  # on the triton backend, where strategy "fused" runs

    @classmethod
    def of(cls, call: AdaptedCall) -> "Workload":
        needs = call.needs()
        return cls(tuple(call.weight.shape), tuple(call.x.shape), _output_shape(call), call.groups, call.x.dtype,
                   call.weight.dtype, call.weight.device.type, call.math, tuple(tuple(t.shape) for t in call.adapter),
                   needs["input"], needs["weight"], needs["bias"], needs["adapter"], call.dropped_x is not None,
                   call.impl != "reference", call.impl == "triton")

    @property
    def ranks(self) -> tuple:
        """Tucker: the core's shape; lora: (r,); scales: ()."""
        if self.math.delta == "tucker":
            return self.adapter_shapes[0]
        return (self.adapter_shapes[0][1],) if self.math.delta == "lora" else ()


def _output_shape(call: AdaptedCall) -> tuple:
    if call.is_linear:
        return (call.x.shape[0], call.weight.shape[0])
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
               zip(call.x.shape[2:], call.weight.shape[2:], call.stride, call.padding, call.dilation)]
    return (call.x.shape[0], call.weight.shape[0], *spatial)


@dataclass
class Cost:
    """FLOPs, bytes and ops of one strategy's forward + backward; ``notes`` say how it runs."""

    flops: float = 0.0
    bytes: float = 0.0
    ops: int = 0
    notes: list = field(default_factory=list)
    grouped_flops: float = 0.0  # part of ``flops``: grouped convolutions' forward and input gradients
    grouped_weight_grad_flops: float = 0.0  # part of ``flops``: grouped convolutions' weight gradients
    conv_calls: int = 0  # of ``ops``: convolutions (fixed costs beyond a small op's on some devices)
    matmul_flops: float = 0.0  # part of ``flops``: a linear layer's matmuls
    kind: str = ""  # "frozen" for the plain layer's ops (no adapter host cost)
    exps: float = 0.0  # exponentials computed inside the fused kernels' tiles

    def add(self, flops: float = 0.0, nbytes: float = 0.0, ops: int = 1) -> "Cost":
        self.flops += flops
        self.bytes += nbytes
        self.ops += ops
        return self

    def merge(self, other: "Cost") -> "Cost":
        self.add(other.flops, other.bytes, other.ops)
        self.grouped_flops += other.grouped_flops
        self.conv_calls += other.conv_calls
        self.matmul_flops += other.matmul_flops
        self.grouped_weight_grad_flops += other.grouped_weight_grad_flops
        self.exps += other.exps
        return self

    def seconds(self, device: DeviceModel, dtype: torch.dtype) -> float:
        dense = device.flop_rate(dtype)

        def rate(grouped_rate: Optional[float]) -> float:
            return dense if grouped_rate is None else min(grouped_rate, dense)

        dense_flops = self.flops - self.grouped_flops - self.grouped_weight_grad_flops - self.matmul_flops
        compute = (dense_flops / dense + self.grouped_flops / rate(device.grouped)
                   + self.grouped_weight_grad_flops / rate(device.grouped_weight_grad)
                   + self.matmul_flops / device.matmul_rate(dtype))
        exps = self.exps / device.exp_rate if device.exp_rate else 0.0
        host = device.op_overhead + (device.adapter_op_overhead if self.kind != "frozen" else 0.0)
        return (compute + exps + self.bytes / device.bandwidth + self.ops * host
                + self.conv_calls * device.conv_overhead)


class _Sizes:
    """Element counts and sizes of one workload, named as the formulas use them."""

    def __init__(self, w: Workload):
        self.w = w
        self.batch = w.input_shape[0]
        self.c_in, self.c_out = w.input_shape[1], w.weight_shape[0]
        self.c_group = w.weight_shape[1]
        self.kernel = pymath.prod(w.weight_shape[2:])
        self.pixels_in = pymath.prod(w.input_shape[2:])
        self.pixels_out = pymath.prod(w.output_shape[2:])
        self.x = self.batch * self.c_in * self.pixels_in
        self.y = self.batch * self.c_out * self.pixels_out
        self.weight = pymath.prod(w.weight_shape)
        self.e = torch.finfo(w.dtype).bits // 8
        self.e_acc = torch.finfo(methods.compute_dtype(w.weight_dtype)).bits // 8
        self.conv = 2.0 * self.batch * self.pixels_out * self.c_out * self.c_group * self.kernel
        self.is_conv = len(w.weight_shape) > 2

    def op(self, cost: Cost, flops: float, *elements: float) -> Cost:
        """An op of ``flops`` reading/writing tensors of ``elements`` elements in the op's dtype; on
        a convolution layer, an op with FLOPs is a convolution."""
        if flops and self.is_conv:
            cost.conv_calls += 1
        elif flops:
            cost.matmul_flops += flops
        return cost.add(flops, self.e * sum(elements))

    def grouped_op(self, cost: Cost, flops: float, *elements: float, weight_grad: bool = False) -> Cost:
        """An op of the layer's grouping: a grouped convolution runs at its own rate on some devices."""
        if self.w.groups > 1:
            if weight_grad:
                cost.grouped_weight_grad_flops += flops
            else:
                cost.grouped_flops += flops
        return self.op(cost, flops, *elements)

    def conv_pass(self, cost: Cost) -> Cost:
        """One pass of the layer's op (forward or input gradient)."""
        return self.grouped_op(cost, self.conv, self.x, self.weight, self.y)

    def weight_grad_pass(self, cost: Cost) -> Cost:
        """The layer's weight gradient."""
        return self.grouped_op(cost, self.conv, self.x, self.weight, self.y, weight_grad=True)

    def transform(self, cost: Cost) -> Cost:
        """``W'`` (or ``W' - W``) built in the op's dtype: one fused pass, or the reference's
        delta, combine and cast passes in the compute dtype."""
        rank = self.w.ranks[0] if self.w.ranks else 1
        if self.w.fused:
            return cost.add(2.0 * rank * self.weight, self.weight * (self.e + self.e))
        return cost.add(2.0 * rank * self.weight, self.weight * (5 * self.e_acc + self.e), ops=4)

    def project(self, cost: Cost) -> Cost:
        """``dL/dW'`` projected onto the adapter tensors."""
        rank = self.w.ranks[0] if self.w.ranks else 1
        reads = 1 if self.w.math.combine == "add" else 2
        if self.w.fused:
            return cost.add(4.0 * rank * self.weight, reads * self.weight * self.e, ops=2)
        return cost.add(4.0 * rank * self.weight, self.weight * (reads * self.e + 4 * self.e_acc), ops=6)


def frozen_cost(w: Workload) -> Cost:
    """The frozen layer: the op forward and, when the input needs it, its input gradient."""
    s = _Sizes(w)
    cost = s.conv_pass(Cost(kind="frozen"))
    return s.conv_pass(cost) if w.need_input else cost


def merged_cost(w: Workload) -> Cost:
    if w.dropout:
        return two_branch_cost(w)
    s = _Sizes(w)
    cost = s.conv_pass(s.transform(Cost(notes=["W' built, one op"])))
    if w.need_input:
        s.conv_pass(s.transform(cost) if w.fused else cost)
    if w.need_adapter or w.need_weight:
        s.weight_grad_pass(cost)
        cost.notes.append("full weight gradient")
    if w.need_adapter:
        s.project(cost)
    return cost


def two_branch_cost(w: Workload) -> Cost:
    s = _Sizes(w)
    cost = s.conv_pass(s.transform(s.conv_pass(Cost(notes=["op(x, W) + op(x, W' - W)"]))))
    s.op(cost, 0, s.y, s.y, s.y)
    if w.need_input:
        s.conv_pass(cost)
    if w.need_input or w.dropout:
        s.conv_pass(s.transform(cost) if w.fused else cost)
        s.op(cost, 0, s.x, s.x, s.x)
    if w.need_adapter or w.need_weight:
        s.weight_grad_pass(cost)
    if w.need_adapter:
        s.project(cost)
    return cost


def _chain_parts(s: _Sizes, w: Workload) -> tuple:
    """FLOPs and element counts of the chain's ops (see tucker_bypass): ``(in, mid, out)`` FLOPs
    (``in`` 0 for LoRA's chain, which has no input projection), ``u`` and ``z`` elements (LoRA's
    ``u`` is ``x``)."""
    g = w.groups
    if w.math.delta == "lora":
        r = w.ranks[0]
        z = s.batch * g * r * s.pixels_out
        flops_mid = 2.0 * s.batch * s.pixels_out * g * r * s.c_group * s.kernel
        return 0.0, flops_mid, 2.0 * s.batch * s.pixels_out * s.c_out * r, s.x, z
    r1, r2 = w.ranks[0], w.ranks[1]
    u = s.batch * g * r2 * s.pixels_in
    z = s.batch * g * r1 * s.pixels_out
    flops_in = 2.0 * s.batch * s.pixels_in * s.c_in * r2
    flops_mid = 2.0 * s.batch * s.pixels_out * g * r1 * r2 * s.kernel
    flops_out = 2.0 * s.batch * s.pixels_out * s.c_out * r1
    return flops_in, flops_mid, flops_out, u, z


def _chain_adapter_backward(s: _Sizes, cost: Cost, keeps_u: bool) -> Cost:
    """The chain's ops for the adapter gradients: u again (unless kept; Tucker only), z again, then
    grad z, grad U_1 (B), grad u and grad U_2 (Tucker only), grad K (A)."""
    projects_input = s.w.math.delta == "tucker"
    f_in, f_mid, f_out, u, z = _chain_parts(s, s.w)
    if projects_input and not keeps_u:
        s.op(cost, f_in, s.x, u)
    s.grouped_op(cost, f_mid, u, z)
    s.op(cost, f_out, s.y, z)  # grad z
    s.op(cost, f_out, s.y, z)  # grad U_1 (B)
    if projects_input:
        s.grouped_op(cost, f_mid, z, u)  # grad u
    s.grouped_op(cost, f_mid, z, u, weight_grad=True)  # grad K (A)
    if projects_input:
        s.op(cost, f_in, u, s.x)  # grad U_2
    return cost


def tucker_bypass_cost(w: Workload) -> Cost:
    """FLoRA's Tucker chain or LoRA's chain (A on x, then B) beside the frozen op."""
    from .tucker_bypass import SAVE_U_FRACTION

    s = _Sizes(w)
    f_in, f_mid, f_out, u, z = _chain_parts(s, w)
    projects_input = w.math.delta == "tucker"
    cost = s.conv_pass(Cost(notes=["op(x, W) + " + ("Tucker chain" if projects_input else "LoRA chain")]))
    if projects_input:
        s.op(cost, f_in, s.x, u)
    s.grouped_op(cost, f_mid, u, z)
    s.op(cost, f_out, z, s.y, s.y)
    keeps_u = u <= SAVE_U_FRACTION * s.x
    if w.need_adapter:
        _chain_adapter_backward(s, cost, keeps_u)
    if w.need_input or w.dropout:
        s.conv_pass(cost)
        through_chain = Cost()
        s.op(through_chain, f_in if projects_input else 0, u, s.x, s.x, s.x)
        if not w.need_adapter:
            s.op(through_chain, f_out, s.y, z)
        if not (w.need_adapter and projects_input):
            s.grouped_op(through_chain, f_mid, z, u)
        through_weight = s.transform(Cost())
        dev = DEVICES.get(w.device_type, DEVICES["cuda"])
        if w.dropout or through_chain.seconds(dev, w.dtype) <= through_weight.seconds(dev, w.dtype):
            cost.merge(through_chain)
            cost.notes.append("input gradient through W and the chain")
        else:
            cost.merge(through_weight)
            cost.notes.append("input gradient through W'")
    return _chain_end(s, cost, keeps_u)


def _chain_end(s: _Sizes, cost: Cost, keeps_u: bool) -> Cost:
    """A chain strategy's cost completed: the frozen weight's gradient when it is trained, and
    whether the Tucker chain keeps ``u``."""
    if s.w.need_weight:
        s.weight_grad_pass(cost)
    if s.w.math.delta == "tucker":
        cost.notes.append("u kept" if keeps_u else "u recomputed")
    return cost


def scale_bypass_cost(w: Workload) -> Cost:
    from .scale_bypass import splits

    s = _Sizes(w)
    ssb = len(w.adapter_shapes) == 2
    split = splits(w.dtype)
    cost = Cost()
    if w.dropout:
        cost.notes.append("op(x, W) + op(xd, W' - W) under autograd")
        for _ in range(3 if ssb else 2):
            s.conv_pass(cost)
        s.op(cost, 0, *(s.x,) * 6, *(s.y,) * 6)
    elif split:
        cost.notes.append("x * d_in split: update as its own op")
        s.conv_pass(s.conv_pass(cost))
        s.op(cost, 0, s.x, s.x, *(s.y,) * (6 if ssb else 3))
    else:
        cost.notes.append("x * d_in")
        s.conv_pass(s.op(cost, 0, s.x, s.x))
        if ssb:
            s.op(cost, 0, s.y, s.y, s.y)
    if w.need_adapter or w.need_input:
        s.conv_pass(cost)
        if ssb:
            s.op(cost, 0, s.y, s.y)
        if w.need_input:
            s.op(cost, 0, s.x, s.x)
        if w.need_adapter:
            s.op(cost, 0, s.x, s.x, *((s.y, s.y) if ssb else ()))
    if w.need_weight:
        s.weight_grad_pass(cost)
    return cost


# The pixel tile for which the fused kernels form a W' tile (the GPU plans' usual block): the
# prologue's E = L @ R and combine are paid once per weight element and pixel tile.
FUSED_PIXEL_TILE = 128


def _fused_rank(w: Workload) -> int:
    """The rank the fused tiles compute E with: 1 for scales, else the rank padded to a power of two >= 16."""
    rank = w.ranks[0] if w.ranks else 1
    return 1 if rank == 1 else max(16, 1 << (rank - 1).bit_length())


def _prologue(s: _Sizes, cost: Cost, pixels: float) -> Cost:
    """``W'`` formed in the weight tiles of a pass over ``pixels`` pixels: ``E = L @ R`` and, for
    exp, one exponential per weight element and pixel tile; no bytes."""
    tiles = pymath.ceil(pixels / FUSED_PIXEL_TILE)
    if s.w.math.combine == "exp":
        cost.exps += s.weight * tiles
    return cost.add(2.0 * _fused_rank(s.w) * s.weight * tiles, 0, ops=0)


def fused_prologue_cost(w: Workload) -> Cost:
    """Strategy "fused", ``W'`` in the tiles: the layer's op with ``W'`` formed in its weight tiles
    (forward and input gradient), the weight gradient projected in its epilogue; no weight-sized
    pass. With dropout, ``op(x, W) + op(xd, W' - W)`` (the second adds the first in its epilogue)."""
    s = _Sizes(w)
    cost = Cost(notes=["W' formed in the op's weight tiles"])
    pixels_out, pixels_in = s.batch * s.pixels_out, s.batch * s.pixels_in
    _prologue(s, s.conv_pass(cost), pixels_out)
    if w.dropout:
        s.op(s.conv_pass(cost), 0, s.y)
    if w.need_input or w.dropout:
        _prologue(s, s.conv_pass(cost), pixels_in)
        if w.dropout and w.need_input:
            s.conv_pass(cost)
    if w.need_adapter:
        epilogue = (4.0 + (2.0 if w.math.combine == "exp" else 0.0)) * _fused_rank(w) * s.weight
        s.weight_grad_pass(cost).add(epilogue, 0 if w.math.combine == "add" else s.weight * s.e, ops=0)
        cost.exps += s.weight if w.math.combine == "exp" else 0
        cost.notes.append("weight gradient projected in its tiles")
    if w.need_weight:
        s.weight_grad_pass(cost)
    return cost


def fused_chain_cost(w: Workload) -> Cost:
    """Strategy "fused", chain form (FLoRA's Tucker chain, LoRA's A-then-B chain): the frozen op
    plus the chain, all on the fused kernels, the chain's up-projection added in the frozen op's
    epilogue (no output-sized pass), the input gradient through ``W'`` formed in the tiles (exactly
    the frozen layer's op)."""
    from .tucker_bypass import SAVE_U_FRACTION

    s = _Sizes(w)
    f_in, f_mid, f_out, u, z = _chain_parts(s, w)
    projects_input = w.math.delta == "tucker"
    chain = "Tucker chain" if projects_input else "LoRA chain"
    cost = s.conv_pass(Cost(notes=[f"op(x, W) + {chain}, U_1 z in the op's epilogue"]))
    if projects_input:
        s.op(cost, f_in, s.x, u)
    s.grouped_op(cost, f_mid, u, z)
    cost.add(f_out, s.e * z, ops=0)
    keeps_u = u <= SAVE_U_FRACTION * s.x
    if w.need_adapter:
        _chain_adapter_backward(s, cost, keeps_u)
    if w.dropout:
        s.conv_pass(cost)
        s.op(cost, f_in if projects_input else 0, u, s.x, s.x, s.x)
        cost.notes.append("input gradient through W and the chain")
    elif w.need_input:
        _prologue(s, s.conv_pass(cost), s.batch * s.pixels_in)
        cost.notes.append("input gradient through W' formed in the tiles")
    return _chain_end(s, cost, keeps_u)


CHAIN_FORMS = ("tucker:add", "lora:add")  # the updates whose fused form may be the chain


def fused_form(w: Workload) -> tuple:
    """``(form, cost)`` of strategy "fused": "chain" or "prologue" for FLoRA and LoRA, whichever
    costs less (the chain alone in bfloat16/float16, where the prologue form would round the update
    into ``W'``), "prologue" for every other method."""
    prologue = fused_prologue_cost(w)
    if w.math.key not in CHAIN_FORMS:
        return "prologue", prologue
    chain = fused_chain_cost(w)
    if w.dtype in REDUCED_PRECISION:
        return "chain", chain
    device = DEVICES.get(w.device_type, DEVICES["cuda"])
    if chain.seconds(device, w.dtype) <= prologue.seconds(device, w.dtype):
        return "chain", chain
    return "prologue", prologue


@dataclass
class Decision:
    """The strategy a call runs, why, and every candidate's estimated cost."""

    strategy: str
    reason: str
    costs: dict
    input_grad_via_weight: bool = False
    fused_form: str = ""  # strategy "fused": "prologue" (W' in the tiles) or "chain" (FLoRA's or LoRA's chain)


APPLICABLE = {
    "tucker:add": ("merged", "two_branch", "bypass"),
    "lora:add": ("merged", "two_branch", "bypass"),
    "scales:mul": ("merged", "two_branch", "bypass"),
}
_COSTS = {"merged": merged_cost, "two_branch": two_branch_cost}
_BYPASS_COSTS = {"tucker": tucker_bypass_cost, "lora": tucker_bypass_cost, "scales": scale_bypass_cost}


def applicable(math: methods.AdapterMath) -> tuple:
    """The strategies that can run ``math`` (bypass needs an additive Tucker or LoRA update, or a scaling one)."""
    return APPLICABLE.get(math.key, ("merged", "two_branch"))


def strategy_cost(w: Workload, strategy: str) -> Cost:
    if strategy == "bypass":
        return _BYPASS_COSTS[w.math.delta](w)
    return _COSTS[strategy](w)


def decide(w: Workload, requested: str) -> Decision:
    """The strategy for ``w``: ``requested`` itself, or for "auto" the rule of the module doc.

    Memoised in eager mode; traced through (constant-folded) under torch.compile."""
    if torch.compiler.is_compiling():
        return _decide(w, requested)
    return _decide_cached(w, requested)


def _decide(w: Workload, requested: str) -> Decision:
    device = DEVICES.get(w.device_type, DEVICES["cuda"])
    candidates = applicable(w.math)
    costs = {name: strategy_cost(w, name) for name in candidates}
    form = ""
    if w.triton:
        form, costs["fused"] = fused_form(w)
    elif requested == "fused":
        raise AdapterConfigError("strategy 'fused' runs on the 'triton' backend only (its implicit-GEMM kernels)")
    times = {name: cost.seconds(device, w.dtype) for name, cost in costs.items()}
    fused_considered = w.triton and w.device_type == "cuda" and device.calibrated
    if requested != "auto":
        strategy, reason = requested, "set on the layer"
    elif w.math.combine in ("exp", "first_order"):
        strategy, reason = "merged", "multiplicative update: no bypass; merged is the cheapest exact form"
        if fused_considered and times["fused"] < times["merged"]:
            strategy, reason = "fused", "multiplicative update: no bypass; fused is the cheapest exact form"
    else:
        allowed = [c for c in candidates if not (c == "merged" and w.dtype in REDUCED_PRECISION)]
        if fused_considered and not (form == "prologue" and w.dtype in REDUCED_PRECISION):
            allowed.append("fused")
        strategy = min(allowed, key=times.__getitem__)
        reason = "cheapest estimate"
        if len(allowed) < len(candidates):
            reason += f"; merged excluded: {str(w.dtype).replace('torch.', '')} would round a small update away"
    if requested == "auto" and w.triton and not fused_considered:
        reason += ("; fused not considered: " + ("Triton is interpreted on the CPU" if w.device_type != "cuda" else
                                                 "the CUDA cost constants are not yet calibrated by a measurement run"))
    via_weight = strategy == "bypass" and "input gradient through W'" in costs["bypass"].notes
    return Decision(strategy, reason, costs, via_weight, form if strategy == "fused" else "")


_decide_cached = functools.lru_cache(maxsize=4096)(_decide)


def frozen_seconds(w: Workload) -> float:
    return frozen_cost(w).seconds(DEVICES.get(w.device_type, DEVICES["cuda"]), w.dtype)
