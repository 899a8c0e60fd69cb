// CUDA contraction: a grouped GEMM over positions, out[rows[s], b] += V[s, :] . G[b, pos(s), :].
//
// Each block owns one plan tile (up to kTileS vectors of a single position) and kTileB batch
// columns; vectors and the grads slice stream through shared memory in slices of D.
// The (B x S x D) gathered tensor of the reference never exists: grads are read in place through
// their strides.
//
// Two kernels:
//   contract_mma_kernel   fp32, fp16 and bf16 inputs, on tensor cores (mma.sync, sm_80 and newer;
//                         sm_90 runs the same instructions): fp16/bf16 through m16n8k16 with fp32
//                         accumulators; fp32 through 3xTF32 (big = tf32(x), small = tf32(x - big),
//                         small*big + big*small + big*big), which keeps the sum within ~1e-6
//                         relative of an fp32 FMA sum where one TF32 product would be ~1e-3 off.
//   contract_simt_kernel  fp64 inputs only: the tensor-core wrappers have no fp64 shape, and
//                         circuit-tracer's fp64 runs (its cross-backend checks) want fp64 sums, so
//                         these stay on fp64 FMA.
// The build targets sm_80 and newer only (CMakeLists.txt), so no SIMT fallback for older cards is
// needed; the launchers refuse a device below compute capability 8.0 with a message.
//
// Without atomics every out element is written by one thread of one block, after a sum in a fixed
// order: run to run identical. With atomics (repeated rows) the order of the adds is the blocks'
// scheduling order; the Python plan's deterministic mode launches passes with unique rows instead.
//
// The tensor-core kernel uses only the wrappers of mma_sm80.cuh and plain global/shared loads (no
// ldmatrix or cp.async), so that the CPU emulation (FASTATTR_CUDA_EMULATION) can execute it.
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
#include "mma_sm80.cuh"

