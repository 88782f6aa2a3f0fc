"""The cost model behind strategy "auto": the estimated time of each strategy for one layer call,
on each backend that can run it.

    time = flops / flop_rate(dtype) + bytes / bandwidth + exp_elements / exp_rate
           + ops * op_overhead + conv_calls * conv_overhead + spatial_conv_calls * spatial_conv_overhead
           + call_overhead[strategy, backend] (+ ops * adapter_op_overhead for an adapter strategy's ops)

counted from the call's shapes alone (nothing runs): the FLOPs of every convolution or matmul a
strategy calls in the forward and in the backward autograd will run for this call (only the
gradients it needs), the bytes of every activation- or weight-sized tensor those ops and the
elementwise passes read or write, the elements that go through ``exp``, the number of ops and of
convolution calls (a k x k convolution call costs more to set up than a 1x1 one), and the fixed
Python and autograd cost of one call of the strategy on the backend. The per-device constants
are in ``DEVICES``, the one place to calibrate them (``python -m bench.cpu_time --fit`` fits the
CPU's from measured steps). :meth:`Cost.seconds_by_part` splits an estimate into convolutions and
matmuls, weight-sized passes, activation-sized passes and fixed per-call costs.

"auto" takes the cheapest applicable strategy, and on the CPU the cheaper backend of ``native`` and
``reference`` for it, with rules before cost:
- LieRA (multiplicative ``exp``/``first_order``) runs merged: it has no bypass, its floor is full
  fine-tuning; two_branch is offered for precision, not picked.
- In bfloat16/float16 FLoRA, LoRA and SSL/SSB never run merged or hybrid: rounding ``W'`` to the op's
  dtype loses most of a small update (see the precision table of docs/strategies.md), which bypass
  and two_branch keep.
- "fused" (the Triton implicit-GEMM kernels, triton backend only) is considered only on a CUDA
  device whose ``DeviceModel`` was calibrated by a measurement run (``calibrated``; none is yet):
  until then auto keeps the other strategies' choices and says why. In bfloat16/float16 its
  ``W'``-in-the-tiles form rounds like merged and follows merged's rule; the chain form (FLoRA,
  LoRA) keeps the update.
"""
from __future__ import annotations

import dataclasses
import functools
import math as pymath
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import methods
from ..errors import AdapterConfigError
from .call import AdaptedCall

REDUCED_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DeviceModel:
    """Throughputs and fixed costs of one device type. ``flops``: dense conv/matmul FLOP/s per dtype;
    ``bandwidth``: bytes/s of a large elementwise pass (read + write); ``op_overhead``: seconds
    per op launched from Python (dispatch, launch, small-op latency); ``grouped``: FLOP/s of a
    grouped convolution's forward and input gradient, ``grouped_weight_grad``: of its weight
    gradient (None: the dense rate); ``matmul``: FLOP/s of a linear layer's matmuls (None: the
    dense rate); ``narrow``: FLOP/s of a convolution pass whose output has fewer than
    ``narrow_channels`` channels (a vector register's lanes go unused; None: the dense rate);
    ``conv_overhead``: seconds a convolution call costs beyond ``op_overhead``,
    ``spatial_conv_overhead``: what a convolution with a kernel larger than 1x1,
    or a stride, costs beyond that; ``exp_rate``: elements/s through ``exp`` in a fused pass or
    a fused kernel's tiles (None: free);
    ``call_overhead``: seconds of Python and autograd per call of a strategy, by ``(cost kind,
    fused)`` (:attr:`Cost.kind`), beyond the ops counted; ``matmul_flops``: FLOP/s of a linear
    layer's matmuls per dtype (before ``matmul``); ``adapter_op_overhead``: host seconds each op of an
    adapter strategy costs beyond ``op_overhead`` (this package's Python around the op:
    autograd.Function, the launchers, the strategy's bookkeeping; not charged to the frozen layer
    nor to full fine-tuning; CUDA's, where ``call_overhead`` is not fitted); ``calibrated``: the
    constants were fitted to a measurement run of this package's strategies on the device, fused
    kernels included (auto considers "fused" only then)."""

    flops: dict
    bandwidth: float
    op_overhead: float
    grouped: Optional[float] = None
    grouped_weight_grad: Optional[float] = None
    conv_overhead: float = 0.0
    matmul: Optional[float] = None
    spatial_conv_overhead: float = 0.0
    exp_rate: Optional[float] = None
    fresh_byte_cost: float = 0.0
    call_overhead: dict = field(default_factory=dict)
    matmul_flops: Optional[dict] = None
    adapter_op_overhead: float = 0.0
    calibrated: bool = False
    narrow: Optional[float] = None
    narrow_channels: int = 0

    def flop_rate(self, dtype: torch.dtype) -> float:
        return self.flops.get(dtype, self.flops[torch.float32])

    def matmul_rate(self, dtype: torch.dtype) -> float:
        """A linear layer's matmuls: ``matmul_flops[dtype]``, else ``matmul`` (at most the dense
        rate), else the dense rate."""
        if self.matmul_flops and dtype in self.matmul_flops:
            return self.matmul_flops[dtype]
        dense = self.flop_rate(dtype)
        return dense if self.matmul is None else min(self.matmul, dense)

    def narrow_rate(self, dtype: torch.dtype) -> float:
        """A convolution pass writing few channels: ``narrow`` (a float32 rate) scaled to ``dtype`` as
        the dense rate is, at most the dense rate; the dense rate where ``narrow`` is None."""
        dense = self.flop_rate(dtype)
        if self.narrow is None:
            return dense
        return min(dense, self.narrow * dense / self.flop_rate(torch.float32))


