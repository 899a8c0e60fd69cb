// Bindings of the influence kernels: the dense sweep, partial influences, and the row sums and
// matvec of the device power series. Every argument is named and keyword-only; scalars and
// pointers are re-checked here (see common.h).
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

// Waves from an earlier call (reuse_order) index the matrix: every offset and node id is checked.
void check_waves(std::uintptr_t order, std::uintptr_t wave_ptr, bool reuse_order, std::int64_t n_waves,
                 std::int64_t n) {
  if ((order == 0) != (wave_ptr == 0)) fail("order/wave_ptr: expected both or neither, got only one");
  if (!reuse_order) return;
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

// The edge-score histogram is filled by the sweep of the pruned graph only.
void check_hist(std::uintptr_t hist_count, std::uintptr_t hist_sum, bool normalize, std::uintptr_t node_mask) {
  if ((hist_count == 0) != (hist_sum == 0)) fail("hist: expected both count and sum buffers, got one");
  if (hist_count != 0 && (!normalize || node_mask == 0)) fail("hist: edge scores need normalize=True and a node_mask");
}

py::tuple influence_dense(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t w,
                          std::uintptr_t out, bool normalize, float eps, std::uintptr_t node_mask,
                          std::int64_t max_iter, std::uintptr_t order, std::uintptr_t wave_ptr, bool reuse_order,
                          std::int64_t n_waves, std::uintptr_t row_scale, std::uintptr_t row_factor,
                          std::uintptr_t hist_count, std::uintptr_t hist_sum, std::uintptr_t row_blocks) {
  check_dtype(a_dtype, kFloat32, "A");
  check_square(n, lda, "A");
  check_nonnull(a, n * n, "A");
  check_nonnull(w, n, "logit_weights");
  check_nonnull(out, n, "out");
  check_eps(eps);
  check_max_iter(max_iter);
  check_waves(order, wave_ptr, reuse_order, n_waves, n);
  check_hist(hist_count, hist_sum, normalize, node_mask);
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
  args.row_blocks = as_ptr<std::uint64_t>(row_blocks);
  SelectHist hist;
  args.edge_hist = hist_count != 0 ? &hist : nullptr;
  InfluenceResult r;
  {
    py::gil_scoped_release nogil;
    r = influence_dense_cpu(args);
  }
  if (hist_count != 0) {
    std::memcpy(as_ptr<void>(hist_count), hist.count, sizeof hist.count);
    std::memcpy(as_ptr<void>(hist_sum), hist.sum, sizeof hist.sum);
  }
  return py::make_tuple(r.status, r.n_waves, r.depth, r.edge_sum, r.edge_nnz, r.edge_min);
}

void check_row_to_node(const std::int64_t* idx, std::int64_t rows, std::int64_t cols) {
  for (std::int64_t r = 0; r < rows; ++r)
    if (idx[r] < 0 || idx[r] >= cols)
      fail("row_to_node_index: expected indices in [0, ", cols, "), got ", idx[r], " at row ", r);
}

// A state of `rows` rows: row sums and a (rows, rows) block of row stride ldb.
PartialState partial_state(std::uintptr_t row_sum, std::uintptr_t block, std::int64_t ldb, std::int64_t rows) {
  check_nonnull(row_sum, rows, "row_sum");
  if (ldb < rows) fail("ldb: expected at least ", rows, " (the rows), got ", ldb);
  check_nonnull(block, rows * ldb, "block");
  return PartialState{as_ptr<float>(row_sum), as_ptr<float>(block), ldb};
}

// The arguments both partial-influence series share: the logits seeded in the last n_logits of
// cols columns, each of the rows' node, the stopping rule's max_iter and the sums' floor eps.
const std::int64_t* checked_series_args(std::int64_t rows, std::int64_t cols, std::uintptr_t logit_p,
                                        std::int64_t n_logits, std::uintptr_t row_to_node, std::int64_t max_iter,
                                        float eps) {
  if (n_logits < 0 || n_logits > cols) fail("logit_p: expected at most ", cols, " entries, got ", n_logits);
  check_nonnull(logit_p, n_logits, "logit_p");
  check_nonnull(row_to_node, rows, "row_to_node_index");
  check_eps(eps);
  check_max_iter(max_iter);
  const std::int64_t* idx = as_ptr<const std::int64_t>(row_to_node);
  check_row_to_node(idx, rows, cols);
  return idx;
}

int partial_influence(std::uintptr_t e, int e_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lde,
                      std::uintptr_t logit_p, std::int64_t n_logits, std::uintptr_t row_to_node, std::uintptr_t out,
                      std::int64_t max_iter, float eps, std::uintptr_t row_sum, std::uintptr_t block,
                      std::int64_t ldb) {
  check_matrix(e, e_dtype, rows, cols, lde, "edge_matrix");
  check_nonnull(out, cols, "out");
  const std::int64_t* idx = checked_series_args(rows, cols, logit_p, n_logits, row_to_node, max_iter, eps);
  if ((row_sum == 0) != (block == 0)) fail("row_sum, block: expected both or neither");
  PartialState state{};
  if (block != 0) state = partial_state(row_sum, block, ldb, rows);
  py::gil_scoped_release nogil;
  return partial_influence_cpu(as_ptr<const float>(e), rows, cols, lde, as_ptr<const float>(logit_p), n_logits, idx,
                               as_ptr<float>(out), max_iter, eps, block != 0 ? &state : nullptr);
}

int partial_influence_grow(std::uintptr_t e, int e_dtype, std::int64_t cols, std::int64_t lde,
                           std::uintptr_t row_to_node, std::int64_t st0, std::int64_t st, std::uintptr_t row_sum,
                           std::uintptr_t block, std::int64_t ldb, std::int64_t rows0, std::int64_t rows) {
  if (st0 < 0 || st < st0) fail("st0, st: expected 0 <= st0 <= st, got ", st0, ", ", st);
  if (rows < 0) rows0 = st0, rows = st;  // one process: the rows are the node columns
  if (rows0 < 0 || rows < rows0) fail("rows0, rows: expected 0 <= rows0 <= rows, got ", rows0, ", ", rows);
  check_matrix(e, e_dtype, rows, cols, lde, "edge_matrix");
  check_nonnull(row_to_node, st, "row_to_node_index");
  const std::int64_t* idx = as_ptr<const std::int64_t>(row_to_node);
  check_row_to_node(idx, st, cols);
  if (ldb < st) fail("ldb: expected at least ", st, " (the node columns), got ", ldb);
  const PartialState state = partial_state(row_sum, block, ldb, rows);
  py::gil_scoped_release nogil;
  return partial_influence_grow_cpu(as_ptr<const float>(e), lde, cols, idx, rows0, rows, st0, st, state);
}

int partial_influence_coef(std::int64_t rows, std::int64_t cols, std::uintptr_t logit_p, std::int64_t n_logits,
                           std::uintptr_t row_to_node, std::uintptr_t total_coef, std::uintptr_t last_coef,
                           std::int64_t max_iter, float eps, std::uintptr_t row_sum, std::uintptr_t block,
                           std::int64_t ldb) {
  if (rows < 0 || cols < rows) fail("rows, cols: expected 0 <= rows <= cols, got ", rows, ", ", cols);
  check_nonnull(total_coef, rows, "total_coef");
  check_nonnull(last_coef, rows, "last_coef");
  const std::int64_t* idx = checked_series_args(rows, cols, logit_p, n_logits, row_to_node, max_iter, eps);
  const PartialState state = partial_state(row_sum, block, ldb, rows);
  py::gil_scoped_release nogil;
  return partial_influence_coef_cpu(rows, cols, as_ptr<const float>(logit_p), n_logits, idx, as_ptr<double>(total_coef),
                                    as_ptr<double>(last_coef), max_iter, eps, state);
}

void abs_weighted_row_sum(std::uintptr_t e, int e_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lde,
                          std::uintptr_t coef, std::uintptr_t out) {
  check_matrix(e, e_dtype, rows, cols, lde, "edge_matrix");
  check_nonnull(coef, rows, "coef");
  check_nonnull(out, cols, "out");
  py::gil_scoped_release nogil;
  abs_weighted_row_sum_cpu(as_ptr<const float>(e), rows, cols, lde, as_ptr<const double>(coef), as_ptr<double>(out));
}

#ifdef FASTATTR_WITH_CUDA
// A (n, m) matrix whose node mask, when given, covers both its rows and its columns.
void check_masked_matrix(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t m, std::int64_t lda,
                         std::uintptr_t mask) {
  check_matrix(a, a_dtype, n, m, lda, "A");
  if (mask != 0 && n != m) fail("mask: expected a square matrix with a node mask, got (", n, ", ", m, ")");
}

void row_abs_sum(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t m, std::int64_t lda, std::uintptr_t mask,
                 std::uintptr_t out, std::uintptr_t stream) {
  check_masked_matrix(a, a_dtype, n, m, lda, mask);
  check_nonnull(out, n, "out");
  row_abs_sum_cuda(as_ptr<const float>(a), n, m, lda, as_ptr<const std::uint8_t>(mask), as_ptr<double>(out), stream);
}

void matvec(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t m, std::int64_t lda, std::uintptr_t y,
            std::uintptr_t mask, bool absolute, std::uintptr_t partials, std::int64_t n_partials, std::uintptr_t out,
            std::uintptr_t stream) {
  check_masked_matrix(a, a_dtype, n, m, lda, mask);
  check_nonnull(y, n, "y");
  check_nonnull(out, m, "out");
  if (partials != 0) {
    if (n_partials < 1 || n_partials > kMatvecMaxPartials)
      fail("n_partials: expected a value in [1, ", kMatvecMaxPartials, "], got ", n_partials);
    check_nonnull(partials, n_partials * m, "partials");
  }
  matvec_cuda(as_ptr<const float>(a), n, m, lda, as_ptr<const double>(y), as_ptr<const std::uint8_t>(mask), absolute,
              as_ptr<double>(partials), partials != 0 ? n_partials : 0, as_ptr<double>(out), stream);
}
#endif

}  // namespace

