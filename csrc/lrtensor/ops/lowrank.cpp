// Argument checks of the ops, and the library that owns the `lrtensor` namespace.
#include "lowrank.h"

#include <torch/library.h>

#include <string>

namespace lrtensor::ops {

namespace {

// Sizes in error messages as plain integers: with torch 2.11.0+cu130 (an H200 machine, gcc 13.3), a
// TORCH_CHECK whose message streams a SymIntArrayRef killed the process (SIGSEGV) instead of
// raising, on CPU and CUDA tensors alike, where the same check with a plain string message raised.
std::string text(const c10::SymInt& s) {
  if (auto v = s.maybe_as_int()) return std::to_string(*v);
  return "(symbolic)";
}

std::string text(c10::SymIntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + text(sizes[i]);
  return out + "]";
}

bool is_float_type(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": expected ", name,
              " of dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": expected a contiguous ", name, ", got strides ", text(t.sym_strides()),
              " for shape ", text(t.sym_sizes()));
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, c10::ScalarType want, const char* why) {
  TORCH_CHECK(t.scalar_type() == want, op, ": expected ", name, " of dtype ", want, " (", why, "), got ",
              t.scalar_type());
}

// Sizes are read as SymInts: the Meta kernels run these checks on fake tensors under torch.compile.
void check_matrix(const char* op, const char* name, const at::Tensor& t, const c10::SymInt& rows,
                  const c10::SymInt& cols, const char* form) {
  TORCH_CHECK(t.dim() == 2 && t.sym_size(0) == rows && t.sym_size(1) == cols, op, ": expected ", name,
              " of shape ", form, " = (", text(rows), ", ", text(cols), "), got ", text(t.sym_sizes()));
}

// weight is an (O, C) matrix; left (O, r) and right (r, C) in its accumulation type.
void check_lowrank_operands(const char* op, const at::Tensor& weight, const at::Tensor& left,
                            const at::Tensor& right) {
  TORCH_CHECK(weight.dim() >= 2, op, ": expected a weight of at least 2 dimensions (out, in, *kernel), got shape ",
              text(weight.sym_sizes()));
  check_float(op, "weight", weight);
  check_contiguous(op, "weight", weight);
  c10::SymInt cols = 1;
  for (int64_t d = 1; d < weight.dim(); ++d) cols = cols * weight.sym_size(d);
  TORCH_CHECK(left.dim() == 2, op, ": expected left of shape (O, r), got ", text(left.sym_sizes()));
  const c10::SymInt rank = left.sym_size(1);
  TORCH_CHECK(rank >= 1, op, ": expected a rank r >= 1 (left of shape (O, r)), got left of shape ",
              text(left.sym_sizes()));
  check_matrix(op, "left", left, weight.sym_size(0), rank, "(O, r)");
  check_matrix(op, "right", right, rank, cols, "(r, C)");
  const auto acc = accumulate_type(weight.scalar_type());
  check_dtype(op, "left", left, acc, "the accumulation type of the weight");
  check_dtype(op, "right", right, acc, "the accumulation type of the weight");
  check_contiguous(op, "left", left);
  check_contiguous(op, "right", right);
  check_same_device(op, "left", left, weight, "weight");
  check_same_device(op, "right", right, weight, "weight");
}

}  // namespace

Combine parse_combine(const char* op, c10::string_view name) {
  if (name == "add") return Combine::Add;
  if (name == "exp") return Combine::Exp;
  if (name == "first_order") return Combine::FirstOrder;
  if (name == "mul") return Combine::Mul;
  TORCH_CHECK(false, op, ": expected combine 'add', 'exp', 'first_order' or 'mul', got '", std::string(name), "'");
}

c10::ScalarType accumulate_type(c10::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

void check_out(const char* op, const at::Tensor& weight, const at::Tensor& out) {
  TORCH_CHECK(out.sym_sizes() == weight.sym_sizes(), op, ": expected out of the weight's shape ",
              text(weight.sym_sizes()), ", got ", text(out.sym_sizes()));
  check_float(op, "out", out);
  check_contiguous(op, "out", out);
  check_same_device(op, "out", out, weight, "weight");
}

void check_projection(const char* op, const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                      const at::Tensor& right, const at::Tensor& grad_left, const at::Tensor& grad_right) {
  check_lowrank_operands(op, weight, left, right);
  TORCH_CHECK(grad.sym_sizes() == weight.sym_sizes(), op, ": expected grad of the weight's shape ",
              text(weight.sym_sizes()), ", got ", text(grad.sym_sizes()));
  check_float(op, "grad", grad);
  check_contiguous(op, "grad", grad);
  check_same_device(op, "grad", grad, weight, "weight");
  check_matrix(op, "grad_left", grad_left, left.sym_size(0), left.sym_size(1), "left's (O, r)");
  check_matrix(op, "grad_right", grad_right, right.sym_size(0), right.sym_size(1), "right's (r, C)");
  check_dtype(op, "grad_left", grad_left, left.scalar_type(), "left's");
  check_dtype(op, "grad_right", grad_right, right.scalar_type(), "right's");
  check_contiguous(op, "grad_left", grad_left);
  check_contiguous(op, "grad_right", grad_right);
  check_same_device(op, "grad_left", grad_left, weight, "weight");
  check_same_device(op, "grad_right", grad_right, weight, "weight");
}

}  // namespace

