// The fastattr._C module: build facts, the CUDA runtime probe, and each op's bindings.
#include <pybind11/pybind11.h>

#include <string>

#include "ops.h"

#ifdef FASTATTR_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
#ifdef FASTATTR_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::string(FASTATTR_CUDA_VERSION_STR);
  d["cuda_archs"] = std::string(FASTATTR_CUDA_ARCHS_STR);
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["cudart_version"] = rt;
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["cuda_archs"] = py::none();
  d["cudart_version"] = py::none();
#endif
#ifdef FASTATTR_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  return d;
}

// Returns (device_count, error_code, error_message, driver_version). Never throws: on a machine
// with no driver the static runtime reports cudaErrorInsufficientDriver (35) and we pass it on.
py::tuple cuda_probe() {
#ifdef FASTATTR_WITH_CUDA
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  int driver = 0;
  cudaDriverGetVersion(&driver);
  if (err != cudaSuccess) {
    std::string msg = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return py::make_tuple(0, static_cast<int>(err), msg, driver);
  }
  return py::make_tuple(count, 0, std::string(), driver);
#else
  return py::make_tuple(0, -1, std::string("built without CUDA"), 0);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattr compiled kernels (CPU, and CUDA when built with it); no libtorch dependency";
  m.def("build_info", &build_info, "Facts about this build: CUDA version and archs, OpenMP, compiler.");
  m.def("cuda_probe", &cuda_probe, "(device_count, error_code, error_message, driver_version)");
  fastattr::register_contraction_ops(m);
  fastattr::register_influence_ops(m);
  fastattr::register_threshold_ops(m);
  fastattr::register_prune_ops(m);
  fastattr::register_topk_edges_ops(m);
}
