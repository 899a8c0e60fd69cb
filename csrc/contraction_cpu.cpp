// CPU contraction: one task per (tile, batch chunk), a register-blocked dot-product micro-kernel.
//
// Host memory lets us check every index before touching memory, so out-of-range tiles or rows are
// reported as ValueError instead of corrupting the heap. Half-precision inputs are widened once
// per task into a scratch buffer so the micro-kernel sees fp32; float64 runs the same micro-kernel
// in fp64.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "contraction.h"

#ifdef FASTATTR_WITH_OPENMP
#include <omp.h>
#endif

namespace fastattr {
namespace {

constexpr std::int64_t kBatchChunk = 32;
// Batch columns per task when tasks own columns (deterministic mode with repeated rows): narrower,
// since only B / kOwnedChunk tasks share the threads.
constexpr std::int64_t kOwnedChunk = 16;

// 4 rows x 2 batch columns per step: 8 accumulators reuse each loaded value 2-4 times. T is the
// accumulation type: float for float32 and the widened half types, double for float64 (so a
// float64 model contracts in float64, as circuit-tracer's einsum does).
template <typename T>
inline __attribute__((always_inline)) void micro_kernel(const T* const* v, int nv, const T* g0, const T* g1,
                                                         std::int64_t D, T acc[4][2]) {
  T a00 = 0, a01 = 0, a10 = 0, a11 = 0, a20 = 0, a21 = 0, a30 = 0, a31 = 0;
  const T* v0 = v[0];
  const T* v1 = v[nv > 1 ? 1 : 0];
  const T* v2 = v[nv > 2 ? 2 : 0];
  const T* v3 = v[nv > 3 ? 3 : 0];
#pragma omp simd reduction(+ : a00, a01, a10, a11, a20, a21, a30, a31)
  for (std::int64_t d = 0; d < D; ++d) {
    const T x0 = g0[d], x1 = g1[d];
    a00 += v0[d] * x0; a01 += v0[d] * x1;
    a10 += v1[d] * x0; a11 += v1[d] * x1;
    a20 += v2[d] * x0; a21 += v2[d] * x1;
    a30 += v3[d] * x0; a31 += v3[d] * x1;
  }
  acc[0][0] = a00; acc[0][1] = a01; acc[1][0] = a10; acc[1][1] = a11;
  acc[2][0] = a20; acc[2][1] = a21; acc[3][0] = a30; acc[3][1] = a31;
}

template <typename T>
using MicroKernel = void (*)(const T* const*, int, const T*, const T*, std::int64_t, T[4][2]);

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,fma"))) void micro_kernel_avx2(const T* const* v, int nv, const T* g0, const T* g1,
                                                          std::int64_t D, T acc[4][2]) {
  micro_kernel<T>(v, nv, g0, g1, D, acc);
}
#endif
template <typename T>
void micro_kernel_generic(const T* const* v, int nv, const T* g0, const T* g1, std::int64_t D, T acc[4][2]) {
  micro_kernel<T>(v, nv, g0, g1, D, acc);
}

template <typename T>
MicroKernel<T> pick_micro_kernel() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return micro_kernel_avx2<T>;
#endif
  return micro_kernel_generic<T>;
}

float load_float(const void* base, std::int64_t i, int dtype) {
  switch (dtype) {
    case kFloat16: return Loader<kFloat16>::load(base, i);
    case kBFloat16: return Loader<kBFloat16>::load(base, i);
    default: return Loader<kFloat32>::load(base, i);
  }
}

std::uint16_t float_to_bf16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<std::uint16_t>(bits >> 16);
}

