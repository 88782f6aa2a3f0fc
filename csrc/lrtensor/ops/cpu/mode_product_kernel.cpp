// CPU kernels of lrtensor::mode_product.out and lrtensor::mode_gram.out (semantics:
// ../mode_product.cpp). Each output row is computed by one task in a fixed order, in float64.
#include "lowrank_tile.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

namespace lrtensor::ops::cpu {

namespace {

using VecD = Vectorized<double>;
constexpr int64_t kQChunk = 512;

struct Layout {
  int64_t outer, mode, inner;
};

Layout around(const at::Tensor& x, int64_t mode) {
  Layout l{1, x.size(mode), 1};
  for (int64_t d = 0; d < mode; ++d) l.outer *= x.size(d);
  for (int64_t d = mode + 1; d < x.dim(); ++d) l.inner *= x.size(d);
  return l;
}

template <typename scalar_t>
void mode_product_rows(const scalar_t* x, const scalar_t* u, scalar_t* out, Layout l, int64_t rows_j, int64_t begin,
                       int64_t end) {
  alignas(64) double acc[kQChunk];
  alignas(64) double xs[kQChunk];
  for (int64_t row = begin; row < end; ++row) {  // row = p * J + j
    const int64_t p = row / rows_j, j = row % rows_j;
    for (int64_t q0 = 0; q0 < l.inner; q0 += kQChunk) {
      const int64_t n = std::min(kQChunk, l.inner - q0);
      std::fill(acc, acc + n, 0.0);
      for (int64_t m = 0; m < l.mode; ++m) {
        const VecD coef(static_cast<double>(u[j * l.mode + m]));
        const scalar_t* xr = x + (p * l.mode + m) * l.inner + q0;
        for (int64_t q = 0; q < n; ++q) xs[q] = static_cast<double>(xr[q]);
        for (int64_t q = 0; q < n; q += VecD::size()) {
          const int64_t k = std::min<int64_t>(VecD::size(), n - q);
          store_lanes(at::vec::fmadd(coef, load_lanes(xs + q, k), load_lanes(acc + q, k)), acc + q, k);
        }
      }
      scalar_t* o = out + row * l.inner + q0;
      for (int64_t q = 0; q < n; ++q) o[q] = static_cast<scalar_t>(acc[q]);
    }
  }
}

void mode_product_cpu(const at::Tensor& x, const at::Tensor& u, int64_t mode, at::Tensor& out) {
  check_mode_product(x, u, mode, &out);
  const Layout l = around(x, mode);
  const int64_t rows_j = u.size(0);
  const int64_t rows = l.outer * rows_j;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, l.mode * l.inner));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrtensor::mode_product", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      mode_product_rows(xp, up, op, l, rows_j, begin, end);
    });
  });
}

void mode_gram_cpu(const at::Tensor& x, const at::Tensor& y, int64_t mode, at::Tensor& out) {
  check_mode_gram(x, y, mode, &out);
  const Layout lx = around(x, mode);
  const int64_t rows_j = x.size(mode), cols_m = y.size(mode);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, lx.outer * lx.inner * cols_m));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrtensor::mode_gram", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows_j, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(cols_m);
      for (int64_t j = begin; j < end; ++j) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t p = 0; p < lx.outer; ++p) {
          const scalar_t* xr = xp + (p * rows_j + j) * lx.inner;
          for (int64_t m = 0; m < cols_m; ++m) {
            const scalar_t* yr = yp + (p * cols_m + m) * lx.inner;
            double s = 0;
            for (int64_t q = 0; q < lx.inner; ++q) s += static_cast<double>(xr[q]) * static_cast<double>(yr[q]);
            acc[m] += s;
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
