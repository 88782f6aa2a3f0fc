// lrtensor::lowrank_transform: W' = combine(W, left @ right), or W' - W, in one pass over the weight.
//
//   weight (O, *) contiguous, float32/float64/float16/bfloat16, read as (O, C)
//   left (O, r), right (r, C): the update E = left @ right, in the weight's accumulation type
//   combine: "add", "exp", "first_order" or "mul" (lowrank.h); delta_only: W' - W instead of W'
//   out / dtype: W' in any of the four float dtypes (the weight's by default); the math runs in
//   float32 (float64 for float64 weights) whatever the storage
//
// The kernels implement the out overload (cpu/, cuda/); the functional overload allocates and calls it.
#include "lowrank.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops {

namespace {

at::Tensor lowrank_transform(const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
                             c10::string_view combine, bool delta_only, std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrtensor::lowrank_transform", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, bool,
                                   at::Tensor&)>();
  at::Tensor out = at::empty_symint(weight.sym_sizes(), weight.options().dtype(dtype.value_or(weight.scalar_type())));
  op.call(weight, left, right, combine, delta_only, out);
  return out;
}

void lowrank_transform_meta(const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
                            c10::string_view combine, bool delta_only, at::Tensor& out) {
  parse_combine("lrtensor::lowrank_transform", combine);
  check_lowrank_transform(weight, left, right, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrtensor, m) {
  m.def("lowrank_transform(Tensor weight, Tensor left, Tensor right, str combine, bool delta_only=False, "
        "ScalarType? dtype=None) -> Tensor");
  m.def("lowrank_transform.out(Tensor weight, Tensor left, Tensor right, str combine, bool delta_only=False, *, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lrtensor, CompositeExplicitAutograd, m) {
  m.impl("lowrank_transform", &lowrank_transform);
}

TORCH_LIBRARY_IMPL(lrtensor, Meta, m) {
  m.impl("lowrank_transform.out", &lowrank_transform_meta);
}

}  // namespace lrtensor::ops
