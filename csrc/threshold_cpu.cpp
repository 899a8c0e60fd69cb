// Cumulative-threshold selection without sorting: a value-weighted radix select.
//
// circuit-tracer's find_threshold sorts the scores descending, takes the cumulative sum divided by
// the total, and returns the first score whose cumulative fraction reaches t. The crossing test is
// monotone in the prefix sum C, so it can be evaluated at bucket boundaries: a histogram of counts
// and double sums over the top 11 bits of the float pattern finds the bucket that holds the
// crossing, then the middle 11 bits inside it, then the low 9 bits, which pin the value exactly.
//
// For the edges of the pruned graph the scores are recomputed from A, the row scales and factors in
// every pass, so the N x N score matrix never exists. The first histogram comes from the influence
// sweep; the scores of the bucket holding the crossing are usually few, so one more pass both
// writes the edge mask (scores above the bucket are kept, below are dropped) and collects that
// bucket's scores with their positions, which are then resolved in memory.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "graph.h"
#include "graph_cpu_kernels.h"

#ifdef FASTATTR_WITH_OPENMP
#include <omp.h>
#endif

namespace fastattr {

namespace {


inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bool crossing(double c, float s, float t) {
  const float cf = (float)c;  // torch rounds each double prefix to float32
  const float q = cf / s;     // float32 division by the float32 total
  return q >= t;              // searchsorted compares in float32
}

// The bucket of a level holding the crossing, for both readings of the test.
struct Pick {
  int early = -1, late = -1;
  double base_early = 0.0, base_late = 0.0;  // prefix before the picked bucket
  std::int64_t count_late = 0;
};

// Walk the buckets from the largest values down. With must_cross (the crossing is known to lie in
// this range from the level above), a test that never passes by rounding picks the last bucket.
Pick pick_bucket(const std::int64_t* count, const double* sum, int nb, double base, const CrossingTest& test,
                 bool must_cross) {
  Pick p;
  double c = base;
  int last = -1;
  double last_base = 0.0;
  for (int b = nb - 1; b >= 0; --b) {
    if (count[b] == 0) continue;
    const double end = c + sum[b];
    if (p.early < 0 && test.early(end)) {
      p.early = b;
      p.base_early = c;
    }
    if (test.late(end)) {
      p.late = b;
      p.base_late = c;
      p.count_late = count[b];
      break;
    }
    last = b;
    last_base = c;
    c = end;
  }
  if (must_cross) {
    if (p.early < 0) {
      p.early = last;
      p.base_early = last_base;
    }
    if (p.late < 0) {
      p.late = last;
      p.base_late = last_base;
      p.count_late = last >= 0 ? count[last] : 0;
    }
  }
  return p;
}

// Resolve the remaining levels on scores held in memory (all sharing the digits above `level`).
// Returns the status and sets `value`.
int select_in_memory(const std::vector<float>& vals, int level, std::uint32_t prefix, double base,
                     const CrossingTest& test, float& value) {
  std::vector<std::int64_t> count;
  std::vector<double> sum;
  std::vector<float> cur, nxt;
  const std::vector<float>* src = &vals;
  for (int lv = level; lv < kSelectLevels; ++lv) {
    const int nb = 1 << kSelectBits[lv];
    const std::uint32_t mask = (std::uint32_t)nb - 1;
    count.assign(nb, 0);
    sum.assign(nb, 0.0);
    for (float v : *src) {
      const std::uint32_t b = (float_bits(v) >> kSelectShift[lv]) & mask;
      count[b] += 1;
      sum[b] += v;
    }
    const Pick p = pick_bucket(count.data(), sum.data(), nb, base, test, true);
    if (p.early != p.late) return kSelectAmbiguous;
    if (p.late < 0) return kSelectAmbiguous;  // unreachable with must_cross and non-empty input
    prefix = (prefix << kSelectBits[lv]) | (std::uint32_t)p.late;
    base = p.base_late;
    if (lv + 1 < kSelectLevels) {
      nxt.clear();
      for (float v : *src)
        if (((float_bits(v) >> kSelectShift[lv]) & mask) == (std::uint32_t)p.late) nxt.push_back(v);
      cur.swap(nxt);
      src = &cur;
    }
  }
  value = bits_float(prefix);
  return kSelectOk;
}

}  // namespace

bool CrossingTest::early(double c) const { return crossing(dc != 0.0 ? c * (1.0 + dc) : c, s_lo, t); }
bool CrossingTest::late(double c) const { return crossing(dc != 0.0 ? c * (1.0 - dc) : c, s_hi, t); }

// ------------------------------------------------------------------------------------------------
// One-dimensional scores.
// ------------------------------------------------------------------------------------------------
SelectResult select_threshold_1d(const float* scores, std::int64_t n, float t, double rel_s, double dc,
                                 float s_fixed) {
  SelectResult res;
  const int T = graphk::threads_for(n);
  std::vector<SelectHist> hists(T);
  std::vector<std::int64_t> nnz(T, 0);
  std::vector<float> mins(T, std::numeric_limits<float>::infinity());
  bool negative = false, nonfinite = false;
#pragma omp parallel num_threads(T) reduction(|| : negative, nonfinite)
  {
    const int t = thread_id();
    SelectHist& h = hists[t];
    h.clear();
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      const float v = scores[i];
      if (!std::isfinite(v)) {
        nonfinite = true;
        continue;
      }
      if (v < 0.0f) {
        negative = true;
        continue;
      }
      if (v == 0.0f) continue;
      const std::uint32_t b = float_bits(v) >> kSelectShift[0];
      h.count[b] += 1;
      h.sum[b] += v;
      nnz[t] += 1;
      mins[t] = std::min(mins[t], v);
    }
  }
  if (nonfinite) {
    res.status = kSelectNonFinite;
    return res;
  }
  if (negative) {
    res.status = kSelectNegative;
    return res;
  }
  SelectHist total;
  total.clear();
  std::int64_t nz = 0;
  float mn = std::numeric_limits<float>::infinity();
  for (int t = 0; t < T; ++t) {
    total.add(hists[t]);
    nz += nnz[t];
    mn = std::min(mn, mins[t]);
  }
  if (nz == 0) {
    res.status = kSelectAllZero;
    res.value = 0.0f;
    return res;
  }
  const float smallest = nz < n ? 0.0f : mn;
  double sum = 0.0;
  for (int b = 0; b < kSelectMaxBuckets; ++b) sum += total.sum[b];
  CrossingTest test{s_fixed, s_fixed, dc, t};
  if (!(s_fixed > 0.0f)) {
    test.s_lo = std::nextafter((float)(sum * (1.0 - rel_s)), 0.0f);
    test.s_hi = std::nextafter((float)(sum * (1.0 + rel_s)), std::numeric_limits<float>::infinity());
  }
  const Pick p = pick_bucket(total.count, total.sum, 1 << kSelectBits[0], 0.0, test, false);
  if (p.early != p.late) {
    res.status = kSelectAmbiguous;
    return res;
  }
  if (p.late < 0) {  // no prefix reaches t: circuit-tracer clamps to the last element
    res.clamped = true;
    res.value = smallest;
    return res;
  }
  std::vector<float> cand;
  cand.reserve((size_t)p.count_late);
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = scores[i];
    if (v > 0.0f && (std::int64_t)(float_bits(v) >> kSelectShift[0]) == p.late) cand.push_back(v);
  }
  float value = 0.0f;
  res.status = select_in_memory(cand, 1, (std::uint32_t)p.late, p.base_late, test, value);
  res.value = value;
  return res;
}

