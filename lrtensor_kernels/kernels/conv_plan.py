"""Problems, launch plans and the autotuner of the implicit-GEMM kernels (:mod:`.fused_conv`).

Every layer is one problem in three spatial dims: a convolution of any order is a 3-d one with
unit dims in front (Conv1d's length is the innermost dim W, Conv2d's (H, W) the inner two), and a
Linear is a 1x1x1 convolution over tokens (batch = tokens, every spatial size 1). A problem holds
the sizes the kernels take: ``batch``, ``C_g = C_in / groups`` and ``O_g = C_out / groups``,
input (D, H, W) as the convolution sees it (padded by the layer when its padding mode is not
zeros), output (OD, OH, OW), kernel (KD, KH, KW), stride, padding (zeros, applied by the
kernels), dilation and groups.

Launch plans: :func:`candidates` lists the tile configurations a kernel may run with when it
plans for a GPU (a few configurations, pruned by the problem's sizes, timed once per problem key
by :class:`Autotuner`) or for the interpreter (one configuration sized to the problem, so that
``TRITON_INTERPRET=1`` runs few programs); :func:`.launch.planned_multiprocessors` says which, and
``launch.as_on_gpu`` makes the launchers plan for a GPU under the interpreter (its first
candidate then runs, untimed) and ``launch.recording`` records every candidate (the
ahead-of-time cases). :func:`forced` makes every launch of a kernel kind use one given
configuration on any target: the tests run every GPU configuration under the interpreter with it.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

KINDS = ("forward", "input_grad", "weight_grad")


@dataclass(frozen=True)
class ConvProblem:
    """One convolution (or linear layer) in the kernels' three-spatial-dim form."""

    batch: int
    in_channels: int  # per group
    out_channels: int  # per group
    groups: int
    in_size: tuple
    out_size: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel)

    @property
    def columns(self) -> int:
        """Columns of the weight as a matrix: ``C_g * KD * KH * KW``."""
        return self.in_channels * self.kernel_volume

    @property
    def out_pixels(self) -> int:
        return self.batch * math.prod(self.out_size)

    @property
    def in_pixels(self) -> int:
        return self.batch * math.prod(self.in_size)

    def class_size(self) -> tuple:
        """The input positions of one stride residue class, per dim (the largest class)."""
        return tuple(-(-size // s) for size, s in zip(self.in_size, self.stride))

    def flops(self) -> int:
        """Multiply-adds times two of one pass (forward, input gradient or weight gradient)."""
        return 2 * self.out_pixels * self.groups * self.out_channels * self.columns


def _three(values: Sequence[int], fill: int) -> tuple:
    return (fill,) * (3 - len(values)) + tuple(int(v) for v in values)


def problem_of(x_shape, weight_shape, stride, padding, dilation, groups: int) -> ConvProblem:
    """The problem of ``base_op(x, weight, ...)``: x (N, C_in, *spatial) or (M, in), weight
    (C_out, C_in / groups, *k) or (out, in); geometry lists of the spatial dims (empty for linear)."""
    spatial = len(weight_shape) - 2
    in_size = _three(x_shape[2:], 1)
    kernel = _three(weight_shape[2:], 1)
    stride, padding, dilation = _three(stride, 1), _three(padding, 0), _three(dilation, 1)
    out_size = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                     for size, k, s, p, d in zip(in_size, kernel, stride, padding, dilation))
    if spatial == 0:
        groups = 1
    return ConvProblem(int(x_shape[0]), int(weight_shape[1]), int(weight_shape[0]) // groups, int(groups), in_size,
                       out_size, kernel, stride, padding, dilation)


def as_5d(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, *spatial) or (M, features) as a view with unit spatial dims in front: (N, C, D, H, W)."""
    while t.dim() < 5:
        t = t.unsqueeze(2)
    return t


def input_taps(problem: ConvProblem) -> list:
    """For each stride residue class of input positions (rd, rh, rw), in row-major order, the
    flattened kernel taps ``(kd * KH + kh) * KW + kw`` that reach it: tap k reaches input position
    i of a dim iff ``(i + padding - k * dilation)`` is a multiple of the stride, which depends on
    i only through its residue. The input-gradient kernel loops over these taps only."""
    per_dim = []
    for size, k, s, p, d in zip(problem.in_size, problem.kernel, problem.stride, problem.padding, problem.dilation):
        per_dim.append([[t for t in range(k) if (r + p - t * d) % s == 0] for r in range(s)])
    kd_all, kh_all, kw_all = problem.kernel
    classes = []
    for rd in range(problem.stride[0]):
        for rh in range(problem.stride[1]):
            for rw in range(problem.stride[2]):
                classes.append([(a * kh_all + b) * kw_all + c for a in per_dim[0][rd] for b in per_dim[1][rh]
                                for c in per_dim[2][rw]])
    return classes


@dataclass(frozen=True)
class Tiles:
    """One launch configuration. forward: ``block_m`` output pixels x ``block_n`` output channels,
    reduced ``block_k`` input channels at a time; input_grad: ``block_m`` input pixels x
    ``block_n`` input channels, ``block_k`` output channels at a time; weight_grad: ``block_m``
    output channels x ``block_n`` input channels of one kernel tap, ``block_k`` output pixels at a
    time, the pixels cut into ``splits`` (0: as many as fill the device) reduced in order."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int = 8

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.warps}_s{self.stages}"


