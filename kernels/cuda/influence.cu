// CUDA kernels of the influence power iteration: |A| row sums and the fused matvec
//   out_j = sum_i y_i * |A_ij|
// where y already carries 1 / rowsum_i (and the node mask), so the row-normalised matrix of
// circuit-tracer is never materialised. Accumulation is in double; rows with y_i == 0 (not yet
// reached, or pruned) are skipped uniformly by the whole block. The matvec's row blocks meet in
// double atomics (order varies from run to run in the last bits), or, given a scratch, write
// per-block column sums that a second kernel adds in block order (bitwise reproducible).
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <stdexcept>
#include <string>

#include "graph_kernels.cuh"
#include "launch_utils.cuh"

namespace fastattr {

namespace {

constexpr int kRowThreads = 256;

__global__ void row_abs_sum_kernel(const float* __restrict__ a, std::int64_t n, std::int64_t m, std::int64_t lda,
                                   const std::uint8_t* __restrict__ mask, double* __restrict__ out) {
  using Reduce = cub::BlockReduce<double, kRowThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    double s = 0.0;
    const bool kept = mask == nullptr || mask[i] != 0;
    if (kept) {
      const float* row = a + i * lda;
      for (std::int64_t j = threadIdx.x; j < m; j += kRowThreads) {
        float v = fabsf(row[j]);
        if (mask != nullptr && mask[j] == 0) v = 0.0f;
        s += (double)v;
      }
    }
    const double total = Reduce(tmp).Sum(s);
    if (threadIdx.x == 0) out[i] = total;
    __syncthreads();  // the temp storage is reused by the next row
  }
}

constexpr int kMvCols = 256;  // one column per thread: consecutive threads read consecutive floats
constexpr int kMvRows = 64;   // rows per block of the default matvec, whose blocks meet in double atomics
// Blocks the fixed-order matvec aims for: enough to fill a GPU, and a (partials, m) double scratch
// of at most kMvDetBlocks * kMvCols doubles (16 MB).
constexpr std::int64_t kMvDetBlocks = 8192;

// Rows [blockIdx.y * rows_per_block, + rows_per_block) against column j. With `partials` each block
// writes its column sums to row blockIdx.y of the scratch (every column, 0 where masked), for
// sum_partials_kernel to add in a fixed order; otherwise the blocks meet in atomics on `out`.
__global__ void matvec_kernel(const float* __restrict__ a, std::int64_t n, std::int64_t m, std::int64_t lda,
                              const double* __restrict__ y, const std::uint8_t* __restrict__ mask, bool absolute,
                              std::int64_t rows_per_block, bool partials, double* __restrict__ out) {
  const std::int64_t j = (std::int64_t)blockIdx.x * kMvCols + threadIdx.x;
  const std::int64_t r0 = (std::int64_t)blockIdx.y * rows_per_block;
  const std::int64_t r1 = r0 + rows_per_block < n ? r0 + rows_per_block : n;
  const bool col_ok = j < m && (mask == nullptr || mask[j] != 0);
  double acc = 0.0;
  for (std::int64_t i = r0; i < r1; ++i) {
    const double c = y[i];
    if (c == 0.0 || !col_ok) continue;
    float v = a[i * lda + j];
    if (absolute) v = fabsf(v);
    acc += c * (double)v;
  }
  if (partials) {
    if (j < m) out[(std::int64_t)blockIdx.y * m + j] = acc;
  } else if (col_ok && acc != 0.0) {
    atomicAdd(out + j, acc);
  }
}

// out[j] = sum over p = 0, 1, ... of partials[p, j], in that order.
__global__ void sum_partials_kernel(const double* __restrict__ partials, std::int64_t n_partials, std::int64_t m,
                                    double* __restrict__ out) {
  const std::int64_t j = (std::int64_t)blockIdx.x * kMvCols + threadIdx.x;
  if (j >= m) return;
  double s = 0.0;
  for (std::int64_t p = 0; p < n_partials; ++p) s += partials[p * m + j];
  out[j] = s;
}

}  // namespace

void row_abs_sum_cuda(const float* a, std::int64_t n, std::int64_t m, std::int64_t lda, const std::uint8_t* mask,
                      double* out, std::uintptr_t stream) {
  if (n <= 0) return;
  const int grid = (int)(n < 65536 ? n : 65536);
  row_abs_sum_kernel<<<grid, kRowThreads, 0, as_stream(stream)>>>(a, n, m, lda, mask, out);
  check_launch("row_abs_sum_cuda");
}

std::int64_t matvec_partials_cuda(std::int64_t n, std::int64_t m) {
  const std::int64_t col_blocks = m > 0 ? (m + kMvCols - 1) / kMvCols : 1;
  const std::int64_t row_chunks = n > 0 ? (n + kMvRows - 1) / kMvRows : 1;
  const std::int64_t fit = kMvDetBlocks / col_blocks > 1 ? kMvDetBlocks / col_blocks : 1;
  return row_chunks < fit ? row_chunks : fit;
}

void matvec_cuda(const float* a, std::int64_t n, std::int64_t m, std::int64_t lda, const double* y,
                 const std::uint8_t* mask, bool absolute, double* partials, std::int64_t n_partials, double* out,
                 std::uintptr_t stream) {
  if (m <= 0) return;
  const cudaStream_t s = as_stream(stream);
  const unsigned gx = (unsigned)((m + kMvCols - 1) / kMvCols);
  if (n <= 0 || partials == nullptr) {
    check_cuda(cudaMemsetAsync(out, 0, (size_t)m * sizeof(double), s), "matvec_cuda: cudaMemsetAsync");
    if (n <= 0) return;
  }
  if (partials == nullptr) {
    const std::int64_t gy = (n + kMvRows - 1) / kMvRows;
    if (gy > kMatvecMaxPartials) throw std::invalid_argument("A: expected at most 65535 * 64 rows for the CUDA matvec");
    matvec_kernel<<<dim3(gx, (unsigned)gy), kMvCols, 0, s>>>(a, n, m, lda, y, mask, absolute, kMvRows, false, out);
    check_launch("matvec_cuda");
    return;
  }
  if (n_partials < 1 || n_partials > kMatvecMaxPartials)
    throw std::invalid_argument("n_partials: expected a value in [1, 65535]");
  const std::int64_t rows_per_block = (n + n_partials - 1) / n_partials;
  matvec_kernel<<<dim3(gx, (unsigned)n_partials), kMvCols, 0, s>>>(a, n, m, lda, y, mask, absolute, rows_per_block,
                                                                   true, partials);
  check_launch("matvec_cuda");
  sum_partials_kernel<<<gx, kMvCols, 0, s>>>(partials, n_partials, m, out);
  check_launch("matvec_cuda: sum_partials");
}

}  // namespace fastattr
