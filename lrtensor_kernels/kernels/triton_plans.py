"""How the Triton kernels of :mod:`lrtensor_kernels.kernels.triton_transform` are launched: block
sizes, warps, stages and grids per device (:func:`launch_plan`, :func:`project_plan`) and the
precision of their dot products (:func:`dot_precision`).

A plan is made for a GPU with a given number of multiprocessors, or for the interpreter
(``multiprocessors=None``); :func:`lrtensor_kernels.kernels.launch.planned_multiprocessors` says
which, and ``as_on_gpu`` runs a GPU's plan under the interpreter. The GPU tiles were chosen with
the ahead-of-time compile (:mod:`lrtensor_kernels.kernels.aot`; the table in bench/NOTES.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from .lowrank_form import LowRankForm


@dataclass(frozen=True)
class LaunchPlan:
    """How the kernels of one (O, C) weight of rank ``rank1`` are launched.

    ``grid = (col_blocks, splits)``: program (j, s) of the transform and of the projection owns
    columns ``j * block_c ...`` and rows ``s * rows_per_program ...``, walked ``block_o`` rows at a
    time; ``rank1`` is the rank padded to the kernels' tile (a power of two, at least 16).
    ``left_grid = (row_blocks, col_splits)``: where the projection makes ``dLoss/dL`` in a second
    pass (``_project_left_kernel``, each program summing ``cols_per_program`` columns of one row
    block), None where its first pass writes it per column block."""

    grid: tuple
    rows_per_program: int
    block_o: int
    block_c: int
    rank1: int
    warps: int
    stages: int
    left_grid: Optional[tuple] = None
    cols_per_program: int = 0


# Tiles on a GPU, per padded rank: (BLOCK_O, BLOCK_C, warps, pipeline stages), for float32 math
# (FMA, tf32 or tf32x3 dots) and float64 (numbers twice as wide). The widest column blocks whose
# kernels keep every tile in registers (no spills) and fit the shared memory of sm_80, sm_90 and
# sm_100, as `python -m lrtensor_kernels.kernels.aot` measures them (bench/NOTES.md). float64 runs 2
# stages: with Triton's default 3 its projection asked for up to 224 KB of shared memory on sm_80.
_GPU_TILES = {
    4: {16: (16, 64, 4, 3), 32: (16, 64, 4, 3), 64: (16, 32, 4, 3), 128: (16, 32, 8, 3), 256: (16, 32, 8, 2)},
    8: {16: (16, 64, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 8, 2), 128: (16, 32, 8, 2), 256: (16, 16, 8, 2)},
}
# Above this padded rank the projection's programs keep fewer tiles live (with all of them they spill
# on every target): dLoss/dL is made in its own pass (_project_left_kernel); LieRA exp's
# H = grad * W' comes from W' made by the transform kernel (one more pass, a weight-sized buffer in
# the compute dtype) instead of E = L @ R recomputed (a dot over the whole rank); a Tucker R is
# materialised (r_1 x C numbers) instead of built from U_2 and G in every program.
LARGE_RANK = 64
_PROGRAMS_PER_MULTIPROCESSOR = 4
MAX_RANK = 256  # the largest rank the GPU plans are made for


def _next_pow2(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(n))


def launch_plan(out_rows: int, cols: int, rank1: int, acc: torch.dtype, multiprocessors: Optional[int]) -> LaunchPlan:
    """The plan for a GPU with ``multiprocessors`` multiprocessors, or for the interpreter (None:
    one program per column block, the smallest blocks, one warp)."""
    rank1 = _next_pow2(rank1, 16)
    if multiprocessors is None:
        block_o, block_c, warps, programs, stages = 16, 64, 1, 1, 1
    else:
        block_o, block_c, warps, stages = _GPU_TILES[torch.finfo(acc).bits // 8][min(rank1, MAX_RANK)]
        programs = _PROGRAMS_PER_MULTIPROCESSOR * multiprocessors
    col_blocks = triton.cdiv(cols, block_c)
    row_tiles = triton.cdiv(out_rows, block_o)
    splits = max(1, min(row_tiles, programs // col_blocks))
    rows_per_program = triton.cdiv(row_tiles, splits) * block_o
    splits = triton.cdiv(out_rows, rows_per_program)
    return LaunchPlan((col_blocks, splits), rows_per_program, block_o, block_c, rank1, warps, stages)


def project_plan(form: LowRankForm, grad_bytes: int, weight_bytes: int, reads_weight: bool,
                 multiprocessors: Optional[int]) -> LaunchPlan:
    """The projection's plan: one pass, or two where that moves fewer bytes or the rank is large.

    One pass writes (and torch reads back) ``dLoss/dL`` once per column block:
    ``2 * col_blocks * O * r_1`` numbers. A second pass over the rows instead reads ``dLoss/dW'``
    (and ``W`` for the rules that read it) once more and writes ``col_splits * O * r_1`` numbers,
    with as many column splits as fill the GPU's programs. Above rank ``LARGE_RANK`` there are always
    two (one pass would keep too many tiles live). The interpreter runs one pass, whatever the rank."""
    plan = launch_plan(form.out_rows, form.cols, form.rank1, form.acc, multiprocessors)
    if multiprocessors is None:
        return plan
    acc_bytes = torch.finfo(form.acc).bits // 8
    col_blocks = plan.grid[0]
    row_blocks = triton.cdiv(form.out_rows, plan.block_o)
    col_splits = max(1, min(col_blocks, _PROGRAMS_PER_MULTIPROCESSOR * multiprocessors // row_blocks))
    cols_per_program = triton.cdiv(col_blocks, col_splits) * plan.block_c
    col_splits = triton.cdiv(form.cols, cols_per_program)
    one_pass = 2 * acc_bytes * col_blocks * form.out_rows * form.rank1
    second_pass = (form.out_rows * form.cols * (grad_bytes + (weight_bytes if reads_weight else 0))
                   + 2 * acc_bytes * col_splits * form.out_rows * form.rank1)
    if second_pass >= one_pass and plan.rank1 <= LARGE_RANK:
        return plan
    return replace(plan, left_grid=(row_blocks, col_splits), cols_per_program=cols_per_program)


# Dot precision. Exact float32 products ("ieee", on the FMA units) while the padded rank is at most
# 32: Triton's FMA dot holds a whole row of its left operand and column of its right one per
# thread, which spills from rank 64 on. Above that, tensor-core products: "tf32x3" (three tf32
# products, about 2^-20 relative) for float32 and float16 weights, "tf32" (up to 2^-10) for bfloat16
# weights, whose W' is stored in bfloat16 (2^-9) and whose dLoss/dW' comes in bfloat16: its
# adapter gradients' tf32 error (about 8e-4 relative) stays under the accuracy rule's bfloat16 floor
# (1e-3), while float16's would not (its own rounding, 2^-11, is finer than tf32's). float64 gets
# exact products at every rank (DMMA). Measured under the interpreter with the operands cut as the
# tensor cores cut them (tests/gpu_rounding.py); the rank <= 32 rule also keeps SSL/SSB's rank-one
# update exact where W' - W cancels (W * (E - 1) with E near 1).
_EXACT_RANK = 32


def dot_precision(weight_dtype: torch.dtype, rank1: int) -> str:
    """The ``input_precision`` of the kernels' dots for weights of ``weight_dtype`` and padded rank ``rank1``."""
    if weight_dtype == torch.float64 or rank1 <= _EXACT_RANK:
        return "ieee"
    return "tf32" if weight_dtype == torch.bfloat16 else "tf32x3"