# Python and autograd per call of each strategy's code path beyond the ops counted, on the CPU, by
# (Cost.kind, fused), fitted with the rest of the CPU constants (bench/cpu_time.py --fit); bypass's
# chain under plain autograd at the op's less 150 us, the least of the differences measured between
# the two paths on the same ops (146-647 us on four layer shapes, bench/NOTES.md): the fit alone
# cannot tell them apart, as they run on different rows
_CPU_CALL_OVERHEAD = {
    ("frozen", False): 0.0, ("full", False): 2e-6,
    ("merged", False): 69e-6, ("merged", True): 232e-6,
    ("two_branch", False): 25e-6, ("two_branch", True): 203e-6,
    ("tucker_bypass", False): 201e-6, ("tucker_bypass", True): 203e-6,
    ("tucker_bypass_autograd", False): 51e-6,
    ("tucker_hybrid", False): 167e-6, ("tucker_hybrid", True): 266e-6,
    ("scale_bypass", False): 52e-6, ("scale_bypass", True): 158e-6,
}

DEVICES = {
    # The 2-core AMD EPYC (Zen 5, AVX-512 with bf16) CI machine, one torch thread, fitted to 1862
    # measured steps (every method, strategy and backend on the bench's 24 CPU-scaled rows, the 11
    # distinct convolutions of a ResNet-18 at 8x3x112x112 and 3 tiny layers; each the minimum of
    # 7 interleaved rounds of thread CPU time, idle machine, commit 66a1ce6) by `python -m
    # bench.cpu_time --fit`: median error 9%, 79% of steps within 25% on rows held out of the fit.
    # Dense fp32 convolutions 234 GFLOP/s as fitted, a linear layer's matmuls 123; a convolution
    # pass writing fewer than 16 channels (an AVX-512 register's fp32 lanes: the chain's rank-8
    # ops) 123, as measured alone (3->8 7x7 stride 2 and 64->8 3x3: 96-111 GFLOP/s, against
    # 193-247 at 16-64 output channels); fp64, bf16 and fp16 at the ratios measured on a
    # 128-channel 3x3 convolution (0.28, 2.7 and 0.025: oneDNN has a bf16 kernel here, none for
    # fp16); grouped convolutions 52 GFLOP/s, their weight gradients 9.4; 18.5 GB/s for the bytes
    # the ops read and write; 7 us per op, a convolution call 9 us more and 78 us more with a
    # kernel larger than 1x1 or a stride (oneDNN's setup: a 3x3 convolution of 4 channels takes
    # 35-80 us; 1x1 unstrided convolutions run as matmuls at one thread); exp in the fused passes
    # 2.0 G elements/s; the per-call Python above. Fresh weight-sized tensors fitted to no cost
    # (their page faults, 0.5 ns per byte where glibc has returned the memory to the system, came
    # and went with the allocator's state: bench/NOTES.md).
    "cpu": DeviceModel(flops={torch.float32: 234e9, torch.float64: 66e9, torch.bfloat16: 630e9,
                              torch.float16: 5.9e9},
                       bandwidth=18.5e9, op_overhead=7.2e-6, grouped=52e9, grouped_weight_grad=9.4e9,
                       conv_overhead=9e-6, matmul=123e9, spatial_conv_overhead=78e-6, exp_rate=2.0e9,
                       fresh_byte_cost=0.0, call_overhead=_CPU_CALL_OVERHEAD, narrow=123e9,
                       narrow_channels=16),
    # The previous CI machine (Zen 3, AVX2, no bf16 unit), one torch thread, used where torch's CPU
    # capability is not AVX-512: fp32 convolutions 40-80 GFLOP/s, copies above the last-level
    # cache 15-20 GB/s, about 5 us per small op; oneDNN's bf16/fp16 convolutions at 1.4/2.4
    # GFLOP/s; depthwise convolutions far below the dense rate (forward and input gradient 3.5-14
    # GFLOP/s, weight gradient 0.6-5 GFLOP/s; one geometric middle each); a convolution call 40 us
    # (commit 7ec1398's CPU run). The terms fitted since (spatial convolutions, exp, per-call
    # Python) were not measured there: the Zen 5's are used, exp at half its rate.
    "cpu-avx2": DeviceModel(flops={torch.float32: 60e9, torch.float64: 30e9, torch.bfloat16: 1.5e9,
                                   torch.float16: 2.5e9},
                            bandwidth=15e9, op_overhead=6e-6, grouped=7e9, grouped_weight_grad=2.5e9,
                            conv_overhead=40e-6, spatial_conv_overhead=0.0, exp_rate=0.9e9,
                            call_overhead=_CPU_CALL_OVERHEAD),
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
    """What the cost model reads of one call: shapes, geometry, dtypes, the adapter's math and
    shapes, the gradients needed, adapter dropout, the backend. Its fields, in order, are what
    :func:`signature` returns: Python ints, strings, bools and dtypes only (``math_key`` is
    ``AdapterMath.key``), so that torch.compile sees them as a constant."""

    weight_shape: tuple
    input_shape: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    device_type: str
    math_key: str
    adapter_shapes: tuple
    need_input: bool
    need_weight: bool
    need_bias: bool
    need_adapter: bool
    dropout: bool
    impl: str

    @classmethod
    def of(cls, call: AdaptedCall) -> "Workload":
        return cls(*signature(call))

    @property
    def math(self) -> methods.AdapterMath:
        return methods.AdapterMath.from_key(self.math_key)

    @property
    def fused(self) -> bool:
        """Whether a fused backend builds ``W'`` (one pass) rather than the reference math."""
        return self.impl != "reference"

    @property
    def triton(self) -> bool:
        """On the triton backend, where strategy "fused" runs."""
        return self.impl == "triton"

    @property
    def output_shape(self) -> tuple:
        if len(self.weight_shape) == 2:
            return (self.input_shape[0], self.weight_shape[0])
        spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                   zip(self.input_shape[2:], self.weight_shape[2:], self.stride, self.padding, self.dilation)]
        return (self.input_shape[0], self.weight_shape[0], *spatial)

    @property
    def ranks(self) -> tuple:
        """Tucker: the core's shape; lora: (r,); scales: ()."""
        if self.math.delta == "tucker":
            return self.adapter_shapes[0]
        return (self.adapter_shapes[0][1],) if self.math.delta == "lora" else ()


