"""Implicit-GEMM convolution and matmul in Triton, with the adapter math inside the tiles.

One family of kernels serves Conv1d/2d/3d and Linear (each seen as a 3-d convolution, see
:mod:`.conv_plan`), for every stride, dilation, zero padding and group count:

- ``forward``: ``y[n, o, p] = sum_{c, k} W'[o, c, k] x[n, c, p * s - pad + k * dil] (+ bias[o])``,
  a GEMM of (output channels) x (output pixels) reducing over (input channels x kernel taps),
  per group.
- ``input_grad``: ``dx = conv^T(dy, W')``, a GEMM of (input pixels) x (input channels) reducing
  over (output channels x taps). Input positions are taken one stride residue class at a time, so
  only the taps that reach a class are visited (a 2x2 stride-2 kernel costs one tap per pixel,
  not four masked ones).
- ``weight_grad``: ``dW'[o, c, k] = sum_{n, p} dy[n, o, p] x[n, c, p * s - pad + k * dil]``, a GEMM
  of (output channels) x (input channels) per tap, reducing over pixels cut into splits.

The adapter math, in the low-rank form of :mod:`.lowrank_form` (``W`` as an (O, C_g * K) matrix,
``E = L @ R``, ``W' = combine(W, E)``):

- *prologue* (forward, input_grad): every weight tile is formed in registers as it is loaded,
  ``W'_tile = combine(W_tile, L_rows @ R_cols)``, in the compute dtype (float32, float64 for
  float64), and rounded to the dot's operand dtype. ``W'`` is never written to memory.
- *epilogue* (weight_grad): every ``dW'`` tile becomes ``H = dW' * dW'/dE`` (``dW'`` for add,
  ``dW' * W'`` for exp, ``dW' * W`` for first order and mul, with ``E`` recomputed for exp) and
  is projected at once: ``H @ R_cols^T`` into a partial of ``dL/dL`` per column tile and split,
  ``L_rows^T @ H`` into a partial of ``dL/dR`` per row tile and split. torch sums the partials in
  a fixed order, so the gradients are bitwise reproducible without atomics. ``dW'`` is never
  written.

Without an adapter the same kernels run the plain op (``base_op``/``op_backward`` here have
``ops.base_op``'s and ``ops.op_backward``'s signatures), and the forward's epilogue can add a
low-rank product ``U z`` of output size (FLoRA's Tucker chain, whose up-projection then costs no
output-sized pass) and a residual.

Precision: the dots take 16-bit operands as they are (fp32 accumulation); float32 operands run
``"ieee"`` (exact fp32 products) unless torch allows TF32 for the op (``torch.backends.cudnn.
allow_tf32`` for convolutions, ``torch.backends.cuda.matmul.allow_tf32`` for linear layers, CUDA
only): the kernels round as the library op would in the same setting. ``E`` is a product of
float32 factors: TF32 only beside bfloat16 operands, where its rounding (2^-11) stays below the
rounding of ``W'`` to bfloat16 (2^-9); the epilogue's projections of ``H`` in TF32 beside bfloat16
operands (``dW'`` is a sum of bfloat16 products), exact beside float16.
Offsets are 64-bit wherever they scale with the batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from . import conv_plan
from .conv_plan import AUTOTUNER, ConvProblem, Tiles, as_5d, problem_of
from .launch import launch, planned_multiprocessors
from .lowrank_form import LowRankForm
from .triton_transform import _combine, _right_tile

_COMBINE_CODE = {"add": 0, "exp": 1, "first_order": 2, "mul": 3}
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
# TF32 products for E only beside bfloat16 operands (its 2^-11 below the 2^-9 of W' rounded to
# bfloat16); the epilogue's projections of H in TF32 beside bfloat16 operands (their dW' is a sum of
# bfloat16 products); exact products everywhere else. Not TF32 beside float16: float16's own
# rounding (2^-11) is finer than TF32's truncation, and a TF32 projection measured 8.7e-4 relative
# error on B's gradient against plain float16's 1.7e-4 (operands cut as the tensor cores cut them);
# not tf32x3 either: its split operands spilled 992 B per thread on sm_80 at the 64x128 tile
_UPDATE_PRECISION = {torch.bfloat16: "tf32"}
_PROJECT_PRECISION = {torch.bfloat16: "tf32"}


# ---------------------------------------------------------------------------------------------
# tile helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``: GROUP_M row tiles walk the column tiles side by side, so
    the column tiles they share are read from L2 (the matmul tutorial's ordering)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


@triton.jit
def _tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                  WIDE_M: tl.constexpr):
    """The row and column indices of program ``pid``'s (BLOCK_M, BLOCK_N) tile of an (M, N) grid of
    tiles (rows 64-bit with ``WIDE_M``)."""
    pid_m, pid_n = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if WIDE_M:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_m, pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _left_tile(l_ptr, rows, row_mask, R1, RANK: tl.constexpr, ACC: tl.constexpr):
    """``L[rows, :R1]`` as (len(rows), RANK), zero beyond R1; for RANK == 1 the vector ``L[rows, 0]``."""
    if RANK == 1:
        left = tl.load(l_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    else:
        ranks = tl.arange(0, RANK)
        left = tl.load(l_ptr + rows[:, None] * R1 + ranks[None, :], mask=row_mask[:, None] & (ranks < R1)[None, :],
                       other=0.0).to(ACC)
    return left


@triton.jit
def _right_cols(r_ptr, cols, RCOLS, R1, RANK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``R[:R1, cols]`` as (RANK, len(cols)), zero beyond R1 and RCOLS; for RANK == 1 the vector ``R[0, cols]``."""
    if RANK == 1:
        right = tl.load(r_ptr + cols, mask=cols < RCOLS, other=0.0).to(ACC)
    else:
        right = _right_tile(r_ptr, r_ptr, r_ptr, cols, tl.arange(0, RANK), RCOLS, 1, R1, 1, 0, ACC, BLOCK, RANK)
    return right


