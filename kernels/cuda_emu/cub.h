// The CUB block primitives the kernels use (BlockReduce::Sum, BlockScan::ExclusiveSum), written for
// the CPU emulation: the same interface and contracts, not CUB's algorithms. Sums are added in
// thread order, so floating-point results can differ from CUB's tree order in the last bits.
//
// Contracts CUB states and a GPU does not check are checked here:
// - the block size must be the template's;
// - BlockReduce's aggregate is valid in thread 0 only (the others get a poisoned value, so a
//   kernel that reads it elsewhere fails its test);
// - a TempStorage may be used again only after a __syncthreads() that follows every thread's
//   previous call (CUB: "a subsequent __syncthreads() is needed if the temporary storage is to be
//   reused"). Neither primitive ends with a barrier of its own, as CUB's do not, and a thread that
//   enters a call while another has not finished the previous one fails the launch.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "runtime.h"

namespace cub {

namespace detail {

inline void check_block(int threads, const char* what) {
  const dim3& b = blockDim;
  if (static_cast<long long>(b.x) * b.y * b.z != threads || b.y != 1 || b.z != 1)
    ::fastattr_emu::fail(std::string(what) + ": the block has " + std::to_string(b.x) + "x" + std::to_string(b.y) +
                         "x" + std::to_string(b.z) + " threads, the template says " + std::to_string(threads));
}

template <typename T>
T poison() {
  if constexpr (std::is_floating_point_v<T>) {
    return std::numeric_limits<T>::quiet_NaN();
  } else {
    return static_cast<T>(0x5a5a5a5a5a5a5a5aULL);
  }
}

// Who is inside a collective on one TempStorage: how many threads have finished the current call.
// Fresh for every block (the storage is a static that outlives the block).
struct Use {
  std::uint64_t block = 0;
  int finished = 0;

  void enter(int threads, const char* what) {
    const std::uint64_t serial = ::fastattr_emu::block_serial();
    if (block != serial) {
      block = serial;
      finished = 0;
      return;
    }
    if (finished == threads) {
      finished = 0;  // everyone left the previous call: this is the first thread of the next
    } else if (finished != 0) {
      ::fastattr_emu::fail(std::string(what) + ": TempStorage reused while " + std::to_string(threads - finished) +
                           " threads are still in the previous call (a __syncthreads() is missing)");
    }
  }
  void leave() { ++finished; }
};

}  // namespace detail

template <typename T, int BLOCK_DIM_X>
class BlockReduce {
 public:
  struct TempStorage {
    T partial[BLOCK_DIM_X];
    detail::Use use;
  };

  explicit BlockReduce(TempStorage& storage) : s_(storage) {}

  T Sum(T input) {
    detail::check_block(BLOCK_DIM_X, "cub::BlockReduce");
    s_.use.enter(BLOCK_DIM_X, "cub::BlockReduce");
    const unsigned tid = threadIdx.x;
    s_.partial[tid] = input;
    __syncthreads();
    T result = detail::poison<T>();
    if (tid == 0) {
      result = s_.partial[0];
      for (int i = 1; i < BLOCK_DIM_X; ++i) result = result + s_.partial[i];
    }
    s_.use.leave();
    return result;
  }

 private:
  TempStorage& s_;
};

template <typename T, int BLOCK_DIM_X>
class BlockScan {
 public:
  struct TempStorage {
    T slot[BLOCK_DIM_X];  // each thread's input, then its exclusive prefix
    T total;
    detail::Use use;
  };

  explicit BlockScan(TempStorage& storage) : s_(storage) {}

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    detail::check_block(BLOCK_DIM_X, "cub::BlockScan");
    s_.use.enter(BLOCK_DIM_X, "cub::BlockScan");
    const unsigned tid = threadIdx.x;
    s_.slot[tid] = input;
    __syncthreads();
    if (tid == 0) {
      T run = T(0);
      for (int i = 0; i < BLOCK_DIM_X; ++i) {
        const T x = s_.slot[i];
        s_.slot[i] = run;
        run = run + x;
      }
      s_.total = run;
    }
    __syncthreads();
    output = s_.slot[tid];
    block_aggregate = s_.total;
    s_.use.leave();
  }

  void ExclusiveSum(T input, T& output) {
    T ignored;
    ExclusiveSum(input, output, ignored);
  }

 private:
  TempStorage& s_;
};

}  // namespace cub
