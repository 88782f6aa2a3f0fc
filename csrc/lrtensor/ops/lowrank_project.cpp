// lrtensor::lowrank_project: the gradients of left and right from grad = dLoss/dW', in one pass.
//
//   grad, weight (O, *) contiguous, read as (O, C); grad's dtype may differ from the weight's
//   left (O, r), right (r, C): as in lrtensor::lowrank_transform
//   H = dLoss/dE: grad (add), grad * W * exp(E) (exp), grad * W (first_order, mul)
//   grad_left = H @ right^T (O, r), grad_right = left^T @ H (r, C), in the accumulation type
//
// Deterministic: the kernels cut the weight into tiles whose size depends only on the shapes, write
// one partial sum per tile and add the partials in a fixed order (no atomics), so the result is
// bitwise the same at any thread count and on every run.
#include "lowrank.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops {

namespace {

std::tuple<at::Tensor, at::Tensor> lowrank_project(const at::Tensor& grad, const at::Tensor& weight,
                                                   const at::Tensor& left, const at::Tensor& right,
                                                   c10::string_view combine) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrtensor::lowrank_project", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         c10::string_view, at::Tensor&, at::Tensor&)>();
  at::Tensor grad_left = at::empty_symint(left.sym_sizes(), left.options());
  at::Tensor grad_right = at::empty_symint(right.sym_sizes(), right.options());
  op.call(grad, weight, left, right, combine, grad_left, grad_right);
  return {grad_left, grad_right};
}

void lowrank_project_meta(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                          const at::Tensor& right, c10::string_view combine, at::Tensor& grad_left,
                          at::Tensor& grad_right) {
  parse_combine("lrtensor::lowrank_project", combine);
  check_lowrank_project(grad, weight, left, right, grad_left, grad_right);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrtensor, m) {
  m.def("lowrank_project(Tensor grad, Tensor weight, Tensor left, Tensor right, str combine) -> (Tensor, Tensor)");
  m.def("lowrank_project.out(Tensor grad, Tensor weight, Tensor left, Tensor right, str combine, *, "
        "Tensor(a!) grad_left, Tensor(b!) grad_right) -> ()");
}

TORCH_LIBRARY_IMPL(lrtensor, CompositeExplicitAutograd, m) {
  m.impl("lowrank_project", &lowrank_project);
}

TORCH_LIBRARY_IMPL(lrtensor, Meta, m) {
  m.impl("lowrank_project.out", &lowrank_project_meta);
}

}  // namespace lrtensor::ops