std::uint16_t float_to_half(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
  if (absx >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflows to inf after rounding
  if (absx < 0x38800000u) {  // below half's smallest normal: count units of 2^-24, ties to even
    float mag;
    std::memcpy(&mag, &absx, sizeof mag);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(std::nearbyint(mag * 16777216.0f)));
  }
  std::uint32_t h = ((absx - 0x38000000u) >> 13);
  const std::uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

void accumulate(void* out, std::int64_t idx, int dtype, float value, bool atomic) {
  switch (dtype) {
    case kFloat32: {
      float* p = static_cast<float*>(out) + idx;
      if (atomic) {
#pragma omp atomic
        *p += value;
      } else {
        *p += value;
      }
      break;
    }
    case kFloat16: {  // atomic half updates are serialised by the caller (see contract_cpu)
      auto* p = static_cast<std::uint16_t*>(out) + idx;
      *p = float_to_half(half_to_float(*p) + value);
      break;
    }
    default: {
      auto* p = static_cast<std::uint16_t*>(out) + idx;
      *p = float_to_bf16(bf16_to_float(*p) + value);
      break;
    }
  }
}

// float64 inputs: out is float64, or float32 updated as torch updates a float32 tensor in place
// with a float64 one (the sum taken in float64, then rounded).
void accumulate(void* out, std::int64_t idx, int dtype, double value, bool atomic) {
  if (dtype == kFloat64) {
    double* p = static_cast<double*>(out) + idx;
    if (atomic) {
#pragma omp atomic
      *p += value;
    } else {
      *p += value;
    }
    return;
  }
  float* p = static_cast<float*>(out) + idx;
  if (atomic) {
#pragma omp critical(fastattr_contract_f32_from_f64)
    *p = static_cast<float>(static_cast<double>(*p) + value);
  } else {
    *p = static_cast<float>(static_cast<double>(*p) + value);
  }
}

void validate_host_indices(const ContractionArgs& a) {
  const auto* rows = reinterpret_cast<const std::int32_t*>(a.rows);
  const auto* tp = reinterpret_cast<const std::int32_t*>(a.tile_pos);
  const auto* ts = reinterpret_cast<const std::int32_t*>(a.tile_start);
  const auto* te = reinterpret_cast<const std::int32_t*>(a.tile_end);
  for (std::int64_t s = 0; s < a.S; ++s)
    if (rows[s] < 0 || rows[s] >= a.R) fail("rows: expected indices in [0, ", a.R, "), got ", rows[s], " at ", s);
  for (std::int64_t t = 0; t < a.n_tiles; ++t) {
    if (tp[t] < 0 || tp[t] >= a.P) fail("positions: expected indices in [0, ", a.P, "), got ", tp[t], " in tile ", t);
    if (ts[t] < 0 || ts[t] > te[t] || te[t] > a.S)
      fail("tiles: expected 0 <= start <= end <= ", a.S, ", got [", ts[t], ", ", te[t], ") in tile ", t);
  }
}

// One task's operands as row pointers: the tile's vectors and its batch chunk's grads rows at the
// tile's position, widened into the task's scratch buffers when the inputs are half precision.
template <typename T>
struct TaskRows {
  std::vector<T> vbuf, gbuf;
  std::vector<const T*> vrows, grows;

  void stage(const ContractionArgs& a, std::int64_t s0, std::int64_t ns, std::int64_t b0, std::int64_t nb,
             std::int64_t p) {
    const void* G = reinterpret_cast<const void*>(a.grads);
    const void* V = reinterpret_cast<const void*>(a.vectors);
    const std::int64_t D = a.D;
    vrows.resize(ns);
    grows.resize(nb);
    const bool widen = a.grads_dtype == kFloat16 || a.grads_dtype == kBFloat16;
    if constexpr (std::is_same_v<T, float>) {
      if (widen) {
        vbuf.resize(ns * D);
        gbuf.resize(nb * D);
        for (std::int64_t i = 0; i < ns; ++i) {
          for (std::int64_t d = 0; d < D; ++d)
            vbuf[i * D + d] = load_float(V, (s0 + i) * a.vectors_stride_s + d, a.vectors_dtype);
          vrows[i] = vbuf.data() + i * D;
        }
        for (std::int64_t j = 0; j < nb; ++j) {
          const std::int64_t base = (b0 + j) * a.grads_stride_b + p * a.grads_stride_p;
          for (std::int64_t d = 0; d < D; ++d) gbuf[j * D + d] = load_float(G, base + d, a.grads_dtype);
          grows[j] = gbuf.data() + j * D;
        }
        return;
      }
    }
    for (std::int64_t i = 0; i < ns; ++i) vrows[i] = static_cast<const T*>(V) + (s0 + i) * a.vectors_stride_s;
    for (std::int64_t j = 0; j < nb; ++j)
      grows[j] = static_cast<const T*>(G) + (b0 + j) * a.grads_stride_b + p * a.grads_stride_p;
  }
};

// out[rows[s0 + i], b0 + j] += vrows[i] . grows[j] for the task's ns x nb block, 4 x 2 at a time.
template <typename T>
void accumulate_block(const ContractionArgs& a, MicroKernel<T> kernel, const TaskRows<T>& t, std::int64_t s0,
                      std::int64_t b0, bool atomic) {
  const auto* rows = reinterpret_cast<const std::int32_t*>(a.rows);
  void* out = reinterpret_cast<void*>(a.out);
  const std::int64_t ns = static_cast<std::int64_t>(t.vrows.size());
  const std::int64_t nb = static_cast<std::int64_t>(t.grows.size());
  T acc[4][2];
  for (std::int64_t i = 0; i < ns; i += 4) {
    const int nv = static_cast<int>(std::min<std::int64_t>(4, ns - i));
    for (std::int64_t j = 0; j < nb; j += 2) {
      const int ng = (j + 1 < nb) ? 2 : 1;
      kernel(t.vrows.data() + i, nv, t.grows[j], t.grows[j + ng - 1], a.D, acc);
      for (int r = 0; r < nv; ++r) {
        const std::int64_t row = rows[s0 + i + r];
        for (int c = 0; c < ng; ++c)
          accumulate(out, row * a.out_stride_r + (b0 + j + c) * a.out_stride_b, a.out_dtype, acc[r][c], atomic);
      }
    }
  }
}

// Repeated rows, deterministic: each task owns a chunk of batch columns and walks every tile in
// order, so each out element takes its adds from one thread in tile order, without atomics.
template <typename T>
void contract_columns_owned(const ContractionArgs& a, MicroKernel<T> kernel) {
  const auto* tp = reinterpret_cast<const std::int32_t*>(a.tile_pos);
  const auto* ts = reinterpret_cast<const std::int32_t*>(a.tile_start);
  const auto* te = reinterpret_cast<const std::int32_t*>(a.tile_end);
  const std::int64_t n_chunks = (a.B + kOwnedChunk - 1) / kOwnedChunk;
#pragma omp parallel if (n_chunks > 1)
  {
    TaskRows<T> task_rows;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const std::int64_t b0 = chunk * kOwnedChunk;
      const std::int64_t b1 = std::min(a.B, b0 + kOwnedChunk);
      for (std::int64_t t = 0; t < a.n_tiles; ++t) {
        if (te[t] == ts[t]) continue;
        task_rows.stage(a, ts[t], te[t] - ts[t], b0, b1 - b0, tp[t]);
        accumulate_block<T>(a, kernel, task_rows, ts[t], b0, /*atomic=*/false);
      }
    }
  }
}

