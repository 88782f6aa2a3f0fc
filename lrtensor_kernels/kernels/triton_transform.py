"""Triton kernels for the adapter weight transform (forward) and its projection (backward).

Every method is brought to the low-rank form of :mod:`lrtensor_kernels.kernels.lowrank_form`:
``W`` (O, C), ``E = L @ R``. For tucker the kernels build the tiles of ``R`` themselves from
``U_2`` (I, r_2) and ``G = core x_3 U_3 ... x_N U_N`` (r_1, r_2, K), the only pre-contraction
made in torch (it holds r_1 * r_2 * K numbers), up to rank 64; above, ``R`` is materialised.

Forward, one launch: ``W' = combine(W, E)`` (or ``W' - W``), math in float32 (float64 for
float64 weights), stored in the output's dtype.

Backward, over ``(grad W', W)``: ``H = dL/dE`` (``grad`` for add; ``grad * W'`` for exp, with
``W'`` recomputed in registers, or above rank 64 made by the transform first; ``grad * W`` for
first_order and mul), then the two partial contractions ``H @ R^T`` and ``L^T @ H``: in one pass
(each program owns one column block and one chunk of rows), or two where that moves fewer bytes
or the rank is large. Every program writes its partial sums to its own slot; torch sums the
slots in a fixed order, so the gradients are bitwise reproducible (no atomics). The remaining
contractions of the (tiny) results with the Tucker factors run in torch.

Plans and dot precision: :mod:`lrtensor_kernels.kernels.triton_plans`. The launches go through
:func:`lrtensor_kernels.kernels.launch.launch`, so ``aot_cases()`` records them (and
``as_on_gpu`` runs the GPU plans under the interpreter).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import methods
from .channels import channel_layout, channel_operands
from .launch import launch, planned_multiprocessors
from .lowrank_form import LowRankForm, adapter_grads, check_operands
from .triton_plans import LARGE_RANK, LaunchPlan, dot_precision, launch_plan, project_plan  # noqa: F401

_LORA, _TUCKER = 0, 1
_COMBINE_CODE = {"add": 0, "exp": 1, "first_order": 2, "mul": 3}
_DELTA_CODE = {"lora": _LORA, "scales": _LORA, "tucker": _TUCKER}
_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
# the Tucker operands hold r_1 * r_2 * K and I * r_2 numbers: their addresses fit 32 bits
_SMALL_POINTERS = ("core_ptr", "u2_ptr")


@triton.jit
def _right_tile(r_ptr, core_ptr, u2_ptr, offs_c, ranks1, C, K, R1, R2, DELTA: tl.constexpr, ACC: tl.constexpr,
                BLOCK_C: tl.constexpr, RANK1: tl.constexpr):
    """R[:, offs_c] as a (RANK1, BLOCK_C) tile, zero outside the ranks and columns."""
    c_mask = offs_c < C
    r_mask = ranks1 < R1
    if DELTA == 0:
        right = tl.load(r_ptr + ranks1[:, None].to(tl.int64) * C + offs_c[None, :],
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
def _row_offsets(o0, O, BLOCK_O: tl.constexpr):
    """Rows ``o0 ... o0 + BLOCK_O - 1`` as int64 (a row times C can pass 2^31) and their mask."""
    offs_o = (o0 + tl.arange(0, BLOCK_O)).to(tl.int64)
    return offs_o, offs_o < O


# Integer arguments that Triton would otherwise specialise (a value of 1, divisibility by 16) and
# compile again for: only C, the row stride of every weight-sized tile, keeps its specialisation
# (its divisibility makes the tile loads wide). Fewer kernels to compile, here and ahead of time.
_UNSPECIALISED = ("O", "K", "R1", "R2", "ROWS_PER_PROGRAM", "COLS_PER_PROGRAM")


@triton.jit(do_not_specialize=_UNSPECIALISED[:5])
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
        offs_o, o_mask = _row_offsets(o0, O, BLOCK_O)
        left = tl.load(l_ptr + offs_o[:, None] * R1 + ranks1[None, :],
                       mask=o_mask[:, None] & (ranks1 < R1)[None, :], other=0.0).to(ACC)
        e = tl.dot(left, right, input_precision=PRECISION, out_dtype=ACC)
        tile = offs_o[:, None] * C + offs_c[None, :]
        mask = o_mask[:, None] & c_mask[None, :]
        w = tl.load(w_ptr + tile, mask=mask, other=0.0).to(ACC)
        out = _combine(w, e, COMBINE, DELTA_ONLY)
        tl.store(out_ptr + tile, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_tile(grad_ptr, w_ptr, tile, mask, left, right, COMBINE: tl.constexpr, ACC: tl.constexpr,
                   PRECISION: tl.constexpr):
    """``H = dLoss/dE`` on one tile: grad (add); grad * W * exp(E), E = left @ right (exp); grad * W (others)."""
    h = tl.load(grad_ptr + tile, mask=mask, other=0.0).to(ACC)
    if COMBINE == 1:
        e = tl.dot(left, right, input_precision=PRECISION, out_dtype=ACC)
        h = h * tl.load(w_ptr + tile, mask=mask, other=0.0).to(ACC) * tl.exp(e)
    elif COMBINE != 0:
        h = h * tl.load(w_ptr + tile, mask=mask, other=0.0).to(ACC)
    return h


@triton.jit(do_not_specialize=_UNSPECIALISED[:5])
def _project_kernel(grad_ptr, w_ptr, l_ptr, r_ptr, core_ptr, u2_ptr, grad_l_ptr, grad_r_ptr,
                    O, C, K, R1, R2, ROWS_PER_PROGRAM,
                    DELTA: tl.constexpr, COMBINE: tl.constexpr, LEFT: tl.constexpr, ACC: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, RANK1: tl.constexpr):
    """Program (j, s): ``grad_r[s, :, cols_j] = L[rows_s]^T @ H[rows_s, cols_j]`` and, with ``LEFT``,
    ``grad_l[j, rows_s, :] = H[rows_s, cols_j] @ R[:, cols_j]^T``."""
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
        offs_o, o_mask = _row_offsets(o0, O, BLOCK_O)
        left = tl.load(l_ptr + offs_o[:, None] * R1 + ranks1[None, :],
                       mask=o_mask[:, None] & r_mask[None, :], other=0.0).to(ACC)
        tile = offs_o[:, None] * C + offs_c[None, :]
        h = _gradient_tile(grad_ptr, w_ptr, tile, o_mask[:, None] & c_mask[None, :], left, right, COMBINE, ACC,
                           PRECISION)
        if LEFT:
            grad_left = tl.dot(h, tl.trans(right), input_precision=PRECISION, out_dtype=ACC)
            tl.store(grad_l_ptr + pid_c.to(tl.int64) * O * R1 + offs_o[:, None] * R1 + ranks1[None, :], grad_left,
                     mask=o_mask[:, None] & r_mask[None, :])
        grad_right += tl.dot(tl.trans(left), h, input_precision=PRECISION, out_dtype=ACC)
    tl.store(grad_r_ptr + pid_rows.to(tl.int64) * R1 * C + ranks1[:, None].to(tl.int64) * C + offs_c[None, :],
             grad_right, mask=r_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=("O", "R1", "COLS_PER_PROGRAM"))
def _project_left_kernel(grad_ptr, w_ptr, l_ptr, r_ptr, grad_l_ptr, O, C, R1, COLS_PER_PROGRAM,
                         COMBINE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_O: tl.constexpr,
                         BLOCK_C: tl.constexpr, RANK1: tl.constexpr):
    """Program (i, s): ``grad_l[s, rows_i, :] = H[rows_i, cols_s] @ R[:, cols_s]^T``, the column
    blocks of split s summed in registers (``R`` materialised, (R1, C))."""
    pid_o = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_o, o_mask = _row_offsets(pid_o * BLOCK_O, O, BLOCK_O)
    ranks1 = tl.arange(0, RANK1)
    r_mask = ranks1 < R1
    left = tl.load(l_ptr + offs_o[:, None] * R1 + ranks1[None, :], mask=o_mask[:, None] & r_mask[None, :],
                   other=0.0).to(ACC)
    grad_left = tl.zeros((BLOCK_O, RANK1), dtype=ACC)
    col_start = pid_split * COLS_PER_PROGRAM
    for c0 in range(col_start, tl.minimum(col_start + COLS_PER_PROGRAM, C), BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        right = tl.load(r_ptr + ranks1[:, None].to(tl.int64) * C + offs_c[None, :],
                        mask=r_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
        tile = offs_o[:, None] * C + offs_c[None, :]
        h = _gradient_tile(grad_ptr, w_ptr, tile, o_mask[:, None] & c_mask[None, :], left, right, COMBINE, ACC,
                           PRECISION)
        grad_left += tl.dot(h, tl.trans(right), input_precision=PRECISION, out_dtype=ACC)
    tl.store(grad_l_ptr + pid_split.to(tl.int64) * O * R1 + offs_o[:, None] * R1 + ranks1[None, :], grad_left,
             mask=o_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=("OUTER", "ROWS_PER_PROGRAM"))
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
    tl.store(partial_ptr + pid_split.to(tl.int64) * C + offs_ch, tl.sum(acc, axis=1), mask=ch_mask)


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pointers(form: LowRankForm, materialised: bool = False):
    """``(L, R, G, U_2)`` as the kernels take them (unused ones replaced by ``L``); ``materialised``:
    ``R`` as a matrix for every delta (the kernels then read it as lora)."""
    dummy = form.left
    if materialised:
        return form.left, form.right_matrix(), dummy, dummy
    return (form.left, form.right if form.right is not None else dummy,
            form.core if form.core is not None else dummy, form.u2 if form.u2 is not None else dummy)


def _plan(form: LowRankForm, device: torch.device) -> LaunchPlan:
    return launch_plan(form.out_rows, form.cols, form.rank1, form.acc, planned_multiprocessors(device))


def transform(weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str, scale: float,
              delta_only: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W'`` (or ``W' - W``) of the same shape and dtype as ``weight``, in one launch."""
    check_operands(weight, adapter)
    spec = methods.AdapterMath.from_key(math)
    form = LowRankForm(weight, adapter, spec.delta, scale)
    weight = weight.contiguous()
    if out is None:
        out = _new_buffer(weight.shape, weight.dtype, weight.device)
    plan = _plan(form, weight.device)
    launch(_transform_kernel, plan.grid,
           weight, out, *_pointers(form), form.out_rows, form.cols, form.kernel_size, form.rank1, form.rank2,
           plan.rows_per_program, DELTA=_DELTA_CODE[spec.delta], COMBINE=_COMBINE_CODE[spec.combine],
           DELTA_ONLY=delta_only, ACC=_TL_DTYPE[form.acc], PRECISION=dot_precision(weight.dtype, plan.rank1),
           BLOCK_O=plan.block_o, BLOCK_C=plan.block_c, RANK1=plan.rank1, num_warps=plan.warps,
           num_stages=plan.stages, small_pointers=_SMALL_POINTERS)
    return out


