// CUDA radix-select histograms for the cumulative thresholds (see fastattr/ops/threshold.py).
//
// Each level histograms counts and sums of the values whose higher digits equal `prefix`, over the
// level's digit of the float32 pattern (non-negative floats order like their bit patterns; the
// digits are csrc/graph.h's). Blocks keep a shared-memory histogram and flush its non-empty
// buckets with global atomics. Edge scores are recomputed on the fly from A, the row scales and the
// row factors, with IEEE division and multiplication in the same order as circuit-tracer, so the
// N x N score matrix is never stored.
//
// The sums come in two modes (graph_kernels.cuh, HistOut): double atomics, whose order varies and
// with it the last bits of a bucket's sum, or (deterministic) exact int64 sums of the significands,
// which every order of integer atomics gives alike.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "graph.h"
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

// One level's digit and the digits above it, from csrc/graph.h (host constants).
struct Digit {
  int shift, bits;
  unsigned prefix;
  bool level0;
};

Digit digit_of(int level, std::uint32_t prefix) {
  return Digit{kSelectShift[level], kSelectBits[level], prefix, level == 0};
}

// Per-thread statistics of level 0, reduced with a few global atomics per block.
struct Stats {
  ull nnz = 0;
  unsigned min_bits = kInfBits;
  bool negative = false, nonfinite = false;
};

// The float32 significand as an integer: value = significand * 2^(max(exponent, 1) - 150).
__device__ inline ull significand(unsigned u) {
  const unsigned m = u & 0x7fffffu;
  return (u >> 23) != 0 ? (ull)(m | 0x800000u) : (ull)m;
}

// A block's histogram in dynamic shared memory: nb 8-byte sums (double, or the exact significand
// sums), then nb counts.
template <bool Exact>
struct SharedHist {
  using Acc = typename std::conditional<Exact, ull, double>::type;
  Acc* sum;
  unsigned* count;
  int nb;

  __device__ explicit SharedHist(int n_buckets) : nb(n_buckets) {
    extern __shared__ ull smem[];
    sum = reinterpret_cast<Acc*>(smem);
    count = reinterpret_cast<unsigned*>(smem + nb);
    for (int b = threadIdx.x; b < nb; b += blockDim.x) {
      sum[b] = Acc(0);
      count[b] = 0;
    }
    __syncthreads();
  }

  __device__ void add(unsigned b, float v, unsigned u) {
    atomicAdd(count + b, 1u);
    if constexpr (Exact) {
      atomicAdd(sum + b, significand(u));
    } else {
      atomicAdd(sum + b, (double)v);
    }
  }

  __device__ void flush(const HistOut& out) {
    __syncthreads();
    for (int b = threadIdx.x; b < nb; b += blockDim.x) {
      if (count[b] == 0) continue;
      atomicAdd(reinterpret_cast<ull*>(out.count) + b, (ull)count[b]);
      if constexpr (Exact) {
        atomicAdd(reinterpret_cast<ull*>(out.sig_sums) + b, sum[b]);
      } else {
        atomicAdd(out.sums + b, sum[b]);
      }
    }
  }
};

template <bool Exact>
__device__ inline void add_value(float v, const Digit& d, SharedHist<Exact>& h, Stats& st) {
  if (d.level0) {
    if (!isfinite(v)) {
      st.nonfinite = true;
      return;
    }
    if (v < 0.0f) {
      st.negative = true;
      return;
    }
  }
  if (v == 0.0f) return;
  const unsigned u = __float_as_uint(v);
  if (d.level0) {
    st.nnz += 1;
    st.min_bits = u < st.min_bits ? u : st.min_bits;
  }
  const int up = d.shift + d.bits;
  if (up < 32 && (u >> up) != d.prefix) return;
  h.add((u >> d.shift) & ((1u << d.bits) - 1u), v, u);
}

// Level-0 statistics are integers (a count, a minimum, two flags): order-independent atomics.
__device__ inline void flush_stats(const Digit& d, const Stats& st, ull* stats) {
  if (!d.level0) return;
  if (st.nnz != 0) atomicAdd(stats + 0, st.nnz);
  if (st.min_bits != kInfBits) atomicMin(stats + 1, (ull)st.min_bits);
  if (st.negative) atomicOr(stats + 2, 1ull);
  if (st.nonfinite) atomicOr(stats + 3, 1ull);
}

