// Bindings and argument checks for the contraction op. Python calls them by keyword only.
#include <pybind11/pybind11.h>

#include <tuple>

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

// The keyword arguments shared by both bindings, in ContractionArgs order.
auto contraction_kwargs() {
  return std::make_tuple(py::arg("grads"), py::arg("grads_dtype"), py::arg("B"), py::arg("P"), py::arg("D"),
                         py::arg("grads_stride_b"), py::arg("grads_stride_p"), py::arg("vectors"),
                         py::arg("vectors_dtype"), py::arg("S"), py::arg("vectors_stride_s"), py::arg("rows"),
                         py::arg("tile_pos"), py::arg("tile_start"), py::arg("tile_end"), py::arg("n_tiles"),
                         py::arg("out"), py::arg("out_dtype"), py::arg("R"), py::arg("out_stride_r"),
                         py::arg("out_stride_b"), py::arg("atomic"));
}

void contract_cpu_entry(std::uintptr_t grads, int grads_dtype, std::int64_t B, std::int64_t P, std::int64_t D,
                        std::int64_t grads_stride_b, std::int64_t grads_stride_p, std::uintptr_t vectors,
                        int vectors_dtype, std::int64_t S, std::int64_t vectors_stride_s, std::uintptr_t rows,
                        std::uintptr_t tile_pos, std::uintptr_t tile_start, std::uintptr_t tile_end,
                        std::int64_t n_tiles, std::uintptr_t out, int out_dtype, std::int64_t R,
                        std::int64_t out_stride_r, std::int64_t out_stride_b, bool atomic, bool deterministic) {
  const ContractionArgs a{grads, grads_dtype, B, P, D, grads_stride_b, grads_stride_p,
                          vectors, vectors_dtype, S, vectors_stride_s,
                          rows, tile_pos, tile_start, tile_end, n_tiles,
                          out, out_dtype, R, out_stride_r, out_stride_b, atomic};
  validate_contraction_args(a);
  py::gil_scoped_release nogil;
  contract_cpu(a, deterministic);
}

#ifdef FASTATTR_WITH_CUDA
void contract_cuda_entry(std::uintptr_t grads, int grads_dtype, std::int64_t B, std::int64_t P, std::int64_t D,
                         std::int64_t grads_stride_b, std::int64_t grads_stride_p, std::uintptr_t vectors,
                         int vectors_dtype, std::int64_t S, std::int64_t vectors_stride_s, std::uintptr_t rows,
                         std::uintptr_t tile_pos, std::uintptr_t tile_start, std::uintptr_t tile_end,
                         std::int64_t n_tiles, std::uintptr_t out, int out_dtype, std::int64_t R,
                         std::int64_t out_stride_r, std::int64_t out_stride_b, bool atomic, std::uintptr_t stream) {
  const ContractionArgs a{grads, grads_dtype, B, P, D, grads_stride_b, grads_stride_p,
                          vectors, vectors_dtype, S, vectors_stride_s,
                          rows, tile_pos, tile_start, tile_end, n_tiles,
                          out, out_dtype, R, out_stride_r, out_stride_b, atomic};
  validate_contraction_args(a);
  py::gil_scoped_release nogil;
  contract_cuda(a, stream);
}
#endif

}  // namespace

void register_contraction_ops(py::module_& m) {
  m.attr("contract_cpu_tile_s") = kCpuContractTileS;
  std::apply(
      [&](auto... kwargs) {
        m.def("contract_cpu", &contract_cpu_entry,
              "out[rows[s], b] += grads[b, pos(s), :] . vectors[s, :] on host memory (see csrc/contraction.h)",
              py::kw_only(), kwargs..., py::arg("deterministic"));
      },
      contraction_kwargs());
#ifdef FASTATTR_WITH_CUDA
  m.attr("contract_cuda_tile_s") = kCudaContractTileS;
  std::apply(
      [&](auto... kwargs) {
        m.def("contract_cuda", &contract_cuda_entry,
              "The contraction on device memory, launched on the given CUDA stream (see csrc/contraction.h)",
              py::kw_only(), kwargs..., py::arg("stream"));
      },
      contraction_kwargs());
#endif
}

}  // namespace fastattr