// ------------------------------------------------------------------------------------------------
// Edge scores of the pruned graph.
// ------------------------------------------------------------------------------------------------
namespace {

// The edge scores exactly as the influence sweep computes them, visited block by block.
struct EdgeScores {
  const EdgeSelectArgs& a;
  const graphk::Kernels& k;
  std::int64_t words;
  std::vector<float> colmask;
  std::vector<std::uint64_t> colmask_blocks;
  explicit EdgeScores(const EdgeSelectArgs& args)
      : a(args), k(graphk::Kernels::get()), words(graphk::block_words(args.n)), colmask(args.n),
        colmask_blocks((size_t)words, 0) {
    for (std::int64_t j = 0; j < a.n; ++j) {
      colmask[j] = a.node_mask[j] ? 1.0f : 0.0f;
      if (a.node_mask[j]) {
        const std::int64_t b = j / graphk::kBlockCols;
        colmask_blocks[b / 64] |= std::uint64_t(1) << (b % 64);
      }
    }
  }
  bool row_active(std::int64_t i) const { return a.node_mask[i] != 0 && a.row_factor[i] != 0.0f; }
  // f(j0, j1, scores) for every block of row i that may hold a non-zero score.
  template <class F>
  void row(std::int64_t i, std::uint64_t* tmp, float* buf, F&& f) const {
    const float* r = a.a + i * a.lda;
    if (a.row_blocks != nullptr) {
      const std::uint64_t* b = a.row_blocks + i * words;
      for (std::int64_t w = 0; w < words; ++w) tmp[w] = b[w] & colmask_blocks[w];
    } else {
      for (std::int64_t w = 0; w < words; ++w) tmp[w] = colmask_blocks[w];
    }
    const float sc = a.row_scale[i], fac = a.row_factor[i];
    graphk::for_blocks(tmp, a.n, [&](std::int64_t j0, std::int64_t j1) {
      k.scores(r, colmask.data(), j0, j1, sc, fac, buf);
      f(j0, j1, buf);
    });
  }
};

// Histogram of the scores whose digits above `level` equal `prefix`.
void edge_hist_pass(const EdgeScores& es, int level, std::uint32_t prefix, std::vector<std::int64_t>& count,
                    std::vector<double>& sum) {
  const std::int64_t n = es.a.n;
  const int T = graphk::threads_for(n * n);
  const int nb = 1 << kSelectBits[level];
  const int up_shift = kSelectShift[level] + kSelectBits[level];
  const std::uint32_t mask = (std::uint32_t)nb - 1;
  std::vector<std::vector<std::int64_t>> cs(T);
  std::vector<std::vector<double>> ss(T);
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    cs[t].assign(nb, 0);
    ss[t].assign(nb, 0.0);
    std::vector<std::uint64_t> tmp((size_t)es.words);
    float buf[graphk::kBlockCols];
#pragma omp for schedule(dynamic, 16)
    for (std::int64_t i = 0; i < n; ++i) {
      if (!es.row_active(i)) continue;
      es.row(i, tmp.data(), buf, [&](std::int64_t j0, std::int64_t j1, const float* sc) {
        for (std::int64_t q = 0; q < j1 - j0; ++q) {
          const float s = sc[q];
          if (s == 0.0f) continue;
          const std::uint32_t u = float_bits(s);
          if ((u >> up_shift) != prefix) continue;
          const std::uint32_t b = (u >> kSelectShift[level]) & mask;
          cs[t][b] += 1;
          ss[t][b] += s;
        }
      });
    }
  }
  count.assign(nb, 0);
  sum.assign(nb, 0.0);
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < nb; ++b) {
      count[b] += cs[t][b];
      sum[b] += ss[t][b];
    }
}

}  // namespace

