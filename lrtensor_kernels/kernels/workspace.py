"""Scratch tensors, reused, for the weight-sized results that live inside one op call on the CPU.

A fused merged step makes ``W'`` twice (for the forward op and for the input gradient), each time
consumed by one convolution or matmul inside the op and dropped there. Allocating it afresh costs
more than computing it where the C library's allocator hands freed memory back to the operating
system (glibc does for blocks above its trim threshold): every page is then faulted in again, about
2 us per 4 KiB page on the 2-core CI machine, 0.5 ns per byte, against 0.1-0.3 ns per byte for the
transform that fills it. :func:`borrowed` lends such a tensor and takes it back when the block ends.

Per thread (no locks, and one thread never sees another's buffer), one buffer per shape and dtype,
at most ``LIMIT_BYTES`` in all per thread (least recently used dropped first). Only CPU tensors are
pooled: CUDA's caching allocator already reuses device memory. A borrowed tensor must not outlive
the block: only code that consumes it inside the block may borrow.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
from typing import Optional

import torch

LIMIT_BYTES = 256 * 2 ** 20
_local = threading.local()
# a value every borrowed tensor is filled with before it is lent (tests set NaN: an element a kernel
# fails to write then shows, rather than a stale one from an earlier call)
fill_on_borrow: Optional[float] = None


def _pool() -> collections.OrderedDict:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = collections.OrderedDict()
    return pool


@contextlib.contextmanager
def borrowed(shape, dtype: torch.dtype, device: torch.device):
    """A tensor of ``shape`` and ``dtype`` on ``device`` for the block (contents undefined), or None
    where nothing is pooled (not the CPU, or larger than ``LIMIT_BYTES``): the caller allocates."""
    nbytes = math.prod(shape) * (torch.finfo(dtype).bits // 8)
    if device.type != "cpu" or nbytes > LIMIT_BYTES:
        yield None
        return
    key = (tuple(shape), dtype)
    pool = _pool()
    tensor = pool.pop(key, None)
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    if fill_on_borrow is not None:
        tensor.fill_(fill_on_borrow)
    try:
        yield tensor
    finally:
        _put(pool, key, tensor)


def keep(tensor: torch.Tensor) -> None:
    """Makes ``tensor`` this thread's pooled buffer of its shape and dtype in place of the one there
    (which is freed), where it can be pooled: a contiguous CPU tensor that owns its storage, within
    ``LIMIT_BYTES``. For a weight-sized result that a library call allocates afresh in every step
    and the caller is done with (a convolution's weight gradient, ``dL/dW'``): glibc tends to place
    such a block at the top of its heap and to trim it off when it is freed there, so that the next
    one faults every page in again; kept, it stays, and the buffer freed instead lies below it, where
    the next block of that size is carved from memory already mapped. The caller must not use
    ``tensor`` afterwards."""
    if (tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.storage_offset() != 0
            or tensor.untyped_storage().nbytes() != tensor.nbytes or tensor.nbytes > LIMIT_BYTES
            or tensor.requires_grad):
        return
    _put(_pool(), (tuple(tensor.shape), tensor.dtype), tensor)


def _put(pool: collections.OrderedDict, key, tensor: torch.Tensor) -> None:
    """``tensor`` as the pool's most recently used buffer for ``key``; the least recently used go
    while the pool holds more than ``LIMIT_BYTES``."""
    pool.pop(key, None)
    pool[key] = tensor
    total = sum(t.nbytes for t in pool.values())
    while total > LIMIT_BYTES:
        _, dropped = pool.popitem(last=False)
        total -= dropped.nbytes


def clear() -> None:
    """Drops this thread's pooled tensors."""
    _pool().clear()