def _specialised_sizes(shape) -> tuple:
    """``shape`` as Python ints under torch.compile: a size the graph holds symbolic (automatic
    dynamic shapes) is specialised to its value, with a guard. The decision depends on it, so a
    graph is compiled per distinct input shape."""
    return tuple([operator.index(d) for d in shape])


def signature(call: AdaptedCall) -> tuple:
    """The fields of ``call``'s :class:`Workload`, as a plain tuple: hashable, and a constant
    under torch.compile (which makes no constant of a dataclass built while tracing)."""
    sizes = _specialised_sizes if torch.compiler.is_compiling() else tuple
    needs = call.needs()
    return (sizes(call.weight.shape), sizes(call.x.shape), tuple(call.stride), tuple(call.padding),
            tuple(call.dilation), call.groups, call.x.dtype, call.weight.dtype, call.weight.device.type, call.math.key,
            tuple([sizes(t.shape) for t in call.adapter]), needs["input"], needs["weight"], needs["bias"],
            needs["adapter"], call.dropped_x is not None, call.impl)


# the plain layer's costs (frozen, trained in full): no adapter host cost
_PLAIN_KINDS = ("frozen", "full")
PARTS = ("convolutions and matmuls", "weight-sized passes", "activation-sized passes", "fixed per-call costs")
_CONV, _WEIGHT, _ACTIVATION, _FIXED = PARTS


