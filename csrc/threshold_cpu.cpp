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
//
// Deterministic for a given thread count: every pass splits its rows statically over the threads
// and merges the per-thread histograms in thread order, so no double sum depends on timing.
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

using graphk::float_bits;

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

inline std::uint32_t digit(float v, int level) {
  return (float_bits(v) >> kSelectShift[level]) & (((std::uint32_t)1 << kSelectBits[level]) - 1u);
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
    count.assign(nb, 0);
    sum.assign(nb, 0.0);
    for (float v : *src) {
      const std::uint32_t b = digit(v, lv);
      count[b] += 1;
      sum[b] += v;
    }
    const BucketPick p = pick_bucket(count.data(), sum.data(), nb, base, test, true);
    if (p.early != p.late) return kSelectAmbiguous;
    if (p.late < 0) return kSelectAmbiguous;  // unreachable with must_cross and non-empty input
    prefix = (prefix << kSelectBits[lv]) | (std::uint32_t)p.late;
    base = p.base_late;
    if (lv + 1 < kSelectLevels) {
      nxt.clear();
      for (float v : *src)
        if (digit(v, lv) == (std::uint32_t)p.late) nxt.push_back(v);
      cur.swap(nxt);
      src = &cur;
    }
  }
  value = bits_float(prefix);
  return kSelectOk;
}

// Level 0 of a 1-D select: the histogram of the positive scores and what the status needs.
struct Level0 {
  SelectHist hist;
  std::int64_t nnz = 0;
  float min_nz = std::numeric_limits<float>::infinity();
  bool negative = false, nonfinite = false;
};

void level0_1d(const float* scores, std::int64_t n, Level0& out) {
  const int T = graphk::threads_for(n);
  std::vector<SelectHist> hists(T);  // value-initialised (zero): a smaller team leaves some unused
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
  out.negative = negative;
  out.nonfinite = nonfinite;
  out.hist.clear();
  for (int t = 0; t < T; ++t) {  // thread order: the same sums on every run
    out.hist.add(hists[t]);
    out.nnz += nnz[t];
    out.min_nz = std::min(out.min_nz, mins[t]);
  }
}

}  // namespace

bool CrossingTest::early(double c) const { return crossing(dc != 0.0 ? c * (1.0 + dc) : c, s_lo, t); }
bool CrossingTest::late(double c) const { return crossing(dc != 0.0 ? c * (1.0 - dc) : c, s_hi, t); }

CrossingTest crossing_test(const double* sum, int nb, float t, double rel_s, double dc, float s_fixed) {
  if (s_fixed > 0.0f) return CrossingTest{s_fixed, s_fixed, dc, t};
  double total = 0.0;
  for (int b = 0; b < nb; ++b) total += sum[b];
  if (rel_s == 0.0) {
    const float s = (float)total;
    return CrossingTest{s, s, dc, t};
  }
  return CrossingTest{std::nextafter((float)(total * (1.0 - rel_s)), 0.0f),
                      std::nextafter((float)(total * (1.0 + rel_s)), std::numeric_limits<float>::infinity()), dc, t};
}

