// lrtensor::channel_dot: out[c] = sum of a * b over every dim but channel_dim, without making a * b.
//
//   a, b: the same shape and dtype (float32/float64/float16/bfloat16), contiguous
//   out: (a.shape[channel_dim],), float32 (float64 for float64 inputs)
//
// Deterministic: partial sums over blocks of a fixed size (it depends only on the shape), added in a
// fixed order.
#include "lowrank.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops {

namespace {

at::Tensor channel_dot(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrtensor::channel_dot", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&)>();
  TORCH_CHECK(a.dim() >= 1 && channel_dim >= -a.dim() && channel_dim < a.dim(),
              "lrtensor::channel_dot: expected channel_dim in [", -a.dim(), ", ", a.dim(), ") for a of shape ",
              a.sizes(), ", got ", channel_dim);
  const int64_t dim = channel_dim < 0 ? channel_dim + a.dim() : channel_dim;
  at::Tensor out = at::empty_symint({a.sym_size(dim)}, a.options().dtype(accumulate_type(a.scalar_type())));
  op.call(a, b, channel_dim, out);
  return out;
}

void channel_dot_meta(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, at::Tensor& out) {
  check_channel_dot(a, b, channel_dim, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrtensor, m) {
  m.def("channel_dot(Tensor a, Tensor b, int channel_dim) -> Tensor");
  m.def("channel_dot.out(Tensor a, Tensor b, int channel_dim, *, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lrtensor, CompositeExplicitAutograd, m) {
  m.impl("channel_dot", &channel_dot);
}

TORCH_LIBRARY_IMPL(lrtensor, Meta, m) {
  m.impl("channel_dot.out", &channel_dot_meta);
}

}  // namespace lrtensor::ops