namespace fastattr {
namespace {

constexpr int kTileS = kCudaContractTileS;  // vectors per block (the plan's tile height), both kernels
constexpr int kTileB = 64;                  // batch columns per block, both kernels

// ---- the SIMT kernel (fp64)
constexpr int kSimtTileD = 16;  // slice of D staged in shared memory
constexpr int kSimtThreads = 256;
// Each thread accumulates kMicroS vectors x kMicroB batch columns; the threads form a
// kThreadsS x kThreadsB grid whose strided register tiles cover the block's tile exactly.
constexpr int kMicroS = 4;
constexpr int kMicroB = 4;
constexpr int kThreadsS = kTileS / kMicroS;
constexpr int kThreadsB = kTileB / kMicroB;
static_assert(kTileS % kMicroS == 0 && kTileB % kMicroB == 0,
              "the register tiles must divide the block tile, or its last rows/columns get no thread");
static_assert(kThreadsS * kThreadsB == kSimtThreads,
              "kSimtThreads must be the thread grid that covers the kTileS x kTileB tile: with fewer threads "
              "some outputs get none, with more some threads index past the tile");
static_assert((kTileS * kSimtTileD) % kSimtThreads == 0 && (kTileB * kSimtTileD) % kSimtThreads == 0,
              "each shared-memory stage must be loaded by whole rounds of all threads");
constexpr int kLoadsS = kTileS * kSimtTileD / kSimtThreads;  // vector elements each thread stages per slice
constexpr int kLoadsB = kTileB * kSimtTileD / kSimtThreads;  // grads elements each thread stages per slice

// ---- the tensor-core kernel (fp32, fp16, bf16)
// 4 warps in a 2 x 2 grid; each warp owns a 32 x 32 piece of the block's kTileS x kTileB tile, i.e.
// kMTiles x kNTiles MMA tiles of 16 (vectors) x 8 (batch columns), 32 fp32 accumulators a lane.
constexpr int kMmaM = 16, kMmaN = 8;
constexpr int kWarpsS = 2, kWarpsB = 2;
constexpr int kMmaThreads = 32 * kWarpsS * kWarpsB;
constexpr int kWarpTileS = kTileS / kWarpsS;
constexpr int kWarpTileB = kTileB / kWarpsB;
constexpr int kMTiles = kWarpTileS / kMmaM;
constexpr int kNTiles = kWarpTileB / kMmaN;
static_assert(kWarpTileS * kWarpsS == kTileS && kMTiles * kMmaM == kWarpTileS,
              "the warps' MMA tiles must cover the block's vectors exactly");
static_assert(kWarpTileB * kWarpsB == kTileB && kNTiles * kMmaN == kWarpTileB,
              "the warps' MMA tiles must cover the block's batch columns exactly");
// A slice of D in shared memory is kSliceWords 32-bit words a row; a word holds kPack elements (2
// halves, or one fp32), so a slice is 32 elements of D for the half types and 16 for fp32 (fp32's
// 3xTF32 splits keep twice the operand registers live: 32-element fp32 slices took 247 registers
// on sm_90, near the 255 limit). One MMA step reads 8 words of a row: k16 for the half types, k8
// for TF32 (the fragment tables in mma_sm80.cuh), hence the same word indexing.
constexpr int kSliceWords = 16;
constexpr int kStepWords = 8;
// Row pitch = words + 4 = 20: the 8 rows (g) x 4 words (t) a fragment load touches fall in 32
// distinct banks (g * 20 mod 32 = 0, 20, 8, 28, 16, 4, 24, 12, plus t < 4).
constexpr int kPitch = kSliceWords + 4;
static_assert(kSliceWords % kStepWords == 0, "a D slice must be whole MMA k-steps");
static_assert(kPitch % 32 == 20, "the pitch must spread a fragment load's 8 rows x 4 words over 32 banks");
static_assert((kTileS * kSliceWords) % kMmaThreads == 0 && (kTileB * kSliceWords) % kMmaThreads == 0,
              "each shared-memory stage must be loaded by whole rounds of all threads");
constexpr int kSteps = kSliceWords / kStepWords;             // MMA k-steps per slice
constexpr int kMmaLoadsS = kTileS * kSliceWords / kMmaThreads;  // words each thread stages per slice
constexpr int kMmaLoadsB = kTileB * kSliceWords / kMmaThreads;

template <typename T> struct TcOperand;  // how T packs into the MMA's 32-bit operand words
template <> struct TcOperand<__half> { static constexpr int kPack = 2; };
template <> struct TcOperand<__nv_bfloat16> { static constexpr int kPack = 2; };
template <> struct TcOperand<float> { static constexpr int kPack = 1; };

// The SIMT kernel's accumulation type (it runs fp64 only; the tensor-core kernel accumulates in fp32).
template <typename T> using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T> __device__ __forceinline__ AccT<T> to_acc(T x);
template <> __device__ __forceinline__ double to_acc<double>(double x) { return x; }

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

__device__ __forceinline__ double fused_madd(double a, double b, double c) { return fma(a, b, c); }

// fp64 only (file comment).
template <typename T, typename OutT>
__global__ void __launch_bounds__(kSimtThreads) contract_simt_kernel(
    const T* __restrict__ grads, const T* __restrict__ vectors, const int* __restrict__ rows,
    const int* __restrict__ tile_pos, const int* __restrict__ tile_start, const int* __restrict__ tile_end,
    OutT* __restrict__ out, std::int64_t B, std::int64_t P, std::int64_t D, std::int64_t gsb, std::int64_t gsp,
    std::int64_t vss, std::int64_t S, std::int64_t R, std::int64_t osr, std::int64_t osb, bool atomic) {
  using Acc = AccT<T>;
  __shared__ Acc vs[kSimtTileD][kTileS + 1];
  __shared__ Acc gs[kSimtTileD][kTileB + 1];

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
  for (std::int64_t d0 = 0; d0 < D; d0 += kSimtTileD) {
    // Stage a kTileS x kSimtTileD slice of vectors and a kTileB x kSimtTileD slice of grads; each
    // thread loads kLoadsS and kLoadsB of them, consecutive threads walking along D for coalescing.
#pragma unroll
    for (int k = 0; k < kLoadsS; ++k) {
      const int idx = threadIdx.x + k * kSimtThreads;
      const int s = idx / kSimtTileD, d = idx % kSimtTileD;
      Acc v = 0;
      if (s < ns && d0 + d < D) v = to_acc(vectors[static_cast<std::int64_t>(s0 + s) * vss + d0 + d]);
      vs[d][s] = v;
    }
#pragma unroll
    for (int k = 0; k < kLoadsB; ++k) {
      const int idx = threadIdx.x + k * kSimtThreads;
      const int b = idx / kSimtTileD, d = idx % kSimtTileD;
      Acc g = 0;
      if (b < nb && d0 + d < D) g = to_acc(gbase[(b0 + b) * gsb + d0 + d]);
      gs[d][b] = g;
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kSimtTileD; ++d) {
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

// ---- the tensor-core kernel

// The 32-bit operand word holding elements d, d + 1 (half types) or d (fp32) of a row that is D
// long, zero past its end: zero words add nothing to the sums. Half types are read as raw 16-bit
// patterns, the low half the lower column, as the MMA fragments pack them.
__device__ __forceinline__ std::uint32_t load_word(const float* row, std::int64_t d, std::int64_t D) {
  return d < D ? __float_as_uint(row[d]) : 0u;
}
__device__ __forceinline__ std::uint32_t load_pair(const std::uint16_t* row, std::int64_t d, std::int64_t D) {
  const std::uint32_t lo = d < D ? row[d] : 0u;
  const std::uint32_t hi = d + 1 < D ? row[d + 1] : 0u;
  return lo | (hi << 16);
}
__device__ __forceinline__ std::uint32_t load_word(const __half* row, std::int64_t d, std::int64_t D) {
  return load_pair(reinterpret_cast<const std::uint16_t*>(row), d, D);
}
__device__ __forceinline__ std::uint32_t load_word(const __nv_bfloat16* row, std::int64_t d, std::int64_t D) {
  return load_pair(reinterpret_cast<const std::uint16_t*>(row), d, D);
}

using AFrags = std::uint32_t[kMTiles][4];
using BFrags = std::uint32_t[kNTiles][2];
using Accums = float[kMTiles][kNTiles][4];

// One k-step of the warp's kMTiles x kNTiles MMA tiles.
template <typename T> __device__ __forceinline__ void mma_step(Accums& acc, const AFrags& a, const BFrags& b);
template <> __device__ __forceinline__ void mma_step<__half>(Accums& acc, const AFrags& a, const BFrags& b) {
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) mma::m16n8k16_f16(acc[i][j], a[i], b[j]);
}
template <> __device__ __forceinline__ void mma_step<__nv_bfloat16>(Accums& acc, const AFrags& a, const BFrags& b) {
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) mma::m16n8k16_bf16(acc[i][j], a[i], b[j]);
}

// x = big + small + O(2^-22 |x|): big = tf32(x), small = tf32(x - big); x - big is exact in fp32.
// A non-finite remainder (x infinite or NaN) gets small = 0, so that inf stays inf, not inf - inf.
__device__ __forceinline__ void split_tf32(std::uint32_t bits, std::uint32_t& big, std::uint32_t& small) {
  const float x = __uint_as_float(bits);
  big = mma::to_tf32(x);
  const float rest = x - __uint_as_float(big);
  small = isfinite(rest) ? mma::to_tf32(rest) : 0u;
}

// 3xTF32: the two cross terms first, then big*big, so the small terms are not lost under the large
// one before they are added together; small*small (~2^-22 relative) is dropped.
template <> __device__ __forceinline__ void mma_step<float>(Accums& acc, const AFrags& a, const BFrags& b) {
  // B split once per step, A one MMA row at a time: fewer live registers than splitting all of A.
  std::uint32_t b_big[kNTiles][2], b_small[kNTiles][2];
#pragma unroll
  for (int j = 0; j < kNTiles; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) split_tf32(b[j][r], b_big[j][r], b_small[j][r]);
#pragma unroll
  for (int i = 0; i < kMTiles; ++i) {
    std::uint32_t a_big[4], a_small[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) split_tf32(a[i][r], a_big[r], a_small[r]);
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      mma::m16n8k8_tf32(acc[i][j], a_small, b_big[j]);
      mma::m16n8k8_tf32(acc[i][j], a_big, b_small[j]);
      mma::m16n8k8_tf32(acc[i][j], a_big, b_big[j]);
    }
  }
}

// A = the tile's vectors (kTileS x D, row-major: the MMA's "row" operand), B = the grads slice
// transposed (D x kTileB, each batch column contiguous along D: the "col" operand). Both are staged
// row by row along D, as packed operand words, so a fragment register is one 32-bit shared load.
// Two blocks an SM as the occupancy hint (255 registers still allowed): without it ptxas 13.0 put the
// fp32 kernel at 128 registers on sm_80 and spilled 12 bytes (with it: 124-140 registers, no spill).
constexpr int kMmaMinBlocks = 2;

template <typename T, typename OutT>
__global__ void __launch_bounds__(kMmaThreads, kMmaMinBlocks) contract_mma_kernel(
    const T* __restrict__ grads, const T* __restrict__ vectors, const int* __restrict__ rows,
    const int* __restrict__ tile_pos, const int* __restrict__ tile_start, const int* __restrict__ tile_end,
    OutT* __restrict__ out, std::int64_t B, std::int64_t P, std::int64_t D, std::int64_t gsb, std::int64_t gsp,
    std::int64_t vss, std::int64_t S, std::int64_t R, std::int64_t osr, std::int64_t osb, bool atomic) {
  constexpr int kPack = TcOperand<T>::kPack;
  constexpr int kSliceD = kSliceWords * kPack;  // elements of D per slice
  __shared__ std::uint32_t vs[kTileS][kPitch];
  __shared__ std::uint32_t gs[kTileB][kPitch];

  const int tile = blockIdx.x;
  const std::int64_t b0 = static_cast<std::int64_t>(blockIdx.y) * kTileB;
  const int p = tile_pos[tile];
  const int s0 = tile_start[tile];
  const int ns = min(tile_end[tile] - s0, kTileS);
  // As in the SIMT kernel: a corrupted plan produces zeros, never a stray read or write.
  if (p < 0 || p >= P || s0 < 0 || ns <= 0 || s0 + ns > S) return;
  const int nb = static_cast<int>(B - b0 < kTileB ? B - b0 : kTileB);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // the fragment tables' groupID and thread-in-group
  const int ws = (warp / kWarpsB) * kWarpTileS;  // the warp's first vector in the tile
  const int wb = (warp % kWarpsB) * kWarpTileB;  // and its first batch column
  Accums acc = {};

  const T* gbase = grads + static_cast<std::int64_t>(p) * gsp;
  for (std::int64_t d0 = 0; d0 < D; d0 += kSliceD) {
    // Consecutive threads take consecutive words of a row: coalesced along D.
#pragma unroll
    for (int k = 0; k < kMmaLoadsS; ++k) {
      const int idx = threadIdx.x + k * kMmaThreads;
      const int s = idx / kSliceWords, w = idx % kSliceWords;
      vs[s][w] = s < ns ? load_word(vectors + static_cast<std::int64_t>(s0 + s) * vss, d0 + w * kPack, D) : 0u;
    }
#pragma unroll
    for (int k = 0; k < kMmaLoadsB; ++k) {
      const int idx = threadIdx.x + k * kMmaThreads;
      const int b = idx / kSliceWords, w = idx % kSliceWords;
      gs[b][w] = b < nb ? load_word(gbase + (b0 + b) * gsb, d0 + w * kPack, D) : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int kw = step * kStepWords;
      // Fragment tables (mma_sm80.cuh): a[r] = row g + 8 (r % 2), word t + 4 (r / 2) of the step;
      // b[r] = column g, word t + 4 r. In words these are the same for k16 halves and k8 TF32.
      AFrags a;
      BFrags b;
#pragma unroll
      for (int i = 0; i < kMTiles; ++i)
#pragma unroll
        for (int r = 0; r < 4; ++r) a[i][r] = vs[ws + i * kMmaM + g + 8 * (r % 2)][kw + t + 4 * (r / 2)];
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) b[j][r] = gs[wb + j * kMmaN + g][kw + t + 4 * r];
      mma_step<T>(acc, a, b);
    }
    __syncthreads();
  }

