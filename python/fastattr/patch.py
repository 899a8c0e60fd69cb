"""``patch_circuit_tracer()``: see :mod:`fastattr.integrations.circuit_tracer`, where it lives.

This module re-exports it, with :class:`UnsupportedCircuitTracerError`, for code that imports them
from here.
"""

from fastattr.integrations.circuit_tracer import (  # noqa: F401
    _GRAPH_FUNCTIONS,
    PatchHandle,
    UnsupportedCircuitTracerError,
    circuit_tracer_version,
    patch_circuit_tracer,
)