@dataclass
class Cost:
    """FLOPs, bytes and ops of one strategy's forward + backward; ``notes`` say how it runs.

    ``kind`` names the strategy's code path for its fixed per-call cost (``DeviceModel.call_overhead``);
    ``part_flops`` and ``part_bytes`` split ``flops`` and ``bytes`` by :data:`PARTS` (what no helper
    of :class:`_Sizes` added counts as an activation-sized pass)."""

    flops: float = 0.0
    bytes: float = 0.0
    ops: int = 0
    notes: list = field(default_factory=list)
    grouped_flops: float = 0.0  # part of ``flops``: grouped convolutions' forward and input gradients
    grouped_weight_grad_flops: float = 0.0  # part of ``flops``: grouped convolutions' weight gradients
    conv_calls: int = 0  # of ``ops``: convolutions (fixed costs beyond a small op's on some devices)
    spatial_conv_calls: int = 0  # of ``conv_calls``: those with a kernel larger than 1x1
    matmul_flops: float = 0.0  # part of ``flops``: a linear layer's matmuls
    narrow_flops: float = 0.0  # part of ``flops``: convolution passes writing few channels (DeviceModel.narrow)
    exp_elements: float = 0.0  # elements through exp: weight-sized passes, the fused kernels' tiles
    fresh_bytes: float = 0.0  # weight-sized tensors allocated afresh (weight gradients, autograd's W')
    kind: str = ""
    fused: bool = False
    part_flops: dict = field(default_factory=dict)
    part_bytes: dict = field(default_factory=dict)

    def add(self, flops: float = 0.0, nbytes: float = 0.0, ops: int = 1, part: str = "") -> "Cost":
        self.flops += flops
        self.bytes += nbytes
        self.ops += ops
        if part:
            self.part_flops[part] = self.part_flops.get(part, 0.0) + flops
            self.part_bytes[part] = self.part_bytes.get(part, 0.0) + nbytes
        return self

    def merge(self, other: "Cost") -> "Cost":
        self.add(other.flops, other.bytes, other.ops)
        self.grouped_flops += other.grouped_flops
        self.conv_calls += other.conv_calls
        self.spatial_conv_calls += other.spatial_conv_calls
        self.grouped_weight_grad_flops += other.grouped_weight_grad_flops
        self.matmul_flops += other.matmul_flops
        self.narrow_flops += other.narrow_flops
        self.exp_elements += other.exp_elements
        self.fresh_bytes += other.fresh_bytes
        for mine, theirs in ((self.part_flops, other.part_flops), (self.part_bytes, other.part_bytes)):
            for part, value in theirs.items():
                mine[part] = mine.get(part, 0.0) + value
        return self

    def seconds(self, device: DeviceModel, dtype: torch.dtype) -> float:
        return sum(self.seconds_by_part(device, dtype).values())

    def seconds_by_part(self, device: DeviceModel, dtype: torch.dtype) -> dict:
        """The estimate split by :data:`PARTS`."""
        dense = device.flop_rate(dtype)

        def rate(grouped_rate: Optional[float]) -> float:
            return dense if grouped_rate is None else min(grouped_rate, dense)

        grouped = (self.grouped_flops / rate(device.grouped) + self.matmul_flops / device.matmul_rate(dtype)
                   + self.grouped_weight_grad_flops / rate(device.grouped_weight_grad)
                   + self.narrow_flops / device.narrow_rate(dtype))
        flops = {p: self.part_flops.get(p, 0.0) for p in PARTS}
        nbytes = {p: self.part_bytes.get(p, 0.0) for p in PARTS}
        flops[_ACTIVATION] += self.flops - sum(flops.values())
        nbytes[_ACTIVATION] += self.bytes - sum(nbytes.values())
        flops[_CONV] -= self.grouped_flops + self.grouped_weight_grad_flops + self.matmul_flops + self.narrow_flops
        out = {p: flops[p] / dense + nbytes[p] / device.bandwidth for p in PARTS}
        out[_CONV] += grouped + self.conv_calls * device.conv_overhead + (
            self.spatial_conv_calls * device.spatial_conv_overhead)
        if device.exp_rate:
            out[_WEIGHT] += self.exp_elements / device.exp_rate
        out[_WEIGHT] += self.fresh_bytes * device.fresh_byte_cost
        host = device.op_overhead + (device.adapter_op_overhead if self.kind not in _PLAIN_KINDS else 0.0)
        out[_FIXED] = self.ops * host + device.call_overhead.get((self.kind, self.fused), 0.0)
        return out


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
        # the layer's own op needs more than a 1x1 unstrided convolution's setup (a k x k kernel, or
        # a stride: oneDNN's path on the CPU, where 1x1 unstrided convolutions are matmuls)
        self.spatial = self.kernel > 1 or self.pixels_out != self.pixels_in
        self.narrow_channels = device_model(w.device_type).narrow_channels if self.is_conv else 0

    def narrow(self, flops: float, channels: int) -> float:
        """``flops`` if a convolution pass writing ``channels`` channels runs at the narrow rate, else 0."""
        return flops if channels < self.narrow_channels and self.w.groups == 1 else 0.0

    def op(self, cost: Cost, flops: float, *elements: float, spatial: bool = False, call: bool = True,
           narrow: float = 0.0) -> Cost:
        """An op of ``flops`` reading/writing tensors of ``elements`` elements in the op's dtype; on
        a convolution layer, an op with FLOPs is a convolution (``spatial``: with the layer's kernel
        and stride, not a 1x1 projection; ``call``: False for work done inside another op's call;
        ``narrow``: how many of its FLOPs write few channels, :meth:`narrow`). An op without FLOPs
        is an activation-sized elementwise pass."""
        cost.narrow_flops += narrow
        if flops and self.is_conv and call:
            cost.conv_calls += 1
            cost.spatial_conv_calls += bool(spatial and self.spatial)
        elif flops and not self.is_conv:
            cost.matmul_flops += flops
        return cost.add(flops, self.e * sum(elements), ops=int(call), part=_CONV if flops else _ACTIVATION)

    def grouped_op(self, cost: Cost, flops: float, *elements: float, weight_grad: bool = False,
                   spatial: bool = True, call: bool = True, narrow: float = 0.0) -> Cost:
        """An op of the layer's grouping and kernel: a grouped convolution runs at its own rate on
        some devices."""
        if self.w.groups > 1:
            if weight_grad:
                cost.grouped_weight_grad_flops += flops
            else:
                cost.grouped_flops += flops
        return self.op(cost, flops, *elements, spatial=spatial, call=call, narrow=narrow)

    def conv_pass(self, cost: Cost) -> Cost:
        """One pass of the layer's op (forward or input gradient)."""
        return self.grouped_op(cost, self.conv, self.x, self.weight, self.y)

    def weight_grad_pass(self, cost: Cost, separate_call: bool = True) -> Cost:
        """The layer's weight gradient (``separate_call`` False: computed in the input gradient's
        call), in a fresh tensor (and, for a convolution, oneDNN's own reordered copy of it)."""
        cost.fresh_bytes += (2 if self.is_conv else 1) * self.weight * self.e
        return self.grouped_op(cost, self.conv, self.x, self.weight, self.y, weight_grad=True, call=separate_call)

    @property
    def _rank(self) -> int:
        return self.w.ranks[0] if self.w.ranks else 1

    @property
    def _exp(self) -> bool:
        return self.w.math.combine == "exp"

    def transform(self, cost: Cost) -> Cost:
        """``W'`` (or ``W' - W``) built in the op's dtype: one fused pass, or the reference's
        delta, combine and cast passes in the compute dtype."""
        cost.exp_elements += self.weight if self._exp else 0.0
        if self.w.fused:  # into a reused scratch tensor on the CPU
            return cost.add(2.0 * self._rank * self.weight, self.weight * (self.e + self.e), part=_WEIGHT)
        cost.fresh_bytes += self.weight * (2 * self.e_acc + self.e)  # the delta, W' and its cast, kept by autograd
        return cost.add(2.0 * self._rank * self.weight, self.weight * (5 * self.e_acc + self.e), ops=4, part=_WEIGHT)

    def project(self, cost: Cost) -> Cost:
        """``dL/dW'`` projected onto the adapter tensors (the fused pass recomputes ``exp(E)``)."""
        reads = 1 if self.w.math.combine == "add" else 2
        if self.w.fused:
            cost.exp_elements += self.weight if self._exp else 0.0
            return cost.add(4.0 * self._rank * self.weight, reads * self.weight * self.e, ops=2, part=_WEIGHT)
        cost.fresh_bytes += 2 * self.weight * self.e_acc  # autograd's gradients of W' and of the delta
        return cost.add(4.0 * self._rank * self.weight, self.weight * (reads * self.e + 4 * self.e_acc), ops=6,
                        part=_WEIGHT)

    def project_transform(self, cost: Cost) -> Cost:
        """The fused CPU backward's one pass: ``dL/dW'`` projected and ``W'`` written."""
        cost.exp_elements += self.weight if self._exp else 0.0
        return cost.add(6.0 * self._rank * self.weight, 3 * self.weight * self.e, ops=2, part=_WEIGHT)

    @property
    def one_pass_backward(self) -> bool:
        """Whether a fused merged backward makes ``W'`` and the projection in one pass (CPU)."""
        return self.w.fused and self.w.device_type == "cpu" and self.w.need_input and self.w.need_adapter


