// fastattr's CPU execution of its CUDA kernels, for correctness tests without a GPU.
//
// The .cu sources compile as C++ against this header (tools/build_cuda_emu.py rewrites only the
// <<<grid, block, smem, stream>>> launches and `extern __shared__` declarations, which are not
// C++). Each CUDA thread is a fiber with its own stack; the threads of one block run on one OS
// thread, cooperatively: a thread runs until it reaches __syncthreads(), a warp collective
// (mma.sync, a shuffle, __syncwarp) or its end, and a barrier opens when every thread still
// running has reached it. Blocks run one after the other on each of a few OS threads, so
// `__shared__` variables are thread_local statics: one copy per block in flight. Between barriers
// the threads run in an order reshuffled at every barrier (a seeded permutation), so that a read
// of shared memory that lacks its barrier sees another thread's stale or future value and fails
// its test. Shared memory, static and dynamic, is poisoned (all bytes 0xff: NaN as a float) for
// every block, so that a read of what no thread of the block wrote fails too.
//
// What this does not model: timing, warp scheduling, the GPU memory model (every write is visible
// at once), divergence within a warp, partial-warp collectives (rejected), and anything nvcc or
// ptxas does to the code. The tensor-core instructions are emulated from their
// fragment layouts (mma.h); CUB's block primitives by this directory's own (cub.h); CUB's
// device-wide radix sort by a host sort that keeps its contract (cub_device.h), not its algorithm.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef FASTATTR_CUDA_EMULATION
#error "kernels/cuda_emu/runtime.h is the CPU emulation of CUDA; build it with tools/build_cuda_emu.py"
#endif

// ------------------------------------------------------------------------------------------------
// Qualifiers: device code is host code here.
// ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One copy per block in flight (blocks run one at a time on each OS thread).
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ------------------------------------------------------------------------------------------------
// The CUDA runtime API, as far as the launchers use it.
// ------------------------------------------------------------------------------------------------
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaMemsetAsync(void* ptr, int value, std::size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, int kind, cudaStream_t stream = nullptr);

#define CUDART_VERSION 13000

namespace fastattr_emu {

// The emulated device: few multiprocessors, so that launchers that size their grid by the SM
// count run their grid-stride loops several times even on small inputs.
constexpr int kMultiprocessors = 2;
constexpr int kComputeCapability = 80;  // what the mma.sync emulation implements (sm_80's PTX)
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr std::size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute, as on a GPU

// What one CUDA thread sees of its position. The fiber that runs the thread owns it.
struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned lane, warp;
};

extern thread_local ThreadCtx* t_ctx;

[[noreturn]] void fail(const std::string& what);
void sync_block();
void sync_warp(unsigned mask);
inline void syncwarp(unsigned mask = kFullMask) { sync_warp(mask); }
// The per-lane exchange area of the calling thread's warp (kLaneScratch bytes per lane), valid
// between the two sync_warp() calls of one collective.
constexpr std::size_t kLaneScratch = 64;
unsigned char* warp_scratch();
unsigned char* dynamic_shared_base();
// A number no other block run of this process shares: lets cub.h tell a fresh block's
// TempStorage (static, so left over from the previous block) from one in use.
std::uint64_t block_serial();
// The lanes of the calling thread's warp that have not exited.
unsigned warp_live_mask();
// Called after each static __shared__ declaration (tools/build_cuda_emu.py adds the call): the
// first thread of a block to pass it fills the variable with poison, the others leave it alone.
constexpr unsigned char kSharedPoison = 0xff;
void poison_shared(void* p, std::size_t bytes);

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(dynamic_shared_base());
}

// A kernel invocation with its arguments bound: every thread of the grid calls it.
struct Body {
  void (*call)(const void*);
  const void* state;
  const char* name;
};

struct LaunchConfig {
  dim3 grid, block;
  std::size_t shared_bytes;
  LaunchConfig(dim3 g, dim3 b, std::size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), shared_bytes(s) {}
};

// How many launches of each kernel (by the name the launch spelled) this process has run: lets a
// test show that an op went through the kernels it names rather than some other path.
std::vector<std::pair<std::string, long long>> launch_counts();

// Runs every block of the grid; a failure inside a thread (an emulator check, a deadlocked
// barrier, an exception) becomes the launch's error, reported by cudaGetLastError().
void run_grid(const LaunchConfig& cfg, const Body& body);

template <typename Fn, typename Tuple>
struct BoundKernel {
  Fn fn;
  Tuple args;
  static void call(const void* self) {
    const auto* k = static_cast<const BoundKernel*>(self);
    std::apply(k->fn, k->args);  // each thread gets its own copies of the arguments, as on a GPU
  }
};

// What tools/build_cuda_emu.py turns `kernel<<<cfg>>>(args...)` into. The arguments convert to
// the kernel's parameter types here, at the launch, as nvcc's launch stub converts them.
template <typename... Params, typename... Args>
void launch(const LaunchConfig& cfg, const char* name, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch must pass every parameter");
  using Tuple = std::tuple<std::decay_t<Params>...>;
  BoundKernel<void (*)(Params...), Tuple> bound{kernel, Tuple(static_cast<std::decay_t<Params>>(args)...)};
  run_grid(cfg, Body{&decltype(bound)::call, &bound, name});
}

}  // namespace fastattr_emu