def project(grad_weight: torch.Tensor, weight: torch.Tensor, adapter: Sequence[torch.Tensor], math: str,
            scale: float) -> list[torch.Tensor]:
    """The gradient of every adapter tensor from ``grad_weight = dLoss/dW'``, in one pass over the
    weight, or two where that moves fewer bytes (:func:`project_plan`)."""
    check_operands(weight, adapter)
    spec = methods.AdapterMath.from_key(math)
    form = LowRankForm(weight, adapter, spec.delta, scale)
    plan = project_plan(form, grad_weight.element_size(), weight.element_size(), spec.combine != "add",
                        planned_multiprocessors(weight.device))
    grad_weight, weight = grad_weight.contiguous(), weight.contiguous()
    precision = dot_precision(weight.dtype, plan.rank1)
    combine = _COMBINE_CODE[spec.combine]
    if spec.combine == "exp" and plan.rank1 > LARGE_RANK:
        # H = grad * W' from W' made by the transform in the compute dtype, not from E recomputed
        weight = transform(weight, adapter, math, scale, out=_new_buffer(weight.shape, form.acc, weight.device))
        combine = _COMBINE_CODE["first_order"]  # whose H is grad * (the weight given)
    two_pass = plan.left_grid is not None
    materialised = two_pass or (spec.delta == "tucker" and plan.rank1 > LARGE_RANK)
    col_blocks, splits = plan.grid
    grad_left = _new_buffer((plan.left_grid[1] if two_pass else col_blocks, form.out_rows, form.rank1), form.acc,
                            weight.device)
    grad_right = _new_buffer((splits, form.rank1, form.cols), form.acc, weight.device)
    pointers = _pointers(form, materialised)
    common = dict(COMBINE=combine, ACC=_TL_DTYPE[form.acc], PRECISION=precision, BLOCK_O=plan.block_o,
                  BLOCK_C=plan.block_c, RANK1=plan.rank1, num_warps=plan.warps, num_stages=plan.stages)
    launch(_project_kernel, plan.grid,
           grad_weight, weight, *pointers, grad_left, grad_right, form.out_rows, form.cols, form.kernel_size,
           form.rank1, form.rank2, plan.rows_per_program, DELTA=_LORA if materialised else _DELTA_CODE[spec.delta],
           LEFT=not two_pass, small_pointers=_SMALL_POINTERS, **common)
    if two_pass:
        launch(_project_left_kernel, plan.left_grid,
               grad_weight, weight, pointers[0], pointers[1], grad_left, form.out_rows, form.cols, form.rank1,
               plan.cols_per_program, **common)
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
    launch(_channel_dot_kernel, grid, a, b, partial, outer, channels, inner, rows, ACC=_TL_DTYPE[acc],
           BLOCK_CH=block_ch, BLOCK_IN=block_in)
    return partial.sum(0)


