// CPU contraction: OpenMP tasks are runs of a position's tiles (by batch chunk when runs are few).
//
// fp32 work (float32 inputs and the half types, widened per task into scratch) runs an
// outer-product micro-kernel on AVX-512 or AVX2: the chunk's grads rows are packed once into a
// D x 32 panel, and each group of vectors broadcasts v[i][d] against panel row d, so every load
// feeds several FMAs and no horizontal reductions are needed (the dot-product form is load bound
// at ~15% of peak). float64, and CPUs without AVX2, keep the register-blocked dot-product kernel.
//
// Host memory lets us check every index before touching memory, so out-of-range tiles or rows are
// reported as ValueError instead of corrupting the heap.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "contraction.h"

#ifdef FASTATTR_WITH_OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTATTR_PANEL_KERNELS 1
#include <immintrin.h>
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
  // A branch-free pass first (it vectorises; the early-exit loop cost ~5% of a small-batch call),
  // then the reporting loop only when something is out of range.
  const auto R = static_cast<std::uint64_t>(a.R);
  bool bad = false;
  for (std::int64_t s = 0; s < a.S; ++s) bad |= static_cast<std::uint64_t>(static_cast<std::int64_t>(rows[s])) >= R;
  for (std::int64_t s = 0; bad && s < a.S; ++s)
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
    stage_vectors(a, s0, ns);
    stage_grads(a, b0, nb, p);
  }

  void stage_vectors(const ContractionArgs& a, std::int64_t s0, std::int64_t ns) {
    const void* V = reinterpret_cast<const void*>(a.vectors);
    const std::int64_t D = a.D;
    vrows.resize(ns);
    if constexpr (std::is_same_v<T, float>) {
      if (a.vectors_dtype == kFloat16 || a.vectors_dtype == kBFloat16) {
        vbuf.resize(ns * D);
        for (std::int64_t i = 0; i < ns; ++i) {
          for (std::int64_t d = 0; d < D; ++d)
            vbuf[i * D + d] = load_float(V, (s0 + i) * a.vectors_stride_s + d, a.vectors_dtype);
          vrows[i] = vbuf.data() + i * D;
        }
        return;
      }
    }
    for (std::int64_t i = 0; i < ns; ++i) vrows[i] = static_cast<const T*>(V) + (s0 + i) * a.vectors_stride_s;
  }

  void stage_grads(const ContractionArgs& a, std::int64_t b0, std::int64_t nb, std::int64_t p) {
    const void* G = reinterpret_cast<const void*>(a.grads);
    const std::int64_t D = a.D;
    grows.resize(nb);
    if constexpr (std::is_same_v<T, float>) {
      if (a.grads_dtype == kFloat16 || a.grads_dtype == kBFloat16) {
        gbuf.resize(nb * D);
        for (std::int64_t j = 0; j < nb; ++j) {
          const std::int64_t base = (b0 + j) * a.grads_stride_b + p * a.grads_stride_p;
          for (std::int64_t d = 0; d < D; ++d) gbuf[j * D + d] = load_float(G, base + d, a.grads_dtype);
          grows[j] = gbuf.data() + j * D;
        }
        return;
      }
    }
    for (std::int64_t j = 0; j < nb; ++j)
      grows[j] = static_cast<const T*>(G) + (b0 + j) * a.grads_stride_b + p * a.grads_stride_p;
  }
};

// ------------------------------------------------------------------------------ fp32 panel kernels
//
// out[rows[s], b] for a group of NR vectors and C batch columns: C / width vector accumulators per
// vector, stepped through d in order with one FMA each. Each output lane is thus
// fma(v[D-1], g[D-1], ... fma(v[0], g[0], 0)): its order is fixed by D alone, the same in every row
// of a group, every column of the panel, every tile and every thread, whatever the buffers'
// alignment (the lanes run along batch columns, never along d). That is the determinism contract
// of contract_cpu_impl; tails (fewer rows, fewer columns) run the same sequence on a zero-padded
// panel, so a vector's sums do not depend on where its tile or chunk was cut either.

// Batch columns per kernel call that every variant and both chunk widths divide into.
constexpr int kPanelColumnStep = 16;
static_assert(kBatchChunk % kPanelColumnStep == 0 && kOwnedChunk % kPanelColumnStep == 0,
              "panel widths must be whole kernel column steps (no masked panel loads)");
