// Descending order of non-negative float32 values, without a comparison sort.
//
// find_threshold needs this only when its radix select cannot decide: circuit-tracer divides by
// torch.sum of the *sorted* scores, a float32 cascade whose rounding depends on every element's
// rank, so no histogram of the values pins that total down to its last bit. The sorted values
// themselves do, and values alone are enough: no int64 indices, and no size limit (torch.sort on
// CUDA takes at most 2^31 - 1 elements).
//
// A stable LSD radix sort over the 31 magnitude bits of the float pattern: non-negative floats
// order like their bit patterns, so ascending keys 0x7fffffff - magnitude give descending values
// (-0.0 and +0.0 share a key: they compare equal in torch.sort too). One sweep counts all three
// digits per chunk; a pass whose digit is the same for every value is skipped, and the remaining
// passes alternate between `tmp` and `out` so that the last writes `out`.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "graph.h"
#include "graph_cpu_kernels.h"

namespace fastattr {

namespace {

constexpr int kSortPasses = 3;
constexpr int kSortShift[kSortPasses] = {0, 11, 22};
constexpr int kSortBits[kSortPasses] = {11, 11, 9};
constexpr int kSortBuckets = 1 << 11;
static_assert(kSortShift[1] == kSortShift[0] + kSortBits[0] && kSortShift[2] == kSortShift[1] + kSortBits[1] &&
                  kSortShift[2] + kSortBits[2] == 31,
              "the digits must tile the 31 magnitude bits, lowest first");
static_assert(kSortBits[0] <= 11 && kSortBits[1] <= 11 && kSortBits[2] <= 11, "a digit must fit kSortBuckets");

using Counts = std::array<std::int64_t, kSortBuckets>;

inline std::uint32_t descending_key(float v) { return 0x7fffffffu - (graphk::float_bits(v) & 0x7fffffffu); }

inline std::uint32_t key_digit(std::uint32_t key, int pass) {
  return (key >> kSortShift[pass]) & ((1u << kSortBits[pass]) - 1u);
}

struct Chunks {
  std::int64_t n;
  int count;
  std::int64_t begin(int c) const { return n / count * c + std::min<std::int64_t>(c, n % count); }
  std::int64_t end(int c) const { return begin(c + 1); }
};

// counts[c] <- exclusive start of each digit's run for chunk c: digit-major, chunk-minor, which is
// what makes the scatter stable.
void exclusive_offsets(std::vector<Counts>& counts, int buckets) {
  std::int64_t run = 0;
  for (int d = 0; d < buckets; ++d) {
    for (Counts& c : counts) {
      const std::int64_t k = c[d];
      c[d] = run;
      run += k;
    }
  }
}

void scatter_pass(const float* src, float* dst, const Chunks& ch, int pass, std::vector<Counts>& offsets, int T) {
#pragma omp parallel for num_threads(T) schedule(static)
  for (int c = 0; c < ch.count; ++c) {
    Counts& off = offsets[c];
    for (std::int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i) {
      const float v = src[i];
      dst[off[key_digit(descending_key(v), pass)]++] = v;
    }
  }
}

void lsd_sort(const float* in, std::int64_t n, float* out, float* tmp) {
  const int T = graphk::threads_for(n);
  const Chunks ch{n, T};

  std::vector<std::array<Counts, kSortPasses>> first(ch.count);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int c = 0; c < ch.count; ++c) {
    for (Counts& k : first[c]) k.fill(0);
    for (std::int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i) {
      const std::uint32_t key = descending_key(in[i]);
      for (int p = 0; p < kSortPasses; ++p) first[c][p][key_digit(key, p)] += 1;
    }
  }

  std::vector<int> passes;
  for (int p = 0; p < kSortPasses; ++p) {
    std::int64_t largest = 0;
    for (int d = 0; d < (1 << kSortBits[p]); ++d) {
      std::int64_t total = 0;
      for (const auto& k : first) total += k[p][d];
      largest = std::max(largest, total);
    }
    if (largest < n) passes.push_back(p);
  }
  if (passes.empty()) {
    std::memcpy(out, in, sizeof(float) * (std::size_t)n);
    return;
  }

  std::vector<Counts> offsets(ch.count);
  const float* src = in;
  const int P = (int)passes.size();
  for (int k = 0; k < P; ++k) {
    const int p = passes[k];
    if (k == 0) {
      for (int c = 0; c < ch.count; ++c) offsets[c] = first[c][p];
    } else {
#pragma omp parallel for num_threads(T) schedule(static)
      for (int c = 0; c < ch.count; ++c) {
        offsets[c].fill(0);
        for (std::int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i)
          offsets[c][key_digit(descending_key(src[i]), p)] += 1;
      }
    }
    exclusive_offsets(offsets, 1 << kSortBits[p]);
    float* dst = (P - 1 - k) % 2 == 0 ? out : tmp;
    scatter_pass(src, dst, ch, p, offsets, T);
    src = dst;
  }
}

}  // namespace

void sort_descending_cpu(const float* in, std::int64_t n, float* out, float* tmp) {
  if (n <= 0) return;
  const int T = graphk::threads_for(n);
  const Chunks ch{n, T};
  std::vector<std::int64_t> zeros(ch.count + 1, 0);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int c = 0; c < ch.count; ++c) {
    std::int64_t z = 0;
    for (std::int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i) z += in[i] == 0.0f;
    zeros[c + 1] = z;
  }
  for (int c = 0; c < ch.count; ++c) zeros[c + 1] += zeros[c];
  const std::int64_t nnz = n - zeros[ch.count];
  if (nnz == 0 || 2 * nnz > n) {
    lsd_sort(in, n, out, tmp);
    return;
  }
  // Mostly zeros (the edge scores of a pruned graph): the zeros go straight to the tail in input
  // order, the non-zeros are compacted into tmp[0, nnz) and sorted with tmp[nnz, 2 nnz) as scratch.
#pragma omp parallel for num_threads(T) schedule(static)
  for (int c = 0; c < ch.count; ++c) {
    float* z = out + nnz + zeros[c];
    float* v = tmp + (ch.begin(c) - zeros[c]);
    for (std::int64_t i = ch.begin(c), e = ch.end(c); i < e; ++i) {
      if (in[i] == 0.0f)
        *z++ = in[i];
      else
        *v++ = in[i];
    }
  }
  lsd_sort(tmp, nnz, out, tmp + nnz);
}

}  // namespace fastattr
