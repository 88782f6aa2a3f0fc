// Building blocks of the CPU kernels: rows of any float dtype read and written as the accumulation
// type, the combine rules on vectors, and the rank-r product E = left @ right over a tile of
// kTileRows rows and one column chunk.
#pragma once

#include "../lowrank.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lrtensor::ops::cpu {

using at::vec::Vectorized;

// Rows handled together by the rank-r micro-kernel (their E tiles stay in registers).
constexpr int64_t kTileRows = 4;

// Columns per chunk: `budget` bytes of `right` (r x chunk), at most 1024 columns. A multiple of two
// vectors of every accumulation type.
template <typename acc_t>
int64_t column_chunk(int64_t rank, int64_t budget) {
  constexpr int64_t step = 2 * Vectorized<float>::size();
  const int64_t columns = budget / (static_cast<int64_t>(sizeof(acc_t)) * rank);
  return std::clamp<int64_t>(columns / step * step, step, 1024);
}

// Asks for the cache lines of `bytes` bytes from `p` (the next rows' segments, while this one is
// computed: the hardware prefetchers lose track of many short interleaved row segments).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// Converts n elements between a storage dtype and the accumulation type (scalar casts, rounding to
// nearest even into 16-bit types, as Tensor.to does).
template <typename acc_t>
using ReadRow = void (*)(const void* src, acc_t* dst, int64_t n);
template <typename acc_t>
using WriteRow = void (*)(const acc_t* src, void* dst, int64_t n);

template <typename src_t, typename acc_t>
void read_row(const void* src, acc_t* dst, int64_t n) {
  const auto* s = static_cast<const src_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(static_cast<float>(s[i]));
}

template <typename dst_t, typename acc_t>
void write_row(const acc_t* src, void* dst, int64_t n) {
  auto* d = static_cast<dst_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<dst_t>(src[i]);
}

// float64 values are never read through a float accumulator (float64 weights accumulate in float64),
// but `out` and `grad` may be float64 beside a float32 weight.
template <typename acc_t>
void read_double_row(const void* src, acc_t* dst, int64_t n) {
  const auto* s = static_cast<const double*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(s[i]);
}

// nullptr when `dtype` is the accumulation type (the row is used in place).
template <typename acc_t>
ReadRow<acc_t> row_reader(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return std::is_same_v<acc_t, float> ? nullptr : &read_row<float, acc_t>;
    case at::kDouble: return std::is_same_v<acc_t, double> ? nullptr : &read_double_row<acc_t>;
    case at::kHalf: return &read_row<c10::Half, acc_t>;
    case at::kBFloat16: return &read_row<c10::BFloat16, acc_t>;
    default: TORCH_CHECK(false, "lrtensor: unsupported dtype ", dtype);
  }
}

template <typename acc_t>
WriteRow<acc_t> row_writer(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return std::is_same_v<acc_t, float> ? nullptr : &write_row<float, acc_t>;
    case at::kDouble: return std::is_same_v<acc_t, double> ? nullptr : &write_row<double, acc_t>;
    case at::kHalf: return &write_row<c10::Half, acc_t>;
    case at::kBFloat16: return &write_row<c10::BFloat16, acc_t>;
    default: TORCH_CHECK(false, "lrtensor: unsupported dtype ", dtype);
  }
}

// A (rows x columns) matrix of some dtype, read and written one row segment at a time in acc_t.
template <typename acc_t>
struct RowView {
  char* data;
  int64_t cols;
  int64_t elem_size;
  ReadRow<acc_t> read;
  WriteRow<acc_t> write;

  RowView(const at::Tensor& t, int64_t columns)
      : data(static_cast<char*>(const_cast<void*>(t.data_ptr()))),
        cols(columns),
        elem_size(static_cast<int64_t>(t.element_size())),
        read(row_reader<acc_t>(t.scalar_type())),
        write(row_writer<acc_t>(t.scalar_type())) {}

  void* at(int64_t row, int64_t col) const { return data + (row * cols + col) * elem_size; }

  // Pointer to `n` values of row `row` from column `col` in acc_t: the row itself, or `buffer`
  // filled by conversion.
  const acc_t* read_segment(int64_t row, int64_t col, int64_t n, acc_t* buffer) const {
    if (read == nullptr) return static_cast<const acc_t*>(at(row, col));
    read(at(row, col), buffer, n);
    return buffer;
  }

  // Where to compute `n` values of row `row` from column `col`: the row itself, or `buffer`
  // (then `commit_segment` converts them into place).
  acc_t* write_target(int64_t row, int64_t col, acc_t* buffer) const {
    return write == nullptr ? static_cast<acc_t*>(at(row, col)) : buffer;
  }
  void commit_segment(int64_t row, int64_t col, int64_t n, const acc_t* buffer) const {
    if (write != nullptr) write(buffer, at(row, col), n);
  }
};

