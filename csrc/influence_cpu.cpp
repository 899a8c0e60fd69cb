// Influence on the CPU: sum_{k>=1} w A^k over a DAG in ONE pass over A, plus the power series
// for matrices that are not DAGs and for compute_partial_influences.
//
// circuit-tracer iterates x <- x @ A until x is exactly zero, which reads the whole N x N matrix once
// per level of the graph (~n_layers + 2 times). On a DAG the same sum satisfies
//   infl_j = sum_i (w_i + infl_i) A_ij,
// so if every target row i is processed after all rows that read from it (a topological order of
// the reversed graph), each row is read once and scattered with its final coefficient. The
// normalised matrix is never built: the coefficient of row i is divided by its |A| row sum.
//
// Two orders are used:
// * decreasing row index, single-threaded, verified on the fly (run_reverse): circuit-tracer's node
//   order makes this a topological order, and then the row sums, the block bitmaps and the sweep
//   all come from one read of each row;
// * otherwise Kahn's algorithm: a first pass computes row sums, bitmaps and the number of rows
//   reading each node, then "waves" of rows with no dependencies among themselves are swept, split
//   among threads (each with its own accumulator, reduced at the wave end) when they are large.
// The raise-on-non-convergence semantics are kept by tracking the longest path from a weighted
// node: circuit-tracer's loop runs at most that many steps before the vector becomes zero. A path
// longer than max_iter, or a cycle, falls back to the power series, which reproduces
// circuit-tracer's loop (including convergence by float32 underflow or exact cancellation).
//
// Every sum here is fixed-order, so results are bitwise identical from run to run (for a given
// FASTATTR_NUM_THREADS / OpenMP thread count): a wave's rows are split among threads by index
// (static partition, not by timing), each thread accumulates its rows in order, and the
// accumulators are reduced column by column in thread order; the power series gives each column
// block to one thread, which adds the rows in order whatever the schedule; row sums are one
// thread's loop per row. No float sum depends on which thread finishes first.
#include <algorithm>
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

void SelectHist::clear() {
  std::memset(count, 0, sizeof count);
  std::memset(sum, 0, sizeof sum);
}

void SelectHist::add(const SelectHist& o) {
  for (int b = 0; b < kSelectMaxBuckets; ++b) {
    count[b] += o.count[b];
    sum[b] += o.sum[b];
  }
}

