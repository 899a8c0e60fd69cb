// CUDA kernels of the influence power iteration: |A| row sums and the fused matvec
//   out_j = sum_i y_i * |A_ij|
// where y already carries 1 / rowsum_i (and the node mask), so the row-normalised matrix of
// circuit-tracer is never materialised. Accumulation is in double; rows with y_i == 0 (not yet
// reached, or pruned) are skipped uniformly by the whole block.
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
constexpr int kMvRows = 64;   // rows per block; partial column sums meet in double atomics

__global__ void matvec_kernel(const float* __restrict__ a, std::int64_t n, std::int64_t m, std::int64_t lda,
                              const double* __restrict__ y, const std::uint8_t* __restrict__ mask, bool absolute,
                              double* __restrict__ out) {
  const std::int64_t j = (std::int64_t)blockIdx.x * kMvCols + threadIdx.x;
  const std::int64_t r0 = (std::int64_t)blockIdx.y * kMvRows;
  const std::int64_t r1 = r0 + kMvRows < n ? r0 + kMvRows : n;
  const bool col_ok = j < m && (mask == nullptr || mask[j] != 0);
  double acc = 0.0;
  for (std::int64_t i = r0; i < r1; ++i) {
    const double c = y[i];
    if (c == 0.0 || !col_ok) continue;
    float v = a[i * lda + j];
    if (absolute) v = fabsf(v);
    acc += c * (double)v;
  }
  if (col_ok && acc != 0.0) atomicAdd(out + j, acc);
}

}  // namespace

void row_abs_sum_cuda(const float* a, std::int64_t n, std::int64_t m, std::int64_t lda, const std::uint8_t* mask,
                      double* out, std::uintptr_t stream) {
  if (n <= 0) return;
  const int grid = (int)(n < 65536 ? n : 65536);
  row_abs_sum_kernel<<<grid, kRowThreads, 0, as_stream(stream)>>>(a, n, m, lda, mask, out);
  check_launch("row_abs_sum_cuda");
}

void matvec_cuda(const float* a, std::int64_t n, std::int64_t m, std::int64_t lda, const double* y,
                 const std::uint8_t* mask, bool absolute, double* out, std::uintptr_t stream) {
  if (m <= 0) return;
  check_cuda(cudaMemsetAsync(out, 0, (size_t)m * sizeof(double), as_stream(stream)), "matvec_cuda: cudaMemsetAsync");
  if (n <= 0) return;
  const std::int64_t gy = (n + kMvRows - 1) / kMvRows;
  if (gy > 65535) throw std::invalid_argument("A: expected at most 65535 * 64 rows for the CUDA matvec");
  const dim3 grid((unsigned)((m + kMvCols - 1) / kMvCols), (unsigned)gy);
  matvec_kernel<<<grid, kMvCols, 0, as_stream(stream)>>>(a, n, m, lda, y, mask, absolute, out);
  check_launch("matvec_cuda");
}

}  // namespace fastattr