// AVX-512: 8 vectors x 32 columns = 16 zmm accumulators + 2 panel loads, and 8 broadcasts + 2
// loads per 16 FMAs keeps the two FMA ports ahead of the two load ports.
constexpr int kPanelRowsAvx512 = 8;
static_assert(kCpuContractTileS % kPanelRowsAvx512 == 0, "full tiles must not leave an AVX-512 row tail");
// AVX2: 6 vectors x 16 columns = 12 ymm accumulators + 2 panel rows + 1 broadcast of 16 registers.
constexpr int kPanelRowsAvx2 = 6;
constexpr int kPanelMaxRows = 8;
static_assert(kPanelRowsAvx512 <= kPanelMaxRows && kPanelRowsAvx2 <= kPanelMaxRows, "acc scratch too small");

// v: NR row pointers; panel: D rows of pw floats (64-byte aligned, this call's columns first);
// acc: NR x C results, row-major.
using PanelFn = void (*)(const float* const* v, const float* panel, std::int64_t pw, std::int64_t D, float* acc);

#ifdef FASTATTR_PANEL_KERNELS
template <int NR, int NV>
__attribute__((target("avx512f,avx512vl,fma"))) void panel_kernel_avx512(const float* const* v, const float* panel,
                                                                         std::int64_t pw, std::int64_t D,
                                                                         float* acc) {
  __m512 c[NR][NV];
  const float* vr[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    vr[r] = v[r];
#pragma GCC unroll 2
    for (int k = 0; k < NV; ++k) c[r][k] = _mm512_setzero_ps();
  }
  for (std::int64_t d = 0; d < D; ++d) {
    const float* g = panel + d * pw;
    __m512 gv[NV];
#pragma GCC unroll 2
    for (int k = 0; k < NV; ++k) gv[k] = _mm512_load_ps(g + 16 * k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512 x = _mm512_set1_ps(vr[r][d]);
#pragma GCC unroll 2
      for (int k = 0; k < NV; ++k) c[r][k] = _mm512_fmadd_ps(x, gv[k], c[r][k]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 2
    for (int k = 0; k < NV; ++k) _mm512_storeu_ps(acc + (r * NV + k) * 16, c[r][k]);
}

template <int NR>
__attribute__((target("avx2,fma"))) void panel_kernel_avx2(const float* const* v, const float* panel,
                                                          std::int64_t pw, std::int64_t D, float* acc) {
  __m256 c[NR][2];
  const float* vr[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    vr[r] = v[r];
    c[r][0] = _mm256_setzero_ps();
    c[r][1] = _mm256_setzero_ps();
  }
  for (std::int64_t d = 0; d < D; ++d) {
    const float* g = panel + d * pw;
    const __m256 g0 = _mm256_load_ps(g), g1 = _mm256_load_ps(g + 8);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256 x = _mm256_broadcast_ss(vr[r] + d);
      c[r][0] = _mm256_fmadd_ps(x, g0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(x, g1, c[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    _mm256_storeu_ps(acc + r * 16, c[r][0]);
    _mm256_storeu_ps(acc + r * 16 + 8, c[r][1]);
  }
}
#endif

#ifdef FASTATTR_PANEL_KERNELS
// Up to 16 elements of a float32/float16/bfloat16 row widened to fp32, zero past n. Exact
// conversions, like load_float (a signalling NaN comes out quiet, as the first FMA would make it).
__attribute__((target("avx512f,avx512vl,fma"))) inline __m512 load_widened16(const void* base, std::int64_t i,
                                                                             int dtype, int n) {
  if (dtype == kFloat32) {
    const __mmask16 m = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
  }
  alignas(32) std::uint16_t h[16] = {};
  std::memcpy(h, static_cast<const std::uint16_t*>(base) + i, static_cast<std::size_t>(n) * 2);
  const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
  if (dtype == kFloat16) return _mm512_cvtph_ps(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// In-register 16 x 16 transpose: r[i] lane j becomes r[j] lane i.
__attribute__((target("avx512f,avx512vl,fma"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane k: a[4k], b[4k], a[4k+1], b[4k+1] / a[4k+2] ...
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // r[4q + m] lane k: column 4k + m of rows 4q .. 4q + 3
    const __m512d t0 = _mm512_castps_pd(t[4 * q]), t1 = _mm512_castps_pd(t[4 * q + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * q + 2]), t3 = _mm512_castps_pd(t[4 * q + 3]);
    r[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  __m512 o[16];
  for (int m = 0; m < 4; ++m) {  // a 4 x 4 transpose of 128-bit lanes across the four row quads
    const __m512 u0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), u1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    o[m] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    o[4 + m] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    o[8 + m] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    o[12 + m] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = o[i];
}

// Panel packing in 16 x 16 blocks: a scalar transpose costs about as much as the FMAs of a
// position's single tile (one store per element).
__attribute__((target("avx512f,avx512vl,fma"))) void pack_panel_avx512(const ContractionArgs& a, std::int64_t p,
                                                                       std::int64_t b0, std::int64_t nb,
                                                                       std::int64_t pw, float* panel) {
  const void* G = reinterpret_cast<const void*>(a.grads);
  const std::int64_t D = a.D;
  for (std::int64_t j0 = 0; j0 < pw; j0 += 16) {
    for (std::int64_t d0 = 0; d0 < D; d0 += 16) {
      const int nd = static_cast<int>(std::min<std::int64_t>(16, D - d0));
      __m512 r[16];
      for (int jj = 0; jj < 16; ++jj) {
        const std::int64_t j = j0 + jj;
        r[jj] = j < nb ? load_widened16(G, (b0 + j) * a.grads_stride_b + p * a.grads_stride_p + d0, a.grads_dtype, nd)
                       : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int dd = 0; dd < nd; ++dd) _mm512_store_ps(panel + (d0 + dd) * pw + j0, r[dd]);
    }
  }
}

__attribute__((target("avx512f,avx512vl,fma"))) void widen_row_avx512(const void* src, std::int64_t i0, int dtype,
                                                                      std::int64_t n, float* dst) {
  for (std::int64_t d = 0; d < n; d += 16) {
    const int nd = static_cast<int>(std::min<std::int64_t>(16, n - d));
    const __mmask16 m = static_cast<__mmask16>(nd >= 16 ? 0xffffu : (1u << nd) - 1u);
    _mm512_mask_storeu_ps(dst + d, m, load_widened16(src, i0 + d, dtype, nd));
  }
}
#endif

#ifdef FASTATTR_PANEL_KERNELS
// out[r + c * sb] += acc[r * cols + c] for r < nr, c < nc: the write-back of a group whose rows
// are one run, one masked 8-wide add per column instead of nr scalar ones (the same single
// rounding per element as the scalar add).
__attribute__((target("avx512f,avx512vl,fma"))) void add_columns_avx512(float* out, std::int64_t sb,
                                                                       const float* acc, int cols, int nr,
                                                                       std::int64_t nc) {
  static_assert(kPanelMaxRows <= 8, "one 8-lane vector per column");
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(cols));
  const __mmask8 m = static_cast<__mmask8>((1u << nr) - 1u);
  for (std::int64_t c = 0; c < nc; ++c) {
    const __m256 v = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m, idx, acc + c, 4);
    float* o = out + c * sb;
    _mm256_mask_storeu_ps(o, m, _mm256_add_ps(_mm256_maskz_loadu_ps(m, o), v));
  }
}
#endif

// The panel kernels this CPU runs: rows 0 when it has neither AVX-512 nor AVX2 (then the
// dot-product kernel serves fp32 too). wide[nr] take 32 columns (AVX-512 only), narrow[nr] 16.
struct PanelKernels {
  int rows = 0;
  bool avx512 = false;  // pack and widen with AVX-512 too
  PanelFn wide[kPanelMaxRows + 1] = {};
  PanelFn narrow[kPanelMaxRows + 1] = {};
};

#ifdef FASTATTR_PANEL_KERNELS
template <int... NR>
void fill_avx512(PanelKernels& k, std::integer_sequence<int, NR...>) {
  ((k.wide[NR + 1] = panel_kernel_avx512<NR + 1, 2>), ...);
  ((k.narrow[NR + 1] = panel_kernel_avx512<NR + 1, 1>), ...);
}
template <int... NR>
void fill_avx2(PanelKernels& k, std::integer_sequence<int, NR...>) {
  ((k.narrow[NR + 1] = panel_kernel_avx2<NR + 1>), ...);
}
#endif

PanelKernels pick_panel_kernels() {
  PanelKernels k;
#ifdef FASTATTR_PANEL_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    k.rows = kPanelRowsAvx512;
    k.avx512 = true;
    fill_avx512(k, std::make_integer_sequence<int, kPanelRowsAvx512>{});
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    k.rows = kPanelRowsAvx2;
    fill_avx2(k, std::make_integer_sequence<int, kPanelRowsAvx2>{});
  }
#endif
  return k;
}

// A thread's packed grads panel: panel[d * pw + j] = grads[b0 + j, p, d], zero for j >= nb. Kept
// across the thread's tasks, so consecutive tiles of one position and chunk pack it once.
struct Panel {
  std::vector<float> storage;
  float* data = nullptr;
  std::int64_t p = -1, b0 = -1, nb = -1, pw = -1;

  const float* pack(const ContractionArgs& a, const PanelKernels& k, std::int64_t p_, std::int64_t b0_,
                    std::int64_t nb_, std::int64_t pw_) {
    if (p_ == p && b0_ == b0 && nb_ == nb && pw_ == pw) return data;
    const std::int64_t D = a.D;
    // 64-byte aligned rows (pw is a multiple of 16), so the kernels' panel loads never split lines.
    storage.resize(static_cast<std::size_t>(D * pw_ + 16));
    data = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 63) & ~std::uintptr_t(63));
    p = p_, b0 = b0_, nb = nb_, pw = pw_;
#ifdef FASTATTR_PANEL_KERNELS
    if (k.avx512) {
      pack_panel_avx512(a, p, b0, nb, pw, data);
      return data;
    }
#endif
    const void* G = reinterpret_cast<const void*>(a.grads);
    for (std::int64_t j = 0; j < nb_; ++j) {
      const std::int64_t base = (b0_ + j) * a.grads_stride_b + p_ * a.grads_stride_p;
      if (a.grads_dtype == kFloat32) {
        const float* g = static_cast<const float*>(G) + base;
        for (std::int64_t d = 0; d < D; ++d) data[d * pw_ + j] = g[d];
      } else {
        for (std::int64_t d = 0; d < D; ++d) data[d * pw_ + j] = load_float(G, base + d, a.grads_dtype);
      }
    }
    for (std::int64_t d = 0; d < D; ++d)
      for (std::int64_t j = nb_; j < pw_; ++j) data[d * pw_ + j] = 0.0f;
    return data;
  }
};

#ifdef FASTATTR_PANEL_KERNELS
// ------------------------------------------------------------------ few columns: vectors on lanes
//
// With nb <= kVectorLaneMaxColumns the column-lane kernels leave most of each FMA's 16 lanes on
// zero padding, yet still pay one broadcast and one FMA per vector element: the same time per
// vector whatever nb is, and about 85% of a call at nb = 4 or 8 (measured by skipping the kernel,
// the write-back, the prefetches and the index checks in turn). Putting 16 vectors on the lanes
// instead makes every lane useful: a pair of 16-vector groups is transposed in registers (a
// 16 x 16 block per step, ~32 shuffles per vector) and each grads element is broadcast against 16
// vectors, so a vector costs ~32 + 8 * nb FMA-port slots instead of 128. That pays below about 8
// columns (the transposition is the floor: -30% at nb = 2, -20% at 4, a few % at 8 in one thread).
// The sums are bitwise the same: each lane still runs fma(v[d], g[d], .) for d in order from 0, as
// the column-lane kernels do, so a column's values do not depend on which path its chunk took.
constexpr int kVectorLaneMaxColumns = 8;

// vt[d * 16 + l] = v[l][d] for l < nr, 0 for nr <= l < 16: one 16-vector group, transposed.
__attribute__((target("avx512f,avx512vl,fma"))) void transpose_group_avx512(const float* const* v, int nr,
                                                                           std::int64_t D, float* vt) {
  for (std::int64_t d0 = 0; d0 < D; d0 += 16) {
    const int nd = static_cast<int>(std::min<std::int64_t>(16, D - d0));
    const __mmask16 m = static_cast<__mmask16>(nd >= 16 ? 0xffffu : (1u << nd) - 1u);
    __m512 r[16];
    for (int l = 0; l < 16; ++l) r[l] = l < nr ? _mm512_maskz_loadu_ps(m, v[l] + d0) : _mm512_setzero_ps();
    transpose16(r);
    for (int dd = 0; dd < nd; ++dd) _mm512_store_ps(vt + (d0 + dd) * 16, r[dd]);
  }
}

// NG transposed groups (vt, D x 16 each, groups gs floats apart) x NC columns of the panel:
// acc[(g * NC + c) * 16 + l] = vector (g, l) . column c. Two groups give 2 * NC independent FMA
// chains, enough to hide the FMA latency down to NC = 2.
template <int NG, int NC>
__attribute__((target("avx512f,avx512vl,fma"))) void vector_lane_kernel_avx512(const float* vt, std::int64_t gs,
                                                                              const float* panel, std::int64_t pw,
                                                                              std::int64_t D, float* acc) {
  __m512 c[NG][NC];
#pragma GCC unroll 2
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) c[g][k] = _mm512_setzero_ps();
  for (std::int64_t d = 0; d < D; ++d) {
    __m512 x[NG];
#pragma GCC unroll 2
    for (int g = 0; g < NG; ++g) x[g] = _mm512_load_ps(vt + g * gs + d * 16);
    const float* p = panel + d * pw;
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) {
      const __m512 b = _mm512_set1_ps(p[k]);
#pragma GCC unroll 2
      for (int g = 0; g < NG; ++g) c[g][k] = _mm512_fmadd_ps(x[g], b, c[g][k]);
    }
  }
#pragma GCC unroll 2
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) _mm512_storeu_ps(acc + (g * NC + k) * 16, c[g][k]);
}

using VectorLaneFn = void (*)(const float*, std::int64_t, const float*, std::int64_t, std::int64_t, float*);

template <int NG, int... NC>
constexpr std::array<VectorLaneFn, sizeof...(NC) + 1> vector_lane_table(std::integer_sequence<int, NC...>) {
  return {nullptr, vector_lane_kernel_avx512<NG, NC + 1>...};
}

// The vector-lane form of accumulate_block_panel, for nb <= kVectorLaneMaxColumns (AVX-512 only).
// vt_storage: scratch for one pair of transposed groups (2 x D x 16, stays in L1 for D = 128).
__attribute__((target("avx512f,avx512vl,fma"))) void accumulate_block_vector_lanes(
    const ContractionArgs& a, const float* const* vrows, std::int64_t ns, const float* panel, std::int64_t pw,
    std::int64_t s0, std::int64_t b0, std::int64_t nb, bool atomic, std::vector<float>& vt_storage) {
  static constexpr auto one = vector_lane_table<1>(std::make_integer_sequence<int, kVectorLaneMaxColumns>{});
  static constexpr auto two = vector_lane_table<2>(std::make_integer_sequence<int, kVectorLaneMaxColumns>{});
  const auto* rows = reinterpret_cast<const std::int32_t*>(a.rows);
  void* out = reinterpret_cast<void*>(a.out);
  const std::int64_t D = a.D;
  const std::int64_t n_groups = (ns + 15) / 16;
  const std::int64_t gs = D * 16;
  vt_storage.resize(static_cast<std::size_t>(2 * gs + 16));
  float* vt = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(vt_storage.data()) + 63) & ~std::uintptr_t(63));
  const bool plain = a.out_dtype == kFloat32 && !atomic;
  const std::int64_t out_size = a.out_dtype == kFloat32 ? 4 : 2;
  alignas(64) float acc[2 * kVectorLaneMaxColumns * 16];
  for (std::int64_t g = 0; g < n_groups; g += 2) {
    const int ng = g + 1 < n_groups ? 2 : 1;
    const std::int64_t i0 = g * 16;
    const int nr = static_cast<int>(std::min<std::int64_t>(16 * ng, ns - i0));
    const std::int64_t row0 = rows[s0 + i0];
    bool run = a.out_stride_r == 1;
    for (int r = 1; r < nr && run; ++r) run = rows[s0 + i0 + r] == row0 + r;
    if (run) {  // each column's results are one or two lines: fetch them during the D steps
      const char* o = static_cast<const char*>(out) + (row0 + b0 * a.out_stride_b) * out_size;
      for (std::int64_t c = 0; c < nb; ++c) {
        __builtin_prefetch(o + c * a.out_stride_b * out_size, 1, 2);
        __builtin_prefetch(o + (c * a.out_stride_b + nr - 1) * out_size, 1, 2);
      }
    }
    for (int h = 0; h < ng; ++h)
      transpose_group_avx512(vrows + i0 + 16 * h, std::min(16, nr - 16 * h), D, vt + h * gs);
    (ng == 2 ? two : one)[nb](vt, gs, panel, pw, D, acc);
    for (int h = 0; h < ng; ++h) {
      const int nh = std::min(16, nr - 16 * h);
      if (plain && run) {
        const __mmask16 m = static_cast<__mmask16>(nh >= 16 ? 0xffffu : (1u << nh) - 1u);
        for (std::int64_t c = 0; c < nb; ++c) {
          float* o = static_cast<float*>(out) + row0 + 16 * h + (b0 + c) * a.out_stride_b;
          const __m512 v = _mm512_load_ps(acc + (h * nb + c) * 16);
          _mm512_mask_storeu_ps(o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), v));
        }
        continue;
      }
      for (int l = 0; l < nh; ++l) {
        const std::int64_t base = rows[s0 + i0 + 16 * h + l] * a.out_stride_r + b0 * a.out_stride_b;
        for (std::int64_t c = 0; c < nb; ++c) {
          const float value = acc[(h * nb + c) * 16 + l];
          if (plain)
            static_cast<float*>(out)[base + c * a.out_stride_b] += value;
          else
            accumulate(out, base + c * a.out_stride_b, a.out_dtype, value, atomic);
        }
      }
    }
  }
}
#endif

