// circuit-tracer's removal of dangling nodes after edge thresholding, on the dense byte edge mask.
//
// Its loop clears the rows and columns of removed nodes in the mask on every round; here the mask is
// only read while rounds run (each round one pass over the rows of live nodes) and cleared once at
// the end, which gives the same final masks: the loop ends on a round whose clearing used the final
// node mask. As in circuit-tracer, the first round reads the mask as thresholding left it, and if
// that round removes nothing the mask is not cleared at all.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "graph.h"
#include "graph_cpu_kernels.h"

#ifdef FASTATTR_WITH_OPENMP
#include <omp.h>
#endif

namespace fastattr {

namespace {


// colany[j] = any kept edge into j's column from a row in `rows` (null: every row);
// rowany[i] = any kept edge in row i from a column in `cols` (null: every column), for i < n_rows_any.
void scan(const std::uint8_t* e, std::int64_t n, const std::uint8_t* rows, const std::uint8_t* cols,
          std::int64_t n_rows_any, std::vector<std::uint8_t>& colany, std::vector<std::uint8_t>& rowany) {
  std::int64_t live = n;
  if (rows != nullptr) {
    live = 0;
    for (std::int64_t i = 0; i < n; ++i) live += rows[i] != 0;
  }
  const int T = graphk::threads_for(live * n);
  // Zeroed here, not by their threads: OpenMP may give a smaller team than T, and the column merge
  // reads every buffer.
  std::vector<std::vector<std::uint8_t>> priv(T, std::vector<std::uint8_t>(n, 0));
  colany.assign(n, 0);
  rowany.assign(n, 0);
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    std::vector<std::uint8_t>& c = priv[t];
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      if (rows != nullptr && rows[i] == 0) continue;
      const std::uint8_t* r = e + i * n;
      std::uint8_t* cp = c.data();
#pragma omp simd
      for (std::int64_t j = 0; j < n; ++j) cp[j] |= r[j];
      if (i < n_rows_any) {
        std::uint8_t any = 0;
        if (cols == nullptr) {
#pragma omp simd reduction(| : any)
          for (std::int64_t j = 0; j < n; ++j) any |= r[j];
        } else {
#pragma omp simd reduction(| : any)
          for (std::int64_t j = 0; j < n; ++j) any |= (std::uint8_t)(r[j] & cols[j]);
        }
        rowany[i] = any != 0;
      }
    }
#pragma omp for schedule(static)
    for (std::int64_t j = 0; j < n; ++j) {
      std::uint8_t v = 0;
      for (int u = 0; u < T; ++u) v |= priv[u][j];
      colany[j] = v != 0;
    }
  }
}

// node_mask[:end] &= colany[:end]; node_mask[:n_features] &= rowany[:n_features]. Returns whether
// anything changed.
bool update(std::uint8_t* nm, std::int64_t end, std::int64_t n_features, const std::vector<std::uint8_t>& colany,
            const std::vector<std::uint8_t>& rowany) {
  bool changed = false;
  for (std::int64_t j = 0; j < end; ++j) {
    const std::uint8_t v = (nm[j] != 0 && colany[j] != 0) ? 1 : 0;
    changed |= v != nm[j];
    nm[j] = v;
  }
  for (std::int64_t i = 0; i < n_features; ++i) {
    const std::uint8_t v = (nm[i] != 0 && rowany[i] != 0) ? 1 : 0;
    changed |= v != nm[i];
    nm[i] = v;
  }
  return changed;
}

}  // namespace

std::int64_t remove_dangling_cpu(std::uint8_t* edge_mask, std::int64_t n, std::uint8_t* node_mask,
                                 std::int64_t n_features, std::int64_t n_fixed) {
  const std::int64_t end = std::max<std::int64_t>(0, n - n_fixed);
  n_features = std::min(std::max<std::int64_t>(n_features, 0), n);
  for (std::int64_t i = 0; i < n; ++i) node_mask[i] = node_mask[i] != 0;
  std::vector<std::uint8_t> colany, rowany;
  scan(edge_mask, n, nullptr, nullptr, n_features, colany, rowany);
  if (!update(node_mask, end, n_features, colany, rowany)) return 0;

  std::int64_t rounds = 1;
  std::vector<std::uint8_t> alive(node_mask, node_mask + n);
  for (;;) {
    alive.assign(node_mask, node_mask + n);
    scan(edge_mask, n, alive.data(), alive.data(), n_features, colany, rowany);
    ++rounds;
    if (!update(node_mask, end, n_features, colany, rowany)) break;
  }
  // The loop's last clearing used the final node mask.
#pragma omp parallel for schedule(static) num_threads(graphk::threads_for(n * n))
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint8_t* r = edge_mask + i * n;
    if (node_mask[i] == 0) {
      std::memset(r, 0, (size_t)n);
      continue;
    }
    const std::uint8_t* a = alive.data();
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) r[j] &= a[j];
  }
  return rounds;
}

}  // namespace fastattr
