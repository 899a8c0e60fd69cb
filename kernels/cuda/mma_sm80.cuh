// The tensor-core instructions of the contraction: warp-wide mma.sync (sm_80 and newer; sm_90 runs
// the same instructions) and the fp32 -> TF32 conversion, as inline PTX.
//
// Fragment layouts (which lane holds which matrix element) are those of the PTX ISA's
// "Matrix fragments for mma.m16n8k16 / mma.m16n8k8"; with g = lane / 4 and t = lane % 4:
//   m16n8k16 (f16, bf16): a[r] holds row g + 8 (r % 2), columns 2t + 8 (r / 2) + {0, 1} (low half first)
//                          b[r] holds rows (k) 2t + 8 r + {0, 1} of column g
//   m16n8k8 (tf32):       a[r] holds row g + 8 (r % 2), column t + 4 (r / 2); b[r] row t + 4 r of column g
//   accumulators:         d[e] holds row g + 8 (e / 2), column 2t + e % 2
// The CPU emulation (kernels/cuda_emu/mma.h) implements the same functions from those tables.
#pragma once

#include <cstdint>

#ifdef FASTATTR_CUDA_EMULATION
#include "mma.h"
#else

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the contraction's tensor-core path needs sm_80 or newer (mma.sync with bf16 and tf32)"
#endif

namespace fastattr {
namespace mma {

// d += a * b: A 16x16 row-major, B 16x8 column-major, fp32 accumulators.
__device__ __forceinline__ void m16n8k16_bf16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void m16n8k16_f16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a * b: A 16x8 row-major, B 8x8 column-major, operands in TF32 (to_tf32).
__device__ __forceinline__ void m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// fp32 rounded to TF32 (10 mantissa bits), to nearest, ties away from zero; the low 13 bits zero.
__device__ __forceinline__ std::uint32_t to_tf32(float x) {
  std::uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

}  // namespace mma
}  // namespace fastattr

#endif  // FASTATTR_CUDA_EMULATION