EdgeSelectResult edge_select_mask_cpu(const EdgeSelectArgs& args) {
  EdgeSelectResult res;
  const std::int64_t n = args.n;
  const std::int64_t nn = n * n;
  std::uint8_t* mask = args.mask_out;
  EdgeScores es(args);
  const int T = graphk::threads_for(nn);

  // All scores zero (S = 0): circuit-tracer's cumulative fractions are NaN, its index clamps to the
  // last element, the threshold is 0 and every edge passes `>= 0`. Likewise when no prefix reaches t.
  auto keep_all = [&]() {
#pragma omp parallel for schedule(static) num_threads(T)
    for (std::int64_t i = 0; i < n; ++i) std::memset(mask + i * n, 1, (size_t)n);
  };
  if (args.nnz == 0) {
    res.status = kSelectAllZero;
    res.threshold = 0.0f;
    res.clamped = true;
    keep_all();
    return res;
  }
  const float total_f = (float)args.total;
  CrossingTest test{total_f, total_f, 0.0, args.t};

  std::vector<std::int64_t> count;
  std::vector<double> sum;
  if (args.hist0 != nullptr) {
    count.assign(args.hist0->count, args.hist0->count + (1 << kSelectBits[0]));
    sum.assign(args.hist0->sum, args.hist0->sum + (1 << kSelectBits[0]));
  } else {
    edge_hist_pass(es, 0, 0, count, sum);
    res.passes += 1;
  }
  Pick p = pick_bucket(count.data(), sum.data(), 1 << kSelectBits[0], 0.0, test, false);
  if (p.late < 0) {
    res.clamped = true;
    res.threshold = args.nnz < nn ? 0.0f : args.min_nz;
    keep_all();
    return res;
  }
  std::uint32_t prefix = (std::uint32_t)p.late;
  double base = p.base_late;
  std::int64_t in_bucket = p.count_late;
  int level = 0;  // digits 0..level are fixed in `prefix`
  // Narrow down with more passes while the bucket is too large to hold in memory.
  while (in_bucket > args.max_candidates && level + 1 < kSelectLevels) {
    ++level;
    edge_hist_pass(es, level, prefix, count, sum);
    res.passes += 1;
    p = pick_bucket(count.data(), sum.data(), 1 << kSelectBits[level], base, test, true);
    if (p.late < 0 || p.early != p.late) {
      // The passes disagree (the level above counted scores this pass does not see): no mask is
      // better than one built from an arbitrary bucket.
      res.status = kSelectAmbiguous;
      return res;
    }
    prefix = (prefix << kSelectBits[level]) | (std::uint32_t)p.late;
    base = p.base_late;
    in_bucket = p.count_late;
  }
  const int shift = kSelectShift[level];
  const bool pinned = level == kSelectLevels - 1;
  const float pinned_thr = bits_float(prefix);

  // One pass writes the mask: scores above the bucket are kept, below dropped; the bucket's scores
  // are collected with their positions (unless the value is already pinned).
  std::vector<std::vector<float>> cval(T);
  std::vector<std::vector<std::int64_t>> cidx(T);
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    std::vector<std::uint64_t> tmp((size_t)es.words);
    float buf[graphk::kBlockCols];
    if (!pinned) {
      // Room for the whole bucket in every thread: large reservations are mapped lazily, so only
      // the entries written become resident, and no vector ever reallocates (which would double it).
      cval[t].reserve((size_t)in_bucket);
      cidx[t].reserve((size_t)in_bucket);
    }
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      std::uint8_t* m = mask + i * n;
      std::memset(m, 0, (size_t)n);
      if (!es.row_active(i)) continue;
      es.row(i, tmp.data(), buf, [&](std::int64_t j0, std::int64_t j1, const float* sc) {
        if (pinned) {
          for (std::int64_t q = 0; q < j1 - j0; ++q) m[j0 + q] = sc[q] >= pinned_thr ? 1 : 0;
          return;
        }
        for (std::int64_t q = 0; q < j1 - j0; ++q) {
          const float s = sc[q];
          const std::uint32_t key = float_bits(s) >> shift;
          m[j0 + q] = key > prefix ? 1 : 0;
          if (key == prefix && s != 0.0f) {
            cval[t].push_back(s);
            cidx[t].push_back(i * n + j0 + q);
          }
        }
      });
    }
  }
  res.passes += 1;
  if (pinned) {
    res.threshold = pinned_thr;
    return res;
  }
  std::vector<float> vals;
  vals.reserve((size_t)in_bucket);
  for (int t = 0; t < T; ++t) {
    vals.insert(vals.end(), cval[t].begin(), cval[t].end());
    std::vector<float>().swap(cval[t]);
  }
  res.candidates = (std::int64_t)vals.size();
  float thr = 0.0f;
  res.status = select_in_memory(vals, level + 1, prefix, base, test, thr);
  res.threshold = thr;
  // The collected scores are in thread order, like their positions.
  std::int64_t q = 0;
  for (int t = 0; t < T; ++t)
    for (std::int64_t idx : cidx[t]) {
      if (vals[q] >= thr) mask[idx] = 1;
      ++q;
    }
  return res;
}

}  // namespace fastattr