def frozen_cost(w: Workload) -> Cost:
    """The frozen layer: the op forward and, when the input needs it, its input gradient."""
    s = _Sizes(w)
    cost = s.conv_pass(Cost(kind="frozen"))
    return s.conv_pass(cost) if w.need_input else cost


def full_fine_tuning_cost(w: Workload) -> Cost:
    """The plain layer with its weight trained: the frozen layer's ops and the weight gradient (in
    the input gradient's call when there is one)."""
    s = _Sizes(w)
    cost = s.weight_grad_pass(frozen_cost(w), separate_call=not w.need_input)
    cost.kind = "full"
    return cost


def merged_cost(w: Workload) -> Cost:
    if w.dropout:
        return two_branch_cost(w)
    s = _Sizes(w)
    cost = s.conv_pass(s.transform(Cost(notes=["W' built, one op"], kind="merged", fused=w.fused)))
    if s.one_pass_backward:
        s.weight_grad_pass(cost)
        s.project_transform(cost)
        s.conv_pass(cost)
        cost.notes += ["full weight gradient", "W' and the projection in one pass"]
        return cost
    if w.need_input:
        s.conv_pass(s.transform(cost) if w.fused else cost)
    if w.need_adapter or w.need_weight:
        s.weight_grad_pass(cost, separate_call=not w.need_input)
        cost.notes.append("full weight gradient")
    if w.need_adapter:
        s.project(cost)
    return cost


def two_branch_cost(w: Workload) -> Cost:
    s = _Sizes(w)
    cost = Cost(notes=["op(x, W) + op(x, W' - W)"], kind="two_branch", fused=w.fused)
    s.conv_pass(s.transform(s.conv_pass(cost)))
    s.op(cost, 0, s.y, s.y, s.y)
    if w.need_input:
        s.conv_pass(cost)
    if w.need_input or w.dropout:
        s.conv_pass(s.transform(cost) if w.fused else cost)
        s.op(cost, 0, s.x, s.x, s.x)
    if w.need_adapter or w.need_weight:
        s.weight_grad_pass(cost, separate_call=not (w.need_input or w.dropout))
    if w.need_adapter:
        s.project(cost)
    return cost


