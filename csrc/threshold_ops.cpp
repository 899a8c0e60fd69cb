// Bindings of find_threshold's radix select: the host select and one device histogram level.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "graph.h"
#include "ops.h"

#ifdef FASTATTR_WITH_CUDA
#include "graph_kernels.cuh"
#endif

namespace py = pybind11;

namespace fastattr {

void register_threshold_ops(py::module_& m) {
  m.attr("select_levels") = kSelectLevels;
  m.attr("select_shift") = py::make_tuple(kSelectShift[0], kSelectShift[1], kSelectShift[2]);
  m.attr("select_bits") = py::make_tuple(kSelectBits[0], kSelectBits[1], kSelectBits[2]);

  m.def(
      "select_threshold_cpu",
      [](std::uintptr_t scores, int dtype, std::int64_t n, double t, double rel_s, double dc, float s_fixed) {
        check_dtype(dtype, kFloat32, "scores");
        if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
        check_nonnull(scores, n, "scores");
        check_threshold(t);
        if (!(rel_s >= 0.0 && rel_s < 0.5)) fail("rel_s: expected a relative error in [0, 0.5), got ", rel_s);
        if (!(dc >= 0.0 && dc < 0.5)) fail("dc: expected a relative error in [0, 0.5), got ", dc);
        if (!std::isfinite(s_fixed)) fail("s_fixed: expected a finite total (<= 0: derive it), got ", s_fixed);
        SelectResult r;
        {
          py::gil_scoped_release nogil;
          r = select_threshold_1d(as_ptr<const float>(scores), n, (float)t, rel_s, dc, s_fixed);
        }
        return py::make_tuple(r.status, r.value, r.clamped);
      },
      "circuit-tracer's find_threshold by radix select; returns (status, value, clamped)");
#ifdef FASTATTR_WITH_CUDA
  m.def(
      "hist_1d_cuda",
      [](std::uintptr_t scores, int dtype, std::int64_t n, int level, std::uint32_t prefix, std::uintptr_t count,
         std::uintptr_t sums, std::uintptr_t stats, std::uintptr_t stream) {
        check_dtype(dtype, kFloat32, "scores");
        if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
        if (level < 0 || level >= kSelectLevels) fail("level: expected 0..", kSelectLevels - 1, ", got ", level);
        check_nonnull(scores, n, "scores");
        check_nonnull(count, 1, "count");
        check_nonnull(sums, 1, "sums");
        check_nonnull(stats, 1, "stats");
        hist_1d_cuda(as_ptr<const float>(scores), n, kSelectShift[level], kSelectBits[level], prefix, level,
                     as_ptr<std::int64_t>(count), as_ptr<double>(sums), as_ptr<std::int64_t>(stats), stream);
      },
      "One radix-select level over a 1-D float32 tensor on the device");
#endif
}

}  // namespace fastattr
