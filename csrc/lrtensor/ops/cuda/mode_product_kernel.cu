// CUDA kernels of lrtensor::mode_product.out and lrtensor::mode_gram.out (semantics:
// ../mode_product.cpp): one thread per output element, its sum in float64 in a fixed order.
// The tensors are the small Tucker factors and cores; simplicity over speed.
#include "cuda_common.cuh"

#include <torch/library.h>

namespace lrtensor::ops::cuda {

namespace {

constexpr int kThreads = 256;

// out[p, j, q] = sum_m u[j, m] * x[p, m, q]
template <typename scalar_t>
__global__ void mode_product_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
                                    scalar_t* __restrict__ out, AroundDim l, int64_t rows_j) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= l.outer * rows_j * l.inner) return;
  const int64_t q = k % l.inner, j = (k / l.inner) % rows_j, p = k / (l.inner * rows_j);
  double s = 0;
  for (int64_t m = 0; m < l.size; ++m) {
    s = fma(static_cast<double>(u[j * l.size + m]), static_cast<double>(x[(p * l.size + m) * l.inner + q]), s);
  }
  out[k] = static_cast<scalar_t>(s);
}

// out[j, m] = sum_{p, q} x[p, j, q] * y[p, m, q]
template <typename scalar_t>
__global__ void mode_gram_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                 scalar_t* __restrict__ out, AroundDim l, int64_t rows_j, int64_t cols_m) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= rows_j * cols_m) return;
  const int64_t j = k / cols_m, m = k % cols_m;
  double s = 0;
  for (int64_t p = 0; p < l.outer; ++p) {
    for (int64_t q = 0; q < l.inner; ++q) {
      s = fma(static_cast<double>(x[(p * rows_j + j) * l.inner + q]),
              static_cast<double>(y[(p * cols_m + m) * l.inner + q]), s);
    }
  }
  out[k] = static_cast<scalar_t>(s);
}

void mode_product_cuda(const at::Tensor& x, const at::Tensor& u, int64_t mode, at::Tensor& out) {
  check_mode_product(x, u, mode, &out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const AroundDim l = around_dim(x, mode);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrtensor::mode_product", [&] {
    mode_product_kernel<scalar_t><<<blocks_for(out.numel(), kThreads), kThreads, 0,
                                    c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), l, u.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mode_gram_cuda(const at::Tensor& x, const at::Tensor& y, int64_t mode, at::Tensor& out) {
  check_mode_gram(x, y, mode, &out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const AroundDim l = around_dim(x, mode);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrtensor::mode_gram", [&] {
    mode_gram_kernel<scalar_t><<<blocks_for(out.numel(), kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), l, x.size(mode),
        y.size(mode));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CUDA, m) {
  m.impl("mode_product.out", &mode_product_cuda);
  m.impl("mode_gram.out", &mode_gram_cuda);
}

}  // namespace lrtensor::ops::cuda
