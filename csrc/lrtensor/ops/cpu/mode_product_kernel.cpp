// CPU kernels of lrtensor::mode_product.out and lrtensor::mode_gram.out (semantics:
// ../mode_product.cpp). Each output row is computed by one task in a fixed order, in float64.
#include "lowrank_tile.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace lrtensor::ops::cpu {

namespace {

// Rows row = p * J + j of out, each out[p, j, :] = sum_m u[j, m] * x[p, m, :]: for a long inner dim.
template <typename scalar_t>
void mode_product_rows(const scalar_t* x, const scalar_t* u, scalar_t* out, AroundDim l, int64_t rows_j,
                       int64_t begin, int64_t end) {
  std::vector<double> acc(l.inner);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t p = row / rows_j, j = row % rows_j;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t m = 0; m < l.size; ++m) {
      const double coef = static_cast<double>(u[j * l.size + m]);
      const scalar_t* xr = x + (p * l.size + m) * l.inner;
      for (int64_t q = 0; q < l.inner; ++q) acc[q] += coef * static_cast<double>(xr[q]);
    }
    scalar_t* o = out + row * l.inner;
    for (int64_t q = 0; q < l.inner; ++q) o[q] = static_cast<scalar_t>(acc[q]);
  }
}

// Columns of out, out[p, :, q] = sum_m u^T[m, :] * x[p, m, q] (u^T: M x J, its rows padded with
// zeros to a multiple of kColumnBlock), for a short inner dim and many rows of u (the Tucker right
// factor, with u = U_2 of I rows and an inner dim of the kernel size): one task per p and block of
// kColumnBlock rows j, its sums in registers (two vectors of j x kInnerBlock columns q at a time).
// Every element is summed over m in order with fused multiply-adds, whatever the blocks, so the
// bits do not depend on the thread count. Which of the two schedules runs depends on the shapes alone.
constexpr int64_t kInnerBlock = 4;
constexpr int64_t kColumnBlock = 2 * Vectorized<double>::size();

// kCount running sums of kColumnBlock lanes each, in vector registers: add() adds xs[i * x_stride]
// times one row of kColumnBlock doubles to sum i, store() writes the first n lanes of each sum.
template <int64_t kCount>
struct RegisterBlock {
  using VecD = Vectorized<double>;
  static constexpr int64_t V = VecD::size();
  VecD acc[kCount][2];

  RegisterBlock() {
    for (int64_t i = 0; i < kCount; ++i) acc[i][0] = acc[i][1] = VecD(0.0);
  }

  template <typename scalar_t>
  inline void add(const double* row, const scalar_t* xs, int64_t x_stride) {
    const VecD r0 = VecD::loadu(row), r1 = VecD::loadu(row + V);
    for (int64_t i = 0; i < kCount; ++i) {
      const VecD x(static_cast<double>(xs[i * x_stride]));
      acc[i][0] = at::vec::fmadd(x, r0, acc[i][0]);
      acc[i][1] = at::vec::fmadd(x, r1, acc[i][1]);
    }
  }

  // out[i * sum_stride + lane * lane_stride] = sum i's lane, for lane < n
  template <typename scalar_t>
  inline void store(scalar_t* out, int64_t n, int64_t sum_stride, int64_t lane_stride) const {
    alignas(64) double lanes[kColumnBlock];
    for (int64_t i = 0; i < kCount; ++i) {
      acc[i][0].store(lanes);
      acc[i][1].store(lanes + V);
      scalar_t* o = out + i * sum_stride;
      for (int64_t lane = 0; lane < n; ++lane) o[lane * lane_stride] = static_cast<scalar_t>(lanes[lane]);
    }
  }
};

template <int64_t kColumns, typename scalar_t>
void mode_product_column_tile(const scalar_t* x, const double* u_t, scalar_t* out, AroundDim l, int64_t n_j,
                              int64_t padded_j) {
  RegisterBlock<kColumns> sums;
  for (int64_t m = 0; m < l.size; ++m) sums.add(u_t + m * padded_j, x + m * l.inner, 1);
  sums.store(out, n_j, 1, l.inner);
}

template <typename scalar_t>
void mode_product_columns(const scalar_t* x, const double* u_t, scalar_t* out, AroundDim l, int64_t rows_j,
                          int64_t padded_j, int64_t begin, int64_t end) {
  const int64_t blocks = padded_j / kColumnBlock;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t p = tile / blocks, j0 = tile % blocks * kColumnBlock, n_j = std::min(kColumnBlock, rows_j - j0);
    const scalar_t* xp = x + p * l.size * l.inner;
    const double* up = u_t + j0;
    scalar_t* op = out + (p * rows_j + j0) * l.inner;
    for (int64_t q0 = 0; q0 < l.inner; q0 += kInnerBlock) {
      switch (std::min(kInnerBlock, l.inner - q0)) {
        case 4: mode_product_column_tile<4>(xp + q0, up, op + q0, l, n_j, padded_j); break;
        case 3: mode_product_column_tile<3>(xp + q0, up, op + q0, l, n_j, padded_j); break;
        case 2: mode_product_column_tile<2>(xp + q0, up, op + q0, l, n_j, padded_j); break;
        default: mode_product_column_tile<1>(xp + q0, up, op + q0, l, n_j, padded_j); break;
      }
    }
  }
}

