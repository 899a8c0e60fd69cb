// Bindings of prune_graph's fused edge select (scores computed on the fly) and dangling-node removal.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "graph.h"
#include "graph_cpu_kernels.h"
#include "ops.h"

#ifdef FASTATTR_WITH_CUDA
#include "graph_kernels.cuh"
#endif

namespace py = pybind11;

namespace fastattr {

namespace {

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

// The level-0 statistics the influence sweep gathered (hist_count / hist_sum null: the select
// makes its own level-0 pass).
void check_edge_stats(std::int64_t n, std::uintptr_t hist_count, std::uintptr_t hist_sum, double total,
                      std::int64_t nnz) {
  if ((hist_count == 0) != (hist_sum == 0)) fail("hist_count: expected both count and sum buffers, got one");
  if (nnz < 0 || nnz > n * n) fail("nnz: expected a value in [0, ", n * n, "], got ", nnz);
  if (!std::isfinite(total) || total < 0.0) fail("total: expected a finite non-negative sum, got ", total);
}

py::tuple edge_select_mask_cpu_binding(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda,
                                       std::uintptr_t node_mask, std::uintptr_t row_scale, std::uintptr_t row_factor,
                                       std::uintptr_t hist_count, std::uintptr_t hist_sum, double total,
                                       std::int64_t nnz, float min_nz, double t, std::uintptr_t edge_mask,
                                       std::int64_t max_candidates, std::uintptr_t row_blocks) {
  check_edge_score_inputs(a, a_dtype, n, lda, node_mask, row_scale, row_factor);
  check_nonnull(edge_mask, n * n, "edge_mask");
  check_threshold(t);
  check_edge_stats(n, hist_count, hist_sum, total, nnz);
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
  args.mask_out = as_ptr<std::uint8_t>(edge_mask);
  args.max_candidates = max_candidates;
  args.row_blocks = as_ptr<const std::uint64_t>(row_blocks);
  EdgeSelectResult r;
  {
    py::gil_scoped_release nogil;
    r = edge_select_mask_cpu(args);
  }
  return py::make_tuple(r.status, r.threshold, r.clamped, r.passes, r.candidates);
}

std::int64_t remove_dangling_cpu_binding(std::uintptr_t edge_mask, std::int64_t n, std::uintptr_t node_mask,
                                         std::int64_t n_features, std::int64_t n_fixed) {
  check_square(n, n, "edge_mask");
  check_nonnull(edge_mask, n * n, "edge_mask");
  check_nonnull(node_mask, n, "node_mask");
  if (n_features < 0 || n_features > n) fail("n_features: expected a value in [0, ", n, "], got ", n_features);
  if (n_fixed < 0 || n_fixed > n) fail("n_fixed: expected a value in [0, ", n, "], got ", n_fixed);
  py::gil_scoped_release nogil;
  return remove_dangling_cpu(as_ptr<std::uint8_t>(edge_mask), n, as_ptr<std::uint8_t>(node_mask), n_features,
                             n_fixed);
}

#ifdef FASTATTR_WITH_CUDA
void edge_hist_cuda_binding(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t node_mask,
                            std::uintptr_t row_scale, std::uintptr_t row_factor, int level, std::uint32_t prefix,
                            std::uintptr_t count, std::uintptr_t sums, std::uintptr_t sig_sums, std::uintptr_t stats,
                            bool deterministic, std::uintptr_t stream) {
  check_edge_score_inputs(a, a_dtype, n, lda, node_mask, row_scale, row_factor);
  if (level < 0 || level >= kSelectLevels) fail("level: expected 0..", kSelectLevels - 1, ", got ", level);
  const std::int64_t nb = std::int64_t(1) << kSelectBits[level];
  check_nonnull(count, nb, "count");
  check_nonnull(deterministic ? sig_sums : sums, nb, deterministic ? "sig_sums" : "sums");
  check_nonnull(stats, 4, "stats");
  if (deterministic && n * n > kExactSumMaxValues)
    fail("A: expected at most ", kExactSumMaxValues, " edge scores for deterministic sums, got ", n * n);
  const HistOut out{as_ptr<std::int64_t>(count), as_ptr<double>(sums), as_ptr<std::int64_t>(sig_sums),
                    as_ptr<std::int64_t>(stats), deterministic};
  edge_hist_cuda(as_ptr<const float>(a), n, lda, as_ptr<const std::uint8_t>(node_mask), as_ptr<const float>(row_scale),
                 as_ptr<const float>(row_factor), level, prefix, out, stream);
}

void edge_mask_cuda_binding(std::uintptr_t a, int a_dtype, std::int64_t n, std::int64_t lda, std::uintptr_t node_mask,
                            std::uintptr_t row_scale, std::uintptr_t row_factor, double thr, std::uintptr_t edge_mask,
                            std::uintptr_t stream) {
  check_edge_score_inputs(a, a_dtype, n, lda, node_mask, row_scale, row_factor);
  check_nonnull(edge_mask, n * n, "edge_mask");
  if (!std::isfinite(thr)) fail("thr: expected a finite threshold, got ", thr);
  edge_mask_cuda(as_ptr<const float>(a), n, lda, as_ptr<const std::uint8_t>(node_mask), as_ptr<const float>(row_scale),
                 as_ptr<const float>(row_factor), (float)thr, as_ptr<std::uint8_t>(edge_mask), stream);
}
#endif

}  // namespace

void register_prune_ops(py::module_& m) {
  // The width of the per-row bitmaps of non-zero 64-column blocks (int64 words per row = ceil(n /
  // cols_per_block_word)), which the influence sweep records and the edge select reads.
  m.attr("cols_per_block_word") = graphk::kColsPerWord;

  m.def("edge_select_mask_cpu", &edge_select_mask_cpu_binding, py::kw_only(), py::arg("a"), py::arg("a_dtype"),
        py::arg("n"), py::arg("lda"), py::arg("node_mask"), py::arg("row_scale"), py::arg("row_factor"),
        py::arg("hist_count"), py::arg("hist_sum"), py::arg("total"), py::arg("nnz"), py::arg("min_nz"), py::arg("t"),
        py::arg("edge_mask"), py::arg("max_candidates"), py::arg("row_blocks"),
        "Edge mask of the pruned graph by the fused cumulative threshold; returns "
        "(status, threshold, clamped, passes, candidates)");
  m.def("remove_dangling_cpu", &remove_dangling_cpu_binding, py::kw_only(), py::arg("edge_mask"), py::arg("n"),
        py::arg("node_mask"), py::arg("n_features"), py::arg("n_fixed"),
        "circuit-tracer's iterative removal of dangling nodes, in place; returns the number of rounds");
#ifdef FASTATTR_WITH_CUDA
  m.def("edge_hist_cuda", &edge_hist_cuda_binding, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("n"),
        py::arg("lda"), py::arg("node_mask"), py::arg("row_scale"), py::arg("row_factor"), py::arg("level"),
        py::arg("prefix"), py::arg("count"), py::arg("sums"), py::arg("sig_sums"), py::arg("stats"),
        py::arg("deterministic"), py::arg("stream"),
        "One radix-select level over the pruned graph's edge scores, computed on the fly on the device");
  m.def("edge_mask_cuda", &edge_mask_cuda_binding, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("n"),
        py::arg("lda"), py::arg("node_mask"), py::arg("row_scale"), py::arg("row_factor"), py::arg("thr"),
        py::arg("edge_mask"), py::arg("stream"), "edge_mask[i, j] = score_ij >= thr on the device");
#endif
}

}  // namespace fastattr