// out[rows[s0 + i], b0 + j] += vrows[i] . grads[b0 + j] for a task's ns x nb block, from its panel.
void accumulate_block_panel(const ContractionArgs& a, const PanelKernels& k, const float* const* vrows,
                            std::int64_t ns, const float* panel, std::int64_t pw, std::int64_t s0, std::int64_t b0,
                            std::int64_t nb, bool atomic) {
  const auto* rows = reinterpret_cast<const std::int32_t*>(a.rows);
  void* out = reinterpret_cast<void*>(a.out);
  const bool wide_panel = k.wide[1] != nullptr && pw % (2 * kPanelColumnStep) == 0;
  // Plain fp32 adds skip accumulate()'s dtype switch: the write-back is a scattered RMW per result.
  const bool plain = a.out_dtype == kFloat32 && !atomic;
  const std::int64_t out_size = a.out_dtype == kFloat32 ? 4 : 2;
  alignas(64) float acc[kPanelMaxRows * 2 * kPanelColumnStep];
  // Columns outer: the AVX2 kernel's 16-column half of the panel stays in L1 across all rows.
  for (std::int64_t c0 = 0, cols; c0 < nb; c0 += cols) {
    // A tail of at most 16 columns takes the narrow kernel: half the FMAs of a padded wide call,
    // and the same bits (each lane's FMA chain is the same in both).
    const bool wide = wide_panel && nb - c0 > kPanelColumnStep;
    cols = wide ? 2 * kPanelColumnStep : kPanelColumnStep;
    const PanelFn* fns = wide ? k.wide : k.narrow;
    const std::int64_t nc = std::min<std::int64_t>(cols, nb - c0);
    for (std::int64_t i = 0; i < ns; i += k.rows) {
      const int nr = static_cast<int>(std::min<std::int64_t>(k.rows, ns - i));
      const std::int64_t row0 = rows[s0 + i];
      // The engine numbers a position's features consecutively, so a group's rows are usually
      // one run: with out_stride_r 1 each column's nr results then share a cache line.
      bool run = a.out_stride_r == 1;
      for (int r = 1; r < nr && run; ++r) run = rows[s0 + i + r] == row0 + r;
      // The group's out elements are scattered (rows in any order, columns out_stride_b apart):
      // fetching them now overlaps the misses with the kernel's D steps.
      if (run && a.out_stride_b != 1) {
        const char* o = static_cast<const char*>(out) + (row0 + (b0 + c0) * a.out_stride_b) * out_size;
        for (std::int64_t c = 0; c < nc; ++c) {
          __builtin_prefetch(o + c * a.out_stride_b * out_size, 1, 2);
          __builtin_prefetch(o + (c * a.out_stride_b + nr - 1) * out_size, 1, 2);
        }
      } else {
        for (int r = 0; r < nr; ++r) {
          const char* o = static_cast<const char*>(out) +
                          (rows[s0 + i + r] * a.out_stride_r + (b0 + c0) * a.out_stride_b) * out_size;
          if (a.out_stride_b == 1) {
            __builtin_prefetch(o, 1, 2);
            __builtin_prefetch(o + (nc - 1) * out_size, 1, 2);
          } else {
            for (std::int64_t c = 0; c < nc; ++c) __builtin_prefetch(o + c * a.out_stride_b * out_size, 1, 2);
          }
        }
      }
      fns[nr](vrows + i, panel + c0, pw, a.D, acc);
#ifdef FASTATTR_PANEL_KERNELS
      if (plain && run && k.avx512 && a.out_stride_b != 1) {
        add_columns_avx512(static_cast<float*>(out) + row0 + (b0 + c0) * a.out_stride_b, a.out_stride_b, acc,
                           static_cast<int>(cols), nr, nc);
        continue;
      }
#endif
      for (int r = 0; r < nr; ++r) {
        const std::int64_t base = rows[s0 + i + r] * a.out_stride_r + (b0 + c0) * a.out_stride_b;
        const float* src = acc + r * cols;
        if (plain) {
          float* o = static_cast<float*>(out) + base;
          const std::int64_t sb = a.out_stride_b;
          if (sb == 1) {
            for (std::int64_t c = 0; c < nc; ++c) o[c] += src[c];
          } else {
            for (std::int64_t c = 0; c < nc; ++c) o[c * sb] += src[c];
          }
        } else {
          for (std::int64_t c = 0; c < nc; ++c)
            accumulate(out, base + c * a.out_stride_b, a.out_dtype, src[c], atomic);
        }
      }
    }
  }
}

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

