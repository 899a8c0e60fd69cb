// Host launchers of the CUDA graph kernels (influence, threshold select, top-k edges).
//
// Called from the csrc/*_ops.cpp bindings under FASTATTR_WITH_CUDA. All pointers are device pointers,
// matrices are float32 row-major with row stride `lda` (elements) and unit column stride, and every
// launcher enqueues on `stream` (torch's current stream, passed as an integer) without
// synchronising. Launch failures throw std::runtime_error.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastattr {

// out[i] = sum_j |a_ij| in double (with mask: only rows and columns where mask != 0; other rows 0).
void row_abs_sum_cuda(const float* a, std::int64_t n, std::int64_t m, std::int64_t lda, const std::uint8_t* mask,
                      double* out, std::uintptr_t stream);

// out[j] = sum_i y_i * a'_ij with a' = |a| (absolute) or a, zero in masked columns; rows with
// y_i == 0 are skipped. `out` (m doubles) is overwritten. With `partials` null, row blocks meet in
// double atomics; otherwise `partials` is an (n_partials, m) double scratch: n_partials row chunks
// write their column sums there and they are added in chunk order, so the result is bitwise
// reproducible. matvec_partials_cuda(n, m) is the number of chunks to allocate for.
constexpr std::int64_t kMatvecMaxPartials = 65535;  // gridDim.y
std::int64_t matvec_partials_cuda(std::int64_t n, std::int64_t m);
void matvec_cuda(const float* a, std::int64_t n, std::int64_t m, std::int64_t lda, const double* y,
                 const std::uint8_t* mask, bool absolute, double* partials, std::int64_t n_partials, double* out,
                 std::uintptr_t stream);

// Radix-select histograms of one level (the digits of csrc/graph.h: kSelectShift, kSelectBits).
// `count` and the bucket sums hold 1 << kSelectBits[level] buckets and are overwritten. `stats` is
// 4 int64: [non-zero count, bit pattern of the smallest non-zero value, any negative, any
// non-finite] (level 0 only; later levels leave it untouched). Default mode: double sums in
// `sums`, by float atomics whose order (and so last bits) varies from run to run. Deterministic
// mode: `sig_sums` gets each bucket's exact integer sum of float32 significands (the level-0 digit
// fixes the exponent, so a bucket's values are significand * one power of two); every atomic is
// then an integer one, whose result does not depend on order. The caller scales them to doubles.
struct HistOut {
  std::int64_t* count;
  double* sums;            // default mode
  std::int64_t* sig_sums;  // deterministic mode
  std::int64_t* stats;
  bool deterministic;
};

void hist_1d_cuda(const float* scores, std::int64_t n, int level, std::uint32_t prefix, const HistOut& out,
                  std::uintptr_t stream);

// The n non-negative float32 scores in descending order, into `out` (CUB's radix sort of the keys:
// no indices, 64-bit sizes); `temp` holds sort_descending_cuda_temp_bytes(n) bytes.
std::size_t sort_descending_cuda_temp_bytes(std::int64_t n);
void sort_descending_cuda(const float* scores, float* out, std::int64_t n, void* temp, std::size_t temp_bytes,
                          std::uintptr_t stream);

// The same over the edge scores fl32(fl32(|a_ij| / scale_i) * factor_i) of the pruned graph (rows
// and columns with mask == 0 score 0), computed on the fly.
void edge_hist_cuda(const float* a, std::int64_t n, std::int64_t lda, const std::uint8_t* mask, const float* scale,
                    const float* factor, int level, std::uint32_t prefix, const HistOut& out, std::uintptr_t stream);

// out[i, j] = score_ij >= thr (out is n x n, contiguous). No reduction: deterministic.
void edge_mask_cuda(const float* a, std::int64_t n, std::int64_t lda, const std::uint8_t* mask, const float* scale,
                    const float* factor, float thr, std::uint8_t* out, std::uintptr_t stream);

// Top-k incoming edges: per-row kept counts min(k, nnz) (k < 0: all), |A| row sums, and flags[0]
// set when a row is non-finite; then the CSR fill (columns ascending, ties to the lower column).
// Deterministic without a mode: the row sums are block reductions in a fixed order, and the only
// atomics are integer ones (counts, the flag), whose result does not depend on order.
void topk_count_cuda(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, std::int64_t k,
                     std::int64_t* row_len, float* row_abs_sum, int* flags, std::uintptr_t stream);
void topk_fill_cuda(const float* a, std::int64_t rows, std::int64_t cols, std::int64_t lda, const std::int64_t* crow,
                    std::int64_t* col_out, float* val_out, std::uintptr_t stream);

}  // namespace fastattr
