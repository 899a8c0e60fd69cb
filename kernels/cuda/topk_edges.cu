// CUDA top-k incoming edges per row, as CSR (see fastattr/ops/topk_edges.py).
//
// One block per row. The k-th largest |a| is found by a 4-pass radix select over the bit patterns
// of |a| (8 bits per pass, shared 256-bucket counts), which also gives how many entries equal to it
// are needed. A compaction pass then keeps the entries above it and, in column order, the first
// `need` entries equal to it (ties go to the lower column, as on the CPU), using cub::BlockScan for
// the output offsets, so columns come out in increasing order.
//
// Deterministic as it stands: row sums are cub block reductions (a fixed order for a fixed block
// size) and every atomic is an integer one (bucket counts, the non-finite flag).
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <stdexcept>
#include <string>

#include "graph_kernels.cuh"
#include "launch_utils.cuh"

namespace fastattr {

namespace {

constexpr int kThreads = 256;

__global__ void topk_count_kernel(const float* __restrict__ a, std::int64_t rows, std::int64_t cols, std::int64_t lda,
                                  std::int64_t k, std::int64_t* __restrict__ row_len, float* __restrict__ row_abs_sum,
                                  int* __restrict__ flags) {
  using ReduceD = cub::BlockReduce<double, kThreads>;
  using ReduceL = cub::BlockReduce<long long, kThreads>;
  __shared__ typename ReduceD::TempStorage tmp_d;
  __shared__ typename ReduceL::TempStorage tmp_l;
  for (std::int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const float* row = a + i * lda;
    double s = 0.0;
    long long nz = 0;
    for (std::int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const float v = row[j];
      s += (double)fabsf(v);
      nz += v != 0.0f ? 1 : 0;
    }
    const double total = ReduceD(tmp_d).Sum(s);
    const long long nnz = ReduceL(tmp_l).Sum(nz);
    if (threadIdx.x == 0) {
      if (!isfinite(total)) atomicOr(flags, 1);
      row_len[i] = k < 0 ? nnz : (nnz < k ? nnz : k);
      row_abs_sum[i] = (float)total;
    }
    __syncthreads();
  }
}

using Scan = cub::BlockScan<int, kThreads>;
using ReduceL = cub::BlockReduce<long long, kThreads>;

// Shared state of the block filling one row at a time.
struct FillShared {
  typename Scan::TempStorage scan;
  typename ReduceL::TempStorage reduce;
  unsigned hist[256];
  unsigned prefix;
  long long need, nnz;
  int carry_keep, carry_eq;
};

__device__ long long row_nnz(const float* row, std::int64_t cols, FillShared& sh) {
  long long nz = 0;
  for (std::int64_t j = threadIdx.x; j < cols; j += kThreads) nz += row[j] != 0.0f ? 1 : 0;
  const long long nnz = ReduceL(sh.reduce).Sum(nz);
  if (threadIdx.x == 0) sh.nnz = nnz;
  __syncthreads();
  return sh.nnz;
}

// The bit pattern `thr` of the want-th largest |a| of the row, and how many entries equal to it
// are kept (`need_eq`): four 8-bit digits, highest first, each chosen from a shared histogram of
// the entries that match the digits above. Integer atomics only: order-independent.
__device__ void kth_pattern(const float* row, std::int64_t cols, long long want, FillShared& sh, unsigned& thr,
                            long long& need_eq) {
  unsigned prefix = 0;
  long long remaining = want;  // how many of the largest still to place at this digit
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) sh.hist[b] = 0;
    __syncthreads();
    const unsigned up_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (std::int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const unsigned u = __float_as_uint(fabsf(row[j]));
      if (u != 0u && (u & up_mask) == (prefix & up_mask)) atomicAdd(&sh.hist[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long acc = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (acc + sh.hist[b] >= remaining) break;
        acc += sh.hist[b];
      }
      sh.prefix = prefix | ((unsigned)b << shift);
      sh.need = remaining - acc;
    }
    __syncthreads();
    prefix = sh.prefix;
    remaining = sh.need;
    __syncthreads();
  }
  thr = prefix;
  need_eq = remaining;
}

// Write the kept entries in column order: every non-zero (all), or those above `thr` and the first
// `need_eq` equal to it (ties to the lower column). Block scans give each kept entry its offset.
__device__ void compact_row(const float* row, std::int64_t cols, bool all, unsigned thr, long long need_eq,
                            std::int64_t* col_out, float* val_out, FillShared& sh) {
  if (threadIdx.x == 0) {
    sh.carry_keep = 0;
    sh.carry_eq = 0;
  }
  __syncthreads();
  for (std::int64_t base = 0; base < cols; base += kThreads) {
    const std::int64_t j = base + threadIdx.x;
    const float v = j < cols ? row[j] : 0.0f;
    const unsigned u = __float_as_uint(fabsf(v));
    int eq = (!all && j < cols && u == thr) ? 1 : 0;
    int eq_rank = 0, eq_total = 0;
    Scan(sh.scan).ExclusiveSum(eq, eq_rank, eq_total);
    __syncthreads();
    const int carry_eq = sh.carry_eq;
    int keep;
    if (all) keep = (j < cols && v != 0.0f) ? 1 : 0;
    else keep = (j < cols && u != 0u && (u > thr || (eq && (long long)(carry_eq + eq_rank) < need_eq))) ? 1 : 0;
    int pos = 0, kept = 0;
    Scan(sh.scan).ExclusiveSum(keep, pos, kept);
    const int carry_keep = sh.carry_keep;
    if (keep) {
      col_out[carry_keep + pos] = j;
      val_out[carry_keep + pos] = v;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      sh.carry_keep = carry_keep + kept;
      sh.carry_eq = carry_eq + eq_total;
    }
    __syncthreads();
  }
}

__global__ void topk_fill_kernel(const float* __restrict__ a, std::int64_t rows, std::int64_t cols, std::int64_t lda,
                                 const std::int64_t* __restrict__ crow, std::int64_t* __restrict__ col_out,
                                 float* __restrict__ val_out) {
  __shared__ FillShared sh;
  for (std::int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const std::int64_t start = crow[i];
    const long long want = (long long)(crow[i + 1] - start);
    if (want <= 0) continue;  // uniform across the block
    const float* row = a + i * lda;
    // Unless the row keeps every non-zero, find where its kept entries end.
    const bool all = want >= row_nnz(row, cols, sh);
    unsigned thr = 1u;
    long long need_eq = 0;
    if (!all) kth_pattern(row, cols, want, sh, thr, need_eq);
    compact_row(row, cols, all, thr, need_eq, col_out + start, val_out + start, sh);
  }
}

int row_grid(std::int64_t rows) { return (int)(rows < 65536 ? (rows > 0 ? rows : 1) : 65536); }

}  // namespace

void topk_count_cuda(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
                     std::int64_t* row_len, float* row_abs_sum, int* flags, std::uintptr_t stream) {
  if (rows <= 0) return;
  topk_count_kernel<<<row_grid(rows), kThreads, 0, as_stream(stream)>>>(a, rows, cols, lda, k, row_len, row_abs_sum,
                                                                       flags);
  check_launch("topk_count_cuda");
}

void topk_fill_cuda(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, const std::int64_t* crow,
                    std::int64_t* col_out, float* val_out, std::uintptr_t stream) {
  if (rows <= 0) return;
  topk_fill_kernel<<<row_grid(rows), kThreads, 0, as_stream(stream)>>>(a, rows, cols, lda, crow, col_out, val_out);
  check_launch("topk_fill_cuda");
}

}  // namespace fastattr
