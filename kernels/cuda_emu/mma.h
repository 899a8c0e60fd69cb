// The warp-wide tensor-core instructions of kernels/cuda/mma_sm80.cuh, emulated.
//
// Every lane deposits its fragments in the warp's exchange area, the warp meets, and each lane
// computes its own four accumulators by looking each matrix element up in the lane and register
// that hold it. The lookups below are the inverse of the layouts in CuTe's MMA_Traits for
// SM80_16x8x16_F32{F16,BF16}..._TN and SM80_16x8x8_F32TF32TF32F32_TN, which are the PTX ISA's
// fragment tables, written here from those (thread, value) -> (row, column) maps and not from
// the kernel's loads, so that a wrong fragment address in the kernel gives wrong sums.
//
// Arithmetic: products exact, the sum of the k products and the accumulator in double, rounded
// to fp32 once: a tensor core at its best. A GPU's fp32 accumulation may truncate where this
// rounds, a difference of an ulp per instruction. TF32 operands must be TF32 (low 13 bits zero,
// what cvt.rna.tf32.f32 gives); anything else is rejected rather than guessed at.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "half.h"
#include "runtime.h"

namespace fastattr {
namespace mma {

namespace emu {

struct Fragments {
  std::uint32_t a[4];
  std::uint32_t b[2];
  float d[4];
};
static_assert(sizeof(Fragments) <= ::fastattr_emu::kLaneScratch, "one lane's fragments fit its exchange slot");

enum class Kind { kF16, kBF16, kTF32 };

inline float element16(std::uint32_t reg, int half, Kind kind) {
  const auto bits = static_cast<std::uint16_t>(half == 0 ? reg & 0xffffu : reg >> 16);
  if (kind == Kind::kBF16) return __bfloat162float(__nv_bfloat16{bits});
  return __half2float(__half{bits});
}

inline float tf32(std::uint32_t reg) {
  if ((reg & 0x1fffu) != 0)
    ::fastattr_emu::fail("mma.m16n8k8.tf32: an operand is not a TF32 value (its low 13 bits are set); "
                         "convert it with cvt.rna.tf32.f32 first");
  return __uint_as_float(reg);
}

// A (16 x K, row-major) element (m, k) and B (K x 8) element (k, n) from the warp's fragments.
inline float a_elem(const Fragments* lanes, int m, int k, Kind kind) {
  if (kind == Kind::kTF32) return tf32(lanes[(m % 8) * 4 + k % 4].a[m / 8 + 2 * (k / 4)]);
  return element16(lanes[(m % 8) * 4 + (k % 8) / 2].a[m / 8 + 2 * (k / 8)], k % 2, kind);
}

inline float b_elem(const Fragments* lanes, int k, int n, Kind kind) {
  if (kind == Kind::kTF32) return tf32(lanes[n * 4 + k % 4].b[k / 4]);
  return element16(lanes[n * 4 + (k % 8) / 2].b[k / 8], k % 2, kind);
}

inline void run(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2], int K, Kind kind) {
  if (::fastattr_emu::warp_live_mask() != ::fastattr_emu::kFullMask)
    ::fastattr_emu::fail("mma.sync.aligned with lanes of the warp exited: it needs all 32 (undefined on a GPU)");
  unsigned char* scratch = ::fastattr_emu::warp_scratch();
  const unsigned lane = ::fastattr_emu::t_ctx->lane;
  Fragments mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.d, d, sizeof mine.d);
  std::memcpy(scratch + lane * ::fastattr_emu::kLaneScratch, &mine, sizeof mine);
  ::fastattr_emu::sync_warp(::fastattr_emu::kFullMask);  // mma.sync.aligned: the whole warp, together
  Fragments lanes[::fastattr_emu::kWarpSize];
  for (int l = 0; l < ::fastattr_emu::kWarpSize; ++l)
    std::memcpy(&lanes[l], scratch + l * ::fastattr_emu::kLaneScratch, sizeof lanes[l]);
  ::fastattr_emu::sync_warp(::fastattr_emu::kFullMask);  // every lane has read before any writes again
  const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
  for (int e = 0; e < 4; ++e) {
    const int m = g + 8 * (e / 2), n = 2 * t + e % 2;
    double sum = static_cast<double>(d[e]);
    for (int k = 0; k < K; ++k)
      sum += static_cast<double>(a_elem(lanes, m, k, kind)) * static_cast<double>(b_elem(lanes, k, n, kind));
    d[e] = static_cast<float>(sum);
  }
}

}  // namespace emu

inline void m16n8k16_bf16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  emu::run(d, a, b, 16, emu::Kind::kBF16);
}
inline void m16n8k16_f16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  emu::run(d, a, b, 16, emu::Kind::kF16);
}
inline void m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  emu::run(d, a, b, 8, emu::Kind::kTF32);
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from zero (adding half a
// TF32 ulp to the magnitude bits carries into the exponent as it should). NaN and Inf pass.
inline std::uint32_t to_tf32(float x) {
  const std::uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x1fffu) != 0 ? (u | 0x00400000u) & ~0x1fffu : u;
  return (u + 0x1000u) & ~0x1fffu;
}

}  // namespace mma
}  // namespace fastattr
