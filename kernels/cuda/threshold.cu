// CUDA radix-select histograms for the cumulative thresholds (see fastattr/threshold.py).
//
// Each level histograms counts and double sums of the values whose higher digits equal `prefix`,
// over `bits` bits starting at `shift` of the float32 pattern (non-negative floats order like their
// bit patterns). Blocks keep a shared-memory histogram and flush its non-empty buckets with global
// atomics. Edge scores are recomputed on the fly from A, the row scales and the row factors, with
// IEEE division and multiplication in the same order as circuit-tracer, so the N x N score matrix
// is never stored.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "graph_kernels.cuh"
#include "launch_utils.cuh"

namespace fastattr {

namespace {

using ull = unsigned long long;
constexpr int kHistThreads = 256;
constexpr unsigned kInfBits = 0x7f800000u;

__global__ void init_stats_kernel(ull* stats) {
  stats[0] = 0;         // non-zero count
  stats[1] = kInfBits;  // smallest non-zero value (bits)
  stats[2] = 0;         // any negative
  stats[3] = 0;         // any non-finite
}

// Per-thread statistics of level 0, reduced with a few global atomics per block.
struct Stats {
  ull nnz = 0;
  unsigned min_bits = kInfBits;
  bool negative = false, nonfinite = false;
};

__device__ inline bool add_value(float v, int shift, int bits, unsigned prefix, bool level0, unsigned* scount,
                                 double* ssum, Stats& st) {
  if (level0) {
    if (!isfinite(v)) {
      st.nonfinite = true;
      return false;
    }
    if (v < 0.0f) {
      st.negative = true;
      return false;
    }
  }
  if (v == 0.0f) return false;
  const unsigned u = __float_as_uint(v);
  if (level0) {
    st.nnz += 1;
    st.min_bits = u < st.min_bits ? u : st.min_bits;
  }
  const int up = shift + bits;
  if (up < 32 && (u >> up) != prefix) return false;
  const unsigned b = (u >> shift) & ((1u << bits) - 1u);
  atomicAdd(scount + b, 1u);
  atomicAdd(ssum + b, (double)v);
  return true;
}

__device__ inline void flush(int nb, unsigned* scount, double* ssum, ull* count, double* sums, bool level0,
                             const Stats& st, ull* stats) {
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    if (scount[b] != 0) {
      atomicAdd(count + b, (ull)scount[b]);
      atomicAdd(sums + b, ssum[b]);
    }
  }
  if (level0) {
    if (st.nnz != 0) atomicAdd(stats + 0, st.nnz);
    if (st.min_bits != kInfBits) atomicMin(stats + 1, (ull)st.min_bits);
    if (st.negative) atomicOr(stats + 2, 1ull);
    if (st.nonfinite) atomicOr(stats + 3, 1ull);
  }
}

__device__ inline void clear_shared(int nb, unsigned* scount, double* ssum) {
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    scount[b] = 0;
    ssum[b] = 0.0;
  }
  __syncthreads();
}

// A block's histogram in dynamic shared memory: nb double sums, then nb counts; cleared.
__device__ inline void shared_hist(int nb, double*& ssum, unsigned*& scount) {
  extern __shared__ double smem[];
  ssum = smem;
  scount = reinterpret_cast<unsigned*>(smem + nb);
  clear_shared(nb, scount, ssum);
}

__global__ void hist_1d_kernel(const float* __restrict__ s, std::int64_t n, int shift, int bits, unsigned prefix,
                               bool level0, ull* count, double* sums, ull* stats) {
  const int nb = 1 << bits;
  double* ssum;
  unsigned* scount;
  shared_hist(nb, ssum, scount);
  Stats st;
  const std::int64_t stride = (std::int64_t)gridDim.x * blockDim.x;
  for (std::int64_t i = (std::int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    add_value(s[i], shift, bits, prefix, level0, scount, ssum, st);
  flush(nb, scount, ssum, count, sums, level0, st, stats);
}

__device__ inline float edge_score(const float* row, const std::uint8_t* mask, std::int64_t j, float scale,
                                   float factor) {
  const float v = mask[j] != 0 ? fabsf(row[j]) : 0.0f;
  return __fmul_rn(__fdiv_rn(v, scale), factor);
}

__global__ void edge_hist_kernel(const float* __restrict__ a, std::int64_t n, std::int64_t lda,
                                 const std::uint8_t* __restrict__ mask, const float* __restrict__ scale,
                                 const float* __restrict__ factor, int shift, int bits, unsigned prefix, bool level0,
                                 ull* count, double* sums, ull* stats) {
  const int nb = 1 << bits;
  double* ssum;
  unsigned* scount;
  shared_hist(nb, ssum, scount);
  Stats st;
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const float f = factor[i];
    if (mask[i] == 0 || f == 0.0f) continue;  // the whole row scores zero
    const float sc = scale[i];
    const float* row = a + i * lda;
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x)
      add_value(edge_score(row, mask, j, sc, f), shift, bits, prefix, level0, scount, ssum, st);
  }
  flush(nb, scount, ssum, count, sums, level0, st, stats);
}