// One task: the ns vectors from s0 (one tile, at position p) against batch columns [b0, b0 + nb),
// packed pw wide on the panel path.
template <typename T>
struct TaskRunner {
  const ContractionArgs& a;
  MicroKernel<T> kernel;
  const PanelKernels* panel_kernels;  // null: the dot-product kernel
  TaskRows<T> task_rows;
  Panel panel;
  std::vector<float> vt;  // the vector-lane path's transposed groups

  void run(std::int64_t s0, std::int64_t ns, std::int64_t p, std::int64_t b0, std::int64_t nb, std::int64_t pw,
           bool atomic) {
    if constexpr (std::is_same_v<T, float>) {
      if (panel_kernels != nullptr) {
#ifdef FASTATTR_PANEL_KERNELS
        if (panel_kernels->avx512 && (a.vectors_dtype == kFloat16 || a.vectors_dtype == kBFloat16)) {
          task_rows.vbuf.resize(ns * a.D);
          task_rows.vrows.resize(ns);
          const void* V = reinterpret_cast<const void*>(a.vectors);
          for (std::int64_t i = 0; i < ns; ++i) {
            float* row = task_rows.vbuf.data() + i * a.D;
            widen_row_avx512(V, (s0 + i) * a.vectors_stride_s, a.vectors_dtype, a.D, row);
            task_rows.vrows[i] = row;
          }
        } else {
          task_rows.stage_vectors(a, s0, ns);
        }
#else
        task_rows.stage_vectors(a, s0, ns);
#endif
        const float* packed = panel.pack(a, *panel_kernels, p, b0, nb, pw);
#ifdef FASTATTR_PANEL_KERNELS
        // A tile of at most 8 vectors is one row group of the column-lane kernel, cheaper than
        // transposing a half-empty 16-lane group (positions with 1 to 8 vectors: 8000 vectors
        // over 1000 positions, n=8, 0.82 -> 0.75 ms in one thread).
        if (panel_kernels->avx512 && nb <= kVectorLaneMaxColumns && ns > kPanelRowsAvx512) {
          accumulate_block_vector_lanes(a, task_rows.vrows.data(), ns, packed, pw, s0, b0, nb, atomic, vt);
          return;
        }
#endif
        accumulate_block_panel(a, *panel_kernels, task_rows.vrows.data(), ns, packed, pw, s0, b0, nb, atomic);
        return;
      }
    }
    task_rows.stage(a, s0, ns, b0, nb, p);
    accumulate_block<T>(a, kernel, task_rows, s0, b0, atomic);
  }
};

