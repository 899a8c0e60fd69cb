"""Re-export of the circuit-tracer adapter's helpers, now in :mod:`fastattr.integrations.circuit_tracer`.

Kept so that ``from fastattr import _circuit_tracer as ct`` (fastattr.attribute, hook_plans) keeps
working; new code imports from the integration.
"""

from fastattr.integrations.circuit_tracer import (  # noqa: F401
    UnsupportedCircuitTracerError,
    check_method,
    check_nnsight_tracer,
    circuit_tracer_version,
    graph_cfg,
    graph_kwargs,
    model_device,
    model_scan,
    offload_targets,
    require_api,
    run_forward,
    unembed,
    unsupported,
)
