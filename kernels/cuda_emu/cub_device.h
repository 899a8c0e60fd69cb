// cub::DeviceRadixSort::SortKeysDescending under the CPU emulation: CUB's documented contract, not
// its algorithm. CUB's onesweep sort (decoupled look-back across blocks, its digit passes and
// scatter) is not executed here; what runs is the launcher that calls it (kernels/cuda/radix_sort.cu):
// the temp-storage query protocol, the bit range, the 64-bit item count, and the keys it hands back.
//
// The contract kept: a call with d_temp_storage == nullptr only writes the temp size; a call with
// less temp than that fails; keys come back in descending order of CUB's float key transform, in
// which -0.0 and +0.0 are one key (CUB sorts them as equal), and the sort is stable, so equal keys
// keep their input order (and bit patterns). Bits outside [begin_bit, end_bit) do not order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "runtime.h"

namespace cub {

struct DeviceRadixSort {
  template <typename KeyT, typename NumItemsT>
  static cudaError_t SortKeysDescending(void* d_temp_storage, std::size_t& temp_storage_bytes, const KeyT* d_keys_in,
                                        KeyT* d_keys_out, NumItemsT num_items, int begin_bit = 0,
                                        int end_bit = sizeof(KeyT) * 8, cudaStream_t stream = nullptr) {
    static_assert(std::is_same_v<KeyT, float>, "the emulation sorts float keys (what fastattr sorts)");
    (void)stream;
    const auto n = static_cast<std::int64_t>(num_items);
    if (n < 0 || begin_bit < 0 || end_bit > 32 || begin_bit >= end_bit) return cudaErrorInvalidValue;
    // A ping-pong buffer of the transformed keys, and a little more, as CUB asks for.
    const std::size_t need = static_cast<std::size_t>(n) * sizeof(std::uint32_t) + 256;
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = need;
      return cudaSuccess;
    }
    if (temp_storage_bytes < need) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    std::vector<std::uint32_t> key(n), tmp(n);
    std::vector<std::int64_t> idx(n), idx_tmp(n);
    for (std::int64_t i = 0; i < n; ++i) {
      std::uint32_t u;
      std::memcpy(&u, d_keys_in + i, sizeof u);
      if (u == 0x80000000u) u = 0;                          // -0.0 sorts as +0.0
      u = (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;   // order of floats = order of unsigned keys
      key[i] = ~u;                                          // descending
      idx[i] = i;
    }
    // Stable LSD passes of at most 8 bits over the requested range.
    for (int shift = begin_bit; shift < end_bit; shift += 8) {
      const int bits = end_bit - shift < 8 ? end_bit - shift : 8;
      const std::uint32_t mask = (1u << bits) - 1u;
      std::int64_t count[257] = {};
      for (std::int64_t i = 0; i < n; ++i) ++count[((key[i] >> shift) & mask) + 1];
      for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t at = count[(key[i] >> shift) & mask]++;
        tmp[at] = key[i];
        idx_tmp[at] = idx[i];
      }
      key.swap(tmp);
      idx.swap(idx_tmp);
    }
    std::vector<KeyT> out(n);
    for (std::int64_t i = 0; i < n; ++i) out[i] = d_keys_in[idx[i]];
    std::memcpy(d_keys_out, out.data(), static_cast<std::size_t>(n) * sizeof(KeyT));
    return cudaSuccess;
  }
};

}  // namespace cub
