"""fastattr: compiled kernels for attribution graphs, as drop-in replacements for circuit-tracer.

The public graph functions keep circuit-tracer's names, signatures and return types; each also
takes ``backend=`` to force one of ``cuda``, ``triton``, ``cpu`` or ``torch``.
"""

from fastattr._runtime.backends import (
    BackendDtypeError,
    BackendLayoutError,
    BackendUnavailableError,
    available_backends,
    last_backend,
    use_backend,
)
from fastattr._runtime.info import __version__, info
from fastattr.ops.contraction import ContractionPlan, contract
from fastattr.ops.influence import (
    compute_edge_influence,
    compute_influence,
    compute_node_influence,
    compute_partial_influences,
    normalize_matrix,
)
from fastattr.ops.pruning import PruneResult, compute_graph_scores, prune_graph, prune_graph_sparse
from fastattr.ops.threshold import find_threshold
from fastattr.ops.sparse_edges import SparseEdges
from fastattr.ops.topk_edges import topk_edges
from fastattr.attribution.driver import attribute  # noqa: I001 - after the graph ops it uses
from fastattr.attribution.distributed import load_graph_shards
from fastattr.patch import patch_circuit_tracer
from fastattr.selftest import selftest

__all__ = [
    "BackendDtypeError",
    "BackendLayoutError",
    "BackendUnavailableError",
    "ContractionPlan",
    "PruneResult",
    "SparseEdges",
    "__version__",
    "attribute",
    "available_backends",
    "compute_edge_influence",
    "compute_graph_scores",
    "compute_influence",
    "compute_node_influence",
    "compute_partial_influences",
    "contract",
    "find_threshold",
    "info",
    "last_backend",
    "load_graph_shards",
    "normalize_matrix",
    "patch_circuit_tracer",
    "prune_graph",
    "prune_graph_sparse",
    "selftest",
    "topk_edges",
    "use_backend",
]
