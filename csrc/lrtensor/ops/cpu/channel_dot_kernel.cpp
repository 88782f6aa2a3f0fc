// CPU kernel of lrtensor::channel_dot.out (schema and semantics: ../channel_dot.cpp).
//
// The input is read as (outer, channels, inner). Two stages, deterministic at any thread count:
// 1. Tasks of kBlockOuter outer rows x one chunk of channels (a partition that depends only on the
//    shape) each write one partial sum per channel into partial[block][channel].
// 2. The partials of each channel are added in the order of their block.
// Products and sums run in float64 whatever the input dtype: the pass is bound by memory bandwidth
// (two reads per product), so the wider accumulator costs little and keeps long sums exact enough.
#include "lowrank_tile.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops::cpu {

namespace {

constexpr int64_t kBlockOuter = 64;
constexpr int64_t kTaskElements = 1 << 16;

// partial[c] = sum_{o in rows, i} a[o, c, i] * b[o, c, i] for the channels [c_begin, c_end), inner > 1;
// four running sums per run (added in a fixed order at the end) for instruction-level parallelism.
template <typename scalar_t>
void dot_runs(const scalar_t* a, const scalar_t* b, const AroundDim& s, int64_t o_begin, int64_t o_end,
              int64_t c_begin, int64_t c_end, double* partial) {
  for (int64_t c = c_begin; c < c_end; ++c) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t o = o_begin; o < o_end; ++o) {
      const scalar_t* x = a + (o * s.size + c) * s.inner;
      const scalar_t* y = b + (o * s.size + c) * s.inner;
      int64_t i = 0;
      for (; i + 4 <= s.inner; i += 4) {
        s0 += static_cast<double>(x[i]) * static_cast<double>(y[i]);
        s1 += static_cast<double>(x[i + 1]) * static_cast<double>(y[i + 1]);
        s2 += static_cast<double>(x[i + 2]) * static_cast<double>(y[i + 2]);
        s3 += static_cast<double>(x[i + 3]) * static_cast<double>(y[i + 3]);
      }
      for (; i < s.inner; ++i) s0 += static_cast<double>(x[i]) * static_cast<double>(y[i]);
    }
    partial[c] = (s0 + s1) + (s2 + s3);
  }
}

// partial[c] = sum_{o in rows} a[o, c] * b[o, c] for the channels [c_begin, c_end), inner == 1
// (elementwise along the channels: the compiler vectorises it).
template <typename scalar_t>
void dot_columns(const scalar_t* a, const scalar_t* b, int64_t channels, int64_t o_begin, int64_t o_end,
                 int64_t c_begin, int64_t c_end, double* partial) {
  std::fill(partial + c_begin, partial + c_end, 0.0);
  for (int64_t o = o_begin; o < o_end; ++o) {
    const scalar_t* x = a + o * channels;
    const scalar_t* y = b + o * channels;
    for (int64_t c = c_begin; c < c_end; ++c) partial[c] += static_cast<double>(x[c]) * static_cast<double>(y[c]);
  }
}

void channel_dot_cpu(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, at::Tensor& out) {
  const int64_t dim = check_channel_dot(a, b, channel_dim, out);
  const AroundDim s = around_dim(a, dim);
  if (s.size == 0) return;
  if (s.outer * s.inner == 0) {
    out.zero_();
    return;
  }
  const int64_t blocks = (s.outer + kBlockOuter - 1) / kBlockOuter;
  const int64_t block_elements = std::min(s.outer, kBlockOuter) * s.inner;
  const int64_t chunk = std::max<int64_t>(1, kTaskElements / block_elements);
  const int64_t chunks = (s.size + chunk - 1) / chunk;
  at::Tensor partial = at::empty({blocks, s.size}, a.options().dtype(at::kDouble));
  double* p = partial.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lrtensor::channel_dot", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t block = t / chunks, c_begin = (t % chunks) * chunk;
        const int64_t o_begin = block * kBlockOuter, o_end = std::min(s.outer, o_begin + kBlockOuter);
        const int64_t c_end = std::min(s.size, c_begin + chunk);
        double* row = p + block * s.size;
        if (s.inner > 1) {
          dot_runs(ap, bp, s, o_begin, o_end, c_begin, c_end, row);
        } else {
          dot_columns(ap, bp, s.size, o_begin, o_end, c_begin, c_end, row);
        }
      }
    });
  });
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lrtensor::channel_dot", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t c = 0; c < s.size; ++c) {
      double sum = p[c];
      for (int64_t k = 1; k < blocks; ++k) sum += p[k * s.size + c];
      o[c] = static_cast<scalar_t>(sum);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CPU, m) {
  m.impl("channel_dot.out", &channel_dot_cpu);
}

}  // namespace lrtensor::ops::cpu
