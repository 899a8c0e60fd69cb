"""The attribution graph of one prompt: :func:`fastattr.attribute` and what it is made of.

- ``driver``: the four phases (setup, logit rows, feature rows, assembly) of ``fastattr.attribute``;
- ``edge_store``: where the rows go while they are written (dense, or top-k with exact sums);
- ``linear_engine``: rows from explicit transposed maps, one batch-1 forward pass, no autograd;
- ``hook_plans``: the contraction plans of a context's decoder rows, error vectors and tokens, and
  the per-context routes the hooks write through;
- ``context_hooks``: circuit-tracer's contexts with their backward-hook contraction replaced by
  those plans (the autograd engine);
- ``replacement_model``: the one place that spells out circuit-tracer's model, context and graph
  interface, for both layouts users install.

Uses :mod:`fastattr.ops` and :mod:`fastattr._runtime`; never :mod:`fastattr.integrations`. This
``__init__`` imports nothing (the public entry point is ``fastattr.attribute``).
"""
