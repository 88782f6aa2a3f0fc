// lrtensor::mode_product and lrtensor::mode_gram: the two small contractions of the Tucker
// adapters (the kernel core, the materialised right factor and their gradients), deterministic
// at any thread count (torch's tensordot goes through BLAS, whose bits may change with it).
//
//   mode_product(x, u, mode): out[p, j, q] = sum_m u[j, m] * x[p, m, q], x read as (P, M, Q)
//     around dim `mode`, u (J, M); out has x's shape with J at `mode`.
//   mode_gram(x, y, mode): out[j, m] = sum_{p, q} x[p, j, q] * y[p, m, q]; x (P, J, Q) and y
//     (P, M, Q) agree in every dim but `mode`; out (J, M). The adjoint of mode_product:
//     d<g, mode_product(x, u, mode)>/du = mode_gram(g, x, mode).
//   float32 or float64, contiguous, one device; sums in float64, each output by one thread in a
//   fixed order.
#include "lowrank.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops {

namespace {

at::Tensor mode_product(const at::Tensor& x, const at::Tensor& u, int64_t mode) {
  check_mode_product(x, u, mode);
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  sizes[mode] = u.sym_size(0);
  at::Tensor out = at::empty_symint(sizes, x.options());
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrtensor::mode_product", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&)>();
  op.call(x, u, mode, out);
  return out;
}

at::Tensor mode_gram(const at::Tensor& x, const at::Tensor& y, int64_t mode) {
  check_mode_gram(x, y, mode);
  at::Tensor out = at::empty_symint({x.sym_size(mode), y.sym_size(mode)}, x.options());
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrtensor::mode_gram", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&)>();
  op.call(x, y, mode, out);
  return out;
}

void mode_product_meta(const at::Tensor& x, const at::Tensor& u, int64_t mode, at::Tensor& out) {
  check_mode_product(x, u, mode, &out);
}

void mode_gram_meta(const at::Tensor& x, const at::Tensor& y, int64_t mode, at::Tensor& out) {
  check_mode_gram(x, y, mode, &out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrtensor, m) {
  m.def("mode_product(Tensor x, Tensor u, int mode) -> Tensor");
  m.def("mode_product.out(Tensor x, Tensor u, int mode, *, Tensor(a!) out) -> ()");
  m.def("mode_gram(Tensor x, Tensor y, int mode) -> Tensor");
  m.def("mode_gram.out(Tensor x, Tensor y, int mode, *, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lrtensor, CompositeExplicitAutograd, m) {
  m.impl("mode_product", &mode_product);
  m.impl("mode_gram", &mode_gram);
}

TORCH_LIBRARY_IMPL(lrtensor, Meta, m) {
  m.impl("mode_product.out", &mode_product_meta);
  m.impl("mode_gram.out", &mode_gram_meta);
}

}  // namespace lrtensor::ops
