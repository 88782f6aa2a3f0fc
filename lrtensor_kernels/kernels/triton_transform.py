"""Triton kernels for the adapter weight transform (forward) and its projection (backward).

Every method is brought to the low-rank form of :mod:`lrtensor_kernels.kernels.lowrank_form`:
``W`` (O, C), ``E = L @ R``. For tucker the kernels build the tiles of ``R`` themselves from
``U_2`` (I, r_2) and ``G = core x_3 U_3 ... x_N U_N`` (r_1, r_2, K), the only pre-contraction
made in torch (it holds r_1 * r_2 * K numbers).

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
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import methods
from ..backend import triton_interpreted
from .channels import channel_layout, channel_operands
from .lowrank_form import LowRankForm, adapter_grads, check_operands

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


@triton.jit
def _channel_dot_kernel(a_ptr, b_ptr, partial_ptr, OUTER, C, INNER, ROWS_PER_PROGRAM, ACC: tl.constexpr,
                        BLOCK_CH: tl.constexpr, BLOCK_IN: tl.constexpr):
    """partial[split, c] = sum of a * b over the split's outer rows and every inner index."""
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_ch = pid_c * BLOCK_CH + tl.arange(0, BLOCK_CH)
    offs_in = tl.arange(0, BLOCK_IN)
    ch_mask = offs_ch < C
    acc = tl.zeros((BLOCK_CH, BLOCK_IN), dtype=ACC)
    row_start = pid_split * ROWS_PER_PROGRAM
    for o in range(row_start, tl.minimum(row_start + ROWS_PER_PROGRAM, OUTER)):
        base = (tl.cast(o, tl.int64) * C + offs_ch[:, None]) * INNER
        for i0 in range(0, INNER, BLOCK_IN):
            mask = ch_mask[:, None] & (i0 + offs_in < INNER)[None, :]
            x = tl.load(a_ptr + base + i0 + offs_in[None, :], mask=mask, other=0.0).to(ACC)
            y = tl.load(b_ptr + base + i0 + offs_in[None, :], mask=mask, other=0.0).to(ACC)
            acc += x * y
    tl.store(partial_ptr + pid_split * C + offs_ch, tl.sum(acc, axis=1), mask=ch_mask)


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pointers(form: LowRankForm):
    dummy = form.left
    return (form.left, form.right if form.right is not None else dummy,
            form.core if form.core is not None else dummy, form.u2 if form.u2 is not None else dummy)