@triton.jit
def _update(left, right, RANK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
            TRANSPOSED: tl.constexpr = False):
    """``E = L @ R`` on one tile, or ``E^T = R^T @ L^T`` (the input gradient's weight tiles are
    (channels, outputs))."""
    if TRANSPOSED:
        if RANK == 1:
            e = right[:, None] * left[None, :]
        else:
            e = tl.dot(tl.trans(right), tl.trans(left), input_precision=PRECISION, out_dtype=ACC)
    else:
        if RANK == 1:
            e = left[:, None] * right[None, :]
        else:
            e = tl.dot(left, right, input_precision=PRECISION, out_dtype=ACC)
    return e


@triton.jit
def _kernel_tap(tap, KH, KW):
    """(kd, kh, kw) of a flattened tap ``(kd * KH + kh) * KW + kw``, in int64 (they scale strides)."""
    tap = tl.cast(tap, tl.int64)
    return tap // (KW * tl.cast(KH, tl.int64)), (tap // KW) % KH, tap % KW


@triton.jit
def _pixel_count(N, D, H, W, WIDE: tl.constexpr):
    """``N * D * H * W``, multiplied in int64; 32-bit unless ``WIDE`` (the launcher makes pixel
    indices 64-bit when the count can reach 2^31)."""
    count = tl.cast(N, tl.int64) * D * H * W
    if not WIDE:
        count = count.to(tl.int32)
    return count


@triton.jit
def _pixel_offsets(n, d, h, w, sn, sd, sh, sw):
    """``n * sn + d * sd + h * sh + w * sw`` in int64 (activations may hold 2^31 elements or more)."""
    return n.to(tl.int64) * sn + d.to(tl.int64) * sd + h.to(tl.int64) * sh + w.to(tl.int64) * sw


