// Bindings and argument checks for the graph ops: influence, threshold selection, top-k edges and
// the pruning helpers. Every entry point re-checks its scalars and pointers (the Python layer has
// already validated the tensors) and reports problems as ValueError naming the argument.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "common.h"
#include "graph.h"
#include "ops.h"

#ifdef FASTATTR_WITH_CUDA
#include "graph_kernels.cuh"
#endif

namespace py = pybind11;

namespace fastattr {

namespace {

template <typename T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check_square(std::int64_t n, std::int64_t lda, const char* arg) {
  if (n < 0) fail(arg, ": expected a non-negative size, got ", n);
  if (n > INT32_MAX - 1) fail(arg, ": expected fewer than 2^31 - 1 nodes, got ", n);
  if (n > 0 && lda < n) fail(arg, ": expected a row stride >= ", n, ", got ", lda);
}

void check_eps(float eps) {
  if (!(eps > 0.0f) || !std::isfinite(eps)) fail("eps: expected a positive finite value, got ", eps);
}

void check_max_iter(std::int64_t max_iter) {
  if (max_iter < 0) fail("max_iter: expected a non-negative integer, got ", max_iter);
}

void check_threshold(double t) {
  if (!std::isfinite(t)) fail("threshold: expected a finite number, got ", t);
}

py::tuple influence_result(const InfluenceResult& r) {
  return py::make_tuple(r.status, r.n_waves, r.depth, r.edge_sum, r.edge_nnz, r.edge_min);
}

// The pruned graph's edge scores |A_ij| / row_scale_i * row_factor_i (node-masked), read on the fly
// by the edge select / histogram / mask entry points: the same inputs, checked one way.
void check_edge_score_inputs(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t node_mask,
                             std::uintptr_t row_scale, std::uintptr_t row_factor) {
  check_dtype(a_dtype, kFloat32, "A");
  check_square(n, lda, "A");
  check_nonnull(a, n * n, "A");
  check_nonnull(node_mask, n, "node_mask");
  check_nonnull(row_scale, n, "row_scale");
  check_nonnull(row_factor, n, "row_factor");
}

InfluenceArgs make_influence_args(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t w,
                                  std::uintptr_t out, bool normalize, float eps, std::uintptr_t node_mask,
                                  std::int64_t max_iter, std::uintptr_t order, std::uintptr_t wave_ptr,
                                  bool reuse_order, std::int64_t n_waves, std::uintptr_t row_scale,
                                  std::uintptr_t row_factor, std::uintptr_t row_blocks) {
  check_dtype(a_dtype, kFloat32, "A");
  check_square(n, lda, "A");
  check_nonnull(a, n * n, "A");
  check_nonnull(w, n, "logit_weights");
  check_nonnull(out, n, "out");
  check_eps(eps);
  check_max_iter(max_iter);
  if ((order == 0) != (wave_ptr == 0)) fail("order/wave_ptr: expected both or neither, got only one");
  if (reuse_order) {
    if (order == 0) fail("order: expected the waves of an earlier call when reuse_order is set, got none");
    if (n_waves < 0 || n_waves > n) fail("n_waves: expected a value in [0, ", n, "], got ", n_waves);
    const std::int32_t* wp = as_ptr<const std::int32_t>(wave_ptr);
    const std::int32_t* ord = as_ptr<const std::int32_t>(order);
    if (n > 0 && (wp[0] != 0 || wp[n_waves] != n))
      fail("wave_ptr: expected offsets from 0 to ", n, ", got ", wp[0], " to ", wp[n_waves]);
    for (std::int64_t k = 0; k < n_waves; ++k)
      if (wp[k] > wp[k + 1]) fail("wave_ptr: expected non-decreasing offsets, got a decrease at wave ", k);
    for (std::int64_t k = 0; k < n; ++k)
      if (ord[k] < 0 || ord[k] >= n) fail("order: expected node indices in [0, ", n, "), got ", ord[k]);
  }
  InfluenceArgs args{};
  args.a = as_ptr<const float>(a);
  args.n = n;
  args.lda = lda;
  args.w = as_ptr<const float>(w);
  args.out = as_ptr<float>(out);
  args.normalize = normalize;
  args.eps = eps;
  args.node_mask = as_ptr<const std::uint8_t>(node_mask);
  args.max_iter = max_iter;
  args.order = as_ptr<std::int32_t>(order);
  args.wave_ptr = as_ptr<std::int32_t>(wave_ptr);
  args.reuse_order = reuse_order;
  args.n_waves = n_waves;
  args.row_scale = as_ptr<float>(row_scale);
  args.row_factor = as_ptr<float>(row_factor);
  args.edge_hist = nullptr;
  args.row_blocks = as_ptr<std::uint64_t>(row_blocks);
  return args;
}

}  // namespace

void register_graph_ops(py::module_& m) {
  m.attr("select_levels") = kSelectLevels;
  m.attr("block_cols") = 64;
  m.attr("cols_per_block_word") = 64 * 64;
  m.attr("select_shift") = py::make_tuple(kSelectShift[0], kSelectShift[1], kSelectShift[2]);
  m.attr("select_bits") = py::make_tuple(kSelectBits[0], kSelectBits[1], kSelectBits[2]);

  m.def(
      "influence_dense_cpu",
      [](std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t w, std::uintptr_t out,
         bool normalize, float eps, std::uintptr_t node_mask, std::int64_t max_iter, std::uintptr_t order,
         std::uintptr_t wave_ptr, bool reuse_order, std::int64_t n_waves, std::uintptr_t row_scale,
         std::uintptr_t row_factor, std::uintptr_t hist_count, std::uintptr_t hist_sum, std::uintptr_t row_blocks) {
        InfluenceArgs args = make_influence_args(a, a_dtype, n, lda, w, out, normalize, eps, node_mask, max_iter,
                                                 order, wave_ptr, reuse_order, n_waves, row_scale, row_factor,
                                                 row_blocks);
        if ((hist_count == 0) != (hist_sum == 0)) fail("hist: expected both count and sum buffers, got one");
        if (hist_count != 0 && (!normalize || node_mask == 0))
          fail("hist: edge scores need normalize=True and a node_mask");
        SelectHist hist;
        if (hist_count != 0) args.edge_hist = &hist;
        InfluenceResult r;
        {
          py::gil_scoped_release nogil;
          r = influence_dense_cpu(args);
        }
        if (hist_count != 0) {
          std::memcpy(as_ptr<void>(hist_count), hist.count, sizeof hist.count);
          std::memcpy(as_ptr<void>(hist_sum), hist.sum, sizeof hist.sum);
        }
        return influence_result(r);
      },
      "sum_{k>=1} w A^k on a dense float32 matrix (|A| row-normalised when normalize); returns "
      "(status, n_waves, depth, edge_sum, edge_nnz, edge_min)");

  m.def(
      "partial_influence_cpu",
      [](std::uintptr_t e, int e_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lde, std::uintptr_t logit_p,
         std::int64_t n_logits, std::uintptr_t row_to_node, std::uintptr_t out, std::int64_t max_iter, float eps) {
        check_dtype(e_dtype, kFloat32, "edge_matrix");
        if (rows < 0 || cols < 0) fail("edge_matrix: expected non-negative sizes, got (", rows, ", ", cols, ")");
        if (rows > 0 && lde < cols) fail("edge_matrix: expected a row stride >= ", cols, ", got ", lde);
        if (n_logits < 0 || n_logits > cols) fail("logit_p: expected at most ", cols, " entries, got ", n_logits);
        check_nonnull(e, rows * cols, "edge_matrix");
        check_nonnull(logit_p, n_logits, "logit_p");
        check_nonnull(row_to_node, rows, "row_to_node_index");
        check_nonnull(out, cols, "out");
        check_eps(eps);
        check_max_iter(max_iter);
        const std::int64_t* idx = as_ptr<const std::int64_t>(row_to_node);
        for (std::int64_t r = 0; r < rows; ++r)
          if (idx[r] < 0 || idx[r] >= cols)
            fail("row_to_node_index: expected indices in [0, ", cols, "), got ", idx[r], " at row ", r);
        py::gil_scoped_release nogil;
        return partial_influence_cpu(as_ptr<const float>(e), rows, cols, lde, as_ptr<const float>(logit_p), n_logits,
                                     idx, as_ptr<float>(out), max_iter, eps);
      },
      "compute_partial_influences on host memory; returns the status (0 ok, 1 no convergence, 2 non-finite)");

  m.def(
      "select_threshold_cpu",
      [](std::uintptr_t scores, int dtype, std::int64_t n, double t, double rel_s, double dc, float s_fixed) {
        check_dtype(dtype, kFloat32, "scores");
        if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
        check_nonnull(scores, n, "scores");
        check_threshold(t);
        if (!(rel_s >= 0.0 && rel_s < 0.5)) fail("rel_s: expected a relative error in [0, 0.5), got ", rel_s);
        if (!(dc >= 0.0 && dc < 0.5)) fail("dc: expected a relative error in [0, 0.5), got ", dc);
        if (!std::isfinite(s_fixed)) fail("s_fixed: expected a finite total (<= 0: derive it), got ", s_fixed);
        SelectResult r;
        {
          py::gil_scoped_release nogil;
          r = select_threshold_1d(as_ptr<const float>(scores), n, (float)t, rel_s, dc, s_fixed);
        }
        return py::make_tuple(r.status, r.value, r.clamped);
      },
      "circuit-tracer's find_threshold by radix select; returns (status, value, clamped)");

  m.def(
      "edge_select_mask_cpu",
      [](std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t node_mask,
         std::uintptr_t row_scale, std::uintptr_t row_factor, std::uintptr_t hist_count, std::uintptr_t hist_sum,
         double total, std::int64_t nnz, float min_nz, double t, std::uintptr_t mask_out,
         std::int64_t max_candidates, std::uintptr_t row_blocks) {
        check_edge_score_inputs(a, a_dtype, n, lda, node_mask, row_scale, row_factor);
        check_nonnull(mask_out, n * n, "edge_mask");
        check_threshold(t);
        if ((hist_count == 0) != (hist_sum == 0)) fail("hist: expected both count and sum buffers, got one");
        if (nnz < 0 || nnz > n * n) fail("nnz: expected a value in [0, ", n * n, "], got ", nnz);
        if (!std::isfinite(total) || total < 0.0) fail("total: expected a finite non-negative sum, got ", total);
        if (max_candidates < 0) fail("max_candidates: expected a non-negative count, got ", max_candidates);
        SelectHist hist;
        EdgeSelectArgs args{};
        args.a = as_ptr<const float>(a);
        args.n = n;
        args.lda = lda;
        args.node_mask = as_ptr<const std::uint8_t>(node_mask);
        args.row_scale = as_ptr<const float>(row_scale);
        args.row_factor = as_ptr<const float>(row_factor);
        if (hist_count != 0) {
          std::memcpy(hist.count, as_ptr<const void>(hist_count), sizeof hist.count);
          std::memcpy(hist.sum, as_ptr<const void>(hist_sum), sizeof hist.sum);
          args.hist0 = &hist;
        }
        args.total = total;
        args.nnz = nnz;
        args.min_nz = min_nz;
        args.t = (float)t;
        args.mask_out = as_ptr<std::uint8_t>(mask_out);
        args.max_candidates = max_candidates;
        args.row_blocks = as_ptr<const std::uint64_t>(row_blocks);
        EdgeSelectResult r;
        {
          py::gil_scoped_release nogil;
          r = edge_select_mask_cpu(args);
        }
        return py::make_tuple(r.status, r.threshold, r.clamped, r.passes, r.candidates);
      },
      "Edge mask of the pruned graph by the fused cumulative threshold; returns "
      "(status, threshold, clamped, passes, candidates)");

  m.def(
      "remove_dangling_cpu",
      [](std::uintptr_t edge_mask, std::int64_t n, std::uintptr_t node_mask, std::int64_t n_features,
         std::int64_t n_fixed) {
        check_square(n, n, "edge_mask");
        check_nonnull(edge_mask, n * n, "edge_mask");
        check_nonnull(node_mask, n, "node_mask");
        if (n_features < 0 || n_features > n) fail("n_features: expected a value in [0, ", n, "], got ", n_features);
        if (n_fixed < 0 || n_fixed > n) fail("n_fixed: expected a value in [0, ", n, "], got ", n_fixed);
        py::gil_scoped_release nogil;
        return remove_dangling_cpu(as_ptr<std::uint8_t>(edge_mask), n, as_ptr<std::uint8_t>(node_mask), n_features,
                                   n_fixed);
      },
      "circuit-tracer's iterative removal of dangling nodes, in place; returns the number of rounds");

  m.def(
      "topk_count_cpu",
      [](std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
         std::uintptr_t row_len, std::uintptr_t row_abs_sum) {
        check_matrix(a, a_dtype, rows, cols, lda, "adjacency");
        check_nonnull(row_len, rows, "row_len");
        check_nonnull(row_abs_sum, rows, "row_abs_sum");
        int bad = 0;
        {
          py::gil_scoped_release nogil;
          topk_count_cpu(as_ptr<const float>(a), rows, cols, lda, k, as_ptr<std::int64_t>(row_len),
                         as_ptr<float>(row_abs_sum), &bad);
        }
        return bad != 0;
      },
      "Kept edges per row (min(k, nnz); k < 0 keeps all) and |A| row sums; returns whether a row was non-finite");

  m.def(
      "topk_fill_cpu",
      [](std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
         std::uintptr_t crow, std::int64_t nnz, std::uintptr_t col_out, std::uintptr_t val_out) {
        check_matrix(a, a_dtype, rows, cols, lda, "adjacency");
        check_nonnull(crow, rows + 1, "crow_indices");
        const std::int64_t* c = as_ptr<const std::int64_t>(crow);
        if (c[0] != 0 || c[rows] != nnz)
          fail("crow_indices: expected offsets from 0 to ", nnz, ", got ", c[0], " to ", c[rows]);
        for (std::int64_t i = 0; i < rows; ++i)
          if (c[i + 1] < c[i] || c[i + 1] - c[i] > cols)
            fail("crow_indices: expected non-decreasing offsets with rows of at most ", cols, " entries, row ", i,
                 " has ", c[i + 1] - c[i]);
        check_nonnull(col_out, nnz, "col_indices");
        check_nonnull(val_out, nnz, "values");
        py::gil_scoped_release nogil;
        topk_fill_cpu(as_ptr<const float>(a), rows, cols, lda, k, c, as_ptr<std::int64_t>(col_out),
                      as_ptr<float>(val_out));
      },
      "Fill the CSR rows counted by topk_count_cpu");
#ifdef FASTATTR_WITH_CUDA
  m.def(
      "row_abs_sum_cuda",
      [](std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t m_cols, std::int64_t lda, std::uintptr_t mask,
         std::uintptr_t out, std::uintptr_t stream) {
        check_dtype(a_dtype, kFloat32, "A");
        if (n < 0 || m_cols < 0) fail("A: expected non-negative sizes, got (", n, ", ", m_cols, ")");
        if (n > 0 && lda < m_cols) fail("A: expected a row stride >= ", m_cols, ", got ", lda);
        if (mask != 0 && n != m_cols) fail("mask: expected a square matrix with a node mask, got (", n, ", ", m_cols, ")");
        check_nonnull(a, n * m_cols, "A");
        check_nonnull(out, n, "out");
        row_abs_sum_cuda(as_ptr<const float>(a), n, m_cols, lda, as_ptr<const std::uint8_t>(mask), as_ptr<double>(out),
                         stream);
      },
      "out[i] = sum_j |A_ij| (double) on the device");
  m.def(
      "matvec_cuda",
      [](std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t m_cols, std::int64_t lda, std::uintptr_t y,
         std::uintptr_t mask, bool absolute, std::uintptr_t out, std::uintptr_t stream) {
        check_dtype(a_dtype, kFloat32, "A");
        if (n < 0 || m_cols < 0) fail("A: expected non-negative sizes, got (", n, ", ", m_cols, ")");
        if (n > 0 && lda < m_cols) fail("A: expected a row stride >= ", m_cols, ", got ", lda);
        if (mask != 0 && n != m_cols) fail("mask: expected a square matrix with a node mask, got (", n, ", ", m_cols, ")");
        check_nonnull(a, n * m_cols, "A");
        check_nonnull(y, n, "y");
        check_nonnull(out, m_cols, "out");
        matvec_cuda(as_ptr<const float>(a), n, m_cols, lda, as_ptr<const double>(y), as_ptr<const std::uint8_t>(mask),
                    absolute, as_ptr<double>(out), stream);
      },
      "out[j] = sum_i y_i * |A_ij| (or A_ij), double, on the device");
  m.def(
      "hist_1d_cuda",
      [](std::uintptr_t scores, int dtype, std::int64_t n, int level, std::uint32_t prefix, std::uintptr_t count,
         std::uintptr_t sums, std::uintptr_t stats, std::uintptr_t stream) {
        check_dtype(dtype, kFloat32, "scores");
        if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
        if (level < 0 || level >= kSelectLevels) fail("level: expected 0..", kSelectLevels - 1, ", got ", level);
        check_nonnull(scores, n, "scores");
        check_nonnull(count, 1, "count");
        check_nonnull(sums, 1, "sums");
        check_nonnull(stats, 1, "stats");
        hist_1d_cuda(as_ptr<const float>(scores), n, kSelectShift[level], kSelectBits[level], prefix, level,
                     as_ptr<std::int64_t>(count), as_ptr<double>(sums), as_ptr<std::int64_t>(stats), stream);
      },
      "One radix-select level over a 1-D float32 tensor on the device");
  m.def(
      "edge_hist_cuda",
      [](std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t mask, std::uintptr_t scale,
         std::uintptr_t factor, int level, std::uint32_t prefix, std::uintptr_t count, std::uintptr_t sums,
         std::uintptr_t stats, std::uintptr_t stream) {
        check_edge_score_inputs(a, a_dtype, n, lda, mask, scale, factor);
        if (level < 0 || level >= kSelectLevels) fail("level: expected 0..", kSelectLevels - 1, ", got ", level);
        check_nonnull(count, 1, "count");
        check_nonnull(sums, 1, "sums");
        check_nonnull(stats, 1, "stats");
        edge_hist_cuda(as_ptr<const float>(a), n, lda, as_ptr<const std::uint8_t>(mask), as_ptr<const float>(scale),
                       as_ptr<const float>(factor), kSelectShift[level], kSelectBits[level], prefix, level,
                       as_ptr<std::int64_t>(count), as_ptr<double>(sums), as_ptr<std::int64_t>(stats), stream);
      },
      "One radix-select level over the pruned graph's edge scores, computed on the fly on the device");
  m.def(
      "edge_mask_cuda",
      [](std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t mask, std::uintptr_t scale,
         std::uintptr_t factor, double thr, std::uintptr_t out, std::uintptr_t stream) {
        check_edge_score_inputs(a, a_dtype, n, lda, mask, scale, factor);
        check_nonnull(out, n * n, "edge_mask");
        if (!std::isfinite(thr)) fail("thr: expected a finite threshold, got ", thr);
        edge_mask_cuda(as_ptr<const float>(a), n, lda, as_ptr<const std::uint8_t>(mask), as_ptr<const float>(scale),
                       as_ptr<const float>(factor), (float)thr, as_ptr<std::uint8_t>(out), stream);
      },
      "edge_mask[i, j] = score_ij >= thr on the device");
  m.def(
      "topk_count_cuda",
      [](std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
         std::uintptr_t row_len, std::uintptr_t row_abs_sum, std::uintptr_t flags, std::uintptr_t stream) {
        check_matrix(a, a_dtype, rows, cols, lda, "adjacency");
        check_nonnull(row_len, rows, "row_len");
        check_nonnull(row_abs_sum, rows, "row_abs_sum");
        check_nonnull(flags, 1, "flags");
        topk_count_cuda(as_ptr<const float>(a), rows, cols, lda, k, as_ptr<std::int64_t>(row_len),
                        as_ptr<float>(row_abs_sum), as_ptr<int>(flags), stream);
      },
      "Kept edges per row and |A| row sums on the device");
  m.def(
      "topk_fill_cuda",
      [](std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
         std::uintptr_t crow, std::int64_t nnz, std::uintptr_t col_out, std::uintptr_t val_out, std::uintptr_t stream) {
        check_dtype(a_dtype, kFloat32, "adjacency");
        if (rows < 0 || cols < 0) fail("adjacency: expected non-negative sizes, got (", rows, ", ", cols, ")");
        if (rows > 0 && lda < cols) fail("adjacency: expected a row stride >= ", cols, ", got ", lda);
        if (nnz < 0) fail("nnz: expected a non-negative count, got ", nnz);
        check_nonnull(a, rows * cols, "adjacency");
        check_nonnull(crow, rows + 1, "crow_indices");
        check_nonnull(col_out, nnz, "col_indices");
        check_nonnull(val_out, nnz, "values");
        topk_fill_cuda(as_ptr<const float>(a), rows, cols, lda, k, as_ptr<const std::int64_t>(crow),
                       as_ptr<std::int64_t>(col_out), as_ptr<float>(val_out), stream);
      },
      "Fill the CSR rows counted by topk_count_cuda on the device");
#endif
}

}  // namespace fastattr