# GPU configurations per kind, operand width (bytes) and adapter rank (padded to 16 at least, or
# 1). The activation tiles are gathers (an im2col view of an NCHW tensor has no axis the compiler
# can prove contiguous), so every element carries its own 64-bit address and a staged load, and a
# wider rank adds the tiles of L, R and E: the lists keep the tiles for which ptxas reports no
# spills on sm_80 and sm_90 (bench/NOTES.md has the table), 32-deep reductions for 16-bit
# operands where they fit, 16-deep for float32 and float64. The weight gradient at ranks up to 16
# keeps 32x64 alone: at 64x64 and 64x128 its projection in exact float32 products (FMA dots: float32,
# float16) spilled 400-900 B per thread for the add rule.
_T = Tiles
_NARROW, _WIDE = 16, 32  # padded ranks up to 16 (and no adapter), and above
_GPU_TILES = {
    ("forward", 2, _NARROW): [_T(64, 64, 32, 4, 3), _T(32, 64, 32, 4, 3)],
    ("forward", 2, _WIDE): [_T(128, 64, 32, 8, 3), _T(64, 128, 32, 8, 3), _T(64, 64, 16, 4, 3), _T(32, 64, 16, 4, 3)],
    ("forward", 4, _NARROW): [_T(64, 64, 16, 4, 3), _T(32, 64, 16, 4, 3)],
    ("forward", 4, _WIDE): [_T(128, 64, 16, 8, 3), _T(64, 64, 16, 4, 3), _T(32, 64, 16, 4, 3)],
    ("input_grad", 2, _NARROW): [_T(64, 64, 16, 4, 2), _T(32, 64, 16, 4, 2)],
    ("input_grad", 2, _WIDE): [_T(128, 64, 16, 8, 2)],
    ("input_grad", 4, _NARROW): [_T(32, 64, 16, 4, 2)],
    ("input_grad", 4, _WIDE): [_T(128, 64, 16, 8, 2)],
    ("weight_grad", 2, _NARROW): [_T(32, 64, 32, 4, 2)],
    ("weight_grad", 2, _WIDE): [_T(32, 64, 16, 4, 2), _T(32, 32, 32, 4, 2)],
    ("weight_grad", 4, _NARROW): [_T(32, 32, 16, 4, 2)],
    ("weight_grad", 4, _WIDE): [_T(32, 64, 16, 4, 2), _T(32, 32, 16, 4, 2)],
}
for _kind in ("forward", "input_grad", "weight_grad"):
    for _rank in (_NARROW, _WIDE):
        _GPU_TILES[(_kind, 8, _rank)] = [_T(64, 32, 16, 4, 2), _T(32, 32, 16, 4, 2)]
_GPU_TILES[("weight_grad", 8, _WIDE)] = [_T(32, 32, 16, 4, 2)]
MIN_BLOCK = 16  # tl.dot's smallest operand dim


def rank_class(padded_rank: int) -> int:
    """The GPU lists' rank class of a padded rank (1 for outer products, 16 or more for dots)."""
    return _NARROW if padded_rank <= _NARROW else _WIDE


def gpu_tiles(kind: str, width: int, padded_rank: int = 1) -> list:
    """Every GPU configuration of a kind for operands of ``width`` bytes and an adapter of
    ``padded_rank`` (1: none or rank one), as the autotuner may launch them (the AOT cases)."""
    return list(_GPU_TILES[(kind, width, rank_class(padded_rank))])