  // Accumulator e of a tile: row g + 8 (e / 2), column 2t + e % 2.
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int s = ws + i * kMmaM + g + 8 * half;
      if (s >= ns) continue;
      const int row = rows[s0 + s];
      if (row < 0 || row >= R) continue;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int b = wb + j * kMmaN + 2 * t + c;
          if (b >= nb) continue;
          OutT* dst = out + static_cast<std::int64_t>(row) * osr + (b0 + b) * osb;
          const float v = acc[i][j][2 * half + c];
          if (atomic) {
            atomic_accumulate<OutT, float>(dst, v);
          } else {
            add_to<OutT, float>(dst, v);
          }
        }
    }
}

// ---- launchers

// The device guard: this build's kernels are SASS for sm_80 and newer (CMakeLists.txt) and the
// tensor-core kernel needs sm_80's mma.sync; an older card would fail with "no kernel image",
// which does not say what to do instead.
void require_sm80() {
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "contract_cuda: cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "contract_cuda: compute capability");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "contract_cuda: compute capability");
  if (major < 8)
    fail("grads: the cuda backend's contraction needs a GPU of compute capability 8.0 or newer, got ", major, ".",
         minor, " (device ", dev, "); use backend='triton' or 'torch'");
}

dim3 grid_of(const ContractionArgs& a) {
  return dim3(static_cast<unsigned>(a.n_tiles), static_cast<unsigned>((a.B + kTileB - 1) / kTileB));
}

