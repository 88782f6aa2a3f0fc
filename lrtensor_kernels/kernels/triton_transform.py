"""Triton kernels for the adapter weight transform (forward) and its projection (backward).

Every method of :mod:`lrtensor_kernels.methods` is brought to one form. The weight is seen
as a matrix ``W`` of shape ``(O, C)`` with ``O = W.shape[0]`` and ``C = prod(W.shape[1:])``,
column ``c = i * K + k`` for input channel ``i`` and flattened kernel position ``k``
(``K = 1`` for linear). The update is ``E = L @ R`` with

- lora:   ``L = scale * B`` (O, r), ``R = A`` (r, C);
- scales: ``L = d_out`` (O, 1) (ones for SSL), ``R[0, c] = d_in[c // K]``;
- tucker: ``L = scale * U_1`` (O, r_1) and ``R[a, c] = sum_b G[a, b, k] * U_2[i, b]``, built
  tile by tile inside the kernels from ``U_2`` (I, r_2) and ``G = core x_3 U_3 ... x_N U_N``
  (r_1, r_2, K), the only pre-contraction made in torch (it holds r_1 * r_2 * K numbers).

Forward, one launch: ``W' = combine(W, E)`` (or ``W' - W``), math in float32 (float64 for
float64 weights), stored in the weight's dtype.

Backward, one launch over ``(grad W', W)``: ``H = dL/dE`` (``grad`` for add; ``grad * W'``,
with ``W'`` recomputed in registers, for exp; ``grad * W`` for first_order and mul), then the
two partial contractions ``H @ R^T`` and ``L^T @ H``. Each program owns one column block and
one chunk of rows and writes its partial sums to its own slot; torch sums the slots in a
fixed order, so the gradients are bitwise reproducible (no atomics). The remaining
contractions of the (tiny) results with the Tucker factors run in torch.
"""
from __future__ import annotations

import functools
import math as pymath
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import methods
from ..backend import triton_interpreted

