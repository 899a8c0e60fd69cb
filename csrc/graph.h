// Graph kernels shared by the CPU implementation and the bindings: influence, cumulative-threshold
// selection, top-k edges and the pruning helpers.
//
// Matrices are float32, row-major with a row stride `lda` (elements) and unit column stride; rows
// are targets and columns are sources, as in circuit-tracer's adjacency matrix. Every index that
// can address an N x N matrix is int64.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastattr {

// ------------------------------------------------------------------------------------------------
// Radix select over non-negative float32 values.
//
// Non-negative floats order like their uint32 bit patterns, so a value-weighted histogram over the
// high bits, then the middle, then the low bits finds the element at which the descending
// cumulative sum crosses a threshold without sorting. The three digits are fixed for every backend
// so that the CPU, CUDA and Triton paths bucket identically: they are defined here only, and
// Python and Triton read them from fastattr._C (select_shift, select_bits).
// ------------------------------------------------------------------------------------------------
constexpr int kSelectLevels = 3;
constexpr int kSelectShift[kSelectLevels] = {20, 9, 0};
constexpr int kSelectBits[kSelectLevels] = {11, 11, 9};
constexpr int kSelectMaxBuckets = 1 << std::max({kSelectBits[0], kSelectBits[1], kSelectBits[2]});
static_assert(kSelectShift[0] + kSelectBits[0] == 31 && kSelectShift[1] + kSelectBits[1] == kSelectShift[0] &&
                  kSelectShift[2] + kSelectBits[2] == kSelectShift[1] && kSelectShift[2] == 0,
              "the digits must tile the 31 bits below the sign bit, highest first");
static_assert(kSelectShift[0] <= 23,
              "the level-0 digit must hold the whole exponent: a bucket's exact significand sum (the device "
              "kernels' deterministic mode) is scaled by one power of two");

// The device kernels' deterministic histograms add float32 significands (< 2^24) in int64: exact
// for up to 2^39 values per call.
constexpr std::int64_t kExactSumMaxValues = std::int64_t(1) << 39;

// The crossing test circuit-tracer applies to each prefix C of the sorted scores:
//   fl32(fl32(C) / S) >= fl32(t)
// (torch.cumsum of float32 on the CPU accumulates in double and rounds each prefix to float32, the
// division is float32 by the float32 total, and searchsorted compares in float32.)
// For an exact answer when S is only known to lie in [s_lo, s_hi] and C to a relative accuracy
// dc, `early` is the most permissive and `late` the strictest reading of the test.
struct CrossingTest {
  float s_lo, s_hi;
  double dc;
  float t;
  bool early(double c) const;
  bool late(double c) const;
  bool exact() const { return s_lo == s_hi && dc == 0.0; }
  // torch.sum's float32 total may be inf: circuit-tracer's ratios are then 0 and NaN, and its
  // binary search over the NaNs is not a crossing test, so only the sorted values can answer.
  bool may_overflow() const { return s_lo != s_hi && !(s_hi <= 3.4028234663852886e38f); }
};

// The test of a select whose level-0 bucket sums are sum[0..nb): S = s_fixed when it is positive;
// otherwise the buckets' total (summed in bucket order), rounded to float32 when rel_s == 0 and
// widened to [total (1 - rel_s), total (1 + rel_s)] (one float32 step further out) when it is not.
CrossingTest crossing_test(const double* sum, int nb, float t, double rel_s, double dc, float s_fixed);

// The bucket of one level that holds the crossing, under both readings of the test.
struct BucketPick {
  int early = -1, late = -1;
  double base_early = 0.0, base_late = 0.0;  // prefix sums before the picked buckets
  std::int64_t count_late = 0;
};

// Walk the buckets from the largest values down, accumulating from `base` in double. With
// must_cross (the level above put the crossing inside this range) a test that never passes, by
// rounding, picks the last non-empty bucket. Every backend's driver picks with this function.
BucketPick pick_bucket(const std::int64_t* count, const double* sum, int nb, double base, const CrossingTest& test,
                       bool must_cross);

// Outcome of a selection.
enum SelectStatus : int {
  kSelectOk = 0,
  kSelectAmbiguous = 1,  // the answer depends on where S lies in [s_lo, s_hi]: caller must resolve
  kSelectAllZero = 2,    // every score is zero (circuit-tracer divides 0 by 0; its answer is 0)
  kSelectNegative = 3,   // negative scores: the bit order trick does not apply
  kSelectNonFinite = 4,  // NaN or Inf among the scores
};

