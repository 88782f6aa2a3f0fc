// lrtensor::lowrank_project_transform: lowrank_project and lowrank_transform of the same weight in
// one pass (a merged layer's backward needs W' for the input gradient and the projection of
// dLoss/dW' onto left and right; both read W and compute E, exp(E) for the exp rule).
//
//   grad, weight, left, right, combine: as in lrtensor::lowrank_project (same results, same bits)
//   delta_only, out / dtype: as in lrtensor::lowrank_transform (same results, same bits)
//
// CPU only: its kernel is lowrank_project's (cpu/lowrank_project_kernel.cpp). On CUDA the Python side
// calls the two ops.
#include "lowrank.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_project_transform(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
    c10::string_view combine, bool delta_only, std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrtensor::lowrank_project_transform", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   c10::string_view, bool, at::Tensor&, at::Tensor&, at::Tensor&)>();
  at::Tensor grad_left = at::empty_symint(left.sym_sizes(), left.options());
  at::Tensor grad_right = at::empty_symint(right.sym_sizes(), right.options());
  at::Tensor out = at::empty_symint(weight.sym_sizes(), weight.options().dtype(dtype.value_or(weight.scalar_type())));
  op.call(grad, weight, left, right, combine, delta_only, grad_left, grad_right, out);
  return {grad_left, grad_right, out};
}

void lowrank_project_transform_meta(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                                    const at::Tensor& right, c10::string_view combine, bool delta_only,
                                    at::Tensor& grad_left, at::Tensor& grad_right, at::Tensor& out) {
  parse_combine("lrtensor::lowrank_project_transform", combine);
  check_lowrank_project_transform(grad, weight, left, right, grad_left, grad_right, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrtensor, m) {
  m.def("lowrank_project_transform(Tensor grad, Tensor weight, Tensor left, Tensor right, str combine, "
        "bool delta_only=False, ScalarType? dtype=None) -> (Tensor, Tensor, Tensor)");
  m.def("lowrank_project_transform.out(Tensor grad, Tensor weight, Tensor left, Tensor right, str combine, "
        "bool delta_only=False, *, Tensor(a!) grad_left, Tensor(b!) grad_right, Tensor(c!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lrtensor, CompositeExplicitAutograd, m) {
  m.impl("lowrank_project_transform", &lowrank_project_transform);
}

TORCH_LIBRARY_IMPL(lrtensor, Meta, m) {
  m.impl("lowrank_project_transform.out", &lowrank_project_transform_meta);
}

}  // namespace lrtensor::ops