// Repeated rows, deterministic: each task owns a chunk of batch columns and walks every tile in
// order, so each out element takes its adds from one thread in tile order, without atomics.
template <typename T>
void contract_columns_owned(const ContractionArgs& a, MicroKernel<T> kernel, const PanelKernels* panel_kernels) {
  const auto* tp = reinterpret_cast<const std::int32_t*>(a.tile_pos);
  const auto* ts = reinterpret_cast<const std::int32_t*>(a.tile_start);
  const auto* te = reinterpret_cast<const std::int32_t*>(a.tile_end);
  const std::int64_t n_chunks = (a.B + kOwnedChunk - 1) / kOwnedChunk;
#pragma omp parallel if (n_chunks > 1)
  {
    TaskRunner<T> runner{a, kernel, panel_kernels};
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const std::int64_t b0 = chunk * kOwnedChunk;
      const std::int64_t b1 = std::min(a.B, b0 + kOwnedChunk);
      for (std::int64_t t = 0; t < a.n_tiles; ++t) {
        if (te[t] == ts[t]) continue;
        runner.run(ts[t], te[t] - ts[t], tp[t], b0, b1 - b0, kOwnedChunk, /*atomic=*/false);
      }
    }
  }
}

// T: float (float32, and half types widened to it per task) or double (float64).
//
// Run to run identical without atomics: every out element (row, b) belongs to one vector, so to one
// tile and one task (a run of tiles, for the chunk holding b), and is updated once, with a dot product whose order is
// fixed by D alone: the panel kernels step each output lane through d in order (see their
// comment); the dot-product kernel's SIMD lanes take d mod width with unaligned loads, no alignment
// peeling. tests/attribution/test_deterministic.py checks shifted buffers. The OpenMP schedule
// decides which thread computes a value, never the order of a sum. With atomics (repeated rows)
// the adds to one element arrive in scheduling order, unless ``deterministic`` has the tasks own
// batch columns instead (contract_columns_owned). Repeated rows into a half-precision buffer run
// the tasks in order, deterministic either way (an element's adds come from one chunk's tasks,
// which run in tile order).
template <typename T>
void contract_cpu_impl(const ContractionArgs& a, bool deterministic) {
  static const MicroKernel<T> kernel = pick_micro_kernel<T>();
  const PanelKernels* panel_kernels = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    static const PanelKernels picked = pick_panel_kernels();
    if (picked.rows > 0) panel_kernels = &picked;
  }
  if (a.atomic && deterministic) {
    contract_columns_owned<T>(a, kernel, panel_kernels);
    return;
  }

  const auto* tp = reinterpret_cast<const std::int32_t*>(a.tile_pos);
  const auto* ts = reinterpret_cast<const std::int32_t*>(a.tile_start);
  const auto* te = reinterpret_cast<const std::int32_t*>(a.tile_end);
  const std::int64_t n_chunks = (a.B + kBatchChunk - 1) / kBatchChunk;