struct SelectResult {
  int status = kSelectOk;
  float value = 0.0f;
  bool clamped = false;  // no prefix passed the test: circuit-tracer clamps to the last (smallest) element
};

// Histogram of one select level: counts and double sums per bucket (only non-zero values).
struct SelectHist {
  std::int64_t count[kSelectMaxBuckets];
  double sum[kSelectMaxBuckets];
  void clear();
  void add(const SelectHist& o);
};

// One-dimensional threshold: the value circuit-tracer's find_threshold returns for `scores`, with S
// as in crossing_test. Deterministic: threads histogram static row ranges, merged in thread order.
SelectResult select_threshold_1d(const float* scores, std::int64_t n, float t, double rel_s, double dc,
                                 float s_fixed);

// The n values of `in` (non-negative float32, as the select's status has established) in
// descending order, written to `out`; `tmp` is n floats of scratch. What an ambiguous select falls
// back on (csrc/radix_sort_cpu.cpp); its CUDA counterpart is kernels/cuda/radix_sort.cu.
void sort_descending_cpu(const float* in, std::int64_t n, float* out, float* tmp);

// ------------------------------------------------------------------------------------------------
// Influence
// ------------------------------------------------------------------------------------------------
enum InfluenceStatus : int {
  kInfluenceOk = 0,
  kInfluenceNoConvergence = 1,  // the iteration would still be non-zero after max_iter steps
  kInfluenceNonFinite = 2,      // NaN or Inf in the matrix
  kInfluenceNeedsRows = 3,      // only the matrix's other columns can tell whether the series ended
};

// Which matrix the influence is computed on.
//   normalize = false: A itself (compute_influence).
//   normalize = true:  |A| with rows divided by max(rowsum|A|, eps) (compute_node_influence).
//   node_mask != null: A with the rows and columns of unmasked nodes zeroed (the pruned matrix).
struct InfluenceArgs {
  const float* a;
  std::int64_t n;
  std::int64_t lda;
  const float* w;  // (n,) weights of the first term, w @ A
  float* out;      // (n,) sum_{k>=1} w A^k
  bool normalize;
  float eps;  // the row-sum floor, the caller's (circuit-tracer's normalize_matrix uses 1e-10)
  const std::uint8_t* node_mask;
  std::int64_t max_iter;
  // Topological waves: rows in `order` grouped by `wave_ptr`. With reuse_order the given waves
  // (from an earlier call on a supergraph) are used; otherwise they are computed and, when the
  // pointers are non-null, stored. n_waves < 0 on return means the matrix has a cycle and the
  // power series was used instead.
  std::int32_t* order;     // (n,)
  std::int32_t* wave_ptr;  // (n + 1,)
  bool reuse_order;
  std::int64_t n_waves;    // number of given waves (reuse_order)
  // Per-row bitmaps of the non-zero 64-column blocks, block_words(n) uint64 words per row (see
  // graph_cpu_kernels.h). Written by the first pass when non-null; with reuse_order they are read
  // (null: every block is visited).
  std::uint64_t* row_blocks;
  // Pruned-graph edge scores |A_ij| / rs_i * (infl_i + w_i), histogrammed while each row is final.
  SelectHist* edge_hist;   // level-0 histogram of the non-zero edge scores (null: not wanted)
  float* row_scale;        // (n,) max(fl32(rowsum), eps) per row (normalize mode)
  float* row_factor;       // (n,) fl32(fl32(infl_i) + w_i) per row (edge-score mode)
};

struct InfluenceResult {
  int status = kInfluenceOk;
  std::int64_t n_waves = 0;   // -1: the power series was used
  std::int64_t depth = 0;     // longest path from a weighted node (the iterations circuit-tracer runs)
  double edge_sum = 0.0;      // sum of all edge scores (edge-score mode)
  std::int64_t edge_nnz = 0;  // number of non-zero edge scores
  float edge_min = 0.0f;      // smallest non-zero edge score
};

InfluenceResult influence_dense_cpu(const InfluenceArgs& args);

// compute_partial_influences: rows of E are the nodes row_to_node[r]; columns are all nodes; row r
// is normalised by max(fl32(sum_j |E_rj|), eps). `eps` is the caller's (circuit-tracer's floor for
// this function, which differs from normalize_matrix's: see fastattr/ops/influence.py).
//
// A matrix that only grows by rows (attribution writes rows and never changes them) can keep a
// PartialState: each row's |sum| and the |entries| of every row at every row's node column, so
// that an update reads only the new rows, the old rows at the new nodes' columns, and the full
// width once for the result, instead of the full width once per term.
struct PartialState {
  float* row_sum;  // (capacity,): sum_j |E_rj| in float32
  float* block;    // (capacity, ldb): block[r, t] = |E[r, row_to_node[t]]|
  std::int64_t ldb;
};

