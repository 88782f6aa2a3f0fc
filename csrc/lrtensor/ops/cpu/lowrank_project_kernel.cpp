// CPU kernel of lrtensor::lowrank_project.out (schema and semantics: ../lowrank_project.cpp).
//
// Two stages, deterministic at any thread count:
// 1. The (O, C) weight is cut into strips of rows x segments of columns (`partition`: it depends
//    only on the shapes, never on the thread count). Each tile, on one thread, forms H tile by tile
//    of kTileRows rows and one column chunk, and writes its own partial sums: H @ right^T over its
//    columns (into partial_left[segment]) and left^T @ H over its rows (into partial_right[strip]).
// 2. The partials are added in the order of their index, elementwise in parallel.
// With one strip (or one segment) the tiles write grad_right (grad_left) directly.
//
// The same kernel serves lrtensor::lowrank_project_transform.out (../lowrank_project_transform.cpp):
// each tile then also stores W' (or W' - W) for its elements, from the E and exp(E) it computes for H
// anyway, so a backward that needs both W' and the projection reads the weight once.
#include "lowrank_tile.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lrtensor::ops::cpu {

namespace {

// Strips of at most kStripRows rows; segments of equal width (a multiple of two vectors), at most
// kSegmentCols columns, and more of them (down to kMinSegmentCols columns) while the tiles number
// fewer than kMinTiles, so that a few threads share mid-sized weights (a 256 x 2304 weight was three
// tiles of 1024, 1024 and 256 columns: on two threads 8/9 of the work on one). Columns, not rows,
// are split further: a segment costs a partial grad_left (rows x rank), small next to its tile, and
// keeps the strip's per-chunk work (copying `right`, storing grad_right) spread over kStripRows rows.
constexpr int64_t kStripRows = 256;
constexpr int64_t kSegmentCols = 1024;
constexpr int64_t kMinSegmentCols = 256;
constexpr int64_t kMinTiles = 16;

struct Partition {
  int64_t strips, strip_rows, segments, segment_cols;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Partition partition(int64_t rows, int64_t cols) {
  constexpr int64_t col_step = 2 * Vectorized<float>::size();
  const int64_t strips = ceil_div(rows, kStripRows);
  const int64_t wanted = std::min(ceil_div(kMinTiles, strips), cols / kMinSegmentCols);
  const int64_t segments = std::max(ceil_div(cols, kSegmentCols), wanted);
  const int64_t segment_cols = ceil_div(ceil_div(cols, segments), col_step) * col_step;
  return {strips, kStripRows, ceil_div(cols, segment_cols), segment_cols};
}

template <typename acc_t>
struct ProjectArgs {
  RowView<acc_t> grad, weight, out;  // out: W' (lowrank_project_transform), unused otherwise
  const acc_t* left;
  const acc_t* right;
  int64_t rows, cols, rank;
  Partition tiles;
  acc_t* partial_left;   // [segments][rows][rank]
  acc_t* partial_right;  // [strips][rank][cols]
};

template <typename acc_t>
inline acc_t sum_lanes(const Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

template <typename acc_t, Combine kCombine, bool kWritesWeight, bool kDeltaOnly>
void project_tile(const ProjectArgs<acc_t>& p, int64_t strip, int64_t segment) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr bool kReadsWeight = kCombine != Combine::Add || kWritesWeight;
  constexpr bool kNeedsUpdate = kCombine == Combine::Exp || kWritesWeight;
  const int64_t rank = p.rank;
  const int64_t o_begin = strip * p.tiles.strip_rows, o_end = std::min(p.rows, o_begin + p.tiles.strip_rows);
  const int64_t c_begin = segment * p.tiles.segment_cols, c_end = std::min(p.cols, c_begin + p.tiles.segment_cols);
  // `right`'s chunk and the grad_right chunk stay in the first-level cache
  const int64_t chunk = column_chunk<acc_t>(rank, 12 * 1024);
  std::vector<acc_t> tile(kTileRows * rank), padded_right, g_buf(kTileRows * chunk), w_buf(kTileRows * chunk);
  std::vector<acc_t> h(kTileRows * chunk), grad_right_chunk(rank * chunk), o_buf(kWritesWeight ? kTileRows * chunk : 0);
  std::vector<acc_t> grad_left((o_end - o_begin) * rank, acc_t(0));
  for (int64_t c0 = c_begin; c0 < c_end; c0 += chunk) {
    const int64_t width = std::min(chunk, c_end - c0);
    const int64_t padded = (width + 2 * V - 1) / (2 * V) * (2 * V);
    const RightChunk<acc_t> r = right_chunk(p.right, rank, p.cols, c0, width, padded, padded_right);
    std::fill(grad_right_chunk.begin(), grad_right_chunk.begin() + rank * padded, acc_t(0));
    for (int64_t o0 = o_begin; o0 < o_end; o0 += kTileRows) {
      const int64_t n_rows = std::min(kTileRows, o_end - o0);
      left_tile(p.left, rank, o0, n_rows, tile.data());
      // H for kTileRows rows of this chunk; zero in the rows and columns beyond the weight
      const acc_t* g_row[kTileRows];
      const acc_t* w_row[kTileRows];
      acc_t* o_row[kTileRows];
      for (int64_t i = 0; i < n_rows; ++i) {
        g_row[i] = p.grad.read_segment(o0 + i, c0, width, g_buf.data() + i * chunk);
        w_row[i] = kReadsWeight ? p.weight.read_segment(o0 + i, c0, width, w_buf.data() + i * chunk) : nullptr;
        if constexpr (kWritesWeight) o_row[i] = p.out.write_target(o0 + i, c0, o_buf.data() + i * chunk);
      }
      for (int64_t i = kTileRows; i < 2 * kTileRows && o0 + i < o_end; ++i) {
        prefetch(p.grad.at(o0 + i, c0), width * p.grad.elem_size);
        if (kReadsWeight) prefetch(p.weight.at(o0 + i, c0), width * p.weight.elem_size);
      }
      for (int64_t c = 0; c < padded; c += 2 * V) {
        Vec e[kTileRows][2];
        if constexpr (kNeedsUpdate) lowrank_product(tile.data(), r, rank, c, e);
        for (int64_t i = 0; i < kTileRows; ++i) {
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t n = std::clamp<int64_t>(width - c - j * V, 0, V);
            Vec hv(acc_t(0));
            if (i < n_rows && n > 0) {
              const Vec g = load_lanes(g_row[i] + c + j * V, n);
              if constexpr (kWritesWeight) {
                const Vec w = load_lanes(w_row[i] + c + j * V, n);
                if constexpr (kCombine == Combine::Exp) {
                  // one exp for both, in the order update_grad and combine use
                  const Vec ex = e[i][j].exp();
                  hv = g * w * ex;
                  store_lanes(kDeltaOnly ? w * e[i][j].expm1() : w * ex, o_row[i] + c + j * V, n);
                } else {
                  hv = kCombine == Combine::Add ? g : update_grad<kCombine>(g, w, e[i][j]);
                  store_lanes(combine<kCombine, kDeltaOnly>(w, e[i][j]), o_row[i] + c + j * V, n);
                }
              } else {
                hv = kReadsWeight ? update_grad<kCombine>(g, load_lanes(w_row[i] + c + j * V, n), e[i][j]) : g;
              }
            }
            hv.store(h.data() + i * chunk + c + j * V);
          }
        }
      }
      if constexpr (kWritesWeight) {
        for (int64_t i = 0; i < n_rows; ++i) p.out.commit_segment(o0 + i, c0, width, o_row[i]);
      }
      // grad_left[o, a] += H[o, chunk] . right[a, chunk]; grad_right[a, chunk] += sum_o left[o, a] H[o, chunk]
      const acc_t* h0 = h.data();
      const acc_t* h1 = h0 + chunk;
      const acc_t* h2 = h1 + chunk;
      const acc_t* h3 = h2 + chunk;
      for (int64_t a = 0; a < rank; ++a) {
        Vec dot0(acc_t(0)), dot1(acc_t(0)), dot2(acc_t(0)), dot3(acc_t(0));
        const Vec l0(tile[a]), l1(tile[rank + a]), l2(tile[2 * rank + a]), l3(tile[3 * rank + a]);
        const acc_t* r_row = r.data + a * r.stride;
        acc_t* gr = grad_right_chunk.data() + a * padded;
        for (int64_t c = 0; c < padded; c += V) {
          const Vec rv = Vec::loadu(r_row + c);
          const Vec v0 = Vec::loadu(h0 + c), v1 = Vec::loadu(h1 + c), v2 = Vec::loadu(h2 + c), v3 = Vec::loadu(h3 + c);
          dot0 = at::vec::fmadd(v0, rv, dot0);
          dot1 = at::vec::fmadd(v1, rv, dot1);
          dot2 = at::vec::fmadd(v2, rv, dot2);
          dot3 = at::vec::fmadd(v3, rv, dot3);
          Vec acc = Vec::loadu(gr + c);
          acc = at::vec::fmadd(l0, v0, acc);
          acc = at::vec::fmadd(l1, v1, acc);
          acc = at::vec::fmadd(l2, v2, acc);
          acc = at::vec::fmadd(l3, v3, acc);
          acc.store(gr + c);
        }
        acc_t* gl = grad_left.data() + (o0 - o_begin) * rank + a;
        const Vec dots[kTileRows] = {dot0, dot1, dot2, dot3};
        for (int64_t i = 0; i < n_rows; ++i) gl[i * rank] += sum_lanes(dots[i]);
      }
    }
    acc_t* out_right = p.partial_right + strip * rank * p.cols;
    for (int64_t a = 0; a < rank; ++a) {
      std::memcpy(out_right + a * p.cols + c0, grad_right_chunk.data() + a * padded, width * sizeof(acc_t));
    }
  }
  std::memcpy(p.partial_left + (segment * p.rows + o_begin) * rank, grad_left.data(),
              grad_left.size() * sizeof(acc_t));
}

// out[k] = sum_s partials[s * n + k] for s = 0, 1, ... in order.
template <typename acc_t>
void sum_partials(const acc_t* partials, int64_t count, int64_t n, acc_t* out) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t s = partials[k];
      for (int64_t i = 1; i < count; ++i) s += partials[i * n + k];
      out[k] = s;
    }
  });
}

