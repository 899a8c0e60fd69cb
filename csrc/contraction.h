// The feature-to-feature Jacobian contraction, shared by the CPU and CUDA launchers.
//
//   out[rows[s], b] += sum_d grads[b, pos(s), d] * vectors[s, d]
//
// accumulated in fp32 for float32, float16 and bfloat16 inputs, and in fp64 for float64 inputs.
//
// Rows s are pre-sorted by position and cut into tiles that never straddle two positions, so each
// tile is one small GEMM (tile rows x D) @ (D x B) against a single grads slice; nothing is
// gathered. The plan (sorted vectors, rows, tiles) is built once per attribution run in Python.
#pragma once

#include <cstdint>

namespace fastattr {

struct ContractionArgs {
  // grads: (B, P, D), unit stride along D.
  std::uintptr_t grads;
  int grads_dtype;
  std::int64_t B, P, D;
  std::int64_t grads_stride_b, grads_stride_p;
  // vectors: (S, D) sorted by position, unit stride along D.
  std::uintptr_t vectors;
  int vectors_dtype;
  std::int64_t S;
  std::int64_t vectors_stride_s;
  // rows: (S,) int32 output row of each vector (sorted order).
  std::uintptr_t rows;
  // tiles: (T,) int32 each: position, first and one-past-last vector of the tile, at most the
  // backend's tile height (kCpuContractTileS, kCudaContractTileS) vectors long.
  std::uintptr_t tile_pos, tile_start, tile_end;
  std::int64_t n_tiles;
  // out: R rows by B columns addressed as out[r * out_stride_r + b * out_stride_b].
  std::uintptr_t out;
  int out_dtype;
  std::int64_t R;
  std::int64_t out_stride_r, out_stride_b;
  // Rows may repeat (several decoder rows of one feature in one call): accumulate atomically.
  // Atomic float sums land in scheduling order; for run-to-run identical results the CPU kernel
  // takes ``deterministic``, and CUDA callers launch the tiles in passes whose rows are unique,
  // with atomic false (the Python plan does both).
  bool atomic;
};

// Checks everything that can be checked without reading device memory.
void validate_contraction_args(const ContractionArgs& a);

// Tile height of the CPU kernel (exported as _C.contract_cpu_tile_s; the Python plan cuts its tiles
// with it): whole row groups of the fp32 panel kernel (static_assert in contraction_cpu.cpp), and
// small enough that a position's tiles give the threads several tasks. The OpenMP tasks are runs
// of one position's tiles, so a packed grads panel serves the whole run whatever the height.
constexpr int kCpuContractTileS = 64;
// ``deterministic``: with repeated rows (a.atomic), threads own batch columns and add in tile
// order instead of using atomics: run-to-run identical, in one launch.
void contract_cpu(const ContractionArgs& a, bool deterministic);

#ifdef FASTATTR_WITH_CUDA
// Tile height of the CUDA kernel: the vectors one thread block holds (exported as
// _C.contract_cuda_tile_s; the Python plan cuts its tiles with it). The kernel derives its thread
// layout from it (kernels/cuda/contraction.cu).
constexpr int kCudaContractTileS = 64;
void contract_cuda(const ContractionArgs& a, std::uintptr_t stream);
#endif

}  // namespace fastattr