void check_lowrank_transform(const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
                             const at::Tensor& out) {
  constexpr const char* op = "lrtensor::lowrank_transform";
  check_lowrank_operands(op, weight, left, right);
  check_out(op, weight, out);
}

void check_lowrank_project(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                           const at::Tensor& right, const at::Tensor& grad_left, const at::Tensor& grad_right) {
  check_projection("lrtensor::lowrank_project", grad, weight, left, right, grad_left, grad_right);
}

void check_lowrank_project_transform(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                                     const at::Tensor& right, const at::Tensor& grad_left,
                                     const at::Tensor& grad_right, const at::Tensor& out) {
  constexpr const char* op = "lrtensor::lowrank_project_transform";
  check_projection(op, grad, weight, left, right, grad_left, grad_right);
  check_out(op, weight, out);
}

int64_t check_channel_dot(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, const at::Tensor& out) {
  constexpr const char* op = "lrtensor::channel_dot";
  TORCH_CHECK(a.dim() >= 1, op, ": expected a of at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(channel_dim >= -a.dim() && channel_dim < a.dim(), op, ": expected channel_dim in [", -a.dim(), ", ",
              a.dim(), ") for a of shape ", text(a.sym_sizes()), ", got ", channel_dim);
  const int64_t dim = channel_dim < 0 ? channel_dim + a.dim() : channel_dim;
  TORCH_CHECK(b.sym_sizes() == a.sym_sizes(), op, ": expected b of a's shape ", text(a.sym_sizes()), ", got ",
              text(b.sym_sizes()));
  check_float(op, "a", a);
  check_dtype(op, "b", b, a.scalar_type(), "a's");
  check_contiguous(op, "a", a);
  check_contiguous(op, "b", b);
  check_same_device(op, "b", b, a, "a");
  TORCH_CHECK(out.dim() == 1 && out.sym_size(0) == a.sym_size(dim), op, ": expected out of shape (",
              text(a.sym_size(dim)), ",) (a.shape[channel_dim]), got ", text(out.sym_sizes()));
  check_dtype(op, "out", out, accumulate_type(a.scalar_type()), "float64 for float64 inputs, else float32");
  check_contiguous(op, "out", out);
  check_same_device(op, "out", out, a, "a");
  return dim;
}

namespace {

void check_contraction_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": expected ", name,
              " of dtype float32 or float64, got ", t.scalar_type());
  check_dtype(op, name, t, x.scalar_type(), "x's");
  check_contiguous(op, name, t);
  check_same_device(op, name, t, x, "x");
}

void check_mode(const char* op, const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode < x.dim(), op, ": expected mode in [0, ", x.dim(), ") for x of shape ",
              text(x.sym_sizes()), ", got ", mode);
}

}  // namespace

void check_mode_product(const at::Tensor& x, const at::Tensor& u, int64_t mode, const at::Tensor* out) {
  constexpr const char* op = "lrtensor::mode_product";
  check_mode(op, x, mode);
  check_contraction_operand(op, "x", x, x);
  check_contraction_operand(op, "u", u, x);
  TORCH_CHECK(u.dim() == 2 && u.sym_size(1) == x.sym_size(mode), op, ": expected u of shape (J, ",
              text(x.sym_size(mode)), ") (x.shape[mode] = ", text(x.sym_size(mode)), "), got ",
              text(u.sym_sizes()));
  if (out != nullptr) {
    std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
    sizes[mode] = u.sym_size(0);
    TORCH_CHECK(out->sym_sizes() == c10::SymIntArrayRef(sizes), op, ": expected out of shape ",
                text(c10::SymIntArrayRef(sizes)), ", got ", text(out->sym_sizes()));
    check_contraction_operand(op, "out", *out, x);
  }
}

void check_mode_gram(const at::Tensor& x, const at::Tensor& y, int64_t mode, const at::Tensor* out) {
  constexpr const char* op = "lrtensor::mode_gram";
  check_mode(op, x, mode);
  check_contraction_operand(op, "x", x, x);
  check_contraction_operand(op, "y", y, x);
  bool agree = y.dim() == x.dim();
  for (int64_t d = 0; agree && d < x.dim(); ++d) agree = d == mode || x.sym_size(d) == y.sym_size(d);
  TORCH_CHECK(agree, op, ": expected y of x's shape ", text(x.sym_sizes()), " in every dim but ", mode, ", got ",
              text(y.sym_sizes()));
  if (out != nullptr) {
    TORCH_CHECK(out->dim() == 2 && out->sym_size(0) == x.sym_size(mode) && out->sym_size(1) == y.sym_size(mode), op,
                ": expected out of shape (", text(x.sym_size(mode)), ", ", text(y.sym_size(mode)), "), got ",
                text(out->sym_sizes()));
    check_contraction_operand(op, "out", *out, x);
  }
}

AroundDim around_dim(const at::Tensor& t, int64_t dim) {
  AroundDim layout{1, t.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) layout.outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) layout.inner *= t.size(d);
  return layout;
}

}  // namespace lrtensor::ops

// This library owns the namespace; each op declares its schema in its own file (ops/<op>.cpp) as a
// fragment, and so do the Python custom ops of lrtensor_kernels/ops.py (torch.library.custom_op).
// The dispatcher allows one TORCH_LIBRARY per namespace beside any number of fragments, in any
// order of loading (tests/test_native_build.py loads them both ways).
TORCH_LIBRARY(lrtensor, m) {}