namespace {

using graphk::Kernels;

// Threads of the current team: OpenMP may give fewer than num_threads asked for (a thread limit,
// dynamic adjustment, or a call from inside another parallel region), so partitions and merges
// use the team actually running.
inline int team_size() {
#ifdef FASTATTR_WITH_OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}


// Scratch of one thread for one sweep.
struct Scratch {
  std::vector<double> acc;
  std::vector<std::int32_t> dec;
  std::vector<std::int32_t> len;
  std::vector<float> buf;
  SelectHist hist;
  double edge_sum = 0.0;
  std::int64_t edge_nnz = 0;
  float edge_min = std::numeric_limits<float>::infinity();
  Scratch() { hist.clear(); }
};

struct Sweep {
  const InfluenceArgs& args;
  const Kernels& k;
  std::int64_t n, words;
  bool masked, counting;
  std::vector<float> colmask;          // 1/0 per column when masked
  std::vector<double> infl;            // final once the row's wave starts
  std::vector<double> rowsum;          // |A| row sums from the first pass (counting mode)
  std::vector<std::int32_t> count;     // Kahn: targets not yet processed that read each node
  std::vector<std::int32_t> len;       // longest path from a weighted node, -1 = unreached
  std::vector<std::uint64_t> own_blocks;
  std::uint64_t* blocks = nullptr;     // n x words
  std::vector<std::uint64_t> colmask_blocks;

  explicit Sweep(const InfluenceArgs& a)
      : args(a), k(Kernels::get()), n(a.n), words(graphk::block_words(a.n)), masked(a.node_mask != nullptr),
        counting(!a.reuse_order) {}

  bool row_kept(std::int64_t i) const { return !masked || args.node_mask[i] != 0; }
  const float* cm() const { return masked ? colmask.data() : nullptr; }
  std::uint64_t* row_bits(std::int64_t i) { return blocks + i * words; }

  void setup_blocks() {
    if (args.row_blocks != nullptr) {
      blocks = args.row_blocks;
    } else {
      own_blocks.assign((size_t)(n * words), 0);
      blocks = own_blocks.data();
    }
    if (args.reuse_order && args.row_blocks == nullptr) {
      for (std::int64_t i = 0; i < n; ++i) graphk::fill_all_blocks(row_bits(i), n);
    }
    if (masked) {
      // Blocks without a kept column contribute nothing on the pruned graph.
      colmask_blocks.assign((size_t)words, 0);
      for (std::int64_t j = 0; j < n; ++j)
        if (colmask[j] != 0.0f) {
          const std::int64_t b = j / graphk::kBlockCols;
          colmask_blocks[b / 64] |= std::uint64_t(1) << (b % 64);
        }
    }
  }

  // Row bitmap restricted to kept columns (copied into `tmp` when masked).
  const std::uint64_t* bits_for(std::int64_t i, std::uint64_t* tmp) {
    const std::uint64_t* b = row_bits(i);
    if (!masked) return b;
    for (std::int64_t w = 0; w < words; ++w) tmp[w] = b[w] & colmask_blocks[w];
    return tmp;
  }

  bool prepare();
  bool row(std::int64_t i, double* acc, std::int32_t* dec, std::int32_t* len_out, Scratch& s);
  bool wave_serial(const std::vector<std::int32_t>& wave, Scratch& s, std::vector<std::int32_t>& next);
  bool wave_parallel(const std::vector<std::int32_t>& wave, int T, std::vector<Scratch>& scratch,
                     std::vector<std::int32_t>& next);
  bool run_waves(InfluenceResult& res);
  int run_reverse(InfluenceResult& res);
  void edge_stats_from(const std::vector<Scratch>& scratch, InfluenceResult& res) const;
};

// Row sums, the finiteness check, Kahn's counts and the block bitmaps in one row-parallel pass.
bool Sweep::prepare() {
  const int T = graphk::threads_for(n * n);
  std::vector<std::vector<std::int32_t>> cnt(T);
  bool bad = false;
  rowsum.assign(n, 0.0);
  count.assign(n, 0);
#pragma omp parallel num_threads(T) reduction(|| : bad)
  {
    const int t = thread_id(), nt = team_size();
    std::vector<std::int32_t>& c = cnt[t];
    c.assign(n, 0);
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      std::uint64_t* bits = row_bits(i);
      if (!row_kept(i)) {
        std::fill(bits, bits + words, std::uint64_t(0));
        continue;
      }
      graphk::PrepareArgs p{args.a + i * args.lda, cm(), n, c.data(), bits};
      const double rs = k.prepare[masked ? 1 : 0](p);
      rowsum[i] = rs;
      if (!std::isfinite(rs)) bad = true;
    }
#pragma omp for schedule(static)
    for (std::int64_t j = 0; j < n; ++j) {
      std::int32_t total = 0;
      for (int u = 0; u < nt; ++u) total += cnt[u][j];
      count[j] = total;
    }
  }
  return !bad;
}

// Process row i with its final coefficient. Returns false on a non-finite row.
bool Sweep::row(std::int64_t i, double* acc, std::int32_t* dec, std::int32_t* len_out, Scratch& s) {
  const bool kept = row_kept(i);
  const bool abs = args.normalize;
  const float* r = args.a + i * args.lda;
  std::uint64_t tmp_bits[64];  // words <= 64 for n < 2^18; larger n uses the heap copy below
  std::vector<std::uint64_t> heap_bits;
  std::uint64_t* tmp = tmp_bits;
  if (words > 64) {
    heap_bits.resize((size_t)words);
    tmp = heap_bits.data();
  }
  const std::uint64_t* bits = kept ? bits_for(i, tmp) : nullptr;
  float scale = abs ? args.eps : 1.0f;
  if (kept) {
    const double rs = counting ? rowsum[i] : k.abs_sum[masked ? 1 : 0](r, cm(), bits, n);
    if (!std::isfinite(rs)) return false;
    if (abs) scale = std::max((float)rs, args.eps);
  }
  const float factor = (float)((float)infl[i] + args.w[i]);
  if (args.row_scale != nullptr) args.row_scale[i] = scale;
  if (args.row_factor != nullptr) args.row_factor[i] = factor;
  if (!kept) return true;  // a pruned row is all zero: nothing to scatter, no edge scores

  const double coef = abs ? ((double)args.w[i] + infl[i]) / (double)scale : (double)args.w[i] + infl[i];
  const std::int32_t li = len[i];
  const bool do_acc = coef != 0.0, do_dec = dec != nullptr, do_len = li >= 0;
  if (do_acc || do_dec || do_len) {
    graphk::ScatterArgs sa{r, cm(), bits, n, coef, acc, dec, len_out, li + 1};
    k.scatter_for(abs, masked, do_acc, do_dec, do_len)(sa);
  }
  if (args.edge_hist != nullptr && factor != 0.0f) {
    // The score circuit-tracer builds: fl32(fl32(|a| / rowsum) * fl32(infl + w)).
    if (s.buf.size() < (size_t)graphk::kBlockCols) s.buf.resize(graphk::kBlockCols);
    float* buf = s.buf.data();
    graphk::for_blocks(bits, n, [&](std::int64_t j0, std::int64_t j1) {
      k.scores(r, colmask.data(), j0, j1, scale, factor, buf);
      for (std::int64_t q = 0; q < j1 - j0; ++q) {
        const float sc = buf[q];
        if (sc == 0.0f) continue;
        const std::uint32_t b = graphk::edge_bucket0(sc);
        s.hist.count[b] += 1;
        s.hist.sum[b] += sc;
        s.edge_sum += sc;
        s.edge_nnz += 1;
        s.edge_min = std::min(s.edge_min, sc);
      }
    });
  }
  return true;
}

// The common case in one pass, single-threaded: rows in decreasing index order. circuit-tracer's
// node order (features by layer and position, then errors, tokens, logits) read backwards is a
// topological order: a row only reads rows of lower index, or rows without inputs (errors,
// tokens), whose influence is not needed before the end. That is verified on the fly: row i must
// not read a row j >= i that has already been processed with inputs of its own. The first pass's
// row sums and block bitmaps are computed here too, from the row while it is in cache.
// Returns 1 on success, 0 when the order does not hold (nothing is kept), -1 on a non-finite row.
int Sweep::run_reverse(InfluenceResult& res) {
  std::vector<float> has_inputs(n, 0.0f);  // processed rows with a non-zero entry
  Scratch s;
  const std::int64_t nb = (n + graphk::kBlockCols - 1) / graphk::kBlockCols;
  rowsum.assign(n, 0.0);
  for (std::int64_t i = n - 1; i >= 0; --i) {
    const float* r = args.a + i * args.lda;
    std::uint64_t* bits = row_bits(i);
    if (!row_kept(i)) {
      std::fill(bits, bits + words, std::uint64_t(0));
    } else {
      graphk::PrepareArgs p{r, cm(), n, nullptr, bits};
      const double rs = k.prepare[masked ? 1 : 0](p);
      if (!std::isfinite(rs)) return -1;
      rowsum[i] = rs;
      // Reads of rows j >= i that already have inputs would come too late.
      const float* hi = has_inputs.data();
      const std::int64_t b0 = i / graphk::kBlockCols;
      bool bad = false;
      for (std::int64_t b = b0; b < nb && !bad; ++b) {
        const std::uint64_t word = bits[b / 64];
        if ((word >> (b % 64) & 1u) == 0) continue;
        const std::int64_t j0 = std::max(b * graphk::kBlockCols, i), j1 = std::min(n, (b + 1) * graphk::kBlockCols);
        int hit = 0;
        if (masked) {
          const float* c = colmask.data();
#pragma omp simd reduction(| : hit)
          for (std::int64_t j = j0; j < j1; ++j)
            hit |= (r[j] != 0.0f && c[j] != 0.0f && (hi[j] != 0.0f || j == i)) ? 1 : 0;
        } else {
#pragma omp simd reduction(| : hit)
          for (std::int64_t j = j0; j < j1; ++j) hit |= (r[j] != 0.0f && (hi[j] != 0.0f || j == i)) ? 1 : 0;
        }
        bad = hit != 0;
      }
      if (bad) return 0;
    }
    if (!row(i, infl.data(), nullptr, len.data(), s)) return -1;
    if (rowsum[i] != 0.0) has_inputs[i] = 1.0f;
  }
  if (args.order != nullptr) {
    // Record the order as one wave per row, so that passes over pruned subgraphs reuse it.
    for (std::int64_t q = 0; q < n; ++q) {
      args.order[q] = (std::int32_t)(n - 1 - q);
      args.wave_ptr[q] = (std::int32_t)q;
    }
    args.wave_ptr[n] = (std::int32_t)n;
  }
  res.n_waves = n;
  std::vector<Scratch> one(1);
  one[0].hist = s.hist;
  one[0].edge_sum = s.edge_sum;
  one[0].edge_nnz = s.edge_nnz;
  one[0].edge_min = s.edge_min;
  edge_stats_from(one, res);
  return 1;
}

void Sweep::edge_stats_from(const std::vector<Scratch>& scratch, InfluenceResult& res) const {
  if (args.edge_hist == nullptr) return;
  args.edge_hist->clear();
  res.edge_sum = 0.0;
  res.edge_nnz = 0;
  float mn = std::numeric_limits<float>::infinity();
  for (const Scratch& t : scratch) {
    args.edge_hist->add(t.hist);
    res.edge_sum += t.edge_sum;
    res.edge_nnz += t.edge_nnz;
    mn = std::min(mn, t.edge_min);
  }
  res.edge_min = res.edge_nnz > 0 ? mn : 0.0f;
}

// A small wave, straight into the shared arrays (rows of one wave never read each other). Returns
// false on a non-finite row; the nodes whose last reader was in the wave go to `next`, sorted.
bool Sweep::wave_serial(const std::vector<std::int32_t>& wave, Scratch& s, std::vector<std::int32_t>& next) {
  std::vector<std::int32_t>& dec_tmp = s.dec;
  if (counting && dec_tmp.size() != (size_t)n) dec_tmp.assign(n, 0);
  for (const std::int32_t i : wave) {
    if (!row(i, infl.data(), counting ? dec_tmp.data() : nullptr, len.data(), s)) return false;
    if (!counting || !row_kept(i)) continue;
    graphk::for_blocks(row_bits(i), n, [&](std::int64_t j0, std::int64_t j1) {
      for (std::int64_t j = j0; j < j1; ++j) {
        if (dec_tmp[j] == 0) continue;
        count[j] -= dec_tmp[j];
        dec_tmp[j] = 0;
        if (count[j] == 0) next.push_back((std::int32_t)j);
      }
    });
  }
  std::sort(next.begin(), next.end());
  return true;
}

// A large wave on up to T threads (nt of them given): thread t sweeps rows [R t / nt, R (t + 1) / nt)
// of the wave into its own accumulators, then each thread reduces a range of columns over the nt
// accumulators in thread order, so the sums do not depend on timing.
bool Sweep::wave_parallel(const std::vector<std::int32_t>& wave, int T, std::vector<Scratch>& scratch,
                          std::vector<std::int32_t>& next) {
  const std::int64_t R = (std::int64_t)wave.size();
  std::vector<std::vector<std::int32_t>> found(T);
  bool bad = false;
#pragma omp parallel num_threads(T) reduction(|| : bad)
  {
    const int t = thread_id(), nt = team_size();
    Scratch& s = scratch[t];
    if (s.acc.size() != (size_t)n) s.acc.assign(n, 0.0);
    if (s.len.size() != (size_t)n) s.len.assign(n, -1);
    if (counting && s.dec.size() != (size_t)n) s.dec.assign(n, 0);
    const std::int64_t lo = R * t / nt, hi = R * (t + 1) / nt;
    for (std::int64_t q = lo; q < hi && !bad; ++q) {
      if (!row(wave[q], s.acc.data(), counting ? s.dec.data() : nullptr, s.len.data(), s)) bad = true;
    }
#pragma omp barrier
    const std::int64_t c0 = n * t / nt, c1 = n * (t + 1) / nt;
    std::vector<std::int32_t>& mine = found[t];
    for (std::int64_t j = c0; j < c1; ++j) {
      double a = 0.0;
      std::int32_t d = 0, l = len[j];
      for (int u = 0; u < nt; ++u) {
        Scratch& o = scratch[u];
        a += o.acc[j];
        o.acc[j] = 0.0;
        l = std::max(l, o.len[j]);
        o.len[j] = -1;
        if (counting) {
          d += o.dec[j];
          o.dec[j] = 0;
        }
      }
      infl[j] += a;
      len[j] = l;
      if (d != 0) {
        count[j] -= d;
        if (count[j] == 0) mine.push_back((std::int32_t)j);
      }
    }
  }
  if (bad) return false;
  for (int t = 0; t < T; ++t) next.insert(next.end(), found[t].begin(), found[t].end());
  return true;
}

bool Sweep::run_waves(InfluenceResult& res) {
  const int T = graphk::threads_for(n * n);
  std::vector<Scratch> scratch(T);
  std::vector<std::int32_t> wave, next;
  std::int64_t processed = 0, n_waves = 0;

  if (counting) {
    for (std::int64_t i = 0; i < n; ++i)
      if (count[i] == 0) wave.push_back((std::int32_t)i);
  } else if (args.n_waves > 0) {
    wave.assign(args.order + args.wave_ptr[0], args.order + args.wave_ptr[1]);
  }

  while (!wave.empty()) {
    if (counting && args.order != nullptr) {
      args.wave_ptr[n_waves] = (std::int32_t)processed;
      std::copy(wave.begin(), wave.end(), args.order + processed);
    }
    processed += (std::int64_t)wave.size();
    ++n_waves;
    next.clear();
    const std::int64_t R = (std::int64_t)wave.size();
    // Threads only pay off on large waves: every parallel region ends in a barrier, and waiting
    // threads spin, which costs the working ones on a loaded machine.
    const bool parallel = T > 1 && R >= 4 * T && R * n >= ((std::int64_t)1 << 22);  // T > 1 only for big graphs
    if (!(parallel ? wave_parallel(wave, T, scratch, next) : wave_serial(wave, scratch[0], next))) return false;

    if (counting) {
      wave.swap(next);
    } else if (n_waves < args.n_waves) {
      wave.assign(args.order + args.wave_ptr[n_waves], args.order + args.wave_ptr[n_waves + 1]);
    } else {
      wave.clear();
    }
  }
  if (counting && args.order != nullptr) {
    for (std::int64_t q = n_waves; q <= n; ++q) args.wave_ptr[q] = (std::int32_t)processed;
  }
  res.n_waves = (counting && processed < n) ? -1 : n_waves;

  edge_stats_from(scratch, res);  // merged in thread order
  return true;
}

// next[j] = sum over the active rows i of coef[i] * entry(row_i, j), accumulated in double, one
// block of columns per task so the accumulator stays in L1 and each row is read once per block.
template <class Entry>
void weighted_row_sum(const float* a, std::int64_t lda, std::int64_t cols, const std::vector<std::int64_t>& active,
                      const std::vector<double>& coef, float* next, Entry entry) {
  constexpr std::int64_t kBlock = 1024;
  const std::int64_t nblocks = (cols + kBlock - 1) / kBlock;
  const int T = graphk::threads_for((std::int64_t)active.size() * cols);
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
  for (std::int64_t blk = 0; blk < nblocks; ++blk) {
    const std::int64_t c0 = blk * kBlock, c1 = std::min(cols, c0 + kBlock);
    double acc[kBlock];
    std::fill(acc, acc + (c1 - c0), 0.0);
    for (std::int64_t i : active) {
      const float* r = a + i * lda;
      const double c = coef[i];
#pragma omp simd
      for (std::int64_t j = c0; j < c1; ++j) acc[j - c0] += c * (double)entry(r, j);
    }
    for (std::int64_t j = c0; j < c1; ++j) next[j] = (float)acc[j - c0];
  }
}

// weighted_row_sum for rows read contiguously (entry |a| when Abs, else a), through the CPU's
// vector kernel: the float chunks of WeightedSumArgs instead of a double per product.
template <typename Out>
void dense_weighted_row_sum(const float* a, std::int64_t lda, std::int64_t cols, const std::vector<std::int64_t>& active,
                            const std::vector<double>& coef, Out* next, bool abs) {
  constexpr std::int64_t kBlock = 2048;
  const std::int64_t nblocks = (cols + kBlock - 1) / kBlock;
  std::vector<float> c(active.size());
  for (std::size_t q = 0; q < active.size(); ++q) c[q] = (float)coef[active[q]];
  const graphk::WeightedSumFn fn = Kernels::get().weighted_sum[abs ? 1 : 0];
  const int T = graphk::threads_for((std::int64_t)active.size() * cols);
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
  for (std::int64_t blk = 0; blk < nblocks; ++blk) {
    const std::int64_t c0 = blk * kBlock, c1 = std::min(cols, c0 + kBlock);
    double acc[kBlock];
    float chunk[kBlock];
    std::fill(acc, acc + (c1 - c0), 0.0);
    fn(graphk::WeightedSumArgs{a, lda, active.data(), c.data(), (std::int64_t)active.size(), c0, c1, acc, chunk});
    for (std::int64_t j = c0; j < c1; ++j) next[j] = (Out)acc[j - c0];
  }
}

// ------------------------------------------------------------------------------------------------
// The one power series of both entry points where the one-pass sweep does not apply (a matrix with
// a cycle; the rectangular rows of compute_partial_influences): circuit-tracer's loop
//   x_1 = M(x_0), x_{k+1} = M(x_k), total = sum_k x_k, stopping at the first x_k exactly zero,
// where M(x)_j = sum_r x[node(r)] / scale_r * entry(row r, j), each term rounded to float32 as
// circuit-tracer's float32 matvec rounds it.
// ------------------------------------------------------------------------------------------------
struct Series {
  const float* a;
  std::int64_t rows, cols, lda;
  const std::int64_t* row_to_node;  // null: row r is node r (a square matrix)
  const float* scale;               // (rows,) divisor of each row's coefficient
  const std::uint8_t* row_kept;     // null: every row; else rows where it is 0 contribute nothing
  std::int64_t max_terms;           // kInfluenceNoConvergence when term max_terms is still non-zero
};

// `term` holds x_0 on entry; `total` receives the sum and `terms` the index of the zero term.
template <class Entry>
int power_series(const Series& s, Entry entry, std::vector<float>& term, std::vector<double>& total,
                 std::int64_t& terms) {
  std::vector<float> next(s.cols);
  std::vector<double> coef(s.rows);
  std::vector<std::int64_t> active;
  total.assign(s.cols, 0.0);
  for (terms = 1; terms <= s.max_terms; ++terms) {
    active.clear();
    for (std::int64_t r = 0; r < s.rows; ++r) {
      const bool kept = s.row_kept == nullptr || s.row_kept[r] != 0;
      const float x = term[s.row_to_node != nullptr ? s.row_to_node[r] : r];
      coef[r] = kept ? (double)x / (double)s.scale[r] : 0.0;
      if (coef[r] != 0.0) active.push_back(r);
    }
    weighted_row_sum(s.a, s.lda, s.cols, active, coef, next.data(), entry);
    term.swap(next);
    if (std::none_of(term.begin(), term.end(), [](float v) { return v != 0.0f; })) return kInfluenceOk;
    for (std::int64_t j = 0; j < s.cols; ++j) total[j] += term[j];
  }
  return kInfluenceNoConvergence;
}

// The dense matrix's series (|A| / rowsum when normalising, the node mask on rows and columns).
template <bool Abs, bool Masked>
int dense_series(const Series& s, const float* colmask, std::vector<float>& term, std::vector<double>& total,
                 std::int64_t& terms) {
  return power_series(
      s, [colmask](const float* r, std::int64_t j) { return graphk::entry<Abs, Masked>(r, colmask, j); }, term,
      total, terms);
}

// Edge scores of the pruned matrix when the power iteration was used (no fused sweep).
void edge_stats_pass(const InfluenceArgs& args, const std::vector<float>& colmask, InfluenceResult& res) {
  const std::int64_t n = args.n;
  const int T = graphk::threads_for(n * n);
  const Kernels& k = Kernels::get();
  std::vector<SelectHist> hists(T);
  for (SelectHist& h : hists) h.clear();  // every one is merged, also those of threads not given
  std::vector<double> sums(T, 0.0);
  std::vector<std::int64_t> nnz(T, 0);
  std::vector<float> mins(T, std::numeric_limits<float>::infinity());
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    float buf[graphk::kBlockCols];
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      if (args.node_mask[i] == 0) continue;
      const float f = args.row_factor[i], sc = args.row_scale[i];
      if (f == 0.0f) continue;
      const float* r = args.a + i * args.lda;
      for (std::int64_t j0 = 0; j0 < n; j0 += graphk::kBlockCols) {
        const std::int64_t j1 = std::min(n, j0 + graphk::kBlockCols);
        k.scores(r, colmask.data(), j0, j1, sc, f, buf);
        for (std::int64_t q = 0; q < j1 - j0; ++q) {
          const float s = buf[q];
          if (s == 0.0f) continue;
          const std::uint32_t b = graphk::edge_bucket0(s);
          hists[t].count[b] += 1;
          hists[t].sum[b] += s;
          sums[t] += s;
          nnz[t] += 1;
          mins[t] = std::min(mins[t], s);
        }
      }
    }
  }
  args.edge_hist->clear();
  res.edge_sum = 0.0;
  res.edge_nnz = 0;
  float mn = std::numeric_limits<float>::infinity();
  for (int t = 0; t < T; ++t) {
    args.edge_hist->add(hists[t]);
    res.edge_sum += sums[t];
    res.edge_nnz += nnz[t];
    mn = std::min(mn, mins[t]);
  }
  res.edge_min = res.edge_nnz > 0 ? mn : 0.0f;
}

