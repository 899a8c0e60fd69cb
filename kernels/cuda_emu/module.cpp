// _fastattr_cuda_emu: fastattr._C's bindings (csrc/*_ops.cpp, compiled with FASTATTR_WITH_CUDA) over
// the CUDA kernels executed by the CPU emulation, plus the emulation's own checks (emu_checks.cu).
// A test instrument: "device" pointers are host pointers, streams are ignored, every launch runs
// to completion before it returns.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "ops.h"
#include "runtime.h"

namespace py = pybind11;

namespace fastattr_emu_checks {
// d = a @ b + c by one emulated mma.sync of `kind` (0 bf16 m16n8k16, 1 f16 m16n8k16, 2 tf32
// m16n8k8), a warp loading its fragments from CuTe's (thread, value) layouts; `perturb` swaps two
// A registers, a layout error the test must see.
void mma_check(int kind, const float* a, const float* b, const float* c, float* d, bool perturb);
void to_tf32_check(const float* x, std::uint32_t* out, std::int64_t n);
// out[i] = the value thread (i + 1) % n wrote to shared memory, read with or without the barrier.
void barrier_check(int* out, int threads, bool with_barrier);
// Two BlockReduce calls on one TempStorage, with or without the barrier between them.
void cub_reuse_check(double* out, bool with_barrier);
void shuffle_check(int* out);
}  // namespace fastattr_emu_checks

namespace {

py::dict build_info() {
  py::dict d;
  d["cuda"] = true;
  d["cuda_version"] = std::string("emulated");
  d["cuda_archs"] = std::string("cpu-emulation (sm_80 mma.sync semantics)");
  d["cudart_version"] = 0;
  d["openmp"] = true;
  d["compiler"] = std::string("gcc ") + __VERSION__;
  d["emulation"] = true;
  return d;
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_fastattr_cuda_emu, m) {
  m.doc() = "fastattr's CUDA kernels executed on the CPU (tests only; see docs/gpu_readiness.md)";
  m.def("build_info", &build_info);
  m.def("cuda_probe", [] { return py::make_tuple(1, 0, std::string(), 0); });
  fastattr::register_contraction_ops(m);
  fastattr::register_influence_ops(m);
  fastattr::register_threshold_ops(m);
  fastattr::register_prune_ops(m);
  fastattr::register_topk_edges_ops(m);

  py::module_ c = m.def_submodule("checks", "the emulation's own kernels: mma fragments, barriers, CUB contracts");
  c.def("mma", [](int kind, std::uintptr_t a, std::uintptr_t b, std::uintptr_t cc, std::uintptr_t d, bool perturb) {
    py::gil_scoped_release nogil;
    fastattr_emu_checks::mma_check(kind, ptr<const float>(a), ptr<const float>(b), ptr<const float>(cc), ptr<float>(d),
                                   perturb);
  }, py::arg("kind"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"), py::arg("perturb") = false);
  c.def("to_tf32", [](std::uintptr_t x, std::uintptr_t out, std::int64_t n) {
    fastattr_emu_checks::to_tf32_check(ptr<const float>(x), ptr<std::uint32_t>(out), n);
  }, py::arg("x"), py::arg("out"), py::arg("n"));
  c.def("barrier", [](std::uintptr_t out, int threads, bool with_barrier) {
    fastattr_emu_checks::barrier_check(ptr<int>(out), threads, with_barrier);
  }, py::arg("out"), py::arg("threads"), py::arg("with_barrier"));
  c.def("cub_reuse", [](std::uintptr_t out, bool with_barrier) {
    fastattr_emu_checks::cub_reuse_check(ptr<double>(out), with_barrier);
  }, py::arg("out"), py::arg("with_barrier"));
  c.def("launch_counts", [] {
    py::dict d;
    for (const auto& [name, n] : fastattr_emu::launch_counts()) d[py::str(name)] = n;
    return d;
  }, "launches per kernel so far in this process");
  c.def("shuffle", [](std::uintptr_t out) { fastattr_emu_checks::shuffle_check(ptr<int>(out)); }, py::arg("out"));
}
