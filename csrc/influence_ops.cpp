// Bindings of the influence kernels: the dense sweep, partial influences, and the row sums and
// matvec of the device power iteration. Scalars and pointers are re-checked here (see common.h).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "graph.h"
#include "ops.h"

#ifdef FASTATTR_WITH_CUDA
#include "graph_kernels.cuh"
#endif

namespace py = pybind11;

namespace fastattr {

namespace {

py::tuple influence_result(const InfluenceResult& r) {
  return py::make_tuple(r.status, r.n_waves, r.depth, r.edge_sum, r.edge_nnz, r.edge_min);
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

void register_influence_ops(py::module_& m) {
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
#endif
}

}  // namespace fastattr
