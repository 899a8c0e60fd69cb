// The k strongest incoming edges of every row (target), by |weight|, as CSR.
//
// Ties in |weight| go to the lower column index, so the selection is a pure function of the matrix;
// zeros are never stored, so a row with fewer than k non-zeros keeps all of them. Within a row the
// kept edges are stored by increasing column. Two passes: the first counts each row's kept edges
// (and the exact |A| row sum of the full row, so normalising the sparse graph matches the dense
// one); the caller turns the counts into crow_indices; the second fills the rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "graph.h"
#include "graph_cpu_kernels.h"

namespace fastattr {

void topk_count_cpu(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
                    std::int64_t* row_len, float* row_abs_sum, int* nonfinite) {
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(graphk::threads_for(rows * cols))
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* r = a + i * lda;
    std::int64_t nnz = 0;
    double s = 0.0;
#pragma omp simd reduction(+ : nnz, s)
    for (std::int64_t j = 0; j < cols; ++j) {
      nnz += r[j] != 0.0f ? 1 : 0;
      s += std::fabs((double)r[j]);
    }
    if (!std::isfinite(s)) bad = 1;
    row_len[i] = k < 0 ? nnz : std::min(nnz, k);
    row_abs_sum[i] = (float)s;
  }
  *nonfinite = bad;
}

void topk_fill_cpu(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, const std::int64_t* crow,
                   std::int64_t* col_out, float* val_out) {
#pragma omp parallel num_threads(graphk::threads_for(rows * cols))
  {
    std::vector<std::pair<float, std::int64_t>> cand;
#pragma omp for schedule(dynamic, 16)
    for (std::int64_t i = 0; i < rows; ++i) {
      const float* r = a + i * lda;
      const std::int64_t start = crow[i], len = crow[i + 1] - crow[i];
      if (len <= 0) continue;
      cand.clear();
      for (std::int64_t j = 0; j < cols; ++j)
        if (r[j] != 0.0f) cand.emplace_back(std::fabs(r[j]), j);
      const std::int64_t keep = std::min<std::int64_t>(len, (std::int64_t)cand.size());
      if ((std::int64_t)cand.size() > keep) {
        auto stronger = [](const std::pair<float, std::int64_t>& x, const std::pair<float, std::int64_t>& y) {
          return x.first > y.first || (x.first == y.first && x.second < y.second);
        };
        std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.end(), stronger);
        cand.resize(keep);
        std::sort(cand.begin(), cand.end(),
                  [](const std::pair<float, std::int64_t>& x, const std::pair<float, std::int64_t>& y) {
                    return x.second < y.second;
                  });
      }
      for (std::int64_t q = 0; q < keep; ++q) {
        col_out[start + q] = cand[q].second;
        val_out[start + q] = r[cand[q].second];
      }
    }
  }
}

}  // namespace fastattr