// Loads/stores `count` (<= size) lanes; lanes beyond `count` read as zero.
template <typename acc_t>
inline Vectorized<acc_t> load_lanes(const acc_t* p, int64_t count) {
  return count == Vectorized<acc_t>::size() ? Vectorized<acc_t>::loadu(p) : Vectorized<acc_t>::loadu(p, count);
}
template <typename acc_t>
inline void store_lanes(const Vectorized<acc_t>& v, acc_t* p, int64_t count) {
  if (count == Vectorized<acc_t>::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// W' (or W' - W) from W and E, elementwise, as lrtensor_kernels/methods.py:combine.
template <Combine kCombine, bool kDeltaOnly, typename acc_t>
inline Vectorized<acc_t> combine(const Vectorized<acc_t>& w, const Vectorized<acc_t>& e) {
  const Vectorized<acc_t> one(acc_t(1));
  if constexpr (kCombine == Combine::Add) {
    return kDeltaOnly ? e : w + e;
  } else if constexpr (kCombine == Combine::Exp) {
    return kDeltaOnly ? w * e.expm1() : w * e.exp();
  } else if constexpr (kCombine == Combine::FirstOrder) {
    return kDeltaOnly ? w * e : w * (one + e);
  } else {
    return kDeltaOnly ? w * (e - one) : w * e;
  }
}

// dLoss/dE from dLoss/dW' = g: g (add), g * W * exp(E) (exp), g * W (first_order, mul).
template <Combine kCombine, typename acc_t>
inline Vectorized<acc_t> update_grad(const Vectorized<acc_t>& g, const Vectorized<acc_t>& w,
                                     const Vectorized<acc_t>& e) {
  if constexpr (kCombine == Combine::Add) {
    return g;
  } else if constexpr (kCombine == Combine::Exp) {
    return g * w * e.exp();
  } else {
    return g * w;
  }
}

// `left` rows o0..o0+kTileRows-1 (zero beyond `rows`) copied to `tile` (kTileRows x rank).
template <typename acc_t>
inline void left_tile(const acc_t* left, int64_t rank, int64_t o0, int64_t rows, acc_t* tile) {
  for (int64_t i = 0; i < kTileRows; ++i) {
    if (i < rows) {
      std::memcpy(tile + i * rank, left + (o0 + i) * rank, rank * sizeof(acc_t));
    } else {
      std::fill(tile + i * rank, tile + (i + 1) * rank, acc_t(0));
    }
  }
}

// A chunk of `right` (rank x width, row stride `stride`): the matrix itself, or a zero-padded copy
// for the last, partial chunk (so that every vector load stays inside the buffer).
template <typename acc_t>
struct RightChunk {
  const acc_t* data;
  int64_t stride;
};

template <typename acc_t>
inline RightChunk<acc_t> right_chunk(const acc_t* right, int64_t rank, int64_t cols, int64_t c0, int64_t width,
                                     int64_t padded, std::vector<acc_t>& buffer) {
  if (width == padded) return {right + c0, cols};
  buffer.assign(rank * padded, acc_t(0));
  for (int64_t a = 0; a < rank; ++a) std::memcpy(buffer.data() + a * padded, right + a * cols + c0, width * sizeof(acc_t));
  return {buffer.data(), padded};
}

// E[i][c..c+2V) = sum_a tile[i][a] * right[a][c..c+2V) for the kTileRows rows of `tile`. The eight
// accumulators are named locals so that they stay in registers across the rank loop.
template <typename acc_t>
inline void lowrank_product(const acc_t* tile, RightChunk<acc_t> right, int64_t rank, int64_t c,
                            Vectorized<acc_t> (&e)[kTileRows][2]) {
  static_assert(kTileRows == 4, "the micro-kernel is written for 4 rows");
  using Vec = Vectorized<acc_t>;
  Vec e00(acc_t(0)), e01(acc_t(0)), e10(acc_t(0)), e11(acc_t(0)), e20(acc_t(0)), e21(acc_t(0)), e30(acc_t(0)),
      e31(acc_t(0));
  const acc_t* l0 = tile;
  const acc_t* l1 = tile + rank;
  const acc_t* l2 = tile + 2 * rank;
  const acc_t* l3 = tile + 3 * rank;
  const acc_t* r = right.data + c;
  for (int64_t a = 0; a < rank; ++a, r += right.stride) {
    const Vec r0 = Vec::loadu(r);
    const Vec r1 = Vec::loadu(r + Vec::size());
    Vec l(l0[a]);
    e00 = at::vec::fmadd(l, r0, e00);
    e01 = at::vec::fmadd(l, r1, e01);
    l = Vec(l1[a]);
    e10 = at::vec::fmadd(l, r0, e10);
    e11 = at::vec::fmadd(l, r1, e11);
    l = Vec(l2[a]);
    e20 = at::vec::fmadd(l, r0, e20);
    e21 = at::vec::fmadd(l, r1, e21);
    l = Vec(l3[a]);
    e30 = at::vec::fmadd(l, r0, e30);
    e31 = at::vec::fmadd(l, r1, e31);
  }
  e[0][0] = e00;
  e[0][1] = e01;
  e[1][0] = e10;
  e[1][1] = e11;
  e[2][0] = e20;
  e[2][1] = e21;
  e[3][0] = e30;
  e[3][1] = e31;
}

// Calls f.template operator()<kCombine, kDeltaOnly>() for the runtime pair.
template <typename F>
void dispatch_combine(Combine combine, bool delta_only, F&& f) {
  switch (combine) {
    case Combine::Add: return delta_only ? f.template operator()<Combine::Add, true>()
                                         : f.template operator()<Combine::Add, false>();
    case Combine::Exp: return delta_only ? f.template operator()<Combine::Exp, true>()
                                         : f.template operator()<Combine::Exp, false>();
    case Combine::FirstOrder: return delta_only ? f.template operator()<Combine::FirstOrder, true>()
                                                : f.template operator()<Combine::FirstOrder, false>();
    case Combine::Mul: return delta_only ? f.template operator()<Combine::Mul, true>()
                                         : f.template operator()<Combine::Mul, false>();
  }
}

}  // namespace lrtensor::ops::cpu
