// CUDA contraction: a grouped GEMM over positions, out[rows[s], b] += V[s, :] . G[b, pos(s), :].
//
// Each block owns one plan tile (up to kTileS vectors of a single position) and kTileB batch
// columns. Vectors and the grads slice stream through shared memory in kTileD-wide slices of D,
// widened to fp32 (float64 inputs stay float64 throughout, as circuit-tracer's einsum does); each
// thread keeps a kMicroS x kMicroB register tile. The (B x S x D) gathered tensor of the reference
// never exists: grads are read in place through their strides.
//
// Without atomics every out element is written by one thread of one block, after a sum in a fixed
// order: run to run identical. With atomics (repeated rows) the order of the adds is the blocks'
// scheduling order; the Python plan's deterministic mode launches passes with unique rows instead.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <string>

#include "common.h"
#include "contraction.h"
#include "launch_utils.cuh"

namespace fastattr {
namespace {

constexpr int kTileS = kCudaContractTileS;  // vectors per block
constexpr int kTileB = 64;                  // batch columns per block
constexpr int kTileD = 16;                  // slice of D staged in shared memory
constexpr int kThreads = 256;
// Each thread accumulates kMicroS vectors x kMicroB batch columns; the threads form a
// kThreadsS x kThreadsB grid whose strided register tiles cover the block's tile exactly.
constexpr int kMicroS = 4;
constexpr int kMicroB = 4;
constexpr int kThreadsS = kTileS / kMicroS;
constexpr int kThreadsB = kTileB / kMicroB;
static_assert(kTileS % kMicroS == 0 && kTileB % kMicroB == 0,
              "the register tiles must divide the block tile, or its last rows/columns get no thread");
static_assert(kThreadsS * kThreadsB == kThreads,
              "kThreads must be the thread grid that covers the kTileS x kTileB tile: with fewer threads "
              "some outputs get none, with more some threads index past the tile");
static_assert((kTileS * kTileD) % kThreads == 0 && (kTileB * kTileD) % kThreads == 0,
              "each shared-memory stage must be loaded by whole rounds of all threads");
constexpr int kLoadsS = kTileS * kTileD / kThreads;  // vector elements each thread stages per slice
constexpr int kLoadsB = kTileB * kTileD / kThreads;  // grads elements each thread stages per slice

// The accumulation type: float for float32 and the half types, double for float64.
template <typename T> using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T> __device__ __forceinline__ AccT<T> to_acc(T x);
template <> __device__ __forceinline__ float to_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double to_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ float to_acc<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// out[...] += v, with v in the accumulation type of the inputs (Acc), out in OutT.
template <typename OutT, typename Acc> __device__ __forceinline__ void add_to(OutT* p, Acc v);
template <> __device__ __forceinline__ void add_to<float, float>(float* p, float v) { *p += v; }
template <> __device__ __forceinline__ void add_to<double, double>(double* p, double v) { *p += v; }
// float64 inputs into a float32 buffer: the sum in float64, then rounded (torch's in-place add).
template <> __device__ __forceinline__ void add_to<float, double>(float* p, double v) {
  *p = static_cast<float>(static_cast<double>(*p) + v);
}
template <> __device__ __forceinline__ void add_to<__half, float>(__half* p, float v) {
  *p = __float2half_rn(__half2float(*p) + v);
}
template <> __device__ __forceinline__ void add_to<__nv_bfloat16, float>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(__bfloat162float(*p) + v);
}

template <typename OutT, typename Acc> __device__ __forceinline__ void atomic_accumulate(OutT* p, Acc v);
template <> __device__ __forceinline__ void atomic_accumulate<float, float>(float* p, float v) { atomicAdd(p, v); }
template <> __device__ __forceinline__ void atomic_accumulate<double, double>(double* p, double v) { atomicAdd(p, v); }
template <> __device__ __forceinline__ void atomic_accumulate<float, double>(float* p, double v) {
  // Compare-and-swap so the float32 result is the float64 sum rounded once, as without atomics.
  auto* bits = reinterpret_cast<unsigned int*>(p);
  unsigned int old = *bits, assumed;
  do {
    assumed = old;
    const float updated = static_cast<float>(static_cast<double>(__uint_as_float(assumed)) + v);
    old = atomicCAS(bits, assumed, __float_as_uint(updated));
  } while (old != assumed);
}
template <> __device__ __forceinline__ void atomic_accumulate<__half, float>(__half* p, float v) {
  atomicAdd(p, __float2half_rn(v));
}
template <> __device__ __forceinline__ void atomic_accumulate<__nv_bfloat16, float>(__nv_bfloat16* p, float v) {
  atomicAdd(p, __float2bfloat16_rn(v));
}

__device__ __forceinline__ float fused_madd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fused_madd(double a, double b, double c) { return fma(a, b, c); }

template <typename T, typename OutT>
__global__ void __launch_bounds__(kThreads) contract_kernel(
    const T* __restrict__ grads, const T* __restrict__ vectors, const int* __restrict__ rows,
    const int* __restrict__ tile_pos, const int* __restrict__ tile_start, const int* __restrict__ tile_end,
    OutT* __restrict__ out, std::int64_t B, std::int64_t P, std::int64_t D, std::int64_t gsb, std::int64_t gsp,
    std::int64_t vss, std::int64_t S, std::int64_t R, std::int64_t osr, std::int64_t osb, bool atomic) {
  using Acc = AccT<T>;
  __shared__ Acc vs[kTileD][kTileS + 1];
  __shared__ Acc gs[kTileD][kTileB + 1];

  const int tile = blockIdx.x;
  const std::int64_t b0 = static_cast<std::int64_t>(blockIdx.y) * kTileB;
  const int p = tile_pos[tile];
  const int s0 = tile_start[tile];
  const int ns = min(tile_end[tile] - s0, kTileS);
  // The Python plan validated every index; these guards keep a corrupted plan from writing or
  // reading out of bounds (it would then produce zeros, never a stray write).
  if (p < 0 || p >= P || s0 < 0 || ns <= 0 || s0 + ns > S) return;
  const int nb = static_cast<int>(B - b0 < kTileB ? B - b0 : kTileB);

  const int tx = threadIdx.x % kThreadsB;  // batch direction
  const int ty = threadIdx.x / kThreadsB;  // vector direction
  Acc acc[kMicroS][kMicroB] = {};

  const T* gbase = grads + static_cast<std::int64_t>(p) * gsp;
  for (std::int64_t d0 = 0; d0 < D; d0 += kTileD) {
    // Stage a kTileS x kTileD slice of vectors and a kTileB x kTileD slice of grads; each
    // thread loads kLoadsS and kLoadsB of them, consecutive threads walking along D for coalescing.
#pragma unroll
    for (int k = 0; k < kLoadsS; ++k) {
      const int idx = threadIdx.x + k * kThreads;
      const int s = idx / kTileD, d = idx % kTileD;
      Acc v = 0;
      if (s < ns && d0 + d < D) v = to_acc(vectors[static_cast<std::int64_t>(s0 + s) * vss + d0 + d]);
      vs[d][s] = v;
    }
#pragma unroll
    for (int k = 0; k < kLoadsB; ++k) {
      const int idx = threadIdx.x + k * kThreads;
      const int b = idx / kTileD, d = idx % kTileD;
      Acc g = 0;
      if (b < nb && d0 + d < D) g = to_acc(gbase[(b0 + b) * gsb + d0 + d]);
      gs[d][b] = g;
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kTileD; ++d) {
      Acc a[kMicroS], g[kMicroB];
#pragma unroll
      for (int i = 0; i < kMicroS; ++i) a[i] = vs[d][ty + kThreadsS * i];
#pragma unroll
      for (int j = 0; j < kMicroB; ++j) g[j] = gs[d][tx + kThreadsB * j];
#pragma unroll
      for (int i = 0; i < kMicroS; ++i)
#pragma unroll
        for (int j = 0; j < kMicroB; ++j) acc[i][j] = fused_madd(a[i], g[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kMicroS; ++i) {
    const int s = ty + kThreadsS * i;
    if (s >= ns) continue;
    const int row = rows[s0 + s];
    if (row < 0 || row >= R) continue;
#pragma unroll
    for (int j = 0; j < kMicroB; ++j) {
      const int b = tx + kThreadsB * j;
      if (b >= nb) continue;
      OutT* dst = out + static_cast<std::int64_t>(row) * osr + (b0 + b) * osb;
      if (atomic) {
        atomic_accumulate<OutT, Acc>(dst, acc[i][j]);
      } else {
        add_to<OutT, Acc>(dst, acc[i][j]);
      }
    }
  }
}

template <typename T, typename OutT>
void launch(const ContractionArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.n_tiles), static_cast<unsigned>((a.B + kTileB - 1) / kTileB));
  contract_kernel<T, OutT><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(a.grads), reinterpret_cast<const T*>(a.vectors),
      reinterpret_cast<const int*>(a.rows), reinterpret_cast<const int*>(a.tile_pos),
      reinterpret_cast<const int*>(a.tile_start), reinterpret_cast<const int*>(a.tile_end),
      reinterpret_cast<OutT*>(a.out), a.B, a.P, a.D, a.grads_stride_b, a.grads_stride_p, a.vectors_stride_s, a.S,
      a.R, a.out_stride_r, a.out_stride_b, a.atomic);
  check_launch("contract_cuda launch");
}

}  // namespace

void contract_cuda(const ContractionArgs& a, std::uintptr_t stream_handle) {
  if (a.B == 0 || a.S == 0 || a.n_tiles == 0) return;
  if (a.n_tiles > 0x7fffffff) fail("tiles: expected fewer than 2^31 tiles, got ", a.n_tiles);
  if ((a.B + kTileB - 1) / kTileB > 65535) fail("grads: expected batch size <= ", 65535 * kTileB, ", got ", a.B);
  const cudaStream_t stream = as_stream(stream_handle);
  const bool same = a.out_dtype == a.vectors_dtype;
  switch (a.vectors_dtype) {
    case kFloat32: launch<float, float>(a, stream); break;
    case kFloat16: same ? launch<__half, __half>(a, stream) : launch<__half, float>(a, stream); break;
    case kBFloat16:
      same ? launch<__nv_bfloat16, __nv_bfloat16>(a, stream) : launch<__nv_bfloat16, float>(a, stream);
      break;
    case kFloat64: same ? launch<double, double>(a, stream) : launch<double, float>(a, stream); break;
    default: fail("vectors: unsupported dtype ", dtype_name(a.vectors_dtype));
  }
}

}  // namespace fastattr
