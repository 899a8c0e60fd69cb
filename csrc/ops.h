// Each op file registers its own bindings, so adding an op touches no shared file but this one.
#pragma once
#include <pybind11/pybind11.h>

namespace fastattr {
void register_contraction_ops(pybind11::module_& m);
void register_influence_ops(pybind11::module_& m);
void register_threshold_ops(pybind11::module_& m);
void register_prune_ops(pybind11::module_& m);
void register_topk_edges_ops(pybind11::module_& m);
}  // namespace fastattr
