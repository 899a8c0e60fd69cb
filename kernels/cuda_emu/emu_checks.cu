// The emulation's own test kernels, built like kernels/cuda/*.cu (tools/build_cuda_emu.py):
// evidence that the emulation computes what a GPU computes where the fastattr kernels cannot show it.
//
// mma: one warp loads its fragments by CuTe's (thread, value) -> (row, column) layouts of the SM80
// MMA_Traits (include/cute/atom/mma_traits_sm80.hpp), an independent description of the PTX ISA
// fragment tables that mma.h inverts; a plain matmul on the host is the reference. If mma.h read a
// fragment element from the wrong lane or register, the product would be wrong.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cstdint>

#include "launch_utils.cuh"
#include "mma_sm80.cuh"

namespace fastattr_emu_checks {

namespace {

// (thread, value) -> flat index into a column-major `rows` x ... matrix. The thread mode is (4, 8):
// lane % 4 then lane / 4; the value mode has up to three sub-modes (size 1 when unused).
struct TvLayout {
  int t_stride[2];
  int v_size[3];
  int v_stride[3];
  int rows;
};

// CuTe's SM80 traits, mode by mode: A is (M, K), B is (N, K), C is (M, N).
constexpr TvLayout kA16 = {{32, 1}, {2, 2, 2}, {16, 8, 128}, 16};  // SM80_16x8x16_*_TN ALayout
constexpr TvLayout kB16 = {{16, 1}, {2, 2, 1}, {8, 64, 0}, 8};     // SM80_16x8x16_*_TN BLayout
constexpr TvLayout kAtf32 = {{16, 1}, {2, 2, 1}, {8, 64, 0}, 16};  // SM80_16x8x8_F32TF32TF32F32_TN ALayout
constexpr TvLayout kBtf32 = {{8, 1}, {2, 1, 1}, {32, 0, 0}, 8};    // its BLayout
constexpr TvLayout kC = {{32, 1}, {2, 2, 1}, {16, 8, 0}, 16};      // SM80_16x8_Row (C and D)

__device__ void coord(const TvLayout& l, int lane, int v, int& row, int& col) {
  int idx = (lane % 4) * l.t_stride[0] + (lane / 4) * l.t_stride[1];
  for (int i = 0; i < 3; ++i) {
    idx += (v % l.v_size[i]) * l.v_stride[i];
    v /= l.v_size[i];
  }
  row = idx % l.rows;
  col = idx / l.rows;
}

template <int Kind>
__device__ std::uint32_t bits16(float x) {
  if constexpr (Kind == 0) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else {
    return __half_as_ushort(__float2half_rn(x));
  }
}

// a: 16 x K row-major, b: K x 8 row-major, c and d: 16 x 8 row-major.
template <int Kind>
__global__ void mma_kernel(const float* a, const float* b, const float* c, float* d, bool perturb) {
  constexpr int K = Kind == 2 ? 8 : 16;
  const int lane = static_cast<int>(threadIdx.x);
  std::uint32_t ra[4] = {0, 0, 0, 0}, rb[2] = {0, 0};
  int r, s;
  if constexpr (Kind == 2) {
    for (int v = 0; v < 4; ++v) {
      coord(kAtf32, lane, v, r, s);  // (m, k)
      ra[v] = fastattr::mma::to_tf32(a[r * K + s]);
    }
    for (int v = 0; v < 2; ++v) {
      coord(kBtf32, lane, v, r, s);  // (n, k)
      rb[v] = fastattr::mma::to_tf32(b[s * 8 + r]);
    }
  } else {
    // Values v and v + 1 share a 32-bit register, the even one in the low half.
    for (int v = 0; v < 8; ++v) {
      coord(kA16, lane, v, r, s);
      ra[v / 2] |= bits16<Kind>(a[r * K + s]) << (16 * (v % 2));
    }
    for (int v = 0; v < 4; ++v) {
      coord(kB16, lane, v, r, s);
      rb[v / 2] |= bits16<Kind>(b[s * 8 + r]) << (16 * (v % 2));
    }
  }
  float acc[4];
  for (int e = 0; e < 4; ++e) {
    coord(kC, lane, e, r, s);
    acc[e] = c[r * 8 + s];
  }
  if (perturb) {
    const std::uint32_t t = ra[1];
    ra[1] = ra[2];
    ra[2] = t;
  }
  if constexpr (Kind == 0) fastattr::mma::m16n8k16_bf16(acc, ra, rb);
  if constexpr (Kind == 1) fastattr::mma::m16n8k16_f16(acc, ra, rb);
  if constexpr (Kind == 2) fastattr::mma::m16n8k8_tf32(acc, ra, rb);
  for (int e = 0; e < 4; ++e) {
    coord(kC, lane, e, r, s);
    d[r * 8 + s] = acc[e];
  }
}

__global__ void to_tf32_kernel(const float* x, std::uint32_t* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n; i += (std::int64_t)gridDim.x * blockDim.x)
    out[i] = fastattr::mma::to_tf32(x[i]);
}

// Each thread publishes a value that changes from launch to launch and reads its neighbour's.
__global__ void barrier_kernel(int* out, int salt, bool with_barrier) {
  __shared__ int s[1024];
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  s[t] = 7 * t + salt;
  if (with_barrier) __syncthreads();
  out[t] = s[(t + 1) % n];
}

constexpr int kReduceThreads = 128;

__global__ void cub_reuse_kernel(double* out, bool with_barrier) {
  using Reduce = cub::BlockReduce<double, kReduceThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double first = Reduce(tmp).Sum(1.0);
  if (with_barrier) __syncthreads();
  const double second = Reduce(tmp).Sum(static_cast<double>(threadIdx.x));
  if (threadIdx.x == 0) {
    out[0] = first;
    out[1] = second;
  }
}

__global__ void shuffle_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x), lane = t % 32;
  int* o = out + 5 * t;
  o[0] = __shfl_sync(0xffffffffu, 3 * t, (lane + 5) % 32);
  o[1] = __shfl_xor_sync(0xffffffffu, t, 1);
  o[2] = __shfl_down_sync(0xffffffffu, t, 3);
  o[3] = __shfl_up_sync(0xffffffffu, t, 2, 8);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
}

}  // namespace

void mma_check(int kind, const float* a, const float* b, const float* c, float* d, bool perturb) {
  switch (kind) {
    case 0: mma_kernel<0><<<1, 32>>>(a, b, c, d, perturb); break;
    case 1: mma_kernel<1><<<1, 32>>>(a, b, c, d, perturb); break;
    case 2: mma_kernel<2><<<1, 32>>>(a, b, c, d, perturb); break;
    default: throw std::invalid_argument("kind: expected 0 (bf16), 1 (f16) or 2 (tf32)");
  }
  fastattr::check_launch("mma_check");
}

void to_tf32_check(const float* x, std::uint32_t* out, std::int64_t n) {
  if (n <= 0) return;
  to_tf32_kernel<<<4, 64>>>(x, out, n);
  fastattr::check_launch("to_tf32_check");
}

void barrier_check(int* out, int threads, bool with_barrier) {
  static int salt = 0;
  barrier_kernel<<<1, threads>>>(out, ++salt * 1000003, with_barrier);
  fastattr::check_launch("barrier_check");
}

void cub_reuse_check(double* out, bool with_barrier) {
  cub_reuse_kernel<<<1, kReduceThreads>>>(out, with_barrier);
  fastattr::check_launch("cub_reuse_check");
}

void shuffle_check(int* out) {
  shuffle_kernel<<<1, 64>>>(out);
  fastattr::check_launch("shuffle_check");
}

}  // namespace fastattr_emu_checks
