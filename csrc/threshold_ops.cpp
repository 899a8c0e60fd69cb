// Bindings of find_threshold's radix select: the host select, the bucket walk every backend's
// driver shares, and one device histogram level.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>

#include "common.h"
#include "graph.h"
#include "ops.h"

#ifdef FASTATTR_WITH_CUDA
#include "graph_kernels.cuh"
#endif

namespace py = pybind11;

namespace fastattr {

namespace {

void check_relative(double v, const char* arg) {
  if (!(v >= 0.0 && v < 0.5)) fail(arg, ": expected a relative error in [0, 0.5), got ", v);
}

void check_level(int level) {
  if (level < 0 || level >= kSelectLevels) fail("level: expected 0..", kSelectLevels - 1, ", got ", level);
}

void check_buckets(std::int64_t n_buckets, int level) {
  if (n_buckets != (std::int64_t(1) << kSelectBits[level]))
    fail("n_buckets: expected ", 1 << kSelectBits[level], " (level ", level, "), got ", n_buckets);
}

py::tuple select_threshold_cpu(std::uintptr_t scores, int scores_dtype, std::int64_t n, double t, double rel_s,
                               double dc, float s_fixed) {
  check_dtype(scores_dtype, kFloat32, "scores");
  if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
  check_nonnull(scores, n, "scores");
  check_threshold(t);
  check_relative(rel_s, "rel_s");
  check_relative(dc, "dc");
  if (!std::isfinite(s_fixed)) fail("s_fixed: expected a finite total (<= 0: derive it), got ", s_fixed);
  SelectResult r;
  {
    py::gil_scoped_release nogil;
    r = select_threshold_1d(as_ptr<const float>(scores), n, (float)t, rel_s, dc, s_fixed);
  }
  return py::make_tuple(r.status, r.value, r.clamped);
}

py::tuple select_crossing_test(std::uintptr_t sums, std::int64_t n_buckets, double t, double rel_s, double dc,
                               float s_fixed) {
  check_buckets(n_buckets, 0);
  check_nonnull(sums, n_buckets, "sums");
  check_threshold(t);
  check_relative(rel_s, "rel_s");
  check_relative(dc, "dc");
  if (!std::isfinite(s_fixed)) fail("s_fixed: expected a finite total (<= 0: derive it), got ", s_fixed);
  const CrossingTest c = crossing_test(as_ptr<const double>(sums), (int)n_buckets, (float)t, rel_s, dc, s_fixed);
  return py::make_tuple(c.s_lo, c.s_hi, c.dc, c.t, c.may_overflow());
}

py::tuple select_pick_bucket(std::uintptr_t count, std::uintptr_t sums, int level, std::int64_t n_buckets,
                             double base, float s_lo, float s_hi, double dc, float t, bool must_cross) {
  check_level(level);
  check_buckets(n_buckets, level);
  check_nonnull(count, n_buckets, "count");
  check_nonnull(sums, n_buckets, "sums");
  check_relative(dc, "dc");
  if (!(s_lo <= s_hi)) fail("s_lo: expected s_lo <= s_hi, got ", s_lo, " > ", s_hi);
  const CrossingTest test{s_lo, s_hi, dc, t};
  const BucketPick p = pick_bucket(as_ptr<const std::int64_t>(count), as_ptr<const double>(sums), (int)n_buckets,
                                   base, test, must_cross);
  return py::make_tuple(p.early, p.late, p.base_early, p.base_late, p.count_late);
}

void sort_descending_cpu_binding(std::uintptr_t scores, int scores_dtype, std::int64_t n, std::uintptr_t out,
                                 std::uintptr_t tmp) {
  check_dtype(scores_dtype, kFloat32, "scores");
  if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
  check_nonnull(scores, n, "scores");
  check_nonnull(out, n, "out");
  check_nonnull(tmp, n, "tmp");
  py::gil_scoped_release nogil;
  sort_descending_cpu(as_ptr<const float>(scores), n, as_ptr<float>(out), as_ptr<float>(tmp));
}

#ifdef FASTATTR_WITH_CUDA
void sort_descending_cuda_binding(std::uintptr_t scores, int scores_dtype, std::int64_t n, std::uintptr_t out,
                                  std::uintptr_t temp, std::size_t temp_bytes, std::uintptr_t stream) {
  check_dtype(scores_dtype, kFloat32, "scores");
  if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
  check_nonnull(scores, n, "scores");
  check_nonnull(out, n, "out");
  const std::size_t need = sort_descending_cuda_temp_bytes(n);
  if (temp_bytes < need) fail("temp_bytes: expected at least ", need, " (sort_descending_cuda_temp_bytes), got ",
                              temp_bytes);
  check_nonnull(temp, (std::int64_t)need, "temp");
  sort_descending_cuda(as_ptr<const float>(scores), as_ptr<float>(out), n, as_ptr<void>(temp), temp_bytes, stream);
}

void hist_1d_cuda_binding(std::uintptr_t scores, int scores_dtype, std::int64_t n, int level, std::uint32_t prefix,
                          std::uintptr_t count, std::uintptr_t sums, std::uintptr_t sig_sums, std::uintptr_t stats,
                          bool deterministic, std::uintptr_t stream) {
  check_dtype(scores_dtype, kFloat32, "scores");
  if (n <= 0) fail("scores: expected a non-empty tensor, got ", n, " elements");
  check_level(level);
  check_nonnull(scores, n, "scores");
  const std::int64_t nb = std::int64_t(1) << kSelectBits[level];
  check_nonnull(count, nb, "count");
  check_nonnull(deterministic ? sig_sums : sums, nb, deterministic ? "sig_sums" : "sums");
  check_nonnull(stats, 4, "stats");
  if (deterministic && n > kExactSumMaxValues)
    fail("scores: expected at most ", kExactSumMaxValues, " elements for deterministic sums, got ", n);
  const HistOut out{as_ptr<std::int64_t>(count), as_ptr<double>(sums), as_ptr<std::int64_t>(sig_sums),
                    as_ptr<std::int64_t>(stats), deterministic};
  hist_1d_cuda(as_ptr<const float>(scores), n, level, prefix, out, stream);
}
#endif

}  // namespace

void register_threshold_ops(py::module_& m) {
  m.attr("select_levels") = kSelectLevels;
  m.attr("select_shift") = py::make_tuple(kSelectShift[0], kSelectShift[1], kSelectShift[2]);
  m.attr("select_bits") = py::make_tuple(kSelectBits[0], kSelectBits[1], kSelectBits[2]);
  py::dict status;
  status["ok"] = (int)kSelectOk;
  status["ambiguous"] = (int)kSelectAmbiguous;
  status["all_zero"] = (int)kSelectAllZero;
  status["negative"] = (int)kSelectNegative;
  status["non_finite"] = (int)kSelectNonFinite;
  m.attr("select_status") = status;

  m.def("select_threshold_cpu", &select_threshold_cpu, py::kw_only(), py::arg("scores"), py::arg("scores_dtype"),
        py::arg("n"), py::arg("t"), py::arg("rel_s"), py::arg("dc"), py::arg("s_fixed"),
        "circuit-tracer's find_threshold by radix select; returns (status, value, clamped)");
  m.def("select_crossing_test", &select_crossing_test, py::kw_only(), py::arg("sums"), py::arg("n_buckets"),
        py::arg("t"), py::arg("rel_s"), py::arg("dc"), py::arg("s_fixed"),
        "The crossing test of a select from its level-0 bucket sums (float64); returns "
        "(s_lo, s_hi, dc, t, may_overflow)");
  m.def("select_pick_bucket", &select_pick_bucket, py::kw_only(), py::arg("count"), py::arg("sums"),
        py::arg("level"), py::arg("n_buckets"), py::arg("base"), py::arg("s_lo"), py::arg("s_hi"), py::arg("dc"),
        py::arg("t"), py::arg("must_cross"),
        "The bucket holding the crossing (int64 counts, float64 sums); returns "
        "(early, late, base_early, base_late, count_late)");
  m.def("sort_descending_cpu", &sort_descending_cpu_binding, py::kw_only(), py::arg("scores"),
        py::arg("scores_dtype"), py::arg("n"), py::arg("out"), py::arg("tmp"),
        "The non-negative float32 scores in descending order, into out (tmp: n floats of scratch)");
#ifdef FASTATTR_WITH_CUDA
  m.def("sort_descending_cuda_temp_bytes", &sort_descending_cuda_temp_bytes, py::kw_only(), py::arg("n"),
        "Scratch bytes sort_descending_cuda needs for n scores");
  m.def("sort_descending_cuda", &sort_descending_cuda_binding, py::kw_only(), py::arg("scores"),
        py::arg("scores_dtype"), py::arg("n"), py::arg("out"), py::arg("temp"), py::arg("temp_bytes"),
        py::arg("stream"), "The non-negative float32 scores in descending order, into out, on the device");
  m.def("hist_1d_cuda", &hist_1d_cuda_binding, py::kw_only(), py::arg("scores"), py::arg("scores_dtype"),
        py::arg("n"), py::arg("level"), py::arg("prefix"), py::arg("count"), py::arg("sums"), py::arg("sig_sums"),
        py::arg("stats"), py::arg("deterministic"), py::arg("stream"),
        "One radix-select level over a 1-D float32 tensor on the device");
#endif
}

}  // namespace fastattr