// T: float (float32, and half types widened to it per task) or double (float64).
//
// Run to run identical without atomics: every out element (row, b) belongs to one vector, so to one
// tile and one task (tile x batch chunk), and is updated once, with a dot product whose order is
// fixed by D alone (the micro-kernel's SIMD lanes take d mod width with unaligned loads, no
// alignment peeling; tests/test_deterministic.py checks shifted buffers). The OpenMP schedule
// decides which thread computes a value, never the order of a sum. With atomics (repeated rows)
// the adds to one element arrive in scheduling order, unless ``deterministic`` has the tasks own
// batch columns instead (contract_columns_owned). Repeated rows into a half-precision buffer run
// the tasks in order, deterministic either way.
template <typename T>
void contract_cpu_impl(const ContractionArgs& a, bool deterministic) {
  static const MicroKernel<T> kernel = pick_micro_kernel<T>();
  if (a.atomic && deterministic) {
    contract_columns_owned<T>(a, kernel);
    return;
  }

  const auto* tp = reinterpret_cast<const std::int32_t*>(a.tile_pos);
  const auto* ts = reinterpret_cast<const std::int32_t*>(a.tile_start);
  const auto* te = reinterpret_cast<const std::int32_t*>(a.tile_end);
  const std::int64_t n_chunks = (a.B + kBatchChunk - 1) / kBatchChunk;
  const std::int64_t n_tasks = a.n_tiles * n_chunks;
  // Repeated rows race between tasks; fp32 uses atomic adds, half outputs run the tasks in order.
  const bool serial = a.atomic && (a.out_dtype == kFloat16 || a.out_dtype == kBFloat16);

#pragma omp parallel if (!serial && n_tasks > 1)
  {
    TaskRows<T> task_rows;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < n_tasks; ++task) {
      const std::int64_t t = task / n_chunks;
      const std::int64_t b0 = (task % n_chunks) * kBatchChunk;
      const std::int64_t b1 = std::min(a.B, b0 + kBatchChunk);
      if (te[t] == ts[t]) continue;
      task_rows.stage(a, ts[t], te[t] - ts[t], b0, b1 - b0, tp[t]);
      accumulate_block<T>(a, kernel, task_rows, ts[t], b0, a.atomic);
    }
  }
}

}  // namespace

void contract_cpu(const ContractionArgs& a, bool deterministic) {
  if (a.B == 0 || a.S == 0) return;
  validate_host_indices(a);
  if (a.vectors_dtype == kFloat64)
    contract_cpu_impl<double>(a, deterministic);
  else
    contract_cpu_impl<float>(a, deterministic);
}

}  // namespace fastattr
