// CUDA kernel of lrtensor::lowrank_transform.out (schema and semantics: ../lowrank_transform.cpp).
//
// One thread per weight column (coalesced reads of W and writes of W'), each block a range of
// kRowsPerBlock rows: E = sum_a left[o, a] * right[a, c], then the combine rule, in the
// accumulation type. Elementwise: no reduction across threads.
#include "cuda_common.cuh"

#include <torch/library.h>

namespace lrtensor::ops::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerBlock = 32;

template <typename w_t, typename out_t, typename acc_t>
__global__ void lowrank_transform_kernel(const w_t* __restrict__ weight, out_t* __restrict__ out,
                                         const acc_t* __restrict__ left, const acc_t* __restrict__ right,
                                         int64_t rows, int64_t cols, int64_t rank, int64_t rows_per_block,
                                         Combine rule, bool delta_only) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  const int64_t o_begin = blockIdx.y * rows_per_block;
  const int64_t o_end = o_begin + rows_per_block < rows ? o_begin + rows_per_block : rows;
  for (int64_t o = o_begin; o < o_end; ++o) {
    acc_t e = 0;
    for (int64_t a = 0; a < rank; ++a) e = fma(left[o * rank + a], right[a * cols + c], e);
    const int64_t i = o * cols + c;
    out[i] = static_cast<out_t>(combine_value<acc_t>(rule, delta_only, static_cast<acc_t>(weight[i]), e));
  }
}

void lowrank_transform_cuda(const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
                            c10::string_view combine, bool delta_only, at::Tensor& out) {
  constexpr const char* op = "lrtensor::lowrank_transform";
  const Combine rule = parse_combine(op, combine);
  check_lowrank_transform(weight, left, right, out);
  if (weight.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t rows = weight.size(0), cols = right.size(1), rank = left.size(1);
  int64_t rows_per_block = kRowsPerBlock;
  while ((rows + rows_per_block - 1) / rows_per_block > 65535) rows_per_block *= 2;
  const dim3 grid(blocks_for(cols, kThreads), grid_y(op, (rows + rows_per_block - 1) / rows_per_block));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lrtensor::lowrank_transform", [&] {
    using w_t = scalar_t;
    using acc_t = typename Accumulate<w_t>::type;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lrtensor::lowrank_transform", [&] {
      lowrank_transform_kernel<w_t, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          weight.const_data_ptr<w_t>(), out.data_ptr<scalar_t>(), left.const_data_ptr<acc_t>(),
          right.const_data_ptr<acc_t>(), rows, cols, rank, rows_per_block, rule, delta_only);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CUDA, m) {
  m.impl("lowrank_transform.out", &lowrank_transform_cuda);
}

}  // namespace lrtensor::ops::cuda
