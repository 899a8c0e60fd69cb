// Bindings and argument checks for the contraction op.
#include <pybind11/pybind11.h>

#include "common.h"
#include "contraction.h"
#include "ops.h"

namespace py = pybind11;

namespace fastattr {

void validate_contraction_args(const ContractionArgs& a) {
  check_float_dtype(a.grads_dtype, "grads");
  check_float_dtype(a.vectors_dtype, "vectors");
  check_float_dtype(a.out_dtype, "out");
  if (a.grads_dtype != a.vectors_dtype)
    fail("grads: expected the dtype of vectors (", dtype_name(a.vectors_dtype), "), got ", dtype_name(a.grads_dtype));
  if (a.out_dtype != kFloat32 && a.out_dtype != a.vectors_dtype)
    fail("out: expected dtype float32 or ", dtype_name(a.vectors_dtype), ", got ", dtype_name(a.out_dtype));
  if (a.B < 0 || a.P < 0 || a.D < 0 || a.S < 0 || a.R < 0 || a.n_tiles < 0)
    fail("shapes: expected non-negative sizes, got B=", a.B, " P=", a.P, " D=", a.D, " S=", a.S, " R=", a.R,
         " tiles=", a.n_tiles);
  if (a.S > INT32_MAX || a.R > INT32_MAX) fail("vectors/out: expected fewer than 2^31 rows, got S=", a.S, " R=", a.R);
  if (a.grads_stride_b < 0 || a.grads_stride_p < 0 || a.vectors_stride_s < a.D || a.out_stride_r < 0 || a.out_stride_b < 0)
    fail("strides: expected non-negative strides (vectors row stride >= D), got grads (", a.grads_stride_b, ", ",
         a.grads_stride_p, "), vectors ", a.vectors_stride_s, ", out (", a.out_stride_r, ", ", a.out_stride_b, ")");
  const std::int64_t work = a.B * a.S;
  check_nonnull(a.grads, a.B * a.P * a.D, "grads");
  check_nonnull(a.vectors, a.S * a.D, "vectors");
  check_nonnull(a.rows, a.S, "rows");
  check_nonnull(a.tile_pos, a.n_tiles, "tile_pos");
  check_nonnull(a.tile_start, a.n_tiles, "tile_start");
  check_nonnull(a.tile_end, a.n_tiles, "tile_end");
  check_nonnull(a.out, work > 0 ? a.R * a.B : 0, "out");
  if (a.S > 0 && a.n_tiles == 0) fail("tiles: expected at least one tile for ", a.S, " vectors, got 0");
}

namespace {

ContractionArgs make_args(std::uintptr_t grads, int grads_dtype, std::int64_t B, std::int64_t P, std::int64_t D,
                          std::int64_t gsb, std::int64_t gsp, std::uintptr_t vectors, int vectors_dtype,
                          std::int64_t S, std::int64_t vss, std::uintptr_t rows, std::uintptr_t tile_pos,
                          std::uintptr_t tile_start, std::uintptr_t tile_end, std::int64_t n_tiles,
                          std::uintptr_t out, int out_dtype, std::int64_t R, std::int64_t osr, std::int64_t osb,
                          bool atomic) {
  ContractionArgs a{grads, grads_dtype, B, P, D, gsb, gsp, vectors, vectors_dtype, S, vss, rows,
                    tile_pos, tile_start, tile_end, n_tiles, out, out_dtype, R, osr, osb, atomic};
  validate_contraction_args(a);
  return a;
}

}  // namespace

void register_contraction_ops(py::module_& m) {
  m.def(
      "contract_cpu",
      [](std::uintptr_t grads, int grads_dtype, std::int64_t B, std::int64_t P, std::int64_t D, std::int64_t gsb,
         std::int64_t gsp, std::uintptr_t vectors, int vectors_dtype, std::int64_t S, std::int64_t vss,
         std::uintptr_t rows, std::uintptr_t tile_pos, std::uintptr_t tile_start, std::uintptr_t tile_end,
         std::int64_t n_tiles, std::uintptr_t out, int out_dtype, std::int64_t R, std::int64_t osr,
         std::int64_t osb, bool atomic) {
        ContractionArgs a = make_args(grads, grads_dtype, B, P, D, gsb, gsp, vectors, vectors_dtype, S, vss, rows,
                                      tile_pos, tile_start, tile_end, n_tiles, out, out_dtype, R, osr, osb, atomic);
        py::gil_scoped_release nogil;
        contract_cpu(a);
      },
      "out[rows[s], b] += grads[b, pos(s), :] . vectors[s, :] on host memory (see csrc/contraction.h)");
#ifdef FASTATTR_WITH_CUDA
  m.attr("contract_cuda_tile_s") = kCudaContractTileS;
  m.def(
      "contract_cuda",
      [](std::uintptr_t grads, int grads_dtype, std::int64_t B, std::int64_t P, std::int64_t D, std::int64_t gsb,
         std::int64_t gsp, std::uintptr_t vectors, int vectors_dtype, std::int64_t S, std::int64_t vss,
         std::uintptr_t rows, std::uintptr_t tile_pos, std::uintptr_t tile_start, std::uintptr_t tile_end,
         std::int64_t n_tiles, std::uintptr_t out, int out_dtype, std::int64_t R, std::int64_t osr,
         std::int64_t osb, bool atomic, std::uintptr_t stream) {
        ContractionArgs a = make_args(grads, grads_dtype, B, P, D, gsb, gsp, vectors, vectors_dtype, S, vss, rows,
                                      tile_pos, tile_start, tile_end, n_tiles, out, out_dtype, R, osr, osb, atomic);
        py::gil_scoped_release nogil;
        contract_cuda(a, stream);
      },
      "The contraction on device memory, launched on the given CUDA stream (see csrc/contraction.h)");
#endif
}

}  // namespace fastattr
