// Bindings of the top-k edge storage: count the kept edges per row, then fill the CSR rows.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "graph.h"
#include "ops.h"

#ifdef FASTATTR_WITH_CUDA
#include "graph_kernels.cuh"
#endif

namespace py = pybind11;

namespace fastattr {

namespace {

// crow_indices of a fill: offsets from 0 to nnz, each row at most `cols` long (read on the host).
void check_crow_host(const std::int64_t* c, std::int64_t rows, std::int64_t cols, std::int64_t nnz) {
  if (c[0] != 0 || c[rows] != nnz) fail("crow_indices: expected offsets from 0 to ", nnz, ", got ", c[0], " to ", c[rows]);
  for (std::int64_t i = 0; i < rows; ++i)
    if (c[i + 1] < c[i] || c[i + 1] - c[i] > cols)
      fail("crow_indices: expected non-decreasing offsets with rows of at most ", cols, " entries, row ", i, " has ",
           c[i + 1] - c[i]);
}

bool topk_count_cpu_binding(std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda,
                            std::int64_t k, std::uintptr_t row_len, std::uintptr_t row_abs_sum) {
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
}

void topk_fill_cpu_binding(std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda,
                           std::uintptr_t crow, std::int64_t nnz, std::uintptr_t col_indices, std::uintptr_t values) {
  check_matrix(a, a_dtype, rows, cols, lda, "adjacency");
  check_nonnull(crow, rows + 1, "crow_indices");
  const std::int64_t* c = as_ptr<const std::int64_t>(crow);
  check_crow_host(c, rows, cols, nnz);
  check_nonnull(col_indices, nnz, "col_indices");
  check_nonnull(values, nnz, "values");
  py::gil_scoped_release nogil;
  topk_fill_cpu(as_ptr<const float>(a), rows, cols, lda, c, as_ptr<std::int64_t>(col_indices), as_ptr<float>(values));
}

#ifdef FASTATTR_WITH_CUDA
void topk_count_cuda_binding(std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda,
                             std::int64_t k, std::uintptr_t row_len, std::uintptr_t row_abs_sum, std::uintptr_t flags,
                             std::uintptr_t stream) {
  check_matrix(a, a_dtype, rows, cols, lda, "adjacency");
  check_nonnull(row_len, rows, "row_len");
  check_nonnull(row_abs_sum, rows, "row_abs_sum");
  check_nonnull(flags, 1, "flags");
  topk_count_cuda(as_ptr<const float>(a), rows, cols, lda, k, as_ptr<std::int64_t>(row_len),
                  as_ptr<float>(row_abs_sum), as_ptr<int>(flags), stream);
}

// crow_indices live on the device here: the kernel trusts the offsets topk_count_cuda produced.
void topk_fill_cuda_binding(std::uintptr_t a, int a_dtype, std::int64_t rows, std::int64_t cols, std::int64_t lda,
                            std::uintptr_t crow, std::int64_t nnz, std::uintptr_t col_indices, std::uintptr_t values,
                            std::uintptr_t stream) {
  check_matrix(a, a_dtype, rows, cols, lda, "adjacency");
  if (nnz < 0) fail("nnz: expected a non-negative count, got ", nnz);
  check_nonnull(crow, rows + 1, "crow_indices");
  check_nonnull(col_indices, nnz, "col_indices");
  check_nonnull(values, nnz, "values");
  topk_fill_cuda(as_ptr<const float>(a), rows, cols, lda, as_ptr<const std::int64_t>(crow),
                 as_ptr<std::int64_t>(col_indices), as_ptr<float>(values), stream);
}
#endif

}  // namespace

void register_topk_edges_ops(py::module_& m) {
  m.def("topk_count_cpu", &topk_count_cpu_binding, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("lda"), py::arg("k"), py::arg("row_len"), py::arg("row_abs_sum"),
        "Kept edges per row (min(k, nnz); k < 0 keeps all) and |A| row sums; returns whether a row was non-finite");
  m.def("topk_fill_cpu", &topk_fill_cpu_binding, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("lda"), py::arg("crow"), py::arg("nnz"), py::arg("col_indices"), py::arg("values"),
        "Fill the CSR rows counted by topk_count_cpu (the row lengths in crow encode k)");
#ifdef FASTATTR_WITH_CUDA
  m.def("topk_count_cuda", &topk_count_cuda_binding, py::kw_only(), py::arg("a"), py::arg("a_dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("lda"), py::arg("k"), py::arg("row_len"), py::arg("row_abs_sum"),
        py::arg("flags"), py::arg("stream"), "Kept edges per row and |A| row sums on the device");
  m.def("topk_fill_cuda", &topk_fill_cuda_binding, py::kw_only(), py::arg("a"), py::arg("a_dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("lda"), py::arg("crow"), py::arg("nnz"), py::arg("col_indices"), py::arg("values"),
        py::arg("stream"), "Fill the CSR rows counted by topk_count_cuda on the device");
#endif
}

}  // namespace fastattr