// A cycle, or a path longer than max_iter: the power series decides, as in circuit-tracer (raise,
// or underflow to zero); then the per-row scales and factors, and the edge-score statistics, from
// its result.
InfluenceResult series_fallback(const InfluenceArgs& args, const Sweep& sw, InfluenceResult& res) {
  const std::int64_t n = args.n;
  const bool abs = args.normalize, masked = sw.masked;
  std::vector<float> scale(n), factor(n);
  for (std::int64_t i = 0; i < n; ++i) scale[i] = abs ? std::max((float)sw.rowsum[i], args.eps) : 1.0f;
  // circuit-tracer's max_iter counts the steps after the first term.
  const std::int64_t max_terms = args.max_iter < INT64_MAX ? args.max_iter + 1 : args.max_iter;
  const Series s{args.a, n, n, args.lda, nullptr, scale.data(), args.node_mask, max_terms};
  std::vector<float> term(args.w, args.w + n);
  std::vector<double> total;
  std::int64_t terms = 0;
  const float* cm = sw.cm();
  res.status = abs ? (masked ? dense_series<true, true>(s, cm, term, total, terms)
                             : dense_series<true, false>(s, cm, term, total, terms))
                   : (masked ? dense_series<false, true>(s, cm, term, total, terms)
                             : dense_series<false, false>(s, cm, term, total, terms));
  res.depth = res.status == kInfluenceOk ? terms - 1 : args.max_iter;
  for (std::int64_t j = 0; j < n; ++j) args.out[j] = (float)total[j];
  if (res.status != kInfluenceOk) return res;
  for (std::int64_t i = 0; i < n; ++i) {
    factor[i] = (float)(args.out[i] + args.w[i]);
    if (args.row_scale != nullptr) args.row_scale[i] = scale[i];
    if (args.row_factor != nullptr) args.row_factor[i] = factor[i];
  }
  if (args.edge_hist != nullptr) {
    InfluenceArgs a2 = args;
    a2.row_scale = scale.data();
    a2.row_factor = factor.data();
    edge_stats_pass(a2, sw.colmask, res);
  }
  return res;
}

}  // namespace

