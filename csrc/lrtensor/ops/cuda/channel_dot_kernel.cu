// CUDA kernel of lrtensor::channel_dot.out (schema and semantics: ../channel_dot.cpp).
//
// The input is read as (outer, channels, inner). Two stages, no atomics:
// 1. inner == 1 (linear activations): one thread per channel (coalesced along the channels), each
//    block summing one split of kRowsPerSplit outer rows. inner > 1 (NCHW activations): one block
//    per (channel, split of outer rows), its threads striding along the contiguous inner runs,
//    then a fixed shared-memory tree. Either way one partial per (split, channel); the split sizes
//    depend only on the shape.
// 2. sum_partials adds the splits of each channel in order.
#include "cuda_common.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerSplit = 256;      // inner == 1
constexpr int64_t kElementsPerSplit = 1 << 16;  // inner > 1: about this many per block

template <typename scalar_t, typename acc_t>
__global__ void channel_dot_columns_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                           acc_t* __restrict__ partial, int64_t outer, int64_t channels,
                                           int64_t rows_per_split) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  const int64_t o_begin = blockIdx.y * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;
  acc_t s = acc_t(0);
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int64_t i = o * channels + c;
    s = fma(static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), s);
  }
  partial[blockIdx.y * channels + c] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void channel_dot_runs_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                        acc_t* __restrict__ partial, int64_t outer, int64_t channels, int64_t inner,
                                        int64_t rows_per_split) {
  __shared__ acc_t sums[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t o_begin = blockIdx.y * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;
  const int64_t count = (o_end - o_begin) * inner;
  acc_t s = acc_t(0);
  for (int64_t j = threadIdx.x; j < count; j += kThreads) {
    const int64_t o = o_begin + j / inner, q = j % inner;
    const int64_t i = (o * channels + c) * inner + q;
    s = fma(static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), s);
  }
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.y * channels + c] = sums[0];
}

void channel_dot_cuda(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, at::Tensor& out) {
  constexpr const char* op = "lrtensor::channel_dot";
  const int64_t dim = check_channel_dot(a, b, channel_dim, out);
  const AroundDim s = around_dim(a, dim);
  if (s.size == 0) return;
  if (s.outer * s.inner == 0) {
    out.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t rows = s.inner == 1 ? kRowsPerSplit : std::max<int64_t>(1, kElementsPerSplit / s.inner);
  while ((s.outer + rows - 1) / rows > 65535) rows *= 2;
  const int64_t splits = (s.outer + rows - 1) / rows;
  at::Tensor partial = at::empty({splits, s.size}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lrtensor::channel_dot", [&] {
    using acc_t = typename Accumulate<scalar_t>::type;
    if (s.inner == 1) {
      const dim3 grid(blocks_for(s.size, kThreads), grid_y(op, splits));
      channel_dot_columns_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), s.outer, s.size,
          rows);
    } else {
      TORCH_CHECK(s.size <= std::numeric_limits<int32_t>::max(), op, ": expected at most 2^31 - 1 channels, got ",
                  s.size);
      const dim3 grid(static_cast<unsigned int>(s.size), grid_y(op, splits));
      channel_dot_runs_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), s.outer, s.size,
          s.inner, rows);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials(partial.const_data_ptr<acc_t>(), splits, s.size, out.data_ptr<acc_t>(), stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CUDA, m) {
  m.impl("channel_dot.out", &channel_dot_cuda);
}

}  // namespace lrtensor::ops::cuda