@dataclass(frozen=True)
class _Chain:
    """The Tucker chain's ops on one workload (see tucker_chain): three (P_in, op_K, P_out) or,
    folded, two (op_M, P_out; LoRA's chain, op_A then B, always); per op its FLOPs, and the chain's
    activations u, z, in elements; the ranks r_1 and r_2 (0 when folded), the channels op_K or op_M
    and P_in write (a pass writing few channels runs at the narrow rate, :meth:`_Sizes.narrow`)."""

    folded: bool
    f_in: float  # P_in, or op_M when folded (k x k, the layer's geometry)
    f_mid: float  # op_K (0 when folded)
    f_out: float  # P_out
    u: float
    z: float
    r1: int = 0
    r2: int = 0

    @classmethod
    def of(cls, s: _Sizes, w: Workload, folded: bool) -> "_Chain":
        r1, g = w.ranks[0], w.groups
        folded = folded or w.math.delta == "lora"
        z = s.batch * g * r1 * s.pixels_out
        f_out = 2.0 * s.batch * s.pixels_out * s.c_out * r1
        if folded:
            f_m = 2.0 * s.batch * s.pixels_out * g * r1 * s.c_group * s.kernel
            return cls(True, f_m, 0.0, f_out, 0.0, z, r1)
        r2 = w.ranks[1]
        f_in = 2.0 * s.batch * s.pixels_in * s.c_in * r2
        f_mid = 2.0 * s.batch * s.pixels_out * g * r1 * r2 * s.kernel
        return cls(False, f_in, f_mid, f_out, s.batch * g * r2 * s.pixels_in, z, r1, r2)

    def kept(self, x: float) -> tuple:
        """``(u kept, z kept)`` as tucker_chain.kept_for_backward decides for a chain input of ``x``
        elements."""
        from .tucker_chain import SAVE_FRACTION

        budget = SAVE_FRACTION * x
        if self.folded:
            return False, self.z <= budget
        return self.u <= budget, self.u + self.z <= budget

    def to_z(self, s: _Sizes, cost: Cost) -> Cost:
        """x -> z: P_in and op_K, or op_M."""
        if self.folded:
            return s.grouped_op(cost, self.f_in, s.x, self.z, narrow=s.narrow(self.f_in, self.r1))
        s.op(cost, self.f_in, s.x, self.u, narrow=s.narrow(self.f_in, self.r2))
        return s.grouped_op(cost, self.f_mid, self.u, self.z, narrow=s.narrow(self.f_mid, self.r1))

    def backward(self, s: _Sizes, cost: Cost, kept: tuple, input_grad: bool, factor_grads: bool = True) -> Cost:
        """The chain's backward from grad_y: what was not ``kept`` (u, z) again, then per op one call
        for its input and weight gradients (the first op's input gradient, into x, only if
        ``input_grad``)."""
        kept_u, kept_z = kept
        if self.folded:
            if not kept_z:
                self.to_z(s, cost)
        else:
            if not kept_u:
                s.op(cost, self.f_in, s.x, self.u, narrow=s.narrow(self.f_in, self.r2))
            if not kept_z:
                s.grouped_op(cost, self.f_mid, self.u, self.z, narrow=s.narrow(self.f_mid, self.r1))
        both = 2 if factor_grads else 1
        s.op(cost, both * self.f_out, s.y, self.z, self.z,  # grad z, grad U_1
             narrow=s.narrow(both * self.f_out, self.r1))
        # the first op's weight gradient (U_2, M) and input gradient (into x)
        first = self.f_in * (factor_grads + input_grad)
        first_narrow = (s.narrow(self.f_in, min(self.r2 or self.r1, s.c_group)) if factor_grads else 0.0) + (
            s.narrow(self.f_in, s.c_in) if input_grad else 0.0)
        if self.folded:
            s.grouped_op(cost, first, self.z, s.x, *((s.x, s.x) if input_grad else ()), weight_grad=True,
                         narrow=first_narrow)
        else:
            s.grouped_op(cost, both * self.f_mid, self.z, self.u, self.u, weight_grad=True,  # grad u, grad K
                         narrow=s.narrow(self.f_mid, self.r2) + (s.narrow(self.f_mid, min(self.r1, self.r2))
                                                                 if factor_grads else 0.0))
            s.op(cost, first, self.u, s.x, *((s.x, s.x) if input_grad else ()), narrow=first_narrow)
        return cost


def _chain_notes(w: Workload, chain: _Chain, kept: Optional[tuple]) -> list:
    if w.math.delta == "lora":
        notes = ["LoRA chain"]
    else:
        notes = ["P_in folded into op_K" if chain.folded else "three-op chain"]
    if kept is not None:
        names = [n for n, k in zip(("u", "z"), kept) if k]
        notes.append(" and ".join(names) + " kept" if names else "nothing kept")
    return notes


UNDER_AUTOGRAD = "the chain under autograd"


def _tucker_bypass_form(w: Workload, folded: bool) -> Cost:
    """Bypass with the chain in one form, the cheapest of its variants: the op with the input gradient
    through ``W`` and the chain, or through ``W'``; and where the op would keep ``u`` and ``z`` (so
    that autograd keeps no more), the same ops as the first under plain autograd, which costs less
    Python per call (:func:`tucker_bypass.run`)."""
    s = _Sizes(w)
    chain = _Chain.of(s, w, folded)
    kept = chain.kept(s.x)
    input_grad = w.need_input or w.dropout
    variants = [_tucker_bypass_variant(w, s, chain, kept, input_grad, via_weight=False, autograd=False)]
    if kept[1]:  # first: it wins a tie
        variants.insert(0, _tucker_bypass_variant(w, s, chain, kept, input_grad, via_weight=False, autograd=True))
    if input_grad and not w.dropout:
        variants.append(_tucker_bypass_variant(w, s, chain, kept, input_grad, via_weight=True, autograd=False))
    dev = device_model(w.device_type)
    return min(variants, key=lambda c: c.seconds(dev, w.dtype))


def _tucker_bypass_variant(w: Workload, s: _Sizes, chain: _Chain, kept: tuple, input_grad: bool, via_weight: bool,
                           autograd: bool) -> Cost:
    cost = Cost(notes=["op(x, W) + low-rank chain"], kind="tucker_bypass_autograd" if autograd else "tucker_bypass",
                fused=w.fused and not autograd)
    s.conv_pass(cost)
    chain.to_z(s, cost)
    s.op(cost, chain.f_out, chain.z, s.y, s.y)
    if input_grad:
        s.conv_pass(cost)
        if via_weight:
            s.transform(chain.backward(s, cost, kept, False) if w.need_adapter else cost)
            cost.notes.append("input gradient through W'")
        else:
            chain.backward(s, cost, kept, True, w.need_adapter)
            cost.notes.append("input gradient through W and the chain")
    elif w.need_adapter:
        chain.backward(s, cost, kept, False)
    if w.need_weight:
        s.weight_grad_pass(cost)
    cost.notes += _chain_notes(w, chain, kept)
    if autograd:
        cost.notes.append(UNDER_AUTOGRAD)
    return cost


