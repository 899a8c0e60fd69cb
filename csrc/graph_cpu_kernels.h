// Vector kernels shared by the CPU graph passes (influence sweep, edge histogram, edge mask).
//
// Attribution adjacencies are block-sparse: a feature reads only from earlier layers at earlier
// positions, so in node order (features by layer and position, then errors, tokens, logits) most of
// a row's 64-column blocks are entirely zero. The first pass over A records, per row, a bitmap of
// its non-zero blocks; every later pass visits only those blocks, which removes most of the memory
// traffic of the later passes.
//
// Each kernel is compiled twice, for baseline x86-64 and for AVX2+FMA, and picked at run time.
// The edge score is always computed as fl32(fl32(|a| / scale) * factor) so that every pass (and
// circuit-tracer) sees bit-identical scores; only the double accumulations may contract to FMA.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "graph.h"

#ifdef FASTATTR_WITH_OPENMP
#include <omp.h>
#endif

namespace fastattr {

// The calling OpenMP thread's index (0 without OpenMP), for per-thread scratch buffers.
inline int thread_id() {
#ifdef FASTATTR_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

namespace graphk {

constexpr std::int64_t kBlockCols = 64;
constexpr std::int64_t kColsPerWord = kBlockCols * 64;

inline std::int64_t block_words(std::int64_t n) { return (n + kColsPerWord - 1) / kColsPerWord; }

// Threads for a pass over `work` elements. The passes are memory-bound (a second thread adds
// little bandwidth on small machines), and every parallel region ends in a barrier where finished
// threads spin, which on a loaded machine costs more than it saves: measured on a shared 2-vCPU
// VM, one thread was 4x faster at N = 2k and still slightly faster at N = 8k. So only passes over
// 16M elements (64 MB of float32) use threads. FASTATTR_NUM_THREADS caps the count (1: never).
inline int threads_for(std::int64_t work) {
#ifdef FASTATTR_WITH_OPENMP
  static const int cap = [] {
    const char* e = std::getenv("FASTATTR_NUM_THREADS");
    const int v = e != nullptr ? std::atoi(e) : 0;
    return v > 0 ? v : 0;
  }();
  int t = std::max(1, omp_get_max_threads());
  if (cap > 0) t = std::min(t, cap);
  return work >= (std::int64_t(1) << 24) ? t : 1;
#else
  (void)work;
  return 1;
#endif
}

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The level-0 histogram bucket of an edge score. The sign bit is dropped so that a negative score
// (negative logit weights, whose graphs the caller sends to the torch backend after the sweep)
// still indexes inside the 2^kSelectBits[0] buckets instead of past them.
inline std::uint32_t edge_bucket0(float score) { return (float_bits(score) & 0x7fffffffu) >> kSelectShift[0]; }

// Visit the non-zero blocks of a row: f(j0, j1) for each block [j0, j1).
template <class F>
inline __attribute__((always_inline)) void for_blocks(const std::uint64_t* bits, std::int64_t n, F&& f) {
  const std::int64_t words = block_words(n);
  for (std::int64_t w = 0; w < words; ++w) {
    std::uint64_t word = bits[w];
    while (word != 0) {
      const int b = __builtin_ctzll(word);
      word &= word - 1;
      const std::int64_t j0 = (w * 64 + b) * kBlockCols;
      f(j0, std::min(n, j0 + kBlockCols));
    }
  }
}

template <bool Abs, bool Masked>
inline __attribute__((always_inline)) float entry(const float* row, const float* colmask, std::int64_t j) {
  float v = Abs ? std::fabs(row[j]) : row[j];
  if (Masked) v = colmask[j] != 0.0f ? v : 0.0f;
  return v;
}

// ---- the first pass: |A| row sum (double), Kahn counts, non-zero block bitmap ----------------
struct PrepareArgs {
  const float* row;
  const float* colmask;
  std::int64_t n;
  std::int32_t* count;  // += 1 per non-zero column (null: skip)
  std::uint64_t* bits;  // this row's bitmap (block_words(n) words), written
};

template <bool Masked>
inline __attribute__((always_inline)) double prepare_impl(const PrepareArgs& p) {
  const std::int64_t words = block_words(p.n);
  std::fill(p.bits, p.bits + words, std::uint64_t(0));
  double total = 0.0;
  for (std::int64_t j0 = 0; j0 < p.n; j0 += kBlockCols) {
    const std::int64_t j1 = std::min(p.n, j0 + kBlockCols);
    double s = 0.0;
    int nz = 0;
#pragma omp simd reduction(+ : s, nz)
    for (std::int64_t j = j0; j < j1; ++j) {
      const float v = entry<true, Masked>(p.row, p.colmask, j);
      s += (double)v;
      nz += v != 0.0f ? 1 : 0;
    }
    if (nz != 0) {
      const std::int64_t b = j0 / kBlockCols;
      p.bits[b / 64] |= std::uint64_t(1) << (b % 64);
      if (p.count != nullptr) {
        std::int32_t* c = p.count;
#pragma omp simd
        for (std::int64_t j = j0; j < j1; ++j) c[j] += entry<true, Masked>(p.row, p.colmask, j) != 0.0f ? 1 : 0;
      }
    }
    total += s;
  }
  return total;
}

// ---- |A| row sum over the non-zero blocks ---------------------------------------------------
template <bool Masked>
inline __attribute__((always_inline)) double abs_sum_impl(const float* row, const float* cm, const std::uint64_t* bits,
                                                          std::int64_t n) {
  double total = 0.0;
  for_blocks(bits, n, [&](std::int64_t j0, std::int64_t j1) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (std::int64_t j = j0; j < j1; ++j) s += (double)entry<true, Masked>(row, cm, j);
    total += s;
  });
  return total;
}

// ---- the sweep: acc += coef * A'_i, Kahn count decrements, longest-path updates --------------
struct ScatterArgs {
  const float* row;
  const float* colmask;
  const std::uint64_t* bits;
  std::int64_t n;
  double coef;
  double* acc;
  std::int32_t* dec;
  std::int32_t* len;
  std::int32_t next_len;
};

template <bool Abs, bool Masked, bool Acc, bool Dec, bool Len>
inline __attribute__((always_inline)) void scatter_impl(const ScatterArgs& s) {
  const float* r = s.row;
  const float* cm = s.colmask;
  double* acc = s.acc;
  std::int32_t* dec = s.dec;
  std::int32_t* len = s.len;
  const double coef = s.coef;
  const std::int32_t nxt = s.next_len;
  for_blocks(s.bits, s.n, [&](std::int64_t j0, std::int64_t j1) {
#pragma omp simd
    for (std::int64_t j = j0; j < j1; ++j) {
      const float v = entry<Abs, Masked>(r, cm, j);
      if (Acc) acc[j] += coef * (double)v;
      if (Dec) dec[j] += v != 0.0f ? 1 : 0;
      if (Len) {
        const std::int32_t cur = len[j];
        len[j] = (v != 0.0f && nxt > cur) ? nxt : cur;
      }
    }
  });
}

// ---- edge scores of one block: fl32(fl32(|a| / scale) * factor), zero where masked -----------
inline __attribute__((always_inline)) void scores_impl(const float* row, const float* cm, std::int64_t j0,
                                                       std::int64_t j1, float scale, float factor, float* out) {
#pragma omp simd
  for (std::int64_t j = j0; j < j1; ++j) {
    const float v = cm[j] != 0.0f ? std::fabs(row[j]) : 0.0f;
    out[j - j0] = (v / scale) * factor;
  }
}

// acc[j - j0] += sum_q coef[q] * entry(row rows[q], j) for j in [j0, j1), entry |a| (Abs) or a:
// float products summed in float over chunks of kWeightedChunk rows, each chunk's sum added in
// double. Eight floats per instruction where a double accumulator takes four, and a chunk's
// float sum of non-negative terms is within kWeightedChunk ulps, so the total keeps close to
// double accuracy.
constexpr std::int64_t kWeightedChunk = 32;
struct WeightedSumArgs {
  const float* a;
  std::int64_t lda;
  const std::int64_t* rows;
  const float* coef;
  std::int64_t n_rows;
  std::int64_t j0, j1;
  double* acc;    // (j1 - j0,)
  float* chunk;   // (j1 - j0,) scratch
};

template <bool Abs>
inline __attribute__((always_inline)) float weighted_entry(float x) {
  return Abs ? std::fabs(x) : x;
}

template <bool Abs>
inline __attribute__((always_inline)) void weighted_sum_impl(const WeightedSumArgs& w) {
  const std::int64_t n = w.j1 - w.j0;
  for (std::int64_t q0 = 0; q0 < w.n_rows; q0 += kWeightedChunk) {
    const std::int64_t q1 = std::min(w.n_rows, q0 + kWeightedChunk);
    float* f = w.chunk;
    for (std::int64_t j = 0; j < n; ++j) f[j] = 0.0f;
    std::int64_t q = q0;
    // Four rows per pass over the chunk's sums: a quarter of the loads and stores of f.
    for (; q + 4 <= q1; q += 4) {
      const float* r0 = w.a + w.rows[q] * w.lda + w.j0;
      const float* r1 = w.a + w.rows[q + 1] * w.lda + w.j0;
      const float* r2 = w.a + w.rows[q + 2] * w.lda + w.j0;
      const float* r3 = w.a + w.rows[q + 3] * w.lda + w.j0;
      const float c0 = w.coef[q], c1 = w.coef[q + 1], c2 = w.coef[q + 2], c3 = w.coef[q + 3];
#pragma omp simd
      for (std::int64_t j = 0; j < n; ++j)
        f[j] += (c0 * weighted_entry<Abs>(r0[j]) + c1 * weighted_entry<Abs>(r1[j])) +
                (c2 * weighted_entry<Abs>(r2[j]) + c3 * weighted_entry<Abs>(r3[j]));
    }
    for (; q < q1; ++q) {
      const float* r = w.a + w.rows[q] * w.lda + w.j0;
      const float c = w.coef[q];
#pragma omp simd
      for (std::int64_t j = 0; j < n; ++j) f[j] += c * weighted_entry<Abs>(r[j]);
    }
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) w.acc[j] += (double)f[j];
  }
}

using PrepareFn = double (*)(const PrepareArgs&);
using AbsSumFn = double (*)(const float*, const float*, const std::uint64_t*, std::int64_t);
using ScatterFn = void (*)(const ScatterArgs&);
using ScoresFn = void (*)(const float*, const float*, std::int64_t, std::int64_t, float, float, float*);
using WeightedSumFn = void (*)(const WeightedSumArgs&);

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTATTR_AVX2 __attribute__((target("avx2,fma")))
#define FASTATTR_HAVE_AVX2_KERNELS 1
#else
#define FASTATTR_AVX2
#define FASTATTR_HAVE_AVX2_KERNELS 0
#endif

template <bool Masked> double prepare_generic(const PrepareArgs& p) { return prepare_impl<Masked>(p); }
template <bool Masked> FASTATTR_AVX2 double prepare_avx2(const PrepareArgs& p) { return prepare_impl<Masked>(p); }
template <bool Masked>
double abs_sum_generic(const float* r, const float* cm, const std::uint64_t* b, std::int64_t n) {
  return abs_sum_impl<Masked>(r, cm, b, n);
}
template <bool Masked>
FASTATTR_AVX2 double abs_sum_avx2(const float* r, const float* cm, const std::uint64_t* b, std::int64_t n) {
  return abs_sum_impl<Masked>(r, cm, b, n);
}
template <int F> void scatter_generic(const ScatterArgs& s) {
  scatter_impl<(F & 1) != 0, (F & 2) != 0, (F & 4) != 0, (F & 8) != 0, (F & 16) != 0>(s);
}
template <int F> FASTATTR_AVX2 void scatter_avx2(const ScatterArgs& s) {
  scatter_impl<(F & 1) != 0, (F & 2) != 0, (F & 4) != 0, (F & 8) != 0, (F & 16) != 0>(s);
}
inline void scores_generic(const float* r, const float* cm, std::int64_t j0, std::int64_t j1, float sc, float f,
                           float* out) {
  scores_impl(r, cm, j0, j1, sc, f, out);
}
FASTATTR_AVX2 inline void scores_avx2(const float* r, const float* cm, std::int64_t j0, std::int64_t j1, float sc,
                                      float f, float* out) {
  scores_impl(r, cm, j0, j1, sc, f, out);
}

template <bool Abs> void weighted_sum_generic(const WeightedSumArgs& w) { weighted_sum_impl<Abs>(w); }
template <bool Abs> FASTATTR_AVX2 void weighted_sum_avx2(const WeightedSumArgs& w) { weighted_sum_impl<Abs>(w); }

inline bool use_avx2() {
#if FASTATTR_HAVE_AVX2_KERNELS
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

template <std::size_t... I>
std::array<ScatterFn, sizeof...(I)> scatter_table(bool avx2, std::index_sequence<I...>) {
  return {(avx2 ? &scatter_avx2<(int)I> : &scatter_generic<(int)I>)...};
}

// The kernel set for this CPU.
struct Kernels {
  PrepareFn prepare[2];  // [masked]
  AbsSumFn abs_sum[2];   // [masked]
  std::array<ScatterFn, 32> scatter;
  ScoresFn scores;
  WeightedSumFn weighted_sum[2];  // [abs]

  ScatterFn scatter_for(bool abs, bool masked, bool acc, bool dec, bool len) const {
    return scatter[(abs ? 1 : 0) | (masked ? 2 : 0) | (acc ? 4 : 0) | (dec ? 8 : 0) | (len ? 16 : 0)];
  }

  static const Kernels& get() {
    static const Kernels k = [] {
      const bool a = use_avx2();
      Kernels r{};
      r.prepare[0] = a ? &prepare_avx2<false> : &prepare_generic<false>;
      r.prepare[1] = a ? &prepare_avx2<true> : &prepare_generic<true>;
      r.abs_sum[0] = a ? &abs_sum_avx2<false> : &abs_sum_generic<false>;
      r.abs_sum[1] = a ? &abs_sum_avx2<true> : &abs_sum_generic<true>;
      r.scatter = scatter_table(a, std::make_index_sequence<32>{});
      r.scores = a ? &scores_avx2 : &scores_generic;
      r.weighted_sum[0] = a ? &weighted_sum_avx2<false> : &weighted_sum_generic<false>;
      r.weighted_sum[1] = a ? &weighted_sum_avx2<true> : &weighted_sum_generic<true>;
      return r;
    }();
    return k;
  }
};

// A bitmap with every block of an n-column row set (when no bitmap was recorded).
inline void fill_all_blocks(std::uint64_t* bits, std::int64_t n) {
  const std::int64_t blocks = (n + kBlockCols - 1) / kBlockCols;
  const std::int64_t words = block_words(n);
  for (std::int64_t w = 0; w < words; ++w) {
    const std::int64_t lo = w * 64, hi = std::min(blocks, lo + 64);
    bits[w] = hi - lo >= 64 ? ~std::uint64_t(0) : ((std::uint64_t(1) << (hi - lo)) - 1);
  }
}

}  // namespace graphk
}  // namespace fastattr
