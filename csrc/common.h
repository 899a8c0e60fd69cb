// Shared helpers for the fastattr extension: argument checks and the raw-pointer ABI.
//
// The extension never sees a torch tensor. Python passes data pointers as integers, with shapes,
// strides (in elements) and dtype codes, so one binary serves every torch version. Because a bad
// pointer or index here is a memory error rather than an exception, every entry point re-checks
// what the Python layer already validated: the C++ layer must stay safe on its own.
#pragma once

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fastattr {

// Must match fastattr/_runtime/ext.py DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4, kUInt8 = 5, kFloat64 = 6 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kInt32: return "int32";
    case kInt64: return "int64";
    case kUInt8: return "uint8";
    case kFloat64: return "float64";
    default: return "unknown";
  }
}

// pybind11 translates std::invalid_argument into ValueError.
template <typename... Args>
[[noreturn]] inline void fail(Args&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

inline void check_arg(bool ok, const char* arg, const std::string& expected, const std::string& actual) {
  if (!ok) fail(arg, ": expected ", expected, ", got ", actual);
}

inline void check_nonnull(std::uintptr_t ptr, std::int64_t numel, const char* arg) {
  if (numel > 0 && ptr == 0) fail(arg, ": expected a non-null data pointer for ", numel, " elements");
}

inline void check_dtype(int code, int expected, const char* arg) {
  if (code != expected) fail(arg, ": expected dtype ", dtype_name(expected), ", got ", dtype_name(code));
}

// A row-major float32 matrix passed as pointer, sizes and row stride.
inline void check_matrix(std::uintptr_t ptr, int dtype, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                         const char* arg) {
  check_dtype(dtype, kFloat32, arg);
  if (rows < 0 || cols < 0) fail(arg, ": expected non-negative sizes, got (", rows, ", ", cols, ")");
  if (rows > 0 && ld < cols) fail(arg, ": expected a row stride >= ", cols, ", got ", ld);
  check_nonnull(ptr, rows * cols, arg);
}

template <typename T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// A square matrix of graph nodes; node ids are int32 in the kernels.
inline void check_square(std::int64_t n, std::int64_t lda, const char* arg) {
  if (n < 0) fail(arg, ": expected a non-negative size, got ", n);
  if (n > INT32_MAX - 1) fail(arg, ": expected fewer than 2^31 - 1 nodes, got ", n);
  if (n > 0 && lda < n) fail(arg, ": expected a row stride >= ", n, ", got ", lda);
}

inline void check_eps(float eps) {
  if (!(eps > 0.0f) || !std::isfinite(eps)) fail("eps: expected a positive finite value, got ", eps);
}

inline void check_max_iter(std::int64_t max_iter) {
  if (max_iter < 0) fail("max_iter: expected a non-negative integer, got ", max_iter);
}

inline void check_threshold(double t) {
  if (!std::isfinite(t)) fail("threshold: expected a finite number, got ", t);
}

inline void check_float_dtype(int code, const char* arg) {
  if (code != kFloat32 && code != kFloat16 && code != kBFloat16 && code != kFloat64)
    fail(arg, ": expected dtype float32, float16, bfloat16 or float64, got ", dtype_name(code));
}

// Half-precision conversions for the CPU kernels (no dependency on compiler __fp16 support).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (std::uint32_t)(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_to_float(std::uint16_t b) {
  std::uint32_t bits = (std::uint32_t)b << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

template <int Code> struct Loader;
template <> struct Loader<kFloat32> {
  static float load(const void* p, std::int64_t i) { return static_cast<const float*>(p)[i]; }
};
template <> struct Loader<kFloat16> {
  static float load(const void* p, std::int64_t i) { return half_to_float(static_cast<const std::uint16_t*>(p)[i]); }
};
template <> struct Loader<kBFloat16> {
  static float load(const void* p, std::int64_t i) { return bf16_to_float(static_cast<const std::uint16_t*>(p)[i]); }
};

}  // namespace fastattr