def _cheapest(w: Workload, form) -> Cost:
    """The cheaper of a chain strategy's two forms (three ops, or P_in folded into op_K; LoRA's
    chain has the folded form only)."""
    if w.math.delta == "lora":
        return form(w, True)
    dev = device_model(w.device_type)
    three, folded = form(w, False), form(w, True)
    return folded if folded.seconds(dev, w.dtype) < three.seconds(dev, w.dtype) else three


def tucker_bypass_cost(w: Workload) -> Cost:
    return _cheapest(w, _tucker_bypass_form)


def _tucker_hybrid_form(w: Workload, folded: bool) -> Cost:
    s = _Sizes(w)
    chain = _Chain.of(s, w, folded)
    cost = s.conv_pass(s.transform(Cost(notes=["op(x, W'), adapter gradients by the chain"], kind="tucker_hybrid",
                                        fused=w.fused)))
    if w.need_input:
        s.conv_pass(s.transform(cost))
    if w.need_adapter:
        chain.backward(s, cost, (False, False), False)
    if w.need_weight:
        s.weight_grad_pass(cost)
    cost.notes += _chain_notes(w, chain, None)
    return cost


def tucker_hybrid_cost(w: Workload) -> Cost:
    if w.dropout:
        cost = tucker_bypass_cost(w)
        cost.notes.insert(0, "adapter dropout: runs bypass")
        return cost
    return _cheapest(w, _tucker_hybrid_form)


