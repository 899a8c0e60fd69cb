"""Adapters between fastattr's ops and the tracers that use them.

fastattr's core (``fastattr.ops.contraction``, ``influence``, ``threshold``, ``topk_edges``,
``pruning``) takes plain tensors and knows no tracer; see docs/backend_contract.md for that API as
a tracer would call it. Each module here adapts one tracer, with the same contract: ``apply``
replaces the tracer's slow functions wherever they are bound and returns a handle whose
``undo()`` restores them exactly.

- :mod:`fastattr.integrations.circuit_tracer`: circuit-tracer (``fastattr.patch_circuit_tracer``).
"""