void register_influence_ops(py::module_& m) {
  m.def("influence_dense_cpu", &influence_dense, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("n"),
        py::arg("lda"), py::arg("w"), py::arg("out"), py::arg("normalize"), py::arg("eps"), py::arg("node_mask"),
        py::arg("max_iter"), py::arg("order"), py::arg("wave_ptr"), py::arg("reuse_order"), py::arg("n_waves"),
        py::arg("row_scale"), py::arg("row_factor"), py::arg("hist_count"), py::arg("hist_sum"),
        py::arg("row_blocks"),
        "sum_{k>=1} w A^k on a dense float32 matrix (|A| row-normalised by max(rowsum, eps) when normalize); "
        "returns (status, n_waves, depth, edge_sum, edge_nnz, edge_min)");
  m.def("partial_influence_cpu", &partial_influence, py::kw_only(), py::arg("e"), py::arg("e_dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("lde"), py::arg("logit_p"), py::arg("n_logits"), py::arg("row_to_node"),
        py::arg("out"), py::arg("max_iter"), py::arg("eps"), py::arg("row_sum") = 0, py::arg("block") = 0,
        py::arg("ldb") = 0,
        "compute_partial_influences on host memory, rows normalised by max(rowsum, eps); with row_sum and block "
        "(a state kept by partial_influence_grow_cpu) the terms read the block, not the matrix; returns the "
        "status (0 ok, 1 no convergence, 2 non-finite)");
  m.def("partial_influence_grow_cpu", &partial_influence_grow, py::kw_only(), py::arg("e"), py::arg("e_dtype"),
        py::arg("cols"), py::arg("lde"), py::arg("row_to_node"), py::arg("st0"), py::arg("st"), py::arg("row_sum"),
        py::arg("block"), py::arg("ldb"), py::arg("rows0") = -1, py::arg("rows") = -1,
        "extends a partial-influence state from rows [0, rows0) and node columns [0, st0) to [0, rows) and "
        "[0, st) (rows0, rows default to st0, st: one process's rows are its node columns): the new rows' "
        "|sums| and |entries| at every node column, the old rows' at the new ones; returns 0, or 2 on a "
        "non-finite row");
  m.def("abs_weighted_row_sum_cpu", &abs_weighted_row_sum, py::kw_only(), py::arg("e"), py::arg("e_dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("lde"), py::arg("coef"), py::arg("out"),
        "out[j] = sum_r coef[r] |e[r, j]|, float64 coef and out, host float32 e");
  m.def("partial_influence_coef_cpu", &partial_influence_coef, py::kw_only(), py::arg("rows"), py::arg("cols"),
        py::arg("logit_p"), py::arg("n_logits"), py::arg("row_to_node"), py::arg("total_coef"), py::arg("last_coef"),
        py::arg("max_iter"), py::arg("eps"), py::arg("row_sum"), py::arg("block"), py::arg("ldb"),
        "partial_influence_cpu's series on a state alone: float64 total_coef per row (the result is "
        "sum_r total_coef[r] |E_r|); returns 0, 1 (no convergence) or 3 (only the matrix's other columns "
        "tell: see graph.h; last_coef then holds the last term's coefficients)");
#ifdef FASTATTR_WITH_CUDA
  m.def("row_abs_sum_cuda", &row_abs_sum, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("n"), py::arg("m"),
        py::arg("lda"), py::arg("mask"), py::arg("out"), py::arg("stream"),
        "out[i] = sum_j |A_ij| (double) on the device");
  m.def("matvec_cuda", &matvec, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("n"), py::arg("m"),
        py::arg("lda"), py::arg("y"), py::arg("mask"), py::arg("absolute"), py::arg("partials"),
        py::arg("n_partials"), py::arg("out"), py::arg("stream"),
        "out[j] = sum_i y_i * |A_ij| (or A_ij), double, on the device; with partials (an (n_partials, m) double "
        "scratch) the row chunks are summed in a fixed order (deterministic), else they meet in atomics");
  m.def("matvec_partials_cuda", &matvec_partials_cuda, py::kw_only(), py::arg("n"), py::arg("m"),
        "rows of the (n_partials, m) double scratch that the fixed-order matvec of an (n, m) matrix uses");
#endif
}

}  // namespace fastattr
