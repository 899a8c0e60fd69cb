// Small host helpers shared by the .cu launchers (included by CUDA sources only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fastattr {

// torch hands its current stream over as an integer handle.
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// A runtime call's status as an exception naming the call.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// FASTATTR_SYNC_CHECK=1: wait for every launch, so that a fault is reported by the launch that
// caused it rather than by whichever later call happens to synchronise (read once per process).
inline bool sync_check() {
  static const bool on = [] {
    const char* v = std::getenv("FASTATTR_SYNC_CHECK");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

// Launches report errors asynchronously; surface them as exceptions at the call that caused them.
inline void check_launch(const char* what) {
  check_cuda(cudaGetLastError(), what);
  if (sync_check()) check_cuda(cudaDeviceSynchronize(), what);
}

}  // namespace fastattr
