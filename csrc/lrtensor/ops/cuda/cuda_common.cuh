// Device helpers shared by the CUDA kernels: the combine rules, the accumulation type, the
// fixed-order sum of partials that ends every two-stage reduction, and launch checks.
#pragma once

#include "../lowrank.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>

namespace lrtensor::ops::cuda {

// float32 math for 16-bit and float32 storage, float64 for float64 (lowrank.h).
template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float expm1_of(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_of(double x) { return expm1(x); }

// W' (or W' - W with delta_only) from W and E, as lrtensor_kernels/methods.py:combine.
template <typename acc_t>
__device__ __forceinline__ acc_t combine_value(Combine rule, bool delta_only, acc_t w, acc_t e) {
  switch (rule) {
    case Combine::Add: return delta_only ? e : w + e;
    case Combine::Exp: return delta_only ? w * expm1_of(e) : w * exp_of(e);
    case Combine::FirstOrder: return delta_only ? w * e : w * (acc_t(1) + e);
    default: return delta_only ? w * (e - acc_t(1)) : w * e;
  }
}

// dLoss/dE from g = dLoss/dW': g (add), g * W * exp(E) (exp), g * W (first_order, mul).
template <typename acc_t>
__device__ __forceinline__ acc_t update_grad(Combine rule, acc_t g, acc_t w, acc_t e) {
  switch (rule) {
    case Combine::Add: return g;
    case Combine::Exp: return g * w * exp_of(e);
    default: return g * w;
  }
}

// out[k] = sum_{s < count} partials[s * n + k], in the order of s (the second stage of every
// deterministic reduction: no atomics, the same bits on every run).
template <typename acc_t, typename out_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int64_t count, int64_t n,
                                    out_t* __restrict__ out) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= n) return;
  acc_t s = partials[k];
  for (int64_t i = 1; i < count; ++i) s += partials[i * n + k];
  out[k] = static_cast<out_t>(s);
}

constexpr int kSumThreads = 256;

inline unsigned int blocks_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lrtensor: ", n,
              " elements are more than one CUDA grid dimension can cover");
  return static_cast<unsigned int>(blocks);
}

inline unsigned int grid_y(const char* op, int64_t n) {
  TORCH_CHECK(n <= 65535, op, ": expected at most 65535 row splits in the CUDA grid, got ", n,
              " (a dimension too large for this kernel)");
  return static_cast<unsigned int>(n);
}

template <typename acc_t, typename out_t>
void sum_partials(const acc_t* partials, int64_t count, int64_t n, out_t* out, cudaStream_t stream) {
  if (n == 0) return;
  sum_partials_kernel<acc_t, out_t><<<blocks_for(n, kSumThreads), kSumThreads, 0, stream>>>(partials, count, n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lrtensor::ops::cuda