def _launch_config(form: LowRankForm, device: torch.device, weight_dtype: torch.dtype):
    rank1 = _next_pow2(form.rank1, 16)
    if triton_interpreted() or device.type != "cuda":
        block_o, block_c, warps, programs = 16, 64, 1, 1
    else:
        block_o, block_c = (32, 128) if rank1 <= 32 else (16, 64)
        warps, programs = 4, 4 * _multiprocessors(device.index or 0)
    col_blocks = triton.cdiv(form.cols, block_c)
    row_tiles = triton.cdiv(form.out_rows, block_o)
    splits = max(1, min(row_tiles, programs // col_blocks))
    rows_per_program = triton.cdiv(row_tiles, splits) * block_o
    splits = triton.cdiv(form.out_rows, rows_per_program)
    return dict(grid=(col_blocks, splits), rows_per_program=rows_per_program, block_o=block_o,
                block_c=block_c, rank1=rank1, warps=warps)


# tf32 products only where their rounding (2^-11 relative) stays below what plain PyTorch loses in
# that dtype: the forward's only rounding is the store of W' (bfloat16: 2^-9), while the backward's
# inputs (grad W' from cuDNN/cuBLAS) are already rounded to the 16-bit dtype.
_FORWARD_PRECISION = {torch.bfloat16: "tf32"}
_BACKWARD_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32"}


def transform(weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str, scale: float,
              delta_only: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W'`` (or ``W' - W``) of the same shape and dtype as ``weight``, in one launch."""
    check_operands(weight, adapter)
    spec = methods.AdapterMath.from_key(math)
    form = LowRankForm(weight, adapter, spec.delta, scale)
    weight = weight.contiguous()
    if out is None:
        out = _new_buffer(weight.shape, weight.dtype, weight.device)
    cfg = _launch_config(form, weight.device, weight.dtype)
    _transform_kernel[cfg["grid"]](
        weight, out, *_pointers(form), form.out_rows, form.cols, form.kernel_size, form.rank1, form.rank2,
        cfg["rows_per_program"], DELTA=_DELTA_CODE[spec.delta], COMBINE=_COMBINE_CODE[spec.combine],
        DELTA_ONLY=delta_only, ACC=_TL_DTYPE[form.acc], PRECISION=_FORWARD_PRECISION.get(weight.dtype, "ieee"),
        BLOCK_O=cfg["block_o"], BLOCK_C=cfg["block_c"], RANK1=cfg["rank1"], num_warps=cfg["warps"],
    )
    return out


def project(grad_weight: torch.Tensor, weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str,
            scale: float) -> list[torch.Tensor]:
    """The gradient of every adapter tensor from ``grad_weight = dLoss/dW'``, in one pass over the weight."""
    check_operands(weight, adapter)
    spec = methods.AdapterMath.from_key(math)
    form = LowRankForm(weight, adapter, spec.delta, scale)
    cfg = _launch_config(form, weight.device, weight.dtype)
    col_blocks, splits = cfg["grid"]
    grad_left = _new_buffer((col_blocks, form.out_rows, form.rank1), form.acc, weight.device)
    grad_right = _new_buffer((splits, form.rank1, form.cols), form.acc, weight.device)
    _project_kernel[cfg["grid"]](
        grad_weight.contiguous(), weight.contiguous(), *_pointers(form), grad_left, grad_right,
        form.out_rows, form.cols, form.kernel_size, form.rank1, form.rank2, cfg["rows_per_program"],
        DELTA=_DELTA_CODE[spec.delta], COMBINE=_COMBINE_CODE[spec.combine], ACC=_TL_DTYPE[form.acc],
        PRECISION=_BACKWARD_PRECISION.get(weight.dtype, "ieee"), BLOCK_O=cfg["block_o"], BLOCK_C=cfg["block_c"],
        RANK1=cfg["rank1"],
        num_warps=cfg["warps"],
    )
    grad_left = grad_left.sum(0)
    grad_right = grad_right.sum(0)
    grads = adapter_grads(form, adapter, grad_left, grad_right, scale)
    return [g.to(t.dtype) for g, t in zip(grads, adapter)]


_CHANNEL_DOT_ELEMENTS = 1 << 16  # elements per program of the first stage
_MAX_GRID_Y = 65535


def channel_dot(a: torch.Tensor, b: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``(a * b).sum(every dim but channel_dim)`` without making ``a * b``: shape ``(a.shape[channel_dim],)``,
    float32 (float64 for float64 inputs). Two stages: one partial sum per channel and split of the
    outer rows (a partition that depends only on the shape), then a sum of the splits in order, so
    the result is bitwise reproducible."""
    a, b, dim = channel_operands(a, b, channel_dim)
    outer, channels, inner = channel_layout(a.shape, dim)
    acc = methods.compute_dtype(a.dtype)
    if outer * inner == 0 or channels == 0:
        return torch.zeros(channels, dtype=acc, device=a.device)
    block_in = min(triton.next_power_of_2(inner), 128)
    block_ch = min(max(1, 1024 // block_in), triton.next_power_of_2(channels))
    rows = max(1, _CHANNEL_DOT_ELEMENTS // (block_ch * inner), triton.cdiv(outer, _MAX_GRID_Y))
    grid = (triton.cdiv(channels, block_ch), triton.cdiv(outer, rows))
    partial = _new_buffer((grid[1], channels), acc, a.device)
    _channel_dot_kernel[grid](a, b, partial, outer, channels, inner, rows, ACC=_TL_DTYPE[acc], BLOCK_CH=block_ch,
                              BLOCK_IN=block_in)
    return partial.sum(0)