def _pow2(n: int, least: int = MIN_BLOCK) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def _sizes(kind: str, problem: ConvProblem) -> tuple:
    """The (m, n, k) sizes of the kind's GEMM, per group."""
    if kind == "forward":
        return problem.out_pixels, problem.out_channels, problem.columns
    if kind == "input_grad":
        return problem.batch * math.prod(problem.class_size()), problem.in_channels, \
            problem.out_channels * problem.kernel_volume
    return problem.out_channels, problem.in_channels, problem.out_pixels


def candidates(kind: str, problem: ConvProblem, width: int, multiprocessors: Optional[int],
               padded_rank: int = 1) -> list:
    """The configurations a kind may launch with when planning for a GPU of ``multiprocessors``
    multiprocessors, or for the interpreter (None; :func:`.launch.planned_multiprocessors`).

    GPU: the kind's GPU list without the tiles more than twice as wide as the problem in a dim
    (each dim padded to 16), the smallest kept if none is left. interpreter: one tile per dim
    sized to the problem (16 to 64)."""
    m, n, k = _sizes(kind, problem)
    if kind == "forward":
        k = problem.in_channels  # the reduction runs channel blocks per tap
    elif kind == "input_grad":
        k = problem.out_channels
    if multiprocessors is None:
        return [Tiles(min(64, _pow2(m)), min(64, _pow2(n)), min(32, _pow2(k)), 1, 1)]
    tiles = gpu_tiles(kind, width, padded_rank)
    kept = [t for t in tiles if t.block_m <= 2 * _pow2(m) and t.block_n <= 2 * _pow2(n) and t.block_k <= _pow2(k)]
    return kept or [min(tiles, key=lambda t: (t.block_m * t.block_n, t.block_k))]


def weight_grad_splits(problem: ConvProblem, tiles: Tiles, programs: int) -> tuple:
    """``(splits, per_split)``: the weight gradient's pixels (the reduction) cut into ``splits``
    consecutive chunks of ``per_split`` (a multiple of ``block_k``) so that the grid has about
    ``programs`` programs; at least 4 blocks per chunk, and groups x splits within the grid's 65535."""
    total = problem.out_pixels
    tiles_per_split = (-(-problem.out_channels // tiles.block_m) * -(-problem.in_channels // tiles.block_n)
                       * problem.kernel_volume * problem.groups)
    splits = max(1, min(-(-programs // tiles_per_split), total // (4 * tiles.block_k), 65535 // problem.groups))
    per_split = -(-(-(-total // splits)) // tiles.block_k) * tiles.block_k
    return -(-total // per_split), per_split


def target_programs(multiprocessors: Optional[int]) -> int:
    """Programs that fill the device: two per multiprocessor on a GPU, four under the interpreter
    (None: so that tests cut the reduction too)."""
    return 4 if multiprocessors is None else 2 * multiprocessors


_forced: contextvars.ContextVar = contextvars.ContextVar("lrtensor_forced_tiles", default={})


@contextlib.contextmanager
def forced(**tiles: Optional[Tiles]):
    """Within the block every launch of a named kind (``forward=``, ``input_grad=``,
    ``weight_grad=``) uses the given :class:`Tiles` (with the GPU's split rule for the weight
    gradient), on any target, without timing."""
    unknown = set(tiles) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kernel kinds {sorted(unknown)}; expected some of {KINDS}")
    token = _forced.set({**_forced.get(), **{k: v for k, v in tiles.items() if v is not None}})
    try:
        yield
    finally:
        _forced.reset(token)


def forced_tiles(kind: str) -> Optional[Tiles]:
    return _forced.get().get(kind)


class Autotuner:
    """The fastest of several configurations, timed once per key (problem, dtypes, layout, math)
    with ``triton.testing.do_bench`` on the first launch, then reused. Thread-safe: a key is timed
    once. The choice decides the reduction order of the weight gradient's splits, so results are
    bitwise reproducible within a process (and across processes that choose alike)."""

    def __init__(self):
        self._best: dict = {}
        self._lock = threading.Lock()

    def pick(self, key, options: list, launch: Callable[[Tiles], None]) -> Tiles:
        if len(options) == 1:
            return options[0]
        with self._lock:
            best = self._best.get(key)
            if best is None:
                from triton.testing import do_bench

                times = [do_bench(lambda t=t: launch(t), warmup=5, rep=20) for t in options]
                best = options[min(range(len(options)), key=times.__getitem__)]
                self._best[key] = best
        return best

    def chosen(self) -> dict:
        """Every key timed so far and its configuration (for the benchmark's notes)."""
        with self._lock:
            return dict(self._best)


AUTOTUNER = Autotuner()
