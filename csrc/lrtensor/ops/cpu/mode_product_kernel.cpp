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

// Columns col = p * Q + q of out, each out[p, :, q] = sum_m u^T[m, :] * x[p, m, q] (u^T: M x J):
// vectorised along j, for a short inner dim and many rows of u (the Tucker right factor, with
// u = U_2 of I rows and an inner dim of the kernel size). Which of the two runs depends on the
// shapes alone.
template <typename scalar_t>
void mode_product_columns(const scalar_t* x, const double* u_t, scalar_t* out, AroundDim l, int64_t rows_j,
                          int64_t begin, int64_t end) {
  using VecD = Vectorized<double>;
  constexpr int64_t V = VecD::size();
  std::vector<double> acc(rows_j);
  for (int64_t col = begin; col < end; ++col) {
    const int64_t p = col / l.inner, q = col % l.inner;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t m = 0; m < l.size; ++m) {
      const double xv = static_cast<double>(x[(p * l.size + m) * l.inner + q]);
      const VecD xm(xv);
      const double* ur = u_t + m * rows_j;
      int64_t j = 0;
      for (; j + V <= rows_j; j += V) {
        at::vec::fmadd(xm, VecD::loadu(ur + j), VecD::loadu(acc.data() + j)).store(acc.data() + j);
      }
      for (; j < rows_j; ++j) acc[j] = std::fma(xv, ur[j], acc[j]);
    }
    scalar_t* o = out + p * rows_j * l.inner + q;
    for (int64_t j = 0; j < rows_j; ++j) o[j * l.inner] = static_cast<scalar_t>(acc[j]);
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
      std::vector<double> u_t(l.size * rows_j);
      for (int64_t j = 0; j < rows_j; ++j) {
        for (int64_t m = 0; m < l.size; ++m) u_t[m * rows_j + j] = static_cast<double>(up[j * l.size + m]);
      }
      at::parallel_for(0, l.outer * l.inner, std::max<int64_t>(1, (1 << 14) / work), [&](int64_t begin, int64_t end) {
        mode_product_columns(xp, u_t.data(), op, l, rows_j, begin, end);
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, l.size * l.inner));
      at::parallel_for(0, l.outer * rows_j, grain, [&](int64_t begin, int64_t end) {
        mode_product_rows(xp, up, op, l, rows_j, begin, end);
      });
    }
  });
}

void mode_gram_cpu(const at::Tensor& x, const at::Tensor& y, int64_t mode, at::Tensor& out) {
  check_mode_gram(x, y, mode, &out);
  const AroundDim lx = around_dim(x, mode);
  const int64_t rows_j = x.size(mode), cols_m = y.size(mode);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, lx.outer * lx.inner * cols_m));
  using VecD = Vectorized<double>;
  constexpr int64_t V = VecD::size();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrtensor::mode_gram", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // y as (P, Q, M) in float64, so that a row of out is updated a vector of m at a time
    std::vector<double> y_t(lx.outer * lx.inner * cols_m);
    for (int64_t p = 0; p < lx.outer; ++p) {
      for (int64_t m = 0; m < cols_m; ++m) {
        for (int64_t q = 0; q < lx.inner; ++q) {
          y_t[(p * lx.inner + q) * cols_m + m] = static_cast<double>(yp[(p * cols_m + m) * lx.inner + q]);
        }
      }
    }
    at::parallel_for(0, rows_j, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(cols_m);
      for (int64_t j = begin; j < end; ++j) {  // out[j, :] = sum_p sum_q x[p, j, q] * y[p, :, q], p then q
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t p = 0; p < lx.outer; ++p) {
          const scalar_t* xr = xp + (p * rows_j + j) * lx.inner;
          for (int64_t q = 0; q < lx.inner; ++q) {
            const double xv = static_cast<double>(xr[q]);
            const VecD xm(xv);
            const double* yr = y_t.data() + (p * lx.inner + q) * cols_m;
            int64_t m = 0;
            for (; m + V <= cols_m; m += V) {
              at::vec::fmadd(xm, VecD::loadu(yr + m), VecD::loadu(acc.data() + m)).store(acc.data() + m);
            }
            for (; m < cols_m; ++m) acc[m] = std::fma(xv, yr[m], acc[m]);
          }
        }
        for (int64_t m = 0; m < cols_m; ++m) op[j * cols_m + m] = static_cast<scalar_t>(acc[m]);
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