@triton.jit
def _split_pixels(offs, OD, OH, OW):
    """(n, d, h, w) of flattened pixel indices ``((n * OD + d) * OH + h) * OW + w``."""
    w = offs % OW
    t = offs // OW
    h = t % OH
    t = t // OH
    return t // OD, t % OD, h, w


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, l_ptr, r_ptr, bias_ptr, up_ptr, z_ptr, res_ptr, y_ptr,
    N, C_g, D, H, W, O_g, OD, OH, OW, KH, KW, KVOL,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    sxn, sxc, sxd, sxh, sxw, swo, swc, swd, swh, sww, syn, syc, syd, syh, syw, szn, szc, szd, szh, szw,
    R1, RCOLS, RZ,
    ADAPTED: tl.constexpr, COMBINE: tl.constexpr, DELTA_ONLY: tl.constexpr, RANK: tl.constexpr,
    HAS_BIAS: tl.constexpr, UP_RANK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr,
    PIXELS64: tl.constexpr,
    PRECISION: tl.constexpr, UPDATE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc[o, m] = sum over (channel block, tap) of W'[o, c, tap] @ x[c, m]; grid (tiles, groups)."""
    group = tl.program_id(1).to(tl.int64)
    M = _pixel_count(N, OD, OH, OW, PIXELS64)
    offs_m, offs_o = _tile_offsets(tl.program_id(0), M, O_g, BLOCK_M, BLOCK_N, GROUP_M, PIXELS64)
    m_mask = offs_m < M
    o_mask = offs_o < O_g
    n, od, oh, ow = _split_pixels(offs_m, OD, OH, OW)
    rows = group * O_g + offs_o
    x_images = n.to(tl.int64) * sxn + group * C_g * sxc
    base_d = od.to(tl.int64) * SD - PD  # the input position of tap 0
    base_h = oh.to(tl.int64) * SH - PH
    base_w = ow.to(tl.int64) * SW - PW
    if ADAPTED:
        left = _left_tile(l_ptr, rows, o_mask, R1, RANK, ACC)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    for it in range(tl.cdiv(C_g, BLOCK_K) * KVOL):
        channels = (it // KVOL) * BLOCK_K + offs_k
        tap = it % KVOL
        kd, kh, kw = _kernel_tap(tap, KH, KW)
        i_d = base_d + kd * DD
        i_h = base_h + kh * DH
        i_w = base_w + kw * DW
        inside = m_mask & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        c_mask = channels < C_g
        x_tile = tl.load(x_ptr + (x_images + _pixel_offsets(n, i_d, i_h, i_w, 0, sxd, sxh, sxw))[None, :]
                         + channels.to(tl.int64)[:, None] * sxc,
                         mask=c_mask[:, None] & inside[None, :], other=0.0)
        w_mask = o_mask[:, None] & c_mask[None, :]
        w_tile = tl.load(w_ptr + rows[:, None] * swo + channels.to(tl.int64)[None, :] * swc
                         + (kd * swd + kh * swh + kw * sww), mask=w_mask, other=0.0)
        if ADAPTED:
            right = _right_cols(r_ptr, channels.to(tl.int64) * KVOL + tap, RCOLS, R1, RANK, ACC, BLOCK_K)
            w_tile = _combine(w_tile.to(ACC), _update(left, right, RANK, ACC, UPDATE_PRECISION), COMBINE, DELTA_ONLY)
        acc = tl.dot(w_tile.to(x_tile.dtype), x_tile, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=o_mask, other=0.0).to(ACC)[:, None]
    if UP_RANK > 0:
        ranks = tl.arange(0, UP_RANK)
        r_mask = ranks < RZ
        up = tl.load(up_ptr + rows[:, None] * RZ + ranks[None, :], mask=o_mask[:, None] & r_mask[None, :], other=0.0)
        z = tl.load(z_ptr + _pixel_offsets(n, od, oh, ow, szn, szd, szh, szw)[None, :]
                    + (group * RZ + ranks)[:, None] * szc,
                    mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(up, z, acc, input_precision=PRECISION, out_dtype=ACC)
    y_offsets = _pixel_offsets(n, od, oh, ow, syn, syd, syh, syw)[None, :] + rows[:, None] * syc
    y_mask = o_mask[:, None] & m_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + y_offsets, mask=y_mask, other=0.0).to(ACC)
    tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _input_grad_kernel(
    g_ptr, w_ptr, l_ptr, r_ptr, taps_ptr, dx_ptr,
    N, C_g, D, H, W, O_g, OD, OH, OW, KH, KW, KVOL,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    sgn, sgc, sgd, sgh, sgw, swo, swc, swd, swh, sww, sxn, sxc, sxd, sxh, sxw,
    R1, RCOLS,
    ADAPTED: tl.constexpr, COMBINE: tl.constexpr, DELTA_ONLY: tl.constexpr, RANK: tl.constexpr,
    ACC: tl.constexpr, PIXELS64: tl.constexpr, PRECISION: tl.constexpr, UPDATE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc[c, q] = sum over (tap reaching q's residue class, output channel block) of W'^T[c, o, tap] @ dy[o, q];
    grid (tiles, groups x stride residue classes). taps: per class, the tap count then the taps."""
    classes = tl.cast(SD, tl.int64) * SH * SW
    group = tl.program_id(1) // classes
    cls = tl.program_id(1) % classes
    rd = cls // (SW * tl.cast(SH, tl.int64))
    rh = (cls // SW) % SH
    rw = cls % SW
    DC = tl.cdiv(D, SD)
    HC = tl.cdiv(H, SH)
    WC = tl.cdiv(W, SW)
    M = _pixel_count(N, DC, HC, WC, PIXELS64)
    offs_m, offs_c = _tile_offsets(tl.program_id(0), M, C_g, BLOCK_M, BLOCK_N, GROUP_M, PIXELS64)
    c_mask = offs_c < C_g
    n, jd, jh, jw = _split_pixels(offs_m, DC, HC, WC)
    i_d = rd + jd.to(tl.int64) * SD
    i_h = rh + jh.to(tl.int64) * SH
    i_w = rw + jw.to(tl.int64) * SW
    m_mask = (offs_m < M) & (i_d < D) & (i_h < H) & (i_w < W)
    g_images = n.to(tl.int64) * sgn + group * O_g * sgc
    taps = taps_ptr + cls * (KVOL + 1)
    o_blocks = tl.cdiv(O_g, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    for it in range(tl.load(taps) * o_blocks):
        tap = tl.load(taps + 1 + it // o_blocks)
        outs = (it % o_blocks) * BLOCK_K + offs_k
        kd, kh, kw = _kernel_tap(tap, KH, KW)
        o_d = jd + (rd + PD - kd * DD) // SD  # exact: the tap reaches this class
        o_h = jh + (rh + PH - kh * DH) // SH
        o_w = jw + (rw + PW - kw * DW) // SW
        reached = m_mask & (o_d >= 0) & (o_d < OD) & (o_h >= 0) & (o_h < OH) & (o_w >= 0) & (o_w < OW)
        o_mask = outs < O_g
        g_tile = tl.load(g_ptr + (g_images + _pixel_offsets(n, o_d, o_h, o_w, 0, sgd, sgh, sgw))[None, :]
                         + outs.to(tl.int64)[:, None] * sgc, mask=o_mask[:, None] & reached[None, :], other=0.0)
        rows = group * O_g + outs
        w_tile = tl.load(w_ptr + offs_c.to(tl.int64)[:, None] * swc + rows[None, :] * swo
                         + (kd * swd + kh * swh + kw * sww), mask=c_mask[:, None] & o_mask[None, :], other=0.0)
        if ADAPTED:
            left = _left_tile(l_ptr, rows, o_mask, R1, RANK, ACC)
            right = _right_cols(r_ptr, offs_c.to(tl.int64) * KVOL + tap, RCOLS, R1, RANK, ACC, BLOCK_N)
            w_tile = _combine(w_tile.to(ACC), _update(left, right, RANK, ACC, UPDATE_PRECISION, True), COMBINE,
                              DELTA_ONLY)
        acc = tl.dot(w_tile.to(g_tile.dtype), g_tile, acc, input_precision=PRECISION, out_dtype=ACC)
    dx_offsets = (_pixel_offsets(n, i_d, i_h, i_w, sxn, sxd, sxh, sxw)[None, :]
                  + (group * C_g + offs_c)[:, None] * sxc)
    tl.store(dx_ptr + dx_offsets, acc.to(dx_ptr.dtype.element_ty), mask=c_mask[:, None] & m_mask[None, :])


@triton.jit
def _weight_grad_kernel(
    x_ptr, g_ptr, w_ptr, l_ptr, r_ptr, gl_ptr, gr_ptr, dw_ptr,
    N, C_g, D, H, W, O_g, OD, OH, OW, KH, KW, KVOL,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    sxn, sxc, sxd, sxh, sxw, sgn, sgc, sgd, sgh, sgw, swo, swc, swd, swh, sww,
    R1, RCOLS, O, SPLITS, PER_SPLIT,
    PROJECT: tl.constexpr, COMBINE: tl.constexpr, RANK: tl.constexpr, ACC: tl.constexpr, PIXELS64: tl.constexpr,
    PRECISION: tl.constexpr, UPDATE_PRECISION: tl.constexpr, PROJECT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc[o, c] = sum over the split's pixels of dy[o, r] @ x[r, c] at one tap; grid (tiles, taps,
    groups x splits). PROJECT: the epilogue writes the tile's partial adapter gradients; else the
    tile itself into its split's slice of dw (O, C_g * KVOL)."""
    tap = tl.program_id(1).to(tl.int64)
    group = (tl.program_id(2) // SPLITS).to(tl.int64)
    split = tl.program_id(2) % SPLITS
    o_tiles = tl.cdiv(O_g, BLOCK_M)
    c_tiles = tl.cdiv(C_g, BLOCK_N)
    pid_o, pid_c = _tile_ids(tl.program_id(0), o_tiles, c_tiles, GROUP_M)
    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < O_g
    c_mask = offs_c < C_g
    kd, kh, kw = _kernel_tap(tap, KH, KW)
    total = _pixel_count(N, OD, OH, OW, PIXELS64)
    g_rows = (group * O_g + offs_o) * sgc
    x_cols = (group * C_g + offs_c) * sxc
    start = split.to(tl.int64) * PER_SPLIT
    if not PIXELS64:
        start = start.to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(0, PER_SPLIT, BLOCK_K):
        offs_r = start + r0 + offs_k
        r_mask = offs_r < total
        n, od, oh, ow = _split_pixels(offs_r, OD, OH, OW)
        i_d = od.to(tl.int64) * SD - PD + kd * DD
        i_h = oh.to(tl.int64) * SH - PH + kh * DH
        i_w = ow.to(tl.int64) * SW - PW + kw * DW
        inside = r_mask & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        g_tile = tl.load(g_ptr + g_rows[:, None] + _pixel_offsets(n, od, oh, ow, sgn, sgd, sgh, sgw)[None, :],
                         mask=o_mask[:, None] & r_mask[None, :], other=0.0)
        x_tile = tl.load(x_ptr + _pixel_offsets(n, i_d, i_h, i_w, sxn, sxd, sxh, sxw)[:, None] + x_cols[None, :],
                         mask=inside[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(g_tile, x_tile, acc, input_precision=PRECISION, out_dtype=ACC)
    rows = group * O_g + offs_o
    cols = offs_c.to(tl.int64) * KVOL + tap
    if PROJECT:
        left = _left_tile(l_ptr, rows, o_mask, R1, RANK, ACC)
        right = _right_cols(r_ptr, cols, RCOLS, R1, RANK, ACC, BLOCK_N)
        h = acc
        if COMBINE != 0:
            w = tl.load(w_ptr + rows[:, None] * swo + offs_c.to(tl.int64)[None, :] * swc
                        + (kd * swd + kh * swh + kw * sww),
                        mask=o_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
            if COMBINE == 1:
                w = w * tl.exp(_update(left, right, RANK, ACC, UPDATE_PRECISION))
            h = h * w
        slot_c = (tap * c_tiles + pid_c) * SPLITS + split
        slot_o = (group * o_tiles + pid_o) * SPLITS + split
        if RANK == 1:
            tl.store(gl_ptr + slot_c * O + rows, tl.sum(h * right[None, :], axis=1), mask=o_mask)
            tl.store(gr_ptr + slot_o * RCOLS + cols, tl.sum(h * left[:, None], axis=0), mask=c_mask)
        else:
            ranks = tl.arange(0, RANK)
            r_mask = ranks < R1
            grad_left = tl.dot(h, tl.trans(right), input_precision=PROJECT_PRECISION, out_dtype=ACC)
            tl.store(gl_ptr + slot_c * O * R1 + rows[:, None] * R1 + ranks[None, :], grad_left,
                     mask=o_mask[:, None] & r_mask[None, :])
            grad_right = tl.dot(tl.trans(left), h, input_precision=PROJECT_PRECISION, out_dtype=ACC)
            tl.store(gr_ptr + slot_o * R1 * RCOLS + ranks.to(tl.int64)[:, None] * RCOLS + cols[None, :], grad_right,
                     mask=r_mask[:, None] & c_mask[None, :])
    else:
        dw_offsets = (split.to(tl.int64) * O + rows)[:, None] * RCOLS + cols[None, :]
        tl.store(dw_ptr + dw_offsets, acc, mask=o_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptedWeight:
    """What the prologue and epilogue need: ``W' = combine(W, L @ R)`` (``W' - W`` with
    ``delta_only``), L (O, r) and R (r, C_g * K) contiguous in the compute dtype."""

    left: torch.Tensor
    right: torch.Tensor
    combine: str
    delta_only: bool = False

    @classmethod
    def of(cls, weight: torch.Tensor, adapter: Sequence[torch.Tensor], delta: str, combine: str, scale: float,
           delta_only: bool = False) -> tuple:
        """``(AdaptedWeight, LowRankForm)`` of a weight and its adapter tensors."""
        form = LowRankForm(weight, adapter, delta, scale)
        return cls(form.left, form.right_matrix(), combine, delta_only), form

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def padded_rank(self) -> int:
        """The tiles' rank: 1 stays 1 (an outer product), anything else a power of two >= 16 (a dot)."""
        return 1 if self.rank == 1 else max(16, triton.next_power_of_2(self.rank))


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` through :func:`.launch.launch` (recorded inside
    :func:`.launch.recording`): every launch of this module goes through here. No pointer is
    declared small: every address product is 64-bit."""
    launch(kernel, grid, *args, **kwargs)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype, device: torch.device, linear: bool) -> str:
    """The main dots' input precision: TF32 for float32 operands where torch allows it for the
    same op on CUDA (cuDNN's flag for convolutions, cuBLAS's for matmuls; on meta tensors too, which
    the ahead-of-time cases plan as on CUDA), else exact."""
    if dtype != torch.float32 or device.type not in ("cuda", "meta"):
        return "ieee"
    allowed = torch.backends.cuda.matmul.allow_tf32 if linear else torch.backends.cudnn.allow_tf32
    return "tf32" if allowed else "ieee"


def _geometry_args(p: ConvProblem) -> tuple:
    (d, h, w), (od, oh, ow), (_, kh, kw) = p.in_size, p.out_size, p.kernel
    return (p.batch, p.in_channels, d, h, w, p.out_channels, od, oh, ow, kh, kw, p.kernel_volume,
            *p.stride, *p.padding, *p.dilation)


def _adapter_args(adapted: Optional[AdaptedWeight], dummy: torch.Tensor, acc: torch.dtype,
                  problem: ConvProblem) -> tuple:
    """(l, r, R1, RCOLS) pointers and sizes (dummy pointers without an adapter)."""
    if adapted is None:
        return dummy, dummy, 1, problem.columns
    return adapted.left.to(acc), adapted.right.to(acc), adapted.rank, adapted.right.shape[1]


def _adapter_constexprs(adapted: Optional[AdaptedWeight]) -> dict:
    if adapted is None:
        return dict(ADAPTED=False, COMBINE=0, DELTA_ONLY=False, RANK=1)
    return dict(ADAPTED=True, COMBINE=_COMBINE_CODE[adapted.combine], DELTA_ONLY=adapted.delta_only,
                RANK=adapted.padded_rank())


def _tiles(kind: str, problem: ConvProblem, device: torch.device, dtype: torch.dtype, padded_rank: int, key,
           launch_with) -> Tiles:
    """The tiles to launch with: the forced ones (``conv_plan.forced``); else the candidates of the
    plan :func:`.launch.planned_multiprocessors` asks for, of which the autotuner's choice on a GPU,
    every one on meta tensors (``launch.recording``: the ahead-of-time cases, all the autotuner may
    pick; the first is returned), the first where nothing can be timed (a GPU plan forced under the
    interpreter)."""
    forced = conv_plan.forced_tiles(kind)
    if forced is not None:
        return forced
    options = conv_plan.candidates(kind, problem, dtype.itemsize, planned_multiprocessors(device), padded_rank)
    if device.type == "meta":
        for tiles in options[1:]:
            launch_with(tiles)
        return options[0]
    if device.type != "cuda" or triton_interpreted():
        return options[0]
    return AUTOTUNER.pick(key, options, launch_with)


def _wide(pixels: int) -> bool:
    """Whether pixel indices need 64 bits (offsets are 64-bit always)."""
    return pixels + 4096 >= 2 ** 31


def _spatial_out(problem: ConvProblem, spatial: int) -> tuple:
    return problem.out_size[3 - spatial:] if spatial else ()


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                 groups: int, adapted: Optional[AdaptedWeight] = None, up: Optional[tuple] = None,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base_op(x, W' or W, bias)`` in x's dtype, plus ``up[0] x_1 up[1]`` and ``residual``.

    x: (N, C_in, *spatial) or (M, in); weight: (C_out, C_in / groups, *k) or (out, in), any float
    dtype (rounded to x's in the tiles); bias: (C_out,) or None. ``up = (U, z)``: U (C_out, r) in
    x's dtype and z (N, groups * r, *out spatial); output channel o of group g adds
    ``sum_a U[o, a] z[n, g r + a, p]``. ``residual``: a tensor of the output's shape, added."""
    problem = problem_of(x.shape, weight.shape, stride, padding, dilation, groups)
    spatial = weight.dim() - 2
    out_shape = (x.shape[0], weight.shape[0], *_spatial_out(problem, spatial))
    acc = _acc(x.dtype)
    y = _new_buffer(out_shape, x.dtype, x.device)
    x5, w5, y5 = as_5d(x), as_5d(weight), as_5d(y)
    z5 = as_5d(up[1]) if up is not None else y5
    res5 = as_5d(residual) if residual is not None else y5
    if residual is not None and res5.stride() != y5.stride():
        res5 = as_5d(residual.contiguous())
    l_arg, r_arg, r1, rcols = _adapter_args(adapted, w5, acc, problem)
    up_rank = 0 if up is None else max(16, triton.next_power_of_2(up[0].shape[1]))
    constexprs = dict(**_adapter_constexprs(adapted), HAS_BIAS=bias is not None, UP_RANK=up_rank,
                      HAS_RESIDUAL=residual is not None, ACC=_TL_ACC[acc], PIXELS64=_wide(problem.out_pixels),
                      PRECISION=dot_precision(x.dtype, x.device, spatial == 0),
                      UPDATE_PRECISION=_UPDATE_PRECISION.get(x.dtype, "ieee"))

    def launch_with(t: Tiles):
        grid = (triton.cdiv(problem.out_pixels, t.block_m) * triton.cdiv(problem.out_channels, t.block_n),
                problem.groups)
        _launch(
            _forward_kernel, grid, x5, w5, l_arg, r_arg, bias if bias is not None else w5,
            up[0] if up is not None else w5, z5, res5, y5, *_geometry_args(problem), *x5.stride(), *w5.stride(),
            *y5.stride(), *z5.stride(), r1, rcols, up[0].shape[1] if up is not None else 1, **constexprs,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.warps, num_stages=t.stages)

    key = ("forward", problem, x.dtype, weight.dtype, x5.stride(), w5.stride(), tuple(sorted(constexprs.items())))
    launch_with(_tiles("forward", problem, x.device, x.dtype, max(constexprs["RANK"], up_rank), key, launch_with))
    return y


@functools.lru_cache(maxsize=256)
def _input_taps(problem: ConvProblem, device: str) -> torch.Tensor:
    """Per stride residue class: the number of taps reaching it, then the taps (int32, padded)."""
    classes = conv_plan.input_taps(problem)
    table = torch.zeros(len(classes), problem.kernel_volume + 1, dtype=torch.int32)
    for i, taps in enumerate(classes):
        table[i, 0] = len(taps)
        table[i, 1:1 + len(taps)] = torch.tensor(taps, dtype=torch.int32)
    return table.to(device)


def conv_input_grad(grad_y: torch.Tensor, x_shape, weight: torch.Tensor, stride, padding, dilation, groups: int,
                    adapted: Optional[AdaptedWeight] = None) -> torch.Tensor:
    """``dLoss/dx`` of ``base_op(x, W' or W)`` from ``grad_y = dLoss/dy``: contiguous, of shape
    ``x_shape``, in grad_y's dtype."""
    problem = problem_of(x_shape, weight.shape, stride, padding, dilation, groups)
    spatial = weight.dim() - 2
    acc = _acc(grad_y.dtype)
    dx = _new_buffer(tuple(x_shape), grad_y.dtype, grad_y.device)
    g5, w5, dx5 = as_5d(grad_y), as_5d(weight), as_5d(dx)
    taps = _input_taps(problem, str(grad_y.device))
    l_arg, r_arg, r1, rcols = _adapter_args(adapted, w5, acc, problem)
    class_pixels = problem.batch * math.prod(problem.class_size())
    constexprs = dict(**_adapter_constexprs(adapted), ACC=_TL_ACC[acc], PIXELS64=_wide(class_pixels),
                      PRECISION=dot_precision(grad_y.dtype, grad_y.device, spatial == 0),
                      UPDATE_PRECISION=_UPDATE_PRECISION.get(grad_y.dtype, "ieee"))
    classes = taps.shape[0]

    def launch_with(t: Tiles):
        grid = (triton.cdiv(class_pixels, t.block_m) * triton.cdiv(problem.in_channels, t.block_n),
                problem.groups * classes)
        _launch(
            _input_grad_kernel, grid, g5, w5, l_arg, r_arg, taps, dx5, *_geometry_args(problem), *g5.stride(),
            *w5.stride(), *dx5.stride(), r1, rcols, **constexprs, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.warps, num_stages=t.stages)

    key = ("input_grad", problem, grad_y.dtype, weight.dtype, g5.stride(), w5.stride(),
           tuple(sorted(constexprs.items())))
    launch_with(_tiles("input_grad", problem, grad_y.device, grad_y.dtype, constexprs["RANK"], key, launch_with))
    return dx


def _weight_grad(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                 groups: int, adapted: Optional[AdaptedWeight]):
    """The weight-gradient launch: ``(grad_left, grad_right)`` projections with ``adapted``, else dW'."""
    problem = problem_of(x.shape, weight.shape, stride, padding, dilation, groups)
    spatial = weight.dim() - 2
    acc = _acc(x.dtype)
    x5, g5, w5 = as_5d(x), as_5d(grad_y), as_5d(weight)
    l_arg, r_arg, r1, rcols = _adapter_args(adapted, w5, acc, problem)
    rows = weight.shape[0]
    constexprs = dict(PROJECT=adapted is not None, COMBINE=0 if adapted is None else _COMBINE_CODE[adapted.combine],
                      RANK=1 if adapted is None else adapted.padded_rank(), ACC=_TL_ACC[acc],
                      PIXELS64=_wide(problem.out_pixels),
                      PRECISION=dot_precision(x.dtype, x.device, spatial == 0),
                      UPDATE_PRECISION=_UPDATE_PRECISION.get(x.dtype, "ieee"),
                      PROJECT_PRECISION=_PROJECT_PRECISION.get(x.dtype, "ieee"))
    programs = conv_plan.target_programs(planned_multiprocessors(x.device))

    def launch_with(t: Tiles):
        splits, per_split = conv_plan.weight_grad_splits(problem, t, programs)
        o_tiles = triton.cdiv(problem.out_channels, t.block_m)
        c_tiles = triton.cdiv(problem.in_channels, t.block_n)
        if adapted is not None:
            grad_left = _new_buffer((problem.kernel_volume * c_tiles * splits, rows, r1), acc, x.device)
            grad_right = _new_buffer((problem.groups * o_tiles * splits, r1, rcols), acc, x.device)
            dw = w5
        else:
            grad_left = grad_right = w5
            dw = _new_buffer((splits, rows, problem.columns), acc, x.device)
        _launch(
            _weight_grad_kernel, (o_tiles * c_tiles, problem.kernel_volume, problem.groups * splits), x5, g5, w5,
            l_arg, r_arg, grad_left, grad_right, dw, *_geometry_args(problem), *x5.stride(), *g5.stride(),
            *w5.stride(), r1, rcols, rows, splits, per_split, **constexprs, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.warps, num_stages=t.stages)
        return (grad_left, grad_right) if adapted is not None else dw

    key = ("weight_grad", problem, x.dtype, weight.dtype, x5.stride(), g5.stride(), tuple(sorted(constexprs.items())))
    out = launch_with(_tiles("weight_grad", problem, x.device, x.dtype, constexprs["RANK"], key, launch_with))
    if adapted is not None:
        return out[0].sum(0), out[1].sum(0)
    return out.sum(0).reshape(weight.shape).to(grad_y.dtype)


def conv_weight_grad_projection(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, stride, padding,
                                dilation, groups: int, adapted: AdaptedWeight) -> tuple:
    """``(H @ R^T, L^T @ H)`` with ``H = dLoss/dE`` from the weight gradient's tiles (``dW'`` is
    never written): shapes (O, r) and (r, C_g * K), compute dtype, as ``lowrank_form.adapter_grads``
    takes them."""
    return _weight_grad(x, grad_y, weight, stride, padding, dilation, groups, adapted)


def conv_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                     groups: int) -> torch.Tensor:
    """``dLoss/dW`` of ``base_op(x, W)``, weight-shaped, in grad_y's dtype (reduced in the compute dtype)."""
    return _weight_grad(x, grad_y, weight, stride, padding, dilation, groups, None)


def base_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
            groups: int) -> torch.Tensor:
    """:func:`lrtensor_kernels.ops.base_op` on these kernels."""
    return conv_forward(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight, bias, stride, padding,
                        dilation, groups)


def op_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                groups: int, need_input: bool, need_weight: bool, need_bias: bool = False) -> tuple:
    """:func:`lrtensor_kernels.ops.op_backward` on these kernels."""
    grad_x = conv_input_grad(grad_out, x.shape, weight, stride, padding, dilation, groups) if need_input else None
    grad_w = conv_weight_grad(x, grad_out, weight, stride, padding, dilation, groups) if need_weight else None
    grad_b = bias_grad(grad_out) if need_bias else None
    return grad_x, grad_w, grad_b


def bias_grad(grad_y: torch.Tensor) -> torch.Tensor:
    """``grad_y`` summed over every dim but the channels (dim 1; the features of a 2-d linear output)."""
    return grad_y.sum([d for d in range(grad_y.dim()) if d != 1])


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile cases
# ---------------------------------------------------------------------------------------------

# What aot_cases() launches (on meta tensors, the launches recorded: kernels/aot.py). The registers
# and shared memory depend on the tiles, the operand width and the adapter's rank class, so every
# GPU candidate runs for each operand width (bfloat16, float32, float64) with no adapter, with the
# chain's up-projection and with LieRA's exp at both rank classes (16, 32: the heaviest rule, E
# recomputed in the weight gradient); every other rule, float16, autocast's float32 weights under
# bfloat16 operands, float32's TF32 dots (torch's default for convolutions on a GPU) and the linear
# layer's specialisation (unit kernel and strides) at each kind's first candidate. Forms:
# (combine, delta_only, rank, up-projection rank); rank 1 is an outer product (SSL/SSB, rank one).
_AOT_EVERY_TILE = {"plain": (None, False, 0, 0), "up16": (None, False, 0, 16), "exp_r16": ("exp", False, 8, 0),
                   "exp_r32": ("exp", False, 24, 0)}
_AOT_FIRST_TILE = {"add_r16": ("add", False, 8, 0), "first_order_r16": ("first_order", False, 8, 0),
                   "mul_r1": ("mul", False, 1, 0), "exp_r1": ("exp", False, 1, 0),
                   "exp_delta_r16": ("exp", True, 8, 0), "first_order_delta_r1": ("first_order", True, 1, 0)}
# (x, weight, stride, padding, dilation, groups): 64 channels keep every GPU candidate
_AOT_PROBLEMS = {"conv": ((2, 64, 16, 16), (64, 64, 3, 3), [1, 1], [1, 1], [1, 1], 1),
                 "linear": ((256, 64), (64, 64), [], [], [], 1)}


def _aot_launches(dtype: torch.dtype, weight_dtype: torch.dtype, problem: str, form: tuple) -> None:
    """Every op of one problem and adapter form as a layer makes them: the forward (with a bias; a
    delta alone adds a residual, as dropout's second launch), the input gradient, and the weight
    gradient (projected onto the adapter, or written whole without one)."""
    combine, delta_only, rank, up_rank = form
    x_shape, w_shape, *geometry = _AOT_PROBLEMS[problem]
    meta = functools.partial(torch.empty, device="meta")
    x, weight = meta(x_shape, dtype=dtype), meta(w_shape, dtype=weight_dtype)
    y = conv_forward(x, weight, None, *geometry)  # the output's shape
    adapted = None
    if combine is not None:
        acc = _acc(dtype)
        adapted = AdaptedWeight(meta(w_shape[0], rank, dtype=acc), meta(rank, math.prod(w_shape[1:]), dtype=acc),
                                combine, delta_only)
    up = None
    if up_rank:
        up = (meta(w_shape[0], up_rank, dtype=dtype), meta((y.shape[0], up_rank, *y.shape[2:]), dtype=dtype))
    residual = y if delta_only else None
    bias = None if delta_only else meta(w_shape[0], dtype=dtype)
    conv_forward(x, weight, bias, *geometry, adapted=adapted, up=up, residual=residual)
    if up_rank:
        return
    conv_input_grad(y, x.shape, weight, *geometry, adapted=adapted)
    if adapted is None:
        conv_weight_grad(x, y, weight, *geometry)
    elif not delta_only:  # W' - W's weight gradient is W''s
        conv_weight_grad_projection(x, y, weight, *geometry, adapted)


def _first_tiles(width: int, rank: int) -> dict:
    return {kind: conv_plan.gpu_tiles(kind, width, max(16, rank))[0] for kind in conv_plan.KINDS}


def aot_cases() -> list:
    """The specialisations these launchers produce on a GPU, as the set above describes."""
    from .aot import unique
    from .launch import recording

    with recording() as recorded:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for form in _AOT_EVERY_TILE.values():
                _aot_launches(dtype, dtype, "conv", form)
            for form in _AOT_FIRST_TILE.values():
                with conv_plan.forced(**_first_tiles(dtype.itemsize, form[2])):
                    _aot_launches(dtype, dtype, "conv", form)
        first = [(torch.float16, torch.float16, "conv"), (torch.bfloat16, torch.float32, "conv"),
                 (torch.bfloat16, torch.bfloat16, "linear"), (torch.float32, torch.float32, "linear")]
        for dtype, weight_dtype, problem in first:
            for form in (_AOT_EVERY_TILE["plain"], _AOT_EVERY_TILE["exp_r16"], _AOT_FIRST_TILE["add_r16"]):
                with conv_plan.forced(**_first_tiles(dtype.itemsize, form[2])):
                    _aot_launches(dtype, weight_dtype, problem, form)
        # float32 convolutions with exact products (cuDNN's TF32 turned off; on by default)
        with torch.backends.cudnn.flags(allow_tf32=False):
            for form in (_AOT_EVERY_TILE["plain"], _AOT_EVERY_TILE["exp_r16"]):
                with conv_plan.forced(**_first_tiles(4, form[2])):
                    _aot_launches(torch.float32, torch.float32, "conv", form)
    return unique(recorded)