InfluenceResult influence_dense_cpu(const InfluenceArgs& args) {
  InfluenceResult res;
  Sweep sw(args);
  const std::int64_t n = args.n;
  if (sw.masked) {
    sw.colmask.resize(n);
    for (std::int64_t j = 0; j < n; ++j) sw.colmask[j] = args.node_mask[j] ? 1.0f : 0.0f;
  }
  sw.setup_blocks();
  sw.infl.assign(n, 0.0);
  sw.len.resize(n);
  for (std::int64_t i = 0; i < n; ++i) sw.len[i] = args.w[i] != 0.0f ? 0 : -1;

  int reversed = 0;
  if (sw.counting) {
    reversed = sw.run_reverse(res);
    if (reversed < 0) {
      res.status = kInfluenceNonFinite;
      return res;
    }
    if (reversed == 0) {  // not in topological order: start over with Kahn's waves
      std::fill(sw.infl.begin(), sw.infl.end(), 0.0);
      for (std::int64_t i = 0; i < n; ++i) sw.len[i] = args.w[i] != 0.0f ? 0 : -1;
      if (!sw.prepare()) {
        res.status = kInfluenceNonFinite;
        return res;
      }
    }
  }
  if (reversed == 0 && !sw.run_waves(res)) {
    res.status = kInfluenceNonFinite;
    return res;
  }

  if (res.n_waves >= 0) {
    std::int32_t depth = 0;
    for (std::int64_t i = 0; i < n; ++i) depth = std::max(depth, sw.len[i]);
    res.depth = depth;
    for (std::int64_t j = 0; j < n; ++j) args.out[j] = (float)sw.infl[j];
    if (depth <= args.max_iter) return res;
    // A path longer than max_iter: circuit-tracer raises unless its float32 terms underflow (or
    // cancel) to exactly zero first, which only its own series can tell.
  }

  return series_fallback(args, sw, res);
}

