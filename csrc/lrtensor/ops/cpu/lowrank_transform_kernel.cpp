// CPU kernel of lrtensor::lowrank_transform.out (schema and semantics: ../lowrank_transform.cpp).
//
// Parallel over blocks of kBlockRows weight rows; each block walks the columns in chunks (the
// chunk of `right` stays in cache) and computes E for kTileRows rows and two vectors of columns
// at a time in registers, then combines it with W and stores W'. Elementwise, so the partition
// does not change any result.
#include "lowrank_tile.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

namespace lrtensor::ops::cpu {

namespace {

constexpr int64_t kBlockRows = 16;

template <typename acc_t, Combine kCombine, bool kDeltaOnly>
void transform_block(const RowView<acc_t>& weight, const RowView<acc_t>& out, const acc_t* left,
                     const acc_t* right, int64_t rows, int64_t cols, int64_t rank, int64_t o_begin, int64_t o_end) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  // `right`'s chunk is read from the second-level cache; long row segments keep the prefetchers on
  const int64_t chunk = column_chunk<acc_t>(rank, 64 * 1024);
  std::vector<acc_t> tile(kTileRows * rank), padded_right, w_buf(kTileRows * chunk), o_buf(kTileRows * chunk);
  for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
    const int64_t width = std::min(chunk, cols - c0);
    const int64_t padded = (width + 2 * V - 1) / (2 * V) * (2 * V);
    const RightChunk<acc_t> r = right_chunk(right, rank, cols, c0, width, padded, padded_right);
    for (int64_t o0 = o_begin; o0 < o_end; o0 += kTileRows) {
      const int64_t n_rows = std::min(kTileRows, o_end - o0);
      left_tile(left, rank, o0, n_rows, tile.data());
      const acc_t* w_row[kTileRows];
      acc_t* o_row[kTileRows];
      for (int64_t i = 0; i < n_rows; ++i) {
        w_row[i] = weight.read_segment(o0 + i, c0, width, w_buf.data() + i * chunk);
        o_row[i] = out.write_target(o0 + i, c0, o_buf.data() + i * chunk);
      }
      for (int64_t i = kTileRows; i < 2 * kTileRows && o0 + i < o_end; ++i) {
        prefetch(weight.at(o0 + i, c0), width * weight.elem_size);
      }
      for (int64_t c = 0; c < width; c += 2 * V) {
        Vec e[kTileRows][2];
        lowrank_product(tile.data(), r, rank, c, e);
        const int64_t n0 = std::min<int64_t>(V, width - c);
        const int64_t n1 = std::clamp<int64_t>(width - c - V, 0, V);
        for (int64_t i = 0; i < n_rows; ++i) {
          store_lanes(combine<kCombine, kDeltaOnly>(load_lanes(w_row[i] + c, n0), e[i][0]), o_row[i] + c, n0);
          if (n1 > 0) {
            store_lanes(combine<kCombine, kDeltaOnly>(load_lanes(w_row[i] + c + V, n1), e[i][1]), o_row[i] + c + V,
                        n1);
          }
        }
      }
      for (int64_t i = 0; i < n_rows; ++i) out.commit_segment(o0 + i, c0, width, o_row[i]);
    }
  }
}

template <typename acc_t>
void transform(const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right, Combine combine,
               bool delta_only, at::Tensor& out) {
  const int64_t rows = weight.size(0);
  const int64_t cols = right.size(1);
  const int64_t rank = left.size(1);
  const RowView<acc_t> w(weight, cols), o(out, cols);
  const acc_t* l = left.const_data_ptr<acc_t>();
  const acc_t* r = right.const_data_ptr<acc_t>();
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  // at least about 32k elements per thread, or the threads cost more than they save
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, kBlockRows * cols));
  dispatch_combine(combine, delta_only, [&]<Combine kCombine, bool kDeltaOnly>() {
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        transform_block<acc_t, kCombine, kDeltaOnly>(w, o, l, r, rows, cols, rank, b * kBlockRows,
                                                     std::min(rows, (b + 1) * kBlockRows));
      }
    });
  });
}

void lowrank_transform_cpu(const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
                           c10::string_view combine, bool delta_only, at::Tensor& out) {
  const Combine rule = parse_combine("lrtensor::lowrank_transform", combine);
  check_lowrank_transform(weight, left, right, out);
  if (weight.numel() == 0) return;
  if (weight.scalar_type() == at::kDouble) {
    transform<double>(weight, left, right, rule, delta_only, out);
  } else {
    transform<float>(weight, left, right, rule, delta_only, out);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CPU, m) {
  m.impl("lowrank_transform.out", &lowrank_transform_cpu);
}

}  // namespace lrtensor::ops::cpu