template <bool Exact>
__global__ void hist_1d_kernel(const float* __restrict__ s, std::int64_t n, Digit d, HistOut out) {
  SharedHist<Exact> h(1 << d.bits);
  Stats st;
  const std::int64_t stride = (std::int64_t)gridDim.x * blockDim.x;
  for (std::int64_t i = (std::int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    add_value<Exact>(s[i], d, h, st);
  h.flush(out);
  flush_stats(d, st, reinterpret_cast<ull*>(out.stats));
}

__device__ inline float edge_score(const float* row, const std::uint8_t* mask, std::int64_t j, float scale,
                                   float factor) {
  const float v = mask[j] != 0 ? fabsf(row[j]) : 0.0f;
  return __fmul_rn(__fdiv_rn(v, scale), factor);
}

// The pruned graph's edge scores, as the CPU sweep and circuit-tracer compute them.
struct EdgeArgs {
  const float* a;
  std::int64_t n, lda;
  const std::uint8_t* mask;
  const float* scale;
  const float* factor;
};

template <bool Exact>
__global__ void edge_hist_kernel(EdgeArgs e, Digit d, HistOut out) {
  SharedHist<Exact> h(1 << d.bits);
  Stats st;
  for (std::int64_t i = blockIdx.x; i < e.n; i += gridDim.x) {
    const float f = e.factor[i];
    if (e.mask[i] == 0 || f == 0.0f) continue;  // the whole row scores zero
    const float sc = e.scale[i];
    const float* row = e.a + i * e.lda;
    for (std::int64_t j = threadIdx.x; j < e.n; j += blockDim.x)
      add_value<Exact>(edge_score(row, e.mask, j, sc, f), d, h, st);
  }
  h.flush(out);
  flush_stats(d, st, reinterpret_cast<ull*>(out.stats));
}

__global__ void edge_mask_kernel(EdgeArgs e, float thr, std::uint8_t* __restrict__ out) {
  for (std::int64_t i = blockIdx.x; i < e.n; i += gridDim.x) {
    std::uint8_t* o = out + i * e.n;
    const float f = e.factor[i];
    const bool active = e.mask[i] != 0 && f != 0.0f;
    const float sc = e.scale[i];
    const float* row = e.a + i * e.lda;
    for (std::int64_t j = threadIdx.x; j < e.n; j += blockDim.x)
      o[j] = active && edge_score(row, e.mask, j, sc, f) >= thr ? 1 : 0;
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

// Zero the outputs of one level (and initialise the level-0 statistics).
void prepare(int level, const HistOut& out, cudaStream_t st) {
  const size_t nb = (size_t)1 << kSelectBits[level];
  check_cuda(cudaMemsetAsync(out.count, 0, nb * sizeof(std::int64_t), st), "histogram: cudaMemsetAsync");
  if (out.deterministic) {
    check_cuda(cudaMemsetAsync(out.sig_sums, 0, nb * sizeof(std::int64_t), st), "histogram: cudaMemsetAsync");
  } else {
    check_cuda(cudaMemsetAsync(out.sums, 0, nb * sizeof(double), st), "histogram: cudaMemsetAsync");
  }
  if (level == 0) init_stats_kernel<<<1, 1, 0, st>>>(reinterpret_cast<ull*>(out.stats));
}

size_t hist_smem(int level) { return ((size_t)1 << kSelectBits[level]) * (sizeof(ull) + sizeof(unsigned)); }

}  // namespace

void hist_1d_cuda(const float* scores, std::int64_t n, int level, std::uint32_t prefix, const HistOut& out,
                  std::uintptr_t stream) {
  const cudaStream_t st = as_stream(stream);
  prepare(level, out, st);
  const Digit d = digit_of(level, prefix);
  const int grid = hist_grid(n);
  if (out.deterministic) {
    hist_1d_kernel<true><<<grid, kHistThreads, hist_smem(level), st>>>(scores, n, d, out);
  } else {
    hist_1d_kernel<false><<<grid, kHistThreads, hist_smem(level), st>>>(scores, n, d, out);
  }
  check_launch("hist_1d_cuda");
}

void edge_hist_cuda(const float* a, std::int64_t n, std::int64_t lda, const std::uint8_t* mask, const float* scale,
                    const float* factor, int level, std::uint32_t prefix, const HistOut& out, std::uintptr_t stream) {
  const cudaStream_t st = as_stream(stream);
  prepare(level, out, st);
  if (n <= 0) return;
  const EdgeArgs e{a, n, lda, mask, scale, factor};
  const Digit d = digit_of(level, prefix);
  const int grid = hist_grid(n * kHistThreads) < n ? hist_grid(n * kHistThreads) : (int)n;
  if (out.deterministic) {
    edge_hist_kernel<true><<<grid, kHistThreads, hist_smem(level), st>>>(e, d, out);
  } else {
    edge_hist_kernel<false><<<grid, kHistThreads, hist_smem(level), st>>>(e, d, out);
  }
  check_launch("edge_hist_cuda");
}

void edge_mask_cuda(const float* a, std::int64_t n, std::int64_t lda, const std::uint8_t* mask, const float* scale,
                    const float* factor, float thr, std::uint8_t* out, std::uintptr_t stream) {
  if (n <= 0) return;
  const int grid = (int)(n < 65536 ? n : 65536);
  const EdgeArgs e{a, n, lda, mask, scale, factor};
  edge_mask_kernel<<<grid, kHistThreads, 0, as_stream(stream)>>>(e, thr, out);
  check_launch("edge_mask_cuda");
}

}  // namespace fastattr