// ------------------------------------------------------------------------------------------------
// compute_partial_influences: circuit-tracer's power iteration over a rectangular block of rows,
// each row the input of node row_to_node[r]. The matrix stays where it is; no normalised copy.
//
// The series only feeds back through the rows' own nodes: term k+1 needs term k at those columns
// alone, and the total is linear in the coefficients, total = sum_r (sum_k coef_k[r]) |A[r, :]|.
// So each step reads |A| at the rows x rows node columns, and the full width of the matrix is
// read twice per call (row sums, the total) instead of once per term. The node entries of each
// term are rounded to float32 as circuit-tracer's matvec rounds them, so the coefficients, the
// stopping term and the non-convergence error follow its loop; the total differs from the sum of
// rounded terms by float32 rounding.
// ------------------------------------------------------------------------------------------------
namespace {

// Float partial sums over runs of 1024 columns, added in double: vector-wide, and each run's sum of
// non-negative terms is split over the vector lanes, so its rounding stays near circuit-tracer's
// own float32 row sum.
double abs_row_sum(const float* row, std::int64_t cols) {
  constexpr std::int64_t kRun = 1024;
  double s = 0.0;
  for (std::int64_t j0 = 0; j0 < cols; j0 += kRun) {
    const std::int64_t j1 = std::min(cols, j0 + kRun);
    float f = 0.0f;
#pragma omp simd reduction(+ : f)
    for (std::int64_t j = j0; j < j1; ++j) f += std::fabs(row[j]);
    s += (double)f;
  }
  return s;
}

}  // namespace