void mode_product_cpu(const at::Tensor& x, const at::Tensor& u, int64_t mode, at::Tensor& out) {
  check_mode_product(x, u, mode, &out);
  const AroundDim l = around_dim(x, mode);
  const int64_t rows_j = u.size(0);
  const int64_t work = std::max<int64_t>(1, l.size * rows_j);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrtensor::mode_product", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (rows_j > l.inner) {  // vectorise along the longer of j and the inner dim
      const int64_t padded_j = (rows_j + kColumnBlock - 1) / kColumnBlock * kColumnBlock;
      std::vector<double> u_t(l.size * padded_j, 0.0);
      for (int64_t j = 0; j < rows_j; ++j) {
        for (int64_t m = 0; m < l.size; ++m) u_t[m * padded_j + j] = static_cast<double>(up[j * l.size + m]);
      }
      const int64_t tiles = l.outer * (padded_j / kColumnBlock);
      const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, l.size * l.inner * kColumnBlock));
      at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
        mode_product_columns(xp, u_t.data(), op, l, rows_j, padded_j, begin, end);
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, l.size * l.inner));
      at::parallel_for(0, l.outer * rows_j, grain, [&](int64_t begin, int64_t end) {
        mode_product_rows(xp, up, op, l, rows_j, begin, end);
      });
    }
  });
}

// Rows j0 .. j0 + kRows - 1 and columns m0 .. m0 + kColumnBlock - 1 of out[j, m] =
// sum_p sum_q x[p, j, q] * y[p, m, q], with y as (P, Q, M) in float64, M padded with zeros to
// padded_m: the sums in registers, each over p then q with fused multiply-adds.
template <int64_t kRows, typename scalar_t>
void mode_gram_tile(const scalar_t* x, const double* y_t, scalar_t* out, AroundDim lx, int64_t rows_j,
                    int64_t cols_m, int64_t padded_m, int64_t j0, int64_t m0) {
  RegisterBlock<kRows> sums;
  for (int64_t p = 0; p < lx.outer; ++p) {
    const scalar_t* xr = x + (p * rows_j + j0) * lx.inner;
    for (int64_t q = 0; q < lx.inner; ++q) sums.add(y_t + (p * lx.inner + q) * padded_m + m0, xr + q, lx.inner);
  }
  sums.store(out + j0 * cols_m + m0, std::min(kColumnBlock, cols_m - m0), cols_m, 1);
}

constexpr int64_t kGramRows = 4;

void mode_gram_cpu(const at::Tensor& x, const at::Tensor& y, int64_t mode, at::Tensor& out) {
  check_mode_gram(x, y, mode, &out);
  const AroundDim lx = around_dim(x, mode);
  const int64_t rows_j = x.size(mode), cols_m = y.size(mode);
  const int64_t padded_m = (cols_m + kColumnBlock - 1) / kColumnBlock * kColumnBlock;
  const int64_t row_blocks = (rows_j + kGramRows - 1) / kGramRows, col_blocks = padded_m / kColumnBlock;
  const int64_t tile_work = std::max<int64_t>(1, lx.outer * lx.inner * kGramRows * kColumnBlock);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrtensor::mode_gram", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<double> y_t(lx.outer * lx.inner * padded_m, 0.0);
    for (int64_t p = 0; p < lx.outer; ++p) {
      for (int64_t m = 0; m < cols_m; ++m) {
        for (int64_t q = 0; q < lx.inner; ++q) {
          y_t[(p * lx.inner + q) * padded_m + m] = static_cast<double>(yp[(p * cols_m + m) * lx.inner + q]);
        }
      }
    }
    at::parallel_for(0, row_blocks * col_blocks, std::max<int64_t>(1, (1 << 14) / tile_work),
                     [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t j0 = tile / col_blocks * kGramRows, m0 = tile % col_blocks * kColumnBlock;
        switch (std::min(kGramRows, rows_j - j0)) {
          case 4: mode_gram_tile<4>(xp, y_t.data(), op, lx, rows_j, cols_m, padded_m, j0, m0); break;
          case 3: mode_gram_tile<3>(xp, y_t.data(), op, lx, rows_j, cols_m, padded_m, j0, m0); break;
          case 2: mode_gram_tile<2>(xp, y_t.data(), op, lx, rows_j, cols_m, padded_m, j0, m0); break;
          default: mode_gram_tile<1>(xp, y_t.data(), op, lx, rows_j, cols_m, padded_m, j0, m0); break;
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CPU, m) {
  m.impl("mode_product.out", &mode_product_cpu);
  m.impl("mode_gram.out", &mode_gram_cpu);
}

}  // namespace lrtensor::ops::cpu
