// The low-rank form shared by every op of this library, and the argument checks of each op.
//
// A weight W of shape (O, d_1, ..., d_n) is read as a contiguous (O, C) matrix, C = d_1 * ... * d_n.
// Every adapter method is an update E = left @ right, left (O, r), right (r, C), applied by one
// elementwise rule (lrtensor_kernels/methods.py defines them):
//   add          W' = W + E           (W' - W = E)
//   exp          W' = W * exp(E)      (W' - W = W * expm1(E))
//   first_order  W' = W * (1 + E)     (W' - W = W * E)
//   mul          W' = W * E           (W' - W = W * (E - 1))
// The math runs in the accumulation type: double for double weights, float otherwise; left and
// right are given in it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace lrtensor::ops {

enum class Combine : int { Add = 0, Exp = 1, FirstOrder = 2, Mul = 3 };

// The combine rule named `name` ("add", "exp", "first_order", "mul"); an error naming `op` otherwise.
Combine parse_combine(const char* op, c10::string_view name);

// float64 for float64 tensors, float32 for float32, float16 and bfloat16.
c10::ScalarType accumulate_type(c10::ScalarType dtype);

// Checks of each op's arguments (device, dtype, shape, contiguity, sizes); they raise an error that
// names the op, what was expected and what was given. Every backend's kernel calls its op's check.
void check_lowrank_transform(const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
                             const at::Tensor& out);
void check_lowrank_project(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                           const at::Tensor& right, const at::Tensor& grad_left, const at::Tensor& grad_right);
// lowrank_project's checks, and `out` as lowrank_transform's.
void check_lowrank_project_transform(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                                     const at::Tensor& right, const at::Tensor& grad_left,
                                     const at::Tensor& grad_right, const at::Tensor& out);
// Returns channel_dim wrapped into [0, a.dim()).
int64_t check_channel_dot(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, const at::Tensor& out);

// `out`, when given, must have the result's shape and dtype.
void check_mode_product(const at::Tensor& x, const at::Tensor& u, int64_t mode, const at::Tensor* out = nullptr);
void check_mode_gram(const at::Tensor& x, const at::Tensor& y, int64_t mode, const at::Tensor* out = nullptr);

// A contiguous tensor read as (outer, size, inner) around dim `dim`: the channel_dot input around
// its channels, a mode product's operand around its mode.
struct AroundDim {
  int64_t outer;
  int64_t size;
  int64_t inner;
};
AroundDim around_dim(const at::Tensor& t, int64_t dim);

}  // namespace lrtensor::ops
