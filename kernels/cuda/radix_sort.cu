// Descending order of non-negative float32 scores on the device: what an ambiguous find_threshold
// select falls back on (see csrc/radix_sort_cpu.cpp for why the order itself is needed).
//
// CUB's onesweep radix sort of the keys alone, with a 64-bit item count: unlike torch.sort it
// builds no int64 index tensor and takes more than 2^31 - 1 elements. CUB gives -0.0 and +0.0 one
// key, as torch.sort compares them equal and the CPU sort does.
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "graph_kernels.cuh"
#include "launch_utils.cuh"

namespace fastattr {

std::size_t sort_descending_cuda_temp_bytes(std::int64_t n) {
  std::size_t bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortKeysDescending(nullptr, bytes, static_cast<const float*>(nullptr),
                                                      static_cast<float*>(nullptr), n),
             "sort_descending_cuda_temp_bytes");
  return bytes;
}

void sort_descending_cuda(const float* scores, float* out, std::int64_t n, void* temp, std::size_t temp_bytes,
                          std::uintptr_t stream) {
  check_cuda(cub::DeviceRadixSort::SortKeysDescending(temp, temp_bytes, scores, out, n, 0, 32, as_stream(stream)),
             "sort_descending_cuda");
  check_launch("sort_descending_cuda");
}

}  // namespace fastattr