# What aot_cases() launches (on meta tensors, with the launches recorded: see kernels/aot.py). All
# of it would be over a thousand kernels, 3 s each to compile per target; the set covers every value
# of every dimension, crossed where the registers and shared memory depend on the combination:
# - every rank class of the plans (padded 16 ... 256) with each math dtype (float32 math with FMA
#   dots, float32 math with tf32 dots (bfloat16 weights), float64), each delta and each weight shape
#   class, under the rule with the largest tiles of live values (exp: the backward recomputes E;
#   W' - W's expm1 series), both transform outputs;
# - every other rule, and every other dtype pair (float16 weights; float32 weights meeting bfloat16
#   or float16 inputs under autocast), at the largest tiles (rank 256);
# - channel_dot on the activation layouts of a convolution (NCHW, two spatial sizes) and a linear
#   layer (channel last, channel first), in every dtype.
_AOT_MATH_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_AOT_OTHER_DTYPES = ((torch.float16, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float16))
_AOT_RANKS = (8, 32, 64, 128, 256)
# a 3x3 convolution with C = 27 (no power-of-two divisor; one column block: one pass), a square
# linear weight, and a wide one (many column blocks, few row blocks: where a second pass pays most)
_AOT_WEIGHTS = {"tucker": ((512, 3, 3, 3), (4096, 4096)), "lora": ((4096, 4096), (256, 65536)),
                "scales": ((512, 3, 3, 3), (4096, 4096))}
