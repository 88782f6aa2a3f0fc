// CPU kernel of lrtensor::channel_dot.out (schema and semantics: ../channel_dot.cpp).
//
// The input is read as (outer, channels, inner). Two stages, deterministic at any thread count:
// 1. Tasks of kBlockOuter outer rows x one chunk of channels (a partition that depends only on the
//    shape) each write one partial sum per channel into partial[block][channel].
// 2. The partials of each channel are added in the order of their block.
// Products and sums run in float64 whatever the input dtype: the pass is bound by memory bandwidth
// (two reads per product), so the wider accumulator costs nothing and keeps long sums exact enough.
#include "lowrank_tile.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops::cpu {

namespace {

constexpr int64_t kBlockOuter = 64;
constexpr int64_t kTaskElements = 1 << 16;

using Vec = Vectorized<double>;
constexpr int64_t V = Vec::size();

// Up to kRun elements of a row converted to float64 at a time.
constexpr int64_t kRun = 256;

struct Inputs {
  RowView<double> a, b;  // rows of one (outer, channel) pair (inner > 1) or of one outer index (inner == 1)
};

// partial[c] += sum_{o in rows, i} a[o, c, i] * b[o, c, i] for the channels [c_begin, c_end), inner > 1.
void dot_runs(const Inputs& in, const ChannelLayout& s, int64_t o_begin, int64_t o_end, int64_t c_begin,
              int64_t c_end, double* partial) {
  alignas(64) double a_buf[kRun], b_buf[kRun];
  for (int64_t c = c_begin; c < c_end; ++c) {
    Vec acc(0.0);
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int64_t row = o * s.channels + c;
      for (int64_t i0 = 0; i0 < s.inner; i0 += kRun) {
        const int64_t n = std::min(kRun, s.inner - i0);
        const double* x = in.a.read_segment(row, i0, n, a_buf);
        const double* y = in.b.read_segment(row, i0, n, b_buf);
        for (int64_t i = 0; i < n; i += V) {
          const int64_t m = std::min<int64_t>(V, n - i);
          acc = at::vec::fmadd(load_lanes(x + i, m), load_lanes(y + i, m), acc);
        }
      }
    }
    alignas(64) double lanes[V];
    acc.store(lanes);
    double sum = 0;
    for (int64_t k = 0; k < V; ++k) sum += lanes[k];
    partial[c] = sum;
  }
}

// partial[c] = sum_{o in rows} a[o, c] * b[o, c] for the channels [c_begin, c_end), inner == 1.
void dot_columns(const Inputs& in, int64_t o_begin, int64_t o_end, int64_t c_begin, int64_t c_end,
                 double* partial) {
  alignas(64) double a_buf[kRun], b_buf[kRun];
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kRun) {
    const int64_t n = std::min(kRun, c_end - c0);
    std::fill(partial + c0, partial + c0 + n, 0.0);
    for (int64_t o = o_begin; o < o_end; ++o) {
      const double* x = in.a.read_segment(o, c0, n, a_buf);
      const double* y = in.b.read_segment(o, c0, n, b_buf);
      for (int64_t i = 0; i < n; i += V) {
        const int64_t m = std::min<int64_t>(V, n - i);
        store_lanes(at::vec::fmadd(load_lanes(x + i, m), load_lanes(y + i, m), load_lanes(partial + c0 + i, m)),
                    partial + c0 + i, m);
      }
    }
  }
}

void channel_dot_cpu(const at::Tensor& a, const at::Tensor& b, int64_t channel_dim, at::Tensor& out) {
  const int64_t dim = check_channel_dot(a, b, channel_dim, out);
  const ChannelLayout s = channel_layout(a, dim);
  if (s.channels == 0) return;
  if (s.outer * s.inner == 0) {
    out.zero_();
    return;
  }
  // rows of `a` as the kernels walk them: (outer * channels) rows of `inner` (inner > 1) or `outer`
  // rows of `channels` (inner == 1)
  const int64_t row_len = s.inner > 1 ? s.inner : s.channels;
  const Inputs in{RowView<double>(a, row_len), RowView<double>(b, row_len)};
  const int64_t blocks = (s.outer + kBlockOuter - 1) / kBlockOuter;
  const int64_t block_elements = std::min(s.outer, kBlockOuter) * s.inner;
  const int64_t chunk = std::max<int64_t>(1, kTaskElements / block_elements);
  const int64_t chunks = (s.channels + chunk - 1) / chunk;
  at::Tensor partial = at::empty({blocks, s.channels}, a.options().dtype(at::kDouble));
  double* p = partial.data_ptr<double>();
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = t / chunks, c_begin = (t % chunks) * chunk;
      const int64_t o_begin = block * kBlockOuter, o_end = std::min(s.outer, o_begin + kBlockOuter);
      const int64_t c_end = std::min(s.channels, c_begin + chunk);
      double* row = p + block * s.channels;
      if (s.inner > 1) {
        dot_runs(in, s, o_begin, o_end, c_begin, c_end, row);
      } else {
        dot_columns(in, o_begin, o_end, c_begin, c_end, row);
      }
    }
  });
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lrtensor::channel_dot", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t c = 0; c < s.channels; ++c) {
      double sum = p[c];
      for (int64_t k = 1; k < blocks; ++k) sum += p[k * s.channels + c];
      o[c] = static_cast<scalar_t>(sum);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CPU, m) {
  m.impl("channel_dot.out", &channel_dot_cpu);
}

}  // namespace lrtensor::ops::cpu