__global__ void edge_mask_kernel(const float* __restrict__ a, std::int64_t n, std::int64_t lda,
                                 const std::uint8_t* __restrict__ mask, const float* __restrict__ scale,
                                 const float* __restrict__ factor, float thr, std::uint8_t* __restrict__ out) {
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    std::uint8_t* o = out + i * n;
    const float f = factor[i];
    const bool active = mask[i] != 0 && f != 0.0f;
    const float sc = scale[i];
    const float* row = a + i * lda;
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x)
      o[j] = active && edge_score(row, mask, j, sc, f) >= thr ? 1 : 0;
  }
}

int hist_grid(std::int64_t work) {
  int dev = 0, sms = 1;
  check_cuda(cudaGetDevice(&dev), "hist_grid: cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "hist_grid: cudaDeviceGetAttribute");
  const std::int64_t want = (work + kHistThreads - 1) / kHistThreads;
  const std::int64_t cap = (std::int64_t)sms * 4;
  return (int)(want < cap ? (want > 0 ? want : 1) : cap);
}

void prepare(int bits, int level, std::int64_t* count, double* sums, std::int64_t* stats, cudaStream_t st) {
  const size_t nb = (size_t)1 << bits;
  check_cuda(cudaMemsetAsync(count, 0, nb * sizeof(std::int64_t), st), "histogram: cudaMemsetAsync");
  check_cuda(cudaMemsetAsync(sums, 0, nb * sizeof(double), st), "histogram: cudaMemsetAsync");
  if (level == 0) init_stats_kernel<<<1, 1, 0, st>>>(reinterpret_cast<ull*>(stats));
}

}  // namespace

void hist_1d_cuda(const float* scores, std::int64_t n, int shift, int bits, std::uint32_t prefix, int level,
                  std::int64_t* count, double* sums, std::int64_t* stats, std::uintptr_t stream) {
  const cudaStream_t st = as_stream(stream);
  prepare(bits, level, count, sums, stats, st);
  const size_t smem = ((size_t)1 << bits) * (sizeof(double) + sizeof(unsigned));
  hist_1d_kernel<<<hist_grid(n), kHistThreads, smem, st>>>(scores, n, shift, bits, prefix, level == 0,
                                                           reinterpret_cast<ull*>(count), sums,
                                                           reinterpret_cast<ull*>(stats));
  check_launch("hist_1d_cuda");
}

void edge_hist_cuda(const float* a, std::int64_t n, std::int64_t lda, const std::uint8_t* mask, const float* scale,
                    const float* factor, int shift, int bits, std::uint32_t prefix, int level, std::int64_t* count,
                    double* sums, std::int64_t* stats, std::uintptr_t stream) {
  const cudaStream_t st = as_stream(stream);
  prepare(bits, level, count, sums, stats, st);
  if (n <= 0) return;
  const size_t smem = ((size_t)1 << bits) * (sizeof(double) + sizeof(unsigned));
  const int grid = hist_grid(n * kHistThreads) < n ? hist_grid(n * kHistThreads) : (int)n;
  edge_hist_kernel<<<grid, kHistThreads, smem, st>>>(a, n, lda, mask, scale, factor, shift, bits, prefix, level == 0,
                                                     reinterpret_cast<ull*>(count), sums,
                                                     reinterpret_cast<ull*>(stats));
  check_launch("edge_hist_cuda");
}

void edge_mask_cuda(const float* a, std::int64_t n, std::int64_t lda, const std::uint8_t* mask, const float* scale,
                    const float* factor, float thr, std::uint8_t* out, std::uintptr_t stream) {
  if (n <= 0) return;
  const int grid = (int)(n < 65536 ? n : 65536);
  edge_mask_kernel<<<grid, kHistThreads, 0, as_stream(stream)>>>(a, n, lda, mask, scale, factor, thr, out);
  check_launch("edge_mask_cuda");
}

}  // namespace fastattr