template <typename T, typename OutT>
void launch_mma(const ContractionArgs& a, cudaStream_t stream) {
  require_sm80();
  contract_mma_kernel<T, OutT><<<grid_of(a), kMmaThreads, 0, stream>>>(
      reinterpret_cast<const T*>(a.grads), reinterpret_cast<const T*>(a.vectors),
      reinterpret_cast<const int*>(a.rows), reinterpret_cast<const int*>(a.tile_pos),
      reinterpret_cast<const int*>(a.tile_start), reinterpret_cast<const int*>(a.tile_end),
      reinterpret_cast<OutT*>(a.out), a.B, a.P, a.D, a.grads_stride_b, a.grads_stride_p, a.vectors_stride_s, a.S,
      a.R, a.out_stride_r, a.out_stride_b, a.atomic);
  check_launch("contract_cuda (tensor cores) launch");
}

template <typename T, typename OutT>
void launch_simt(const ContractionArgs& a, cudaStream_t stream) {
  require_sm80();
  contract_simt_kernel<T, OutT><<<grid_of(a), kSimtThreads, 0, stream>>>(
      reinterpret_cast<const T*>(a.grads), reinterpret_cast<const T*>(a.vectors),
      reinterpret_cast<const int*>(a.rows), reinterpret_cast<const int*>(a.tile_pos),
      reinterpret_cast<const int*>(a.tile_start), reinterpret_cast<const int*>(a.tile_end),
      reinterpret_cast<OutT*>(a.out), a.B, a.P, a.D, a.grads_stride_b, a.grads_stride_p, a.vectors_stride_s, a.S,
      a.R, a.out_stride_r, a.out_stride_b, a.atomic);
  check_launch("contract_cuda (fp64) launch");
}

}  // namespace

void contract_cuda(const ContractionArgs& a, std::uintptr_t stream_handle) {
  if (a.B == 0 || a.S == 0 || a.n_tiles == 0) return;
  if (a.n_tiles > 0x7fffffff) fail("tiles: expected fewer than 2^31 tiles, got ", a.n_tiles);
  if ((a.B + kTileB - 1) / kTileB > 65535) fail("grads: expected batch size <= ", 65535 * kTileB, ", got ", a.B);
  const cudaStream_t stream = as_stream(stream_handle);
  const bool same = a.out_dtype == a.vectors_dtype;
  switch (a.vectors_dtype) {
    case kFloat32: launch_mma<float, float>(a, stream); break;
    case kFloat16: same ? launch_mma<__half, __half>(a, stream) : launch_mma<__half, float>(a, stream); break;
    case kBFloat16:
      same ? launch_mma<__nv_bfloat16, __nv_bfloat16>(a, stream) : launch_mma<__nv_bfloat16, float>(a, stream);
      break;
    case kFloat64: same ? launch_simt<double, double>(a, stream) : launch_simt<double, float>(a, stream); break;
    default: fail("vectors: unsupported dtype ", dtype_name(a.vectors_dtype));
  }
}

}  // namespace fastattr