int partial_influence_cpu(const float* e, std::int64_t rows, std::int64_t cols, std::int64_t lde,
                          const float* logit_p, std::int64_t n_logits, const std::int64_t* row_to_node,
                          float* out, std::int64_t max_iter, float eps, const PartialState* state = nullptr);

// Brings `state` from rows [0, rows0) and node columns [0, st0) to rows [0, rows) and node columns
// [0, st): rows [rows0, rows) are new (their sums and entries at every node column), and the old
// rows are read at the new nodes' columns. row_to_node[t] is node column t. One process keeps
// rows == node columns; a rank of a split graph keeps its own rows at every row's node column.
// Returns kInfluenceNonFinite when a new row is not finite.
int partial_influence_grow_cpu(const float* e, std::int64_t lde, std::int64_t cols, const std::int64_t* row_to_node,
                               std::int64_t rows0, std::int64_t rows, std::int64_t st0, std::int64_t st,
                               const PartialState& state);

// The series of partial_influence_cpu on a state of all `rows` rows alone (no matrix): writes
// total_coef[r] = sum of row r's coefficients, so that the result is sum_r total_coef[r] |E_r|,
// which the rows' owners form. kInfluenceNeedsRows: the last allowed term is zero at every node
// column, and only the other columns tell whether the series ended (then total_coef holds the
// earlier terms) or did not converge; its coefficients are in last_coef.
int partial_influence_coef_cpu(std::int64_t rows, std::int64_t cols, const float* logit_p, std::int64_t n_logits,
                               const std::int64_t* row_to_node, double* total_coef, double* last_coef,
                               std::int64_t max_iter, float eps, const PartialState& state);

// out[j] = sum_r coef[r] |E_rj| in float64 (float chunks, as partial_influence_cpu forms its
// result): a rank's share of a split graph's partial influences, before the ranks' shares are added.
void abs_weighted_row_sum_cpu(const float* e, std::int64_t rows, std::int64_t cols, std::int64_t lde,
                              const double* coef, double* out);

// ------------------------------------------------------------------------------------------------
// Edge thresholding of the pruned graph, without an N x N score matrix.
// ------------------------------------------------------------------------------------------------
struct EdgeSelectArgs {
  const float* a;
  std::int64_t n;
  std::int64_t lda;
  const std::uint8_t* node_mask;
  const float* row_scale;
  const float* row_factor;
  const SelectHist* hist0;  // level-0 histogram from the influence sweep (null: computed here)
  double total;             // sum of all edge scores
  std::int64_t nnz;         // non-zero edge scores
  float min_nz;             // smallest non-zero edge score
  float t;
  std::uint8_t* mask_out;   // (n, n) row-major, contiguous: the edge mask
  std::int64_t max_candidates;
  const std::uint64_t* row_blocks;  // non-zero block bitmaps from the influence pass (null: all)
};

struct EdgeSelectResult {
  int status = kSelectOk;
  float threshold = 0.0f;
  bool clamped = false;
  std::int64_t passes = 0;      // full passes over A made here
  std::int64_t candidates = 0;  // scores resolved in memory
};

// The edge mask of the pruned graph by the fused cumulative threshold (S = fl32(total)). Deterministic
// for a given thread count: every pass splits rows statically and merges in thread order.
EdgeSelectResult edge_select_mask_cpu(const EdgeSelectArgs& args);

// The iterative removal of features/errors without kept outgoing edges and of features without kept
// incoming edges, exactly as circuit-tracer's prune_graph loop does it (in place on both masks).
std::int64_t remove_dangling_cpu(std::uint8_t* edge_mask, std::int64_t n, std::uint8_t* node_mask,
                                 std::int64_t n_features, std::int64_t n_fixed);

// ------------------------------------------------------------------------------------------------
// Top-k incoming edges per row.
// ------------------------------------------------------------------------------------------------
void topk_count_cpu(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
                    std::int64_t* row_len, float* row_abs_sum, int* nonfinite);
// Fill the rows counted by topk_count_cpu: crow's row lengths already encode k.
void topk_fill_cpu(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, const std::int64_t* crow,
                   std::int64_t* col_out, float* val_out);

}  // namespace fastattr
