// Bindings of the top-k edge storage: count the kept edges per row, then fill the CSR rows.
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

void register_topk_edges_ops(py::module_& m) {
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