namespace {

// circuit-tracer's loop, on the coefficients alone: total_coef[r] = sum_k coef_k[r] over the terms
// it adds. `node_term(active, coef, next_at)` writes a term at the rows' node columns; `columns_left`
// says whether a term is non-zero somewhere else when it is zero at every node column (1 yes, 0
// no, -1: this caller cannot read the other columns, and `last_coef` receives the term's
// coefficients so that its caller can).
template <typename NodeTerm, typename ColumnsLeft>
int partial_series(std::int64_t rows, std::int64_t cols, const float* logit_p, std::int64_t n_logits,
                   const std::int64_t* row_to_node, const std::vector<float>& scale,
                   const std::vector<std::uint8_t>& nonzero_row, std::int64_t max_iter, NodeTerm node_term,
                   ColumnsLeft columns_left, std::vector<double>& total_coef, double* last_coef) {
  // The term at each row's node; x_0 is the logit probabilities at the last n_logits columns.
  std::vector<float> at_nodes(rows, 0.0f), next_at(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t q = row_to_node[r] - (cols - n_logits);
    if (q >= 0 && q < n_logits) at_nodes[r] = logit_p[q];
  }
  std::vector<double> coef(rows);
  total_coef.assign(rows, 0.0);
  std::vector<std::int64_t> active;
  for (std::int64_t terms = 1; terms <= max_iter; ++terms) {
    active.clear();
    for (std::int64_t r = 0; r < rows; ++r) {
      coef[r] = (double)at_nodes[r] / (double)scale[r];
      if (coef[r] != 0.0) active.push_back(r);
    }
    node_term(active, coef, next_at);
    const bool at_nodes_zero = std::none_of(next_at.begin(), next_at.end(), [](float v) { return v != 0.0f; });
    if (at_nodes_zero && terms < max_iter) {
      // The next term is zero, so the loop ends here or one term later; this term's columns that no
      // row reads enter the total either way (where they are all zero they add nothing), so
      // whether it is zero everywhere only matters when it would be the last allowed term.
      for (std::int64_t r : active) total_coef[r] += coef[r];
      return kInfluenceOk;
    }
    if (at_nodes_zero) {
      if (std::none_of(active.begin(), active.end(), [&](std::int64_t r) { return nonzero_row[r] != 0; }))
        return kInfluenceOk;
      // Only the columns no row reads are left, and a product there may underflow: the full term says.
      const int left = columns_left(active, coef);
      if (left == 0) return kInfluenceOk;
      if (left < 0) {
        std::copy(coef.begin(), coef.end(), last_coef);
        return kInfluenceNeedsRows;
      }
    }
    for (std::int64_t r : active) total_coef[r] += coef[r];
    at_nodes.swap(next_at);
  }
  return kInfluenceNoConvergence;
}

}  // namespace