BucketPick pick_bucket(const std::int64_t* count, const double* sum, int nb, double base, const CrossingTest& test,
                       bool must_cross) {
  BucketPick p;
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

// ------------------------------------------------------------------------------------------------
// One-dimensional scores.
// ------------------------------------------------------------------------------------------------
SelectResult select_threshold_1d(const float* scores, std::int64_t n, float t, double rel_s, double dc,
                                 float s_fixed) {
  SelectResult res;
  Level0 l0;
  level0_1d(scores, n, l0);
  if (l0.nonfinite) {
    res.status = kSelectNonFinite;
    return res;
  }
  if (l0.negative) {
    res.status = kSelectNegative;
    return res;
  }
  if (l0.nnz == 0) {
    res.status = kSelectAllZero;
    res.value = 0.0f;
    return res;
  }
  const int nb0 = 1 << kSelectBits[0];
  const CrossingTest test = crossing_test(l0.hist.sum, nb0, t, rel_s, dc, s_fixed);
  const BucketPick p = pick_bucket(l0.hist.count, l0.hist.sum, nb0, 0.0, test, false);
  if (p.early != p.late || test.may_overflow()) {
    res.status = kSelectAmbiguous;
    return res;
  }
  if (p.late < 0) {  // no prefix reaches t: circuit-tracer clamps to the last element
    res.clamped = true;
    res.value = l0.nnz < n ? 0.0f : l0.min_nz;
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

// Histogram of the scores whose digits above `level` equal `prefix`. Rows are split statically:
// handing them out by timing (dynamic scheduling) would group the per-thread double sums
// differently on every run.
void edge_hist_pass(const EdgeScores& es, int level, std::uint32_t prefix, std::vector<std::int64_t>& count,
                    std::vector<double>& sum) {
  const std::int64_t n = es.a.n;
  const int T = graphk::threads_for(n * n);
  const int nb = 1 << kSelectBits[level];
  const int up_shift = kSelectShift[level] + kSelectBits[level];
  // Zeroed here, not by their threads: OpenMP may give a smaller team than T, and the merge below
  // reads every buffer.
  std::vector<std::vector<std::int64_t>> cs(T, std::vector<std::int64_t>(nb, 0));
  std::vector<std::vector<double>> ss(T, std::vector<double>(nb, 0.0));
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    std::vector<std::uint64_t> tmp((size_t)es.words);
    float buf[graphk::kBlockCols];
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      if (!es.row_active(i)) continue;
      es.row(i, tmp.data(), buf, [&](std::int64_t j0, std::int64_t j1, const float* sc) {
        for (std::int64_t q = 0; q < j1 - j0; ++q) {
          const float s = sc[q];
          if (s == 0.0f) continue;
          if ((float_bits(s) >> up_shift) != prefix) continue;
          const std::uint32_t b = digit(s, level);
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

// Every edge passes `>= threshold` (threshold 0): all scores zero, or no prefix reaches t.
void keep_all(std::uint8_t* mask, std::int64_t n) {
#pragma omp parallel for schedule(static) num_threads(graphk::threads_for(n * n))
  for (std::int64_t i = 0; i < n; ++i) std::memset(mask + i * n, 1, (size_t)n);
}

// Where the crossing lies: the digits fixed so far and the prefix sum before them.
struct Bucket {
  int level = 0;  // digits 0..level are fixed in `prefix`
  std::uint32_t prefix = 0;
  double base = 0.0;
  std::int64_t count = 0;  // scores in the bucket
};

// Fix further digits with more histogram passes while the bucket holds more scores than fit in
// memory. Returns kSelectOk, or kSelectAmbiguous when a pass contradicts the level above.
int narrow_bucket(const EdgeScores& es, const CrossingTest& test, std::int64_t max_candidates, Bucket& bk,
                  EdgeSelectResult& res) {
  std::vector<std::int64_t> count;
  std::vector<double> sum;
  while (bk.count > max_candidates && bk.level + 1 < kSelectLevels) {
    const int level = bk.level + 1;
    edge_hist_pass(es, level, bk.prefix, count, sum);
    res.passes += 1;
    const BucketPick p = pick_bucket(count.data(), sum.data(), 1 << kSelectBits[level], bk.base, test, true);
    // The level above counted scores this pass does not see: no mask is better than one built
    // from an arbitrary bucket.
    if (p.late < 0 || p.early != p.late) return kSelectAmbiguous;
    bk.level = level;
    bk.prefix = (bk.prefix << kSelectBits[level]) | (std::uint32_t)p.late;
    bk.base = p.base_late;
    bk.count = p.count_late;
  }
  return kSelectOk;
}

// The bucket's scores and their flat positions, per thread in row order.
struct Candidates {
  std::vector<std::vector<float>> val;
  std::vector<std::vector<std::int64_t>> idx;
};

// One pass writes the mask: scores above the bucket are kept, below dropped; the bucket's scores
// are collected with their positions (when the bucket is a single value they are compared to it).
void mask_pass(const EdgeScores& es, std::uint8_t* mask, const Bucket& bk, Candidates& cand) {
  const std::int64_t n = es.a.n;
  const int T = graphk::threads_for(n * n);
  const int shift = kSelectShift[bk.level];
  const bool pinned = bk.level == kSelectLevels - 1;
  const float pinned_thr = bits_float(bk.prefix);
  cand.val.assign(T, {});
  cand.idx.assign(T, {});
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    std::vector<std::uint64_t> tmp((size_t)es.words);
    float buf[graphk::kBlockCols];
    std::vector<float>& cval = cand.val[t];
    std::vector<std::int64_t>& cidx = cand.idx[t];
    if (!pinned) {
      // Room for the whole bucket in every thread: large reservations are mapped lazily, so only
      // the entries written become resident, and no vector ever reallocates (which would double it).
      cval.reserve((size_t)bk.count);
      cidx.reserve((size_t)bk.count);
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
          m[j0 + q] = key > bk.prefix ? 1 : 0;
          if (key == bk.prefix && s != 0.0f) {
            cval.push_back(s);
            cidx.push_back(i * n + j0 + q);
          }
        }
      });
    }
  }
}

// Resolve the remaining digits on the collected scores and set the mask of those that pass.
int resolve_candidates(Candidates& cand, const Bucket& bk, const CrossingTest& test, std::uint8_t* mask,
                       EdgeSelectResult& res) {
  std::vector<float> vals;
  vals.reserve((size_t)bk.count);
  for (std::vector<float>& v : cand.val) {  // thread order, like the positions below
    vals.insert(vals.end(), v.begin(), v.end());
    std::vector<float>().swap(v);
  }
  res.candidates = (std::int64_t)vals.size();
  float thr = 0.0f;
  const int status = select_in_memory(vals, bk.level + 1, bk.prefix, bk.base, test, thr);
  res.threshold = thr;
  std::int64_t q = 0;
  for (const std::vector<std::int64_t>& idx : cand.idx)
    for (std::int64_t at : idx) {
      if (vals[q] >= thr) mask[at] = 1;
      ++q;
    }
  return status;
}

}  // namespace

EdgeSelectResult edge_select_mask_cpu(const EdgeSelectArgs& args) {
  EdgeSelectResult res;
  const std::int64_t n = args.n;
  // All scores zero (S = 0): circuit-tracer's cumulative fractions are NaN, its index clamps to the
  // last element, the threshold is 0 and every edge passes `>= 0`.
  if (args.nnz == 0) {
    res.status = kSelectAllZero;
    res.clamped = true;
    keep_all(args.mask_out, n);
    return res;
  }
  EdgeScores es(args);
  const float total_f = (float)args.total;
  const CrossingTest test{total_f, total_f, 0.0, args.t};
  const int nb0 = 1 << kSelectBits[0];
  std::vector<std::int64_t> count;
  std::vector<double> sum;
  if (args.hist0 != nullptr) {
    count.assign(args.hist0->count, args.hist0->count + nb0);
    sum.assign(args.hist0->sum, args.hist0->sum + nb0);
  } else {
    edge_hist_pass(es, 0, 0, count, sum);
    res.passes += 1;
  }
  const BucketPick p = pick_bucket(count.data(), sum.data(), nb0, 0.0, test, false);
  if (p.late < 0) {  // no prefix reaches t: circuit-tracer clamps to the last (smallest) element
    res.clamped = true;
    res.threshold = args.nnz < n * n ? 0.0f : args.min_nz;
    keep_all(args.mask_out, n);
    return res;
  }
  Bucket bk{0, (std::uint32_t)p.late, p.base_late, p.count_late};
  res.status = narrow_bucket(es, test, args.max_candidates, bk, res);
  if (res.status != kSelectOk) return res;
  Candidates cand;
  mask_pass(es, args.mask_out, bk, cand);
  res.passes += 1;
  if (bk.level == kSelectLevels - 1) {
    res.threshold = bits_float(bk.prefix);
    return res;
  }
  res.status = resolve_candidates(cand, bk, test, args.mask_out, res);
  return res;
}

}  // namespace fastattr
