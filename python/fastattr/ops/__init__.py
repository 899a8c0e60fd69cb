"""fastattr's ops on plain tensors, one module per op, each with its dispatch registry entry and
one launch helper per backend: the contraction (``contraction``), influence (``influence``),
cumulative thresholds (``threshold``), top-k edges (``topk_edges``) and pruning (``pruning``), plus
the CSR edge type they accept (``sparse_edges``). They know no tracer and import nothing from
:mod:`fastattr.attribution` or :mod:`fastattr.integrations`.

The public names are re-exported by :mod:`fastattr` itself (``fastattr.prune_graph``, ...); this
package's ``__init__`` imports nothing, so that importing one op does not import the others.
"""