#define threadIdx (::fastattr_emu::t_ctx->thread_idx)
#define blockIdx (::fastattr_emu::t_ctx->block_idx)
#define blockDim (::fastattr_emu::t_ctx->block_dim)
#define gridDim (::fastattr_emu::t_ctx->grid_dim)
#define warpSize 32
#define __syncthreads() ::fastattr_emu::sync_block()
#define __syncwarp(...) ::fastattr_emu::syncwarp(__VA_ARGS__)

// ------------------------------------------------------------------------------------------------
// Arithmetic intrinsics: IEEE float and double on the host (the build uses no fast-math).
// ------------------------------------------------------------------------------------------------
using std::isfinite;
using std::isinf;
using std::isnan;

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __ldg(const float* p) { return *p; }
inline double __ldg(const double* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x == 0 ? 32 : __builtin_clz(x); }

// ------------------------------------------------------------------------------------------------
// Atomics: real ones, because blocks run on several OS threads at once.
// ------------------------------------------------------------------------------------------------
template <typename T>
inline T atomicAdd(T* p, T v) {
  static_assert(std::is_integral_v<T>, "integer atomicAdd; the float ones are overloads below");
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

template <typename T, typename F>
inline T atomic_update(T* p, F f) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "atomics on 2, 4 or 8 bytes");
  using Bits = std::conditional_t<sizeof(T) == 8, std::uint64_t, std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint16_t>>;
  auto* bits = reinterpret_cast<Bits*>(p);
  Bits old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    T cur;
    std::memcpy(&cur, &old, sizeof cur);
    const T next = f(cur);
    Bits want;
    std::memcpy(&want, &next, sizeof want);
    if (__atomic_compare_exchange_n(bits, &old, want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return cur;
  }
}

inline float atomicAdd(float* p, float v) {
  return atomic_update(p, [v](float x) { return x + v; });
}
inline double atomicAdd(double* p, double v) {
  return atomic_update(p, [v](double x) { return x + v; });
}
template <typename T>
inline T atomicCAS(T* p, T compare, T value) {
  __atomic_compare_exchange_n(p, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // the old value either way
}
template <typename T>
inline T atomicMin(T* p, T v) {
  return atomic_update(p, [v](T x) { return v < x ? v : x; });
}
template <typename T>
inline T atomicMax(T* p, T v) {
  return atomic_update(p, [v](T x) { return x < v ? v : x; });
}
template <typename T>
inline T atomicOr(T* p, T v) {
  return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicAnd(T* p, T v) {
  return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}

// ------------------------------------------------------------------------------------------------
// Warp collectives: every lane deposits its value in the warp's exchange area, the warp meets,
// each lane reads what it needs, and the warp meets again before the area is reused.
// ------------------------------------------------------------------------------------------------
namespace fastattr_emu {

template <typename T, typename Read>
auto warp_exchange(unsigned mask, const T& value, Read read) {
  static_assert(sizeof(T) <= kLaneScratch, "a warp collective's value fits its lane's exchange slot");
  static_assert(std::is_trivially_copyable_v<T>, "warp collectives move plain values");
  unsigned char* s = warp_scratch();
  const unsigned lane = t_ctx->lane;
  std::memcpy(s + lane * kLaneScratch, &value, sizeof(T));
  sync_warp(mask);
  auto lane_value = [s](unsigned l) {
    T x;
    std::memcpy(&x, s + l * kLaneScratch, sizeof(T));
    return x;
  };
  auto result = read(lane_value, lane);
  sync_warp(mask);
  return result;
}

inline void check_width(int width) {
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
    fail("a shuffle's width must be a power of two in [1, 32], got " + std::to_string(width));
}

}  // namespace fastattr_emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = warpSize) {
  ::fastattr_emu::check_width(width);
  return ::fastattr_emu::warp_exchange(mask, var, [&](auto get, unsigned lane) {
    const unsigned base = lane & ~static_cast<unsigned>(width - 1);
    return get(base + (static_cast<unsigned>(src) & static_cast<unsigned>(width - 1)));
  });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  ::fastattr_emu::check_width(width);
  return ::fastattr_emu::warp_exchange(mask, var, [&](auto get, unsigned lane) {
    const unsigned other = lane ^ static_cast<unsigned>(lane_mask);
    const unsigned seg = ~static_cast<unsigned>(width - 1);
    return get((other & seg) == (lane & seg) ? other : lane);
  });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  ::fastattr_emu::check_width(width);
  return ::fastattr_emu::warp_exchange(mask, var, [&](auto get, unsigned lane) {
    const unsigned in_seg = lane & static_cast<unsigned>(width - 1);
    return get(in_seg + delta < static_cast<unsigned>(width) ? lane + delta : lane);
  });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  ::fastattr_emu::check_width(width);
  return ::fastattr_emu::warp_exchange(mask, var, [&](auto get, unsigned lane) {
    const unsigned in_seg = lane & static_cast<unsigned>(width - 1);
    return get(in_seg >= delta ? lane - delta : lane);
  });
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::fastattr_emu::warp_exchange(mask, predicate != 0, [&](auto get, unsigned) {
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) bits |= static_cast<unsigned>(get(l)) << l;
    return bits;
  });
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