def scale_bypass_cost(w: Workload) -> Cost:
    from .scale_bypass import splits

    s = _Sizes(w)
    ssb = len(w.adapter_shapes) == 2
    split = splits(w.dtype)
    cost = Cost(kind="scale_bypass", fused=w.fused)
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
    exp, one exponential per weight element and pixel tile; no bytes, no op of its own."""
    tiles = pymath.ceil(pixels / FUSED_PIXEL_TILE)
    if s.w.math.combine == "exp":
        cost.exp_elements += s.weight * tiles
    return cost.add(2.0 * _fused_rank(s.w) * s.weight * tiles, 0, ops=0, part=_CONV)


def fused_prologue_cost(w: Workload) -> Cost:
    """Strategy "fused", ``W'`` in the tiles: the layer's op with ``W'`` formed in its weight tiles
    (forward and input gradient), the weight gradient projected in its epilogue; no weight-sized
    pass. With dropout, ``op(x, W) + op(xd, W' - W)`` (the second adds the first in its epilogue)."""
    s = _Sizes(w)
    cost = Cost(notes=["W' formed in the op's weight tiles"], kind="fused", fused=True)
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
        s.grouped_op(cost, s.conv, s.x, s.weight, s.y, weight_grad=True)  # dW' in the tiles: no fresh tensor
        cost.add(epilogue, 0 if w.math.combine == "add" else s.weight * s.e, ops=0, part=_CONV)
        cost.exp_elements += s.weight if w.math.combine == "exp" else 0
        cost.notes.append("weight gradient projected in its tiles")
    if w.need_weight:
        s.weight_grad_pass(cost)
    return cost


def _fused_chain_form(w: Workload, folded: bool) -> Cost:
    s = _Sizes(w)
    chain = _Chain.of(s, w, folded)
    cost = s.conv_pass(Cost(notes=["op(x, W) + low-rank chain, U_1 z in the op's epilogue"], kind="fused",
                            fused=True))
    chain.to_z(s, cost)
    cost.add(chain.f_out, s.e * chain.z, ops=0, part=_CONV)
    kept = chain.kept(s.x)
    if w.dropout:
        s.conv_pass(cost)
        chain.backward(s, cost, kept, True, w.need_adapter)
        cost.notes.append("input gradient through W and the chain")
    else:
        if w.need_adapter:
            chain.backward(s, cost, kept, False)
        if w.need_input:
            _prologue(s, s.conv_pass(cost), s.batch * s.pixels_in)
            cost.notes.append("input gradient through W' formed in the tiles")
    if w.need_weight:
        s.weight_grad_pass(cost)
    cost.notes += _chain_notes(w, chain, kept)
    return cost


def fused_chain_cost(w: Workload) -> Cost:
    """Strategy "fused", chain form (FLoRA's Tucker chain, three ops or folded, LoRA's A-then-B
    chain): the frozen op plus the chain, all on the fused kernels, the chain's up-projection added
    in the frozen op's epilogue (no output-sized pass), the input gradient through ``W'`` formed in
    the tiles (exactly the frozen layer's op)."""
    return _cheapest(w, _fused_chain_form)


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
    device = device_model(w.device_type)
    if chain.seconds(device, w.dtype) <= prologue.seconds(device, w.dtype):
        return "chain", chain
    return "prologue", prologue


@dataclass
class Decision:
    """The strategy a call runs (and on which backend), why, and every candidate's estimated cost on
    that backend. ``input_grad_via_weight``, ``folded`` and ``under_autograd`` are details of the
    chain strategies (see tucker_bypass, tucker_chain); ``impl`` is the backend chosen when several
    were offered (None: the call's own); ``backend_seconds``: the chosen strategy's estimate on each
    backend offered."""

    strategy: str
    reason: str
    costs: dict
    input_grad_via_weight: bool = False
    fused_form: str = ""  # strategy "fused": "prologue" (W' in the tiles) or "chain" (FLoRA's or LoRA's chain)
    folded: bool = False
    impl: Optional[str] = None
    under_autograd: bool = False
    backend_seconds: dict = field(default_factory=dict)


APPLICABLE = {
    "tucker:add": ("merged", "two_branch", "bypass", "hybrid"),
    "lora:add": ("merged", "two_branch", "bypass", "hybrid"),
    "scales:mul": ("merged", "two_branch", "bypass"),
}
# strategies that round W' to the op's dtype in the forward: not chosen by auto in 16-bit dtypes
ROUND_WEIGHT = ("merged", "hybrid")
_COSTS = {"merged": merged_cost, "two_branch": two_branch_cost, "hybrid": tucker_hybrid_cost}
_BYPASS_COSTS = {"tucker": tucker_bypass_cost, "lora": tucker_bypass_cost, "scales": scale_bypass_cost}


def applicable(math: methods.AdapterMath) -> tuple:
    """The strategies that can run ``math`` (bypass needs an additive Tucker or LoRA update or a
    scaling one, hybrid an additive Tucker or LoRA one)."""
    return APPLICABLE.get(math.key, ("merged", "two_branch"))


def strategy_cost(w: Workload, strategy: str) -> Cost:
    if strategy == "bypass":
        return _BYPASS_COSTS[w.math.delta](w)
    return _COSTS[strategy](w)


@torch.compiler.assume_constant_result
def decision(sig: tuple, requested: str, impls: tuple = ()) -> Decision:
    """The decision for a call of :func:`signature` ``sig``, made once per signature, ``requested``
    strategy and backends ``impls`` and remembered. Under torch.compile it is made while tracing,
    outside the graph, whose code sees the result as a constant (the signature's sizes are guarded)."""
    return _decision_cached(sig, requested, tuple(impls))


@functools.lru_cache(maxsize=4096)
def _decision_cached(sig: tuple, requested: str, impls: tuple) -> Decision:
    return decide_backend(Workload(*sig), requested, impls)


def decide_backend(w: Workload, requested: str, impls: tuple = ()) -> Decision:
    """:func:`decide` for ``w``; with more than one backend in ``impls``, run once per backend
    (``w`` with that ``impl``), and the one whose strategy is estimated fastest kept
    (``decision.impl``, each backend's estimate in ``backend_seconds``)."""
    impls = tuple(impls)
    if len(impls) < 2:
        return decide(w, requested)
    device = device_model(w.device_type)
    decisions = {impl: decide(dataclasses.replace(w, impl=impl), requested) for impl in impls}
    seconds = {impl: d.costs[d.strategy].seconds(device, w.dtype) for impl, d in decisions.items()}
    impl = impls[0]
    for other in impls[1:]:
        impl = other if seconds[other] < seconds[impl] else impl
    chosen = decisions[impl]
    others = ", ".join(f"{i} {seconds[i] * 1e3:.3g} ms" for i in impls if i != impl)
    reason = f"{chosen.reason}; backend {impl} ({seconds[impl] * 1e3:.3g} ms estimated; {others})"
    return dataclasses.replace(chosen, reason=reason, impl=impl, backend_seconds=seconds)


def decide(w: Workload, requested: str) -> Decision:
    """The strategy for ``w``: ``requested`` itself, or for "auto" the rule of the module doc."""
    device = device_model(w.device_type)
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
        allowed = [c for c in candidates if not (c in ROUND_WEIGHT and w.dtype in REDUCED_PRECISION)]
        if fused_considered and not (form == "prologue" and w.dtype in REDUCED_PRECISION):
            allowed.append("fused")
        strategy = min(allowed, key=times.__getitem__)
        reason = "cheapest estimate"
        excluded = [c for c in candidates if c not in allowed]
        if excluded:
            reason += (f"; {' and '.join(excluded)} excluded: {str(w.dtype).replace('torch.', '')} would round a "
                       f"small update away")
    if requested == "auto" and w.triton and not fused_considered:
        reason += ("; fused not considered: " + ("Triton is interpreted on the CPU" if w.device_type != "cuda" else
                                                 "the CUDA cost constants are not yet calibrated by a measurement run"))
    notes = costs[strategy].notes
    via_weight = strategy == "bypass" and "input gradient through W'" in notes
    folded = strategy in ("bypass", "hybrid", "fused") and "P_in folded into op_K" in notes
    under_autograd = strategy in ("bypass", "hybrid") and UNDER_AUTOGRAD in notes
    return Decision(strategy, reason, costs, via_weight, form if strategy == "fused" else "", folded,
                    under_autograd=under_autograd)


def device_model(device_type: str) -> DeviceModel:
    """The constants of ``device_type`` (CUDA's for a device type without its own); on the CPU those
    of its vector width (AVX-512, else the AVX2 machine's)."""
    if device_type == "cpu":
        return DEVICES["cpu" if _CPU_CAPABILITY == "AVX512" else "cpu-avx2"]
    return DEVICES.get(device_type, DEVICES["cuda"])


_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()  # read once: torch.compile traces device_model


def frozen_seconds(w: Workload) -> float:
    return frozen_cost(w).seconds(device_model(w.device_type), w.dtype)


def full_fine_tuning_seconds(w: Workload) -> float:
    return full_fine_tuning_cost(w).seconds(device_model(w.device_type), w.dtype)
