"""The Triton interpreter's arithmetic made to round as a GPU's does, where the two differ in ways
that matter to the accuracy tests (installed by conftest._interpreter_rounds_as_a_gpu):

- a dot asked for in tf32 is an exact float32 product in the interpreter (numpy); the tensor cores
  read each float32 operand with its mantissa cut to tf32's 10 bits. Here the operands are cut by
  truncation, the worse of the two roundings a GPU may apply. A dot in tf32x3 is three tf32 products,
  ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` with ``a_hi`` = a cut to tf32 and ``a_lo`` = the rest cut
  to tf32 (Triton's decomposition), each cut by truncation here;
- a float32 value cast to bfloat16 is truncated by the interpreter; a GPU rounds to nearest even
  (``cvt.rn.bf16.f32``).
"""
from __future__ import annotations

import functools

import numpy as np

TF32_MASK = np.uint32(0xFFFFE000)  # sign, exponent and the top 10 of float32's 23 mantissa bits


def truncate_to_tf32(values: np.ndarray) -> np.ndarray:
    """float32 values with the 13 mantissa bits tf32 drops set to zero."""
    return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) & TF32_MASK).view(np.float32)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(values)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def tf32_dot(create_dot):
    """``InterpreterBuilder.create_dot`` with float32 operands cut to tf32 where the kernel asks for tf32."""

    @functools.wraps(create_dot)
    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        precision = str(input_precision).upper()
        if not (a.data.dtype == np.float32 and b.data.dtype == np.float32):
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        if precision.endswith("TF32"):
            a = type(a)(truncate_to_tf32(a.data), a.dtype)
            b = type(b)(truncate_to_tf32(b.data), b.dtype)
        elif precision.endswith("TF32X3"):
            a_hi, b_hi = truncate_to_tf32(a.data), truncate_to_tf32(b.data)
            a_lo, b_lo = truncate_to_tf32(a.data - a_hi), truncate_to_tf32(b.data - b_hi)
            parts = np.matmul(a_lo, b_hi) + np.matmul(a_hi, b_lo)  # the small terms first, as a GPU adds them
            return type(d)(np.matmul(a_hi, b_hi) + parts + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    return dot


def rounding_cast(cast_impl):
    """``InterpreterBuilder.cast_impl`` with float32 -> bfloat16 rounded to nearest even."""
    import triton.language as tl

    @functools.wraps(cast_impl)
    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return type(src)(float32_to_bfloat16_bits(src.data), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    return cast
