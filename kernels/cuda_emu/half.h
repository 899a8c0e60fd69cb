// __half and __nv_bfloat16 for the CPU emulation: storage types with the conversions and atomics
// the kernels use. float <-> half goes through gcc's _Float16 (correctly rounded, to nearest
// even); bfloat16 is float's upper half, rounded to nearest even here.
#pragma once

#include <cstdint>
#include <cstring>

#include "runtime.h"

struct __half {
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, sizeof f);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, sizeof h.bits);
  return h;
}
inline __half __float2half(float x) { return __float2half_rn(x); }
inline __half __double2half(double x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, sizeof h.bits);
  return h;
}

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const unsigned u = __float_as_uint(x);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = static_cast<std::uint16_t>((u >> 16) | 0x40u);  // stays a (quiet) NaN
  } else {
    b.bits = static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }

// The sum in double, rounded once to the storage type, as the hardware's half atomic add rounds
// its result once.
inline __half atomicAdd(__half* p, __half v) {
  return atomic_update(p, [v](__half x) {
    return __double2half(static_cast<double>(__half2float(x)) + static_cast<double>(__half2float(v)));
  });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return atomic_update(p, [v](__nv_bfloat16 x) { return __float2bfloat16_rn(__bfloat162float(x) + __bfloat162float(v)); });
}

// Bit views and pairs, as the fragment loads of an mma kernel pack them (x in the low half).
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162{lo, hi}; }
