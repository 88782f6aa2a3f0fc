// CUDA kernel of lrtensor::lowrank_project.out (schema and semantics: ../lowrank_project.cpp).
//
// Two stages, no atomics:
// 1. Block (x, y) owns kColumns columns (one thread each: coalesced reads of grad and W) and the
//    kSplitRows rows of split y; the partition depends only on the shape. Each thread forms
//    H = dLoss/dE for its column, row by row, and accumulates left^T @ H for its column in
//    registers (-> partial_right[y]). H of kTileRows rows goes through shared memory, where the
//    block's threads take (row, rank) pairs and sum H @ right^T over the block's columns in a
//    fixed order (-> partial_left[x]). Ranks are handled kRankChunk at a time.
// 2. sum_partials adds the partials of each output in the order of their index.
#include "cuda_common.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops::cuda {

namespace {

constexpr int kColumns = 128;
constexpr int kTileRows = 8;
constexpr int kRankChunk = 32;
constexpr int64_t kSplitRows = 256;

template <typename g_t, typename w_t, typename acc_t>
__global__ void lowrank_project_kernel(const g_t* __restrict__ grad, const w_t* __restrict__ weight,
                                       const acc_t* __restrict__ left, const acc_t* __restrict__ right,
                                       acc_t* __restrict__ partial_left, acc_t* __restrict__ partial_right,
                                       int64_t rows, int64_t cols, int64_t rank, Combine rule) {
  __shared__ acc_t h_tile[kTileRows][kColumns];
  __shared__ acc_t r_tile[kRankChunk][kColumns + 1];  // +1: the (row, rank) pairs read it without bank conflicts
  const int t = threadIdx.x;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColumns) + t;
  const bool in_cols = c < cols;
  const int64_t o_begin = blockIdx.y * kSplitRows;
  const int64_t o_end = o_begin + kSplitRows < rows ? o_begin + kSplitRows : rows;
  for (int64_t a0 = 0; a0 < rank; a0 += kRankChunk) {
    const int chunk = static_cast<int>(rank - a0 < kRankChunk ? rank - a0 : kRankChunk);
    for (int a = 0; a < kRankChunk; ++a) r_tile[a][t] = in_cols && a < chunk ? right[(a0 + a) * cols + c] : acc_t(0);
    acc_t grad_right[kRankChunk];
#pragma unroll
    for (int a = 0; a < kRankChunk; ++a) grad_right[a] = acc_t(0);
    for (int64_t o0 = o_begin; o0 < o_end; o0 += kTileRows) {
      __syncthreads();  // the previous tile's readers are done with h_tile; r_tile is written
#pragma unroll
      for (int i = 0; i < kTileRows; ++i) {
        const int64_t o = o0 + i;
        acc_t h = acc_t(0);
        if (in_cols && o < o_end) {
          const int64_t idx = o * cols + c;
          acc_t e = acc_t(0);
          if (rule == Combine::Exp) {
            for (int64_t a = 0; a < rank; ++a) e = fma(left[o * rank + a], right[a * cols + c], e);
          }
          const acc_t w = rule == Combine::Add ? acc_t(0) : static_cast<acc_t>(weight[idx]);
          h = update_grad<acc_t>(rule, static_cast<acc_t>(grad[idx]), w, e);
#pragma unroll
          for (int a = 0; a < kRankChunk; ++a) {
            if (a < chunk) grad_right[a] = fma(left[o * rank + a0 + a], h, grad_right[a]);
          }
        }
        h_tile[i][t] = h;
      }
      __syncthreads();
      for (int p = t; p < kTileRows * kRankChunk; p += kColumns) {
        const int i = p / kRankChunk, a = p % kRankChunk;
        if (o0 + i < o_end && a < chunk) {
          acc_t s = acc_t(0);
          for (int k = 0; k < kColumns; ++k) s = fma(h_tile[i][k], r_tile[a][k], s);
          partial_left[(blockIdx.x * rows + o0 + i) * rank + a0 + a] = s;
        }
      }
    }
    if (in_cols) {
#pragma unroll
      for (int a = 0; a < kRankChunk; ++a) {
        if (a < chunk) partial_right[(blockIdx.y * rank + a0 + a) * cols + c] = grad_right[a];
      }
    }
    __syncthreads();  // every reader of r_tile is done before the next rank chunk overwrites it
  }
}

void lowrank_project_cuda(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                          const at::Tensor& right, c10::string_view combine, at::Tensor& grad_left,
                          at::Tensor& grad_right) {
  constexpr const char* op = "lrtensor::lowrank_project";
  const Combine rule = parse_combine(op, combine);
  check_lowrank_project(grad, weight, left, right, grad_left, grad_right);
  if (weight.numel() == 0) {
    grad_left.zero_();
    grad_right.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t rows = weight.size(0), cols = right.size(1), rank = left.size(1);
  const int64_t col_blocks = (cols + kColumns - 1) / kColumns;
  const int64_t splits = (rows + kSplitRows - 1) / kSplitRows;
  const dim3 grid(blocks_for(cols, kColumns), grid_y(op, splits));
  at::Tensor partial_left = at::empty({col_blocks, rows, rank}, left.options());
  at::Tensor partial_right = at::empty({splits, rank, cols}, right.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lrtensor::lowrank_project", [&] {
    using w_t = scalar_t;
    using acc_t = typename Accumulate<w_t>::type;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "lrtensor::lowrank_project", [&] {
      lowrank_project_kernel<scalar_t, w_t, acc_t><<<grid, kColumns, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), weight.const_data_ptr<w_t>(), left.const_data_ptr<acc_t>(),
          right.const_data_ptr<acc_t>(), partial_left.data_ptr<acc_t>(), partial_right.data_ptr<acc_t>(), rows,
          cols, rank, rule);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sum_partials(partial_left.const_data_ptr<acc_t>(), col_blocks, rows * rank, grad_left.data_ptr<acc_t>(), stream);
    sum_partials(partial_right.const_data_ptr<acc_t>(), splits, rank * cols, grad_right.data_ptr<acc_t>(), stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CUDA, m) {
  m.impl("lowrank_project.out", &lowrank_project_cuda);
}

}  // namespace lrtensor::ops::cuda