// `out` defined: also W' (or W' - W with `delta_only`) into it (lowrank_project_transform).
template <typename acc_t>
void project(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left, const at::Tensor& right,
             Combine combine, at::Tensor& grad_left, at::Tensor& grad_right, const at::Tensor& out = at::Tensor(),
             bool delta_only = false) {
  const int64_t rows = left.size(0), rank = left.size(1), cols = right.size(1);
  const Partition tiles = partition(rows, cols);
  const int64_t strips = tiles.strips, segments = tiles.segments;
  at::Tensor partial_left = segments == 1 ? grad_left : at::empty({segments, rows, rank}, left.options());
  at::Tensor partial_right = strips == 1 ? grad_right : at::empty({strips, rank, cols}, right.options());
  const bool writes = out.defined();
  const ProjectArgs<acc_t> args{RowView<acc_t>(grad, cols), RowView<acc_t>(weight, cols),
                                RowView<acc_t>(writes ? out : weight, cols), left.const_data_ptr<acc_t>(),
                                right.const_data_ptr<acc_t>(), rows, cols, rank, tiles,
                                partial_left.data_ptr<acc_t>(), partial_right.data_ptr<acc_t>()};
  dispatch_combine(combine, delta_only, [&]<Combine kCombine, bool kDeltaOnly>() {
    at::parallel_for(0, strips * segments, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (writes) {
          project_tile<acc_t, kCombine, true, kDeltaOnly>(args, t / segments, t % segments);
        } else {
          project_tile<acc_t, kCombine, false, false>(args, t / segments, t % segments);
        }
      }
    });
  });
  if (segments > 1) sum_partials(args.partial_left, segments, rows * rank, grad_left.data_ptr<acc_t>());
  if (strips > 1) sum_partials(args.partial_right, strips, rank * cols, grad_right.data_ptr<acc_t>());
}