int partial_influence_cpu(const float* e, std::int64_t rows, std::int64_t cols, std::int64_t lde,
                          const float* logit_p, std::int64_t n_logits, const std::int64_t* row_to_node,
                          float* out, std::int64_t max_iter, float eps, const PartialState* state) {
  std::vector<float> scale(rows);
  std::vector<std::uint8_t> nonzero_row(rows);
  if (state != nullptr) {
    // Rows never change once written, so their sums were taken when they arrived.
    for (std::int64_t r = 0; r < rows; ++r) {
      scale[r] = std::max(state->row_sum[r], eps);
      nonzero_row[r] = state->row_sum[r] != 0.0f;
    }
  } else {
    bool bad = false;
#pragma omp parallel for schedule(static) reduction(|| : bad) num_threads(graphk::threads_for(rows * cols))
    for (std::int64_t r = 0; r < rows; ++r) {
      const double s = abs_row_sum(e + r * lde, cols);
      if (!std::isfinite(s)) bad = true;
      scale[r] = std::max((float)s, eps);
      nonzero_row[r] = s != 0.0;
    }
    if (bad) return kInfluenceNonFinite;
  }
  // The rows' node columns only: entry t of a row is its value at node row_to_node[t]. With a
  // state they sit contiguous in its block, so a term reads rows x rows floats, not the matrix.
  auto node_term = [&](const std::vector<std::int64_t>& active, const std::vector<double>& coef, std::vector<float>& next) {
    if (state != nullptr) {
      dense_weighted_row_sum(state->block, state->ldb, rows, active, coef, next.data(), false);
    } else {
      weighted_row_sum(e, lde, rows, active, coef, next.data(),
                       [row_to_node](const float* row, std::int64_t t) { return std::fabs(row[row_to_node[t]]); });
    }
  };
  auto columns_left = [&](const std::vector<std::int64_t>& active, const std::vector<double>& coef) {
    std::vector<float> term(cols);
    weighted_row_sum(e, lde, cols, active, coef, term.data(), [](const float* row, std::int64_t j) { return std::fabs(row[j]); });
    return std::any_of(term.begin(), term.end(), [](float v) { return v != 0.0f; }) ? 1 : 0;
  };
  std::vector<double> total_coef;
  const int status = partial_series(rows, cols, logit_p, n_logits, row_to_node, scale, nonzero_row, max_iter,
                                    node_term, columns_left, total_coef, nullptr);
  if (status != kInfluenceOk) return status;
  std::vector<std::int64_t> active;
  for (std::int64_t r = 0; r < rows; ++r)
    if (total_coef[r] != 0.0) active.push_back(r);
  dense_weighted_row_sum(e, lde, cols, active, total_coef, out, true);
  return kInfluenceOk;
}