_AOT_RULES = {"tucker": ("exp", "add", "first_order"), "lora": ("exp", "add", "first_order"), "scales": ("mul",)}
_AOT_ACTIVATIONS = (((2, 64, 56, 56), 1), ((2, 512, 7, 7), 1), ((2048, 4096), 1), ((4096, 768), -1))


def _aot_adapter(delta: str, shape, rank: int) -> list:
    """Meta adapter tensors of ``delta`` and rank ``rank`` for a weight of ``shape``."""
    meta = functools.partial(torch.empty, device="meta")
    if delta == "tucker":
        ranks = [min(rank, d) for d in shape[:2]] + [min(2, d) for d in shape[2:]]
        return [meta(ranks)] + [meta(d, r) for d, r in zip(shape, ranks)]
    if delta == "lora":
        return [meta(shape[0], rank), meta(rank, math.prod(shape[1:]))]
    return [meta(shape[1]), meta(shape[0])]


def _aot_launches(weight_dtype, dtype, delta: str, rule: str, rank: int):
    """transform (both outputs) and project, as a layer of ``weight_dtype`` on inputs of ``dtype`` calls them."""
    for shape in _AOT_WEIGHTS[delta]:
        weight = torch.empty(shape, dtype=weight_dtype, device="meta")
        grad = torch.empty(shape, dtype=dtype, device="meta")
        adapter = _aot_adapter(delta, shape, rank)
        for delta_only in (False, True):
            transform(weight, adapter, f"{delta}:{rule}", 0.5, delta_only, out=torch.empty_like(grad))
        project(grad, weight, adapter, f"{delta}:{rule}", 0.5)


def aot_cases() -> list:
    """The specialisations this module's launchers produce on a GPU, as the set above describes."""
    from .aot import unique
    from .launch import recording

    top = max(_AOT_RANKS)
    with recording() as recorded:
        for dtype in _AOT_MATH_DTYPES:
            for delta, rules in _AOT_RULES.items():
                for rank in _AOT_RANKS if delta != "scales" else (1,):
                    _aot_launches(dtype, dtype, delta, rules[0], rank)
                for rule in rules[1:]:
                    _aot_launches(dtype, dtype, delta, rule, top)
        for weight_dtype, dtype in _AOT_OTHER_DTYPES:
            for delta, rules in _AOT_RULES.items():
                _aot_launches(weight_dtype, dtype, delta, rules[0], top if delta != "scales" else 1)
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for shape, dim in _AOT_ACTIVATIONS:
                activation = torch.empty(shape, dtype=dtype, device="meta")
                channel_dot(activation, activation, dim)
    return unique(recorded)