_LORA, _TUCKER = 0, 1
_COMBINE_CODE = {"add": 0, "exp": 1, "first_order": 2, "mul": 3}
_DELTA_CODE = {"lora": _LORA, "scales": _LORA, "tucker": _TUCKER}
_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _right_tile(r_ptr, core_ptr, u2_ptr, offs_c, ranks1, C, K, R1, R2, DELTA: tl.constexpr, ACC: tl.constexpr,
                BLOCK_C: tl.constexpr, RANK1: tl.constexpr):
    """R[:, offs_c] as a (RANK1, BLOCK_C) tile, zero outside the ranks and columns."""
    c_mask = offs_c < C
    r_mask = ranks1 < R1
    if DELTA == 0:
        right = tl.load(r_ptr + ranks1[:, None] * C + offs_c[None, :],
                        mask=r_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
    else:
        chan = offs_c // K
        kpos = offs_c % K
        right = tl.zeros((RANK1, BLOCK_C), dtype=ACC)
        for b in range(0, R2):
            u2 = tl.load(u2_ptr + chan * R2 + b, mask=c_mask, other=0.0).to(ACC)
            g = tl.load(core_ptr + ranks1[:, None] * (R2 * K) + b * K + kpos[None, :],
                        mask=r_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
            right += g * u2[None, :]
    return right


@triton.jit
def _expm1(e):
    """exp(e) - 1 without cancellation: a Taylor series for |e| < 1/2, exp(e) - 1 beyond. float64
    sums to e^15 (the first omitted term is below 2e-18 relative); float32 to e^7 (below 3e-7)."""
    if e.dtype == tl.float64:
        p = 1.0 + e * (1.0 / 15)  # 1 + e/2 (1 + e/3 (... (1 + e/15)))
        for k in tl.static_range(14, 1, -1):
            p = 1.0 + e * p * (1.0 / k)
    else:
        p = 1.0 + e * (0.5 + e * (1.0 / 6 + e * (1.0 / 24 + e * (1.0 / 120 + e * (1.0 / 720 + e * (1.0 / 5040))))))
    return tl.where(tl.abs(e) < 0.5, e * p, tl.exp(e) - 1.0)


@triton.jit
def _combine(w, e, COMBINE: tl.constexpr, DELTA_ONLY: tl.constexpr):
    if COMBINE == 0:
        if DELTA_ONLY:
            out = e
        else:
            out = w + e
    elif COMBINE == 1:
        if DELTA_ONLY:
            out = w * _expm1(e)
        else:
            out = w * tl.exp(e)
    elif COMBINE == 2:
        if DELTA_ONLY:
            out = w * e
        else:
            out = w * (1.0 + e)
    else:
        if DELTA_ONLY:
            out = w * (e - 1.0)
        else:
            out = w * e
    return out


@triton.jit
def _transform_kernel(w_ptr, out_ptr, l_ptr, r_ptr, core_ptr, u2_ptr, O, C, K, R1, R2, ROWS_PER_PROGRAM,
                      DELTA: tl.constexpr, COMBINE: tl.constexpr, DELTA_ONLY: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, RANK1: tl.constexpr):
    pid_c = tl.program_id(0)
    row_start = tl.program_id(1) * ROWS_PER_PROGRAM
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks1 = tl.arange(0, RANK1)
    c_mask = offs_c < C
    right = _right_tile(r_ptr, core_ptr, u2_ptr, offs_c, ranks1, C, K, R1, R2, DELTA, ACC, BLOCK_C, RANK1)
    for o0 in range(row_start, tl.minimum(row_start + ROWS_PER_PROGRAM, O), BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_mask = offs_o < O
        left = tl.load(l_ptr + offs_o[:, None] * R1 + ranks1[None, :],
                       mask=o_mask[:, None] & (ranks1 < R1)[None, :], other=0.0).to(ACC)
        e = tl.dot(left, right, input_precision=PRECISION, out_dtype=ACC)
        tile = offs_o[:, None] * C + offs_c[None, :]
        mask = o_mask[:, None] & c_mask[None, :]
        w = tl.load(w_ptr + tile, mask=mask, other=0.0).to(ACC)
        out = _combine(w, e, COMBINE, DELTA_ONLY)
        tl.store(out_ptr + tile, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _project_kernel(grad_ptr, w_ptr, l_ptr, r_ptr, core_ptr, u2_ptr, grad_l_ptr, grad_r_ptr,
                    O, C, K, R1, R2, ROWS_PER_PROGRAM,
                    DELTA: tl.constexpr, COMBINE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, RANK1: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_rows = tl.program_id(1)
    row_start = pid_rows * ROWS_PER_PROGRAM
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks1 = tl.arange(0, RANK1)
    c_mask = offs_c < C
    r_mask = ranks1 < R1
    right = _right_tile(r_ptr, core_ptr, u2_ptr, offs_c, ranks1, C, K, R1, R2, DELTA, ACC, BLOCK_C, RANK1)
    grad_right = tl.zeros((RANK1, BLOCK_C), dtype=ACC)
    for o0 in range(row_start, tl.minimum(row_start + ROWS_PER_PROGRAM, O), BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_mask = offs_o < O
        left = tl.load(l_ptr + offs_o[:, None] * R1 + ranks1[None, :],
                       mask=o_mask[:, None] & r_mask[None, :], other=0.0).to(ACC)
        tile = offs_o[:, None] * C + offs_c[None, :]
        mask = o_mask[:, None] & c_mask[None, :]
        h = tl.load(grad_ptr + tile, mask=mask, other=0.0).to(ACC)
        if COMBINE == 1:
            e = tl.dot(left, right, input_precision=PRECISION, out_dtype=ACC)
            h = h * tl.load(w_ptr + tile, mask=mask, other=0.0).to(ACC) * tl.exp(e)
        elif COMBINE != 0:
            h = h * tl.load(w_ptr + tile, mask=mask, other=0.0).to(ACC)
        grad_left = tl.dot(h, tl.trans(right), input_precision=PRECISION, out_dtype=ACC)
        tl.store(grad_l_ptr + pid_c * O * R1 + offs_o[:, None] * R1 + ranks1[None, :], grad_left,
                 mask=o_mask[:, None] & r_mask[None, :])
        grad_right += tl.dot(tl.trans(left), h, input_precision=PRECISION, out_dtype=ACC)
    tl.store(grad_r_ptr + pid_rows * R1 * C + ranks1[:, None] * C + offs_c[None, :], grad_right,
             mask=r_mask[:, None] & c_mask[None, :])


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class _Operands:
    """The (L, R) form of one weight and its adapter tensors, in the compute dtype."""

    def __init__(self, weight: torch.Tensor, adapter: Sequence[torch.Tensor], delta: str, scale: float):
        acc = methods.compute_dtype(weight.dtype)
        self.acc = acc
        self.delta = delta
        self.out_rows = weight.shape[0]
        self.in_channels = weight.shape[1]
        self.kernel_size = pymath.prod(weight.shape[2:])
        self.cols = self.in_channels * self.kernel_size
        self.core = self.u2 = self.right = None
        adapter = [t.detach().to(acc) for t in adapter]
        if delta == "lora":
            lora_B, lora_A = adapter
            self.left = (scale * lora_B).contiguous()
            self.right = lora_A.contiguous()
            self.rank1, self.rank2 = lora_A.shape[0], 1
        elif delta == "scales":
            d_in = adapter[0]
            d_out = adapter[1] if len(adapter) == 2 else torch.ones(self.out_rows, dtype=acc, device=d_in.device)
            self.left = (scale * d_out).reshape(-1, 1).contiguous()
            self.right = d_in.repeat_interleave(self.kernel_size).reshape(1, -1).contiguous()
            self.rank1, self.rank2 = 1, 1
        elif delta == "tucker":
            core, u1, u2, *kernel_factors = adapter
            self.left = (scale * u1).contiguous()
            self.u2 = u2.contiguous()
            self.core = self.kernel_core(core, kernel_factors)
            self.rank1, self.rank2 = core.shape[0], core.shape[1]
        else:
            raise ValueError(f"unknown delta {delta!r}")

    def kernel_core(self, core, kernel_factors):
        """``core x_3 U_3 ... x_N U_N`` as (r_1, r_2, K)."""
        out = methods.tucker_product(core, kernel_factors, first_mode=2)
        return out.reshape(core.shape[0], core.shape[1], self.kernel_size).contiguous()

    def pointers(self):
        dummy = self.left
        return (self.left, self.right if self.right is not None else dummy,
                self.core if self.core is not None else dummy, self.u2 if self.u2 is not None else dummy)

    def launch_config(self, device: torch.device, weight_dtype: torch.dtype):
        rank1 = _next_pow2(self.rank1, 16)
        if triton_interpreted() or device.type != "cuda":
            block_o, block_c, warps, programs = 16, 64, 1, 1
        else:
            block_o, block_c = (32, 128) if rank1 <= 32 else (16, 64)
            warps, programs = 4, 4 * _multiprocessors(device.index or 0)
        col_blocks = triton.cdiv(self.cols, block_c)
        row_tiles = triton.cdiv(self.out_rows, block_o)
        splits = max(1, min(row_tiles, programs // col_blocks))
        rows_per_program = triton.cdiv(row_tiles, splits) * block_o
        splits = triton.cdiv(self.out_rows, rows_per_program)
        return dict(grid=(col_blocks, splits), rows_per_program=rows_per_program, block_o=block_o,
                    block_c=block_c, rank1=rank1, warps=warps)


# tf32 products only where their rounding (2^-11 relative) stays below what plain PyTorch loses in
# that dtype: the forward's only rounding is the store of W' (bfloat16: 2^-9), while the backward's
# inputs (grad W' from cuDNN/cuBLAS) are already rounded to the 16-bit dtype.
_FORWARD_PRECISION = {torch.bfloat16: "tf32"}
_BACKWARD_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32"}


def _check(weight: torch.Tensor, adapter: Sequence[torch.Tensor]):
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    for t in adapter:
        if t.device != weight.device:
            raise ValueError(f"adapter tensor on {t.device} but weight on {weight.device}")


def transform(weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str, scale: float,
              delta_only: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W'`` (or ``W' - W``) of the same shape and dtype as ``weight``, in one launch."""
    _check(weight, adapter)
    spec = methods.AdapterMath.from_key(math)
    ops = _Operands(weight, adapter, spec.delta, scale)
    weight = weight.contiguous()
    if out is None:
        out = _new_buffer(weight.shape, weight.dtype, weight.device)
    cfg = ops.launch_config(weight.device, weight.dtype)
    _transform_kernel[cfg["grid"]](
        weight, out, *ops.pointers(), ops.out_rows, ops.cols, ops.kernel_size, ops.rank1, ops.rank2,
        cfg["rows_per_program"], DELTA=_DELTA_CODE[spec.delta], COMBINE=_COMBINE_CODE[spec.combine],
        DELTA_ONLY=delta_only, ACC=_TL_DTYPE[ops.acc], PRECISION=_FORWARD_PRECISION.get(weight.dtype, "ieee"),
        BLOCK_O=cfg["block_o"], BLOCK_C=cfg["block_c"], RANK1=cfg["rank1"], num_warps=cfg["warps"],
    )
    return out


def project(grad_weight: torch.Tensor, weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str,
            scale: float) -> list[torch.Tensor]:
    """The gradient of every adapter tensor from ``grad_weight = dLoss/dW'``, in one pass over the weight."""
    _check(weight, adapter)
    spec = methods.AdapterMath.from_key(math)
    ops = _Operands(weight, adapter, spec.delta, scale)
    cfg = ops.launch_config(weight.device, weight.dtype)
    col_blocks, splits = cfg["grid"]
    grad_left = _new_buffer((col_blocks, ops.out_rows, ops.rank1), ops.acc, weight.device)
    grad_right = _new_buffer((splits, ops.rank1, ops.cols), ops.acc, weight.device)
    _project_kernel[cfg["grid"]](
        grad_weight.contiguous(), weight.contiguous(), *ops.pointers(), grad_left, grad_right,
        ops.out_rows, ops.cols, ops.kernel_size, ops.rank1, ops.rank2, cfg["rows_per_program"],
        DELTA=_DELTA_CODE[spec.delta], COMBINE=_COMBINE_CODE[spec.combine], ACC=_TL_DTYPE[ops.acc],
        PRECISION=_BACKWARD_PRECISION.get(weight.dtype, "ieee"), BLOCK_O=cfg["block_o"], BLOCK_C=cfg["block_c"],
        RANK1=cfg["rank1"],
        num_warps=cfg["warps"],
    )
    grad_left = grad_left.sum(0)
    grad_right = grad_right.sum(0)
    grads = _adapter_grads(ops, adapter, grad_left, grad_right, scale)
    return [g.to(t.dtype) for g, t in zip(grads, adapter)]


def _adapter_grads(ops: _Operands, adapter, grad_left, grad_right, scale):
    """Adapter gradients from ``dLoss/dL`` (unscaled: ``grad_left`` is ``H @ R^T``) and ``dLoss/dR``."""
    if ops.delta == "lora":
        return [scale * grad_left, grad_right]
    if ops.delta == "scales":
        grad_in = grad_right.reshape(ops.in_channels, ops.kernel_size).sum(1)
        return [grad_in] if len(adapter) == 1 else [grad_in, scale * grad_left[:, 0]]
    # tucker: R[a, i, k] = sum_b U2[i, b] * G[a, b, k] with G = core x_3 U_3 ... x_N U_N.
    core, u1, u2, *kernel_factors = [t.detach().to(ops.acc) for t in adapter]
    grad_r = grad_right.reshape(ops.rank1, ops.in_channels, ops.kernel_size)
    grad_u2 = torch.einsum("aik,abk->ib", grad_r, ops.core)
    grad_g = torch.einsum("aik,ib->abk", grad_r, u2).reshape(core.shape[:2] + tuple(f.shape[0] for f in kernel_factors))
    grad_core, *grad_kernel = methods.tucker_product_grads(core, kernel_factors, grad_g, first_mode=2)
    return [grad_core, scale * grad_left, grad_u2, *grad_kernel]