int partial_influence_coef_cpu(std::int64_t rows, std::int64_t cols, const float* logit_p, std::int64_t n_logits,
                               const std::int64_t* row_to_node, double* total_coef, double* last_coef,
                               std::int64_t max_iter, float eps, const PartialState& state) {
  std::vector<float> scale(rows);
  std::vector<std::uint8_t> nonzero_row(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    scale[r] = std::max(state.row_sum[r], eps);
    nonzero_row[r] = state.row_sum[r] != 0.0f;
  }
  auto node_term = [&](const std::vector<std::int64_t>& active, const std::vector<double>& coef, std::vector<float>& next) {
    dense_weighted_row_sum(state.block, state.ldb, rows, active, coef, next.data(), false);
  };
  auto columns_left = [](const std::vector<std::int64_t>&, const std::vector<double>&) { return -1; };
  std::vector<double> total;
  const int status = partial_series(rows, cols, logit_p, n_logits, row_to_node, scale, nonzero_row, max_iter, node_term,
                                    columns_left, total, last_coef);
  std::copy(total.begin(), total.end(), total_coef);
  return status;
}

int partial_influence_grow_cpu(const float* e, std::int64_t lde, std::int64_t cols, const std::int64_t* row_to_node,
                               std::int64_t rows0, std::int64_t rows, std::int64_t st0, std::int64_t st,
                               const PartialState& state) {
  // The node columns in column order, so that each row's gathers walk it forward (pages and
  // cache lines in sequence) instead of jumping around it in the order the rows were written.
  std::vector<std::int64_t> by_col(st);
  for (std::int64_t t = 0; t < st; ++t) by_col[t] = t;
  std::sort(by_col.begin(), by_col.end(), [row_to_node](std::int64_t a, std::int64_t b) { return row_to_node[a] < row_to_node[b]; });
  std::vector<std::int64_t> new_by_col;
  new_by_col.reserve(st - st0);
  for (std::int64_t t : by_col)
    if (t >= st0) new_by_col.push_back(t);
  bool bad = false;
  // A gather reads a cache line for one float: weigh it as a line's worth of streamed floats.
  constexpr std::int64_t kGatherWeight = 16;
  const int T = graphk::threads_for((rows - rows0) * (cols + kGatherWeight * st) + rows0 * kGatherWeight * (st - st0));
  // New rows: their sums and their entries at every node column; old rows: entries at the new nodes.
#pragma omp parallel for schedule(dynamic, 16) reduction(|| : bad) num_threads(T)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = e + r * lde;
    float* out = state.block + r * state.ldb;
    if (r >= rows0) {
      const double s = abs_row_sum(row, cols);
      if (!std::isfinite(s)) bad = true;
      state.row_sum[r] = (float)s;
    }
    for (std::int64_t t : (r >= rows0 ? by_col : new_by_col)) out[t] = std::fabs(row[row_to_node[t]]);
  }
  return bad ? kInfluenceNonFinite : kInfluenceOk;
}

void abs_weighted_row_sum_cpu(const float* e, std::int64_t rows, std::int64_t cols, std::int64_t lde,
                              const double* coef, double* out) {
  std::vector<std::int64_t> active;
  std::vector<double> c(coef, coef + rows);
  for (std::int64_t r = 0; r < rows; ++r)
    if (c[r] != 0.0) active.push_back(r);
  dense_weighted_row_sum(e, lde, cols, active, c, out, true);
}

}  // namespace fastattr