#ifdef FASTATTR_WITH_OPENMP
  const std::int64_t n_threads = omp_get_max_threads();
#else
  const std::int64_t n_threads = 1;
#endif
  // Tasks are runs of consecutive tiles at one position, walked chunk by chunk: each chunk's grads
  // are packed (or loaded) once per run, and the run's vectors stay in L2 across its chunks. Runs
  // are capped so that every thread gets several, and split by chunk when there are still too few.
  const std::int64_t cap = std::max<std::int64_t>(1, a.n_tiles / (8 * n_threads));
  std::vector<std::int64_t> run_first;
  for (std::int64_t t = 0; t < a.n_tiles; ++t)
    if (t == 0 || tp[t] != tp[t - 1] || t - run_first.back() == cap) run_first.push_back(t);
  const std::int64_t n_runs = static_cast<std::int64_t>(run_first.size());
  run_first.push_back(a.n_tiles);
  const std::int64_t chunks_per_task = n_runs >= 4 * n_threads ? n_chunks : 1;
  const std::int64_t tasks_per_run = n_chunks / chunks_per_task;
  const std::int64_t n_tasks = n_runs * tasks_per_run;
  // Repeated rows race between tasks; fp32 uses atomic adds, half outputs run the tasks in order
  // (an element's adds then come in tile order: its chunk's tasks are in tile order).
  const bool serial = a.atomic && (a.out_dtype == kFloat16 || a.out_dtype == kBFloat16);

#pragma omp parallel if (!serial && n_tasks > 1)
  {
    TaskRunner<T> runner{a, kernel, panel_kernels};
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < n_tasks; ++task) {
      const std::int64_t run = task / tasks_per_run;
      const std::int64_t c_lo = (task % tasks_per_run) * chunks_per_task;
      for (std::int64_t chunk = c_lo; chunk < c_lo + chunks_per_task; ++chunk) {
        const std::int64_t b0 = chunk * kBatchChunk;
        const std::int64_t b1 = std::min(a.B, b0 + kBatchChunk);
        // A chunk of at most 16 columns never takes the 32-wide kernel, so its panel is packed 16
        // wide: half the packing stores, which dominate when positions hold few vectors.
        const std::int64_t pw = b1 - b0 <= kPanelColumnStep ? kPanelColumnStep : kBatchChunk;
        for (std::int64_t t = run_first[run]; t < run_first[run + 1]; ++t) {
          if (te[t] == ts[t]) continue;
          runner.run(ts[t], te[t] - ts[t], tp[t], b0, b1 - b0, pw, a.atomic);
        }
      }
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