void lowrank_project_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                         const at::Tensor& right, c10::string_view combine, at::Tensor& grad_left,
                         at::Tensor& grad_right) {
  const Combine rule = parse_combine("lrtensor::lowrank_project", combine);
  check_lowrank_project(grad, weight, left, right, grad_left, grad_right);
  if (weight.numel() == 0) {
    grad_left.zero_();
    grad_right.zero_();
  } else if (weight.scalar_type() == at::kDouble) {
    project<double>(grad, weight, left, right, rule, grad_left, grad_right);
  } else {
    project<float>(grad, weight, left, right, rule, grad_left, grad_right);
  }
}

void lowrank_project_transform_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& left,
                                   const at::Tensor& right, c10::string_view combine, bool delta_only,
                                   at::Tensor& grad_left, at::Tensor& grad_right, at::Tensor& out) {
  const Combine rule = parse_combine("lrtensor::lowrank_project_transform", combine);
  check_lowrank_project_transform(grad, weight, left, right, grad_left, grad_right, out);
  if (weight.numel() == 0) {
    grad_left.zero_();
    grad_right.zero_();
  } else if (weight.scalar_type() == at::kDouble) {
    project<double>(grad, weight, left, right, rule, grad_left, grad_right, out, delta_only);
  } else {
    project<float>(grad, weight, left, right, rule, grad_left, grad_right, out, delta_only);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lrtensor, CPU, m) {
  m.impl("lowrank_project.out", &lowrank_project_cpu);
  m.impl("lowrank_project_transform.out", &lowrank_project_transform_cpu);
}

}  // namespace lrtensor::ops::cpu
