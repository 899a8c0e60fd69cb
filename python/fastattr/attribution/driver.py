"""``fastattr.attribute``: circuit-tracer's attribution graph, built without its slow path.

A small driver over four phases, each a function below:

1. **setup**: tokenize, let the model precompute its attribution context (activations, error
   vectors, decoder and encoder rows), pick the row engine and the targets;
2. **logit rows**: one row per target logit;
3. **feature rows**: rows of the active features, all of them or the ``max_feature_nodes`` most
   influential, ranked by partial influences every ``update_interval`` batches as circuit-tracer
   does;
4. **assembly**: the final adjacency in circuit-tracer's node order.

Rows come from an *engine*:

- ``"linear"`` (:mod:`fastattr.attribution.linear_engine`): one batch-1 forward pass and explicit transposed
  maps, no copies of the model and no autograd graph. The default wherever the model is expressed.
- ``"autograd"``: circuit-tracer's own forward pass over ``batch_size`` copies of the prompt and a
  backward pass per batch, with the contraction hooks writing straight into the edge rows.

Rows are written into a store (:mod:`fastattr.attribution.edge_store`) on the model's device: every row dense
(``edge_storage="dense"``, circuit-tracer's graph), or each feature row's ``topk`` strongest
entries plus exact sums (``"topk"``, bounded memory). Node order and meaning are circuit-tracer's;
so are target selection and the ``Graph`` returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fastattr._runtime import backends as _backends
from fastattr.attribution import context_hooks, hook_plans
from fastattr.attribution import distributed as _distributed
from fastattr.attribution import replacement_model as ct
from fastattr.attribution.edge_store import DEFAULT_TOPK, DenseRows, RowStore, TopKRows
from fastattr.attribution import readers
from fastattr.attribution.linear_engine import LinearEngine
from fastattr.ops import pruning

logger = logging.getLogger("fastattr")

__all__ = ["DEFAULT_TOPK", "attribute"]

# Bytes of final-adjacency rows assembled and moved to the CPU per copy: bounds the transient.
_BLOCK_BYTES = 64 << 20
_ENGINES = ("auto", "linear", "autograd")
# Models whose fallback to the autograd engine was already logged (once per model and reason).
_LOGGED_FALLBACKS: set[tuple[int, str]] = set()


def _validate(prompt: Any, batch_size: Any, max_feature_nodes: Any, update_interval: Any, edge_storage: Any,
              topk: Any, max_n_logits: Any, engine: Any) -> None:  # fmt: skip
    def positive_int(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and value > 0

    if not positive_int(batch_size):
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if max_feature_nodes is not None and not positive_int(max_feature_nodes):
        raise ValueError(f"max_feature_nodes: expected a positive integer or None, got {max_feature_nodes!r}")
    if not positive_int(update_interval):
        raise ValueError(f"update_interval: expected a positive integer, got {update_interval!r}")
    if not positive_int(max_n_logits):
        raise ValueError(f"max_n_logits: expected a positive integer, got {max_n_logits!r}")
    if edge_storage not in ("dense", "topk"):
        raise ValueError(f"edge_storage: expected 'dense' or 'topk', got {edge_storage!r}")
    if topk is not None and not positive_int(topk):
        raise ValueError(f"topk: expected a positive integer or None, got {topk!r}")
    if engine not in _ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(map(repr, _ENGINES))}, got {engine!r}")
    if isinstance(prompt, str):
        empty = not prompt.strip()
    elif isinstance(prompt, torch.Tensor):
        empty = prompt.numel() == 0
    else:
        empty = len(prompt) == 0
    if empty:
        raise ValueError("prompt: expected at least one token, got an empty prompt")


# --------------------------------------------------------------------------------- row engines


class _LinearRows:
    """Rows from the linear engine: exactly as many as seeds, no forward batch."""

    name = "linear"

    def __init__(self, engine: LinearEngine):
        self.engine = engine
        # Which reader took the model apart, and as what: logged and kept in _LAST_RUN.
        self.source = dict(engine.frozen.source)
        places = {layer.place for layer in engine.layers}
        if len(places) > 1:
            self.source["placements"] = len(places)

    def block_rows(self, n: int) -> int:
        return n

    def rows_per_write(self, batch_size: int, row_bytes: int) -> int:
        return self.engine.rows_per_run(batch_size, row_bytes)

    def cut_runs(self, positions: torch.Tensor, batch_size: int, max_rows: int) -> list[tuple[int, int]]:
        return self.engine.cut_runs(positions, batch_size, max_rows)

    def compute(self, block: torch.Tensor, layers: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, retain: bool) -> None:
        self.engine.run(block.T, layers, positions, values)


class _AutogradRows:
    """Rows from circuit-tracer's backward passes over its ``batch`` copies of the prompt; the
    patched hooks write into this context's route (:mod:`fastattr.attribution.hook_plans`)."""

    name = "autograd"
    source: dict[str, Any] = {}

    def __init__(self, ctx: Any, batch: int, deterministic: bool):
        self.ctx = ctx
        self.batch = batch
        self.route = hook_plans.route_for(ctx)
        self.route.backend = _backends.forced_choice()
        self.route.deterministic = deterministic

    def block_rows(self, n: int) -> int:
        return self.batch

    def rows_per_write(self, batch_size: int, row_bytes: int) -> int:
        return batch_size  # circuit-tracer's forward ran over exactly this many copies

    def cut_runs(self, positions: torch.Tensor, batch_size: int, max_rows: int) -> list[tuple[int, int]]:
        return [(i, min(i + batch_size, len(positions))) for i in range(0, len(positions), batch_size)]

    def compute(self, block: torch.Tensor, layers: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, retain: bool) -> None:
        self.route.out = block.T
        try:
            self.ctx.compute_batch(layers=layers, positions=positions, inject_values=values, retain_graph=retain)
        finally:
            self.route.out = None


# ---------------------------------------------------------------------------------------- phases


@dataclass
class _Run:
    """What one attribute() call knows as it goes, and how long each phase took."""

    model: Any
    verbose: bool
    # Resolved once per call: fixed-order reductions in every op that has atomics.
    deterministic: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    offload_handles: list = field(default_factory=list)
    # Per-batch device synchronisation, only to split out the engine's own time when asked.
    profile: bool = False
    # The rank layout when one graph is split over a process group (distributed.Ranks), else None.
    ranks: Any = None
    # Rows each partial-influence update read: for the benchmarks' floor model.
    influence_rows: list = field(default_factory=list)
    # Where the graph goes with a process group: "all" ranks, "rank0", or "shards" (files in shard_dir).
    gather: str = "all"
    shard_dir: Any = None

    def offload(self, how: str | None, phase: int) -> None:
        if how:
            from circuit_tracer.utils.disk_offload import offload_modules

            self.offload_handles += offload_modules(ct.offload_targets(self.model, phase), how)


@dataclass
class _Setup:
    input_ids: torch.Tensor
    ctx: Any
    rows: _LinearRows | _AutogradRows
    targets: Any
    device: torch.device
    n_layers: int
    n_pos: int
    total_active: int
    n_features: int

    @property
    def n_logits(self) -> int:
        return len(self.targets)

    @property
    def logit_offset(self) -> int:
        return self.total_active + (self.n_layers + 1) * self.n_pos

    @property
    def total_nodes(self) -> int:
        return self.logit_offset + self.n_logits


def _choose_engine(model: Any, engine: str) -> str:
    if engine == "autograd":
        return "autograd"
    reason = readers.unsupported_reason(model)
    if reason is None:
        return "linear"
    if engine == "linear":
        raise ValueError(f"engine: 'linear' cannot express this model: {reason}; use engine='autograd' or 'auto'")
    key = (id(model), reason)
    if key not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(key)
        logger.info("fastattr.attribute: autograd engine (%s)", reason)
    return "autograd"


def _setup(run: _Run, prompt: Any, *, chosen: str, batch_size: int, offload: str | None, attribution_targets: Any,
           max_n_logits: int, desired_logit_prob: float, max_feature_nodes: int | None) -> _Setup:  # fmt: skip
    from circuit_tracer.attribution.targets import AttributionTargets, log_attribution_target_info

    model = run.model
    t = time.perf_counter()
    input_ids = model.ensure_tokenized(prompt)
    if chosen == "linear":
        # The setup runs the model once over the prompt; the engine's frozen state is taken from it.
        reader = readers.reader_for(model)
        with reader.capture(model) as frozen:
            ctx = model.setup_attribution(input_ids)
        # Before any offload: the engine reads the transcoders' skip path and the model's weights.
        engine = LinearEngine(reader.read(model, ctx, input_ids, frozen), ctx, deterministic=run.deterministic)
        rows: _LinearRows | _AutogradRows = _LinearRows(engine)
        del frozen
    else:
        ctx = model.setup_attribution(input_ids)
    device = ct.model_device(ctx)
    run.offload(offload, 0)
    run.timings["precompute"] = time.perf_counter() - t

    t = time.perf_counter()
    if chosen == "autograd":
        ct.run_forward(model, input_ids, batch_size, ctx)
        rows = _AutogradRows(ctx, ctx._resid_activations[0].shape[0], run.deterministic)
    run.offload(offload, 1)
    run.timings["forward"] = time.perf_counter() - t

    targets = AttributionTargets(
        attribution_targets=attribution_targets,
        logits=ctx.logits[0, -1],
        unembed_proj=ct.unembed(model),
        tokenizer=model.tokenizer,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
    )
    log_attribution_target_info(targets, attribution_targets, logger)
    run.offload(offload, 2)

    n_layers, n_pos, _ = ctx.activation_matrix.shape
    total_active = ctx.activation_matrix._nnz()
    n_features = min(max_feature_nodes or total_active, total_active)
    read = "".join(f", {k} {v}" for k, v in rows.source.items())
    logger.info("fastattr.attribute: %d active features, %d of them as nodes, %d logits, %s engine%s",
                total_active, n_features, len(targets), rows.name, read)  # fmt: skip
    return _Setup(input_ids, ctx, rows, targets, device, n_layers, n_pos, total_active, n_features)


class _RowWriter:
    """Writes batches of rows into the store through the engine, and records which node each is."""

    def __init__(self, run: _Run, s: _Setup, store: RowStore):
        self.run, self.s, self.store = run, s, store
        self.row_to_node = torch.zeros(s.n_features + s.n_logits, dtype=torch.int64, device=s.device)
        self.st = 0

    def phase(self, batches: list[dict]) -> None:
        """Write the batches of one phase (no influence update inside it), in order. Over ranks,
        each batch is computed by its owner alone and committed everywhere in this order."""
        ranks = self.run.ranks
        if ranks is None:
            for b in batches:
                self.write(**b)
            return
        if isinstance(self.store, _distributed.ShardedDenseRows):
            ranks.agree(lambda: self._phase_sharded(batches))
            return
        mine: dict[int, torch.Tensor] = {}

        def compute() -> None:
            for j, b in enumerate(batches):
                if ranks.owner(j) == ranks.rank:
                    n = len(b["nodes"])
                    buf = torch.zeros(self.s.rows.block_rows(n), self.s.total_nodes, device=self.s.device)
                    # Every rank keeps the graph alive: which batch is the last one is not its own.
                    self._compute(buf[:, : self.s.logit_offset], b["layers"], b["positions"], b["values"], True)
                    mine[j] = buf[:n]

        ranks.agree(compute)
        ref = torch.empty(0, device=self.s.device)
        for j, b in enumerate(batches):
            n = len(b["nodes"])
            rows = ranks.share(mine.pop(j, None), (n, self.s.total_nodes), ranks.owner(j), ref)
            self.store.target(self.st, self.s.rows.block_rows(n))[:n] = rows
            self._commit(b["nodes"], b["layers"], b.get("features"))

    def _phase_sharded(self, batches: list[dict]) -> None:
        """Each rank computes its own batches into its shard; every rank records every row's node."""
        ranks = self.run.ranks
        for j, b in enumerate(batches):
            n, owner = len(b["nodes"]), b.get("owner", ranks.owner(j))
            if owner == ranks.rank:
                block = self.store.target(self.st, self.s.rows.block_rows(n))[:, : self.s.logit_offset]
                # Every rank keeps the graph alive: which batch is the last one is not its own.
                self._compute(block, b["layers"], b["positions"], b["values"], True)
            self.store.written(self.st, n, owner)
            self._commit(b["nodes"], b["layers"], b.get("features"))

    def _compute(self, block: torch.Tensor, layers: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
                 retain: bool) -> None:  # fmt: skip
        on_cuda = self.s.device.type == "cuda"
        if self.run.profile and on_cuda:
            torch.cuda.synchronize(self.s.device)
        t0 = time.perf_counter()
        self.s.rows.compute(block, layers, positions, values, retain)
        if self.run.profile:
            if on_cuda:
                torch.cuda.synchronize(self.s.device)
            self.run.timings["engine"] = self.run.timings.get("engine", 0.0) + time.perf_counter() - t0

    def _commit(self, nodes: torch.Tensor, layers: torch.Tensor, features: torch.Tensor | None) -> None:
        n = len(nodes)
        self.store.commit(self.st, n, features, None if features is None else layers)
        self.row_to_node[self.st : self.st + n] = nodes.to(self.s.device)
        self.st += n

    def write(self, nodes: torch.Tensor, layers: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
              *, retain: bool = True, features: torch.Tensor | None = None) -> None:  # fmt: skip
        n = len(nodes)
        block = self.store.target(self.st, self.s.rows.block_rows(n))[:, : self.s.logit_offset]
        self._compute(block, layers, positions, values, retain)
        self._commit(nodes, layers, features)


def _shares(run: _Run, store: RowStore, items: torch.Tensor) -> list[tuple[int | None, torch.Tensor]]:
    """Who computes which of a phase's ``items`` (in position order): (owner, items) pairs, the
    owner None where the phase's batches are dealt round-robin (or there are no ranks)."""
    if run.ranks is None or not isinstance(store, _distributed.ShardedDenseRows):
        return [(None, items)]
    # Rows go to the rank that computes them, in any order: each rank takes every R-th item, so
    # every share covers the same position prefixes (the linear engine's cost grows with them)
    # and the ranks finish together.
    return [(r, items[r :: run.ranks.size]) for r in range(run.ranks.size)]


def _logit_rows(run: _Run, s: _Setup, writer: _RowWriter, batch_size: int) -> None:
    t = time.perf_counter()
    batches = []
    for owner, share in _shares(run, writer.store, torch.arange(s.n_logits)):
        for i in range(0, len(share), batch_size):
            idx = share[i : i + batch_size]
            n = len(idx)
            batches.append(dict(nodes=idx + s.logit_offset, layers=torch.full((n,), s.n_layers),
                                positions=torch.full((n,), s.n_pos - 1), values=s.targets.logit_vectors[idx]))  # fmt: skip
            if owner is not None:
                batches[-1]["owner"] = owner
    writer.phase(batches)
    run.timings["logits"] = time.perf_counter() - t


def _by_position(features: torch.Tensor, positions: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
    """``features`` reordered so that batches cover short position prefixes (the linear engine
    truncates a batch to its largest position); with ``layers``, by descending layer first."""
    order = torch.argsort(positions[features], stable=True)
    features = features[order]
    if layers is not None:
        features = features[torch.argsort(layers[features], descending=True, stable=True)]
    return features


def _feature_rows(run: _Run, s: _Setup, writer: _RowWriter, store: RowStore, *, batch_size: int,
                  update_interval: int, verbose: bool, stream_influence: bool) -> torch.Tensor:  # fmt: skip
    """Attribute the feature rows; returns the visited mask over the active features."""
    from tqdm import tqdm

    t = time.perf_counter()
    feat_layers, feat_pos, _ = (x.cpu() for x in s.ctx.activation_matrix.indices())
    logit_p = s.targets.logit_probabilities.to(device=s.device, dtype=torch.float32)
    visited = torch.zeros(s.total_active, dtype=torch.bool)
    n_visited = 0
    n_updates = 0
    pbar = tqdm(total=s.n_features, desc="Feature influence computation", disable=not verbose)
    while n_visited < s.n_features:
        if s.n_features == s.total_active:
            # Every feature is a row. Streaming the exact node influence (top-k storage) needs the
            # rows by descending layer; the order is otherwise free.
            pending = _by_position(torch.arange(s.total_active), feat_pos, feat_layers if stream_influence else None)
        else:
            influences = store.partial_influences(writer.st, logit_p, writer.row_to_node[: writer.st],
                                                  deterministic=run.deterministic)  # fmt: skip
            n_updates += 1
            run.influence_rows.append(writer.st)
            rank = torch.argsort(influences[: s.total_active], descending=True).cpu()
            queue_size = min(update_interval * batch_size, s.n_features - n_visited)
            # Which features are queued is circuit-tracer's choice; their order within the queue
            # cannot change the graph (no update happens inside it), so take them by position.
            pending = _by_position(rank[~visited[rank]][:queue_size], feat_pos)
        store.select(pending)
        batches = []
        # The queue is circuit-tracer's (update_interval batches); how it is cut into engine runs is not.
        step = s.rows.rows_per_write(batch_size, 4 * s.total_nodes)
        shares = _shares(run, store, pending)
        if run.ranks is not None and shares[0][0] is None:  # batches dealt round-robin: one for every rank
            step = max(batch_size, min(step, -(-len(pending) // run.ranks.size)))
        for owner, share in shares:
            for a, b in s.rows.cut_runs(feat_pos[share], batch_size, step):
                idx = share[a:b]
                # Upper layers first inside a batch: the linear engine then sweeps each row from its own layer.
                idx = idx[torch.argsort(feat_layers[idx], descending=True, stable=True)]
                n_visited += len(idx)
                batches.append(dict(nodes=idx, layers=feat_layers[idx], positions=feat_pos[idx],
                                    values=s.ctx.encoder_vecs[idx], retain=n_visited < s.n_features, features=idx))  # fmt: skip
                if owner is not None:
                    batches[-1]["owner"] = owner
        writer.phase(batches)
        visited[pending] = True
        pbar.update(len(pending))
    pbar.close()
    run.timings["features"] = time.perf_counter() - t
    run.timings["influence_updates"] = n_updates
    return visited


def _final_columns(s: _Setup, visited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selected features, and the edge-row columns the graph keeps (None: all of them)."""
    selected = torch.where(visited)[0]
    if s.n_features == s.total_active:
        return selected, None
    return selected, torch.cat([selected, torch.arange(s.total_active, s.total_nodes)]).to(s.device)


def _final_rows(s: _Setup, writer: _RowWriter) -> torch.Tensor:
    """The row of the square adjacency that each written row becomes: rows sorted by node are
    [features ascending, logits], and in the square matrix the logits go last."""
    order = torch.argsort(writer.row_to_node[: writer.st])
    n_final = s.n_features + (s.total_nodes - s.total_active)
    dest = torch.cat([torch.arange(s.n_features), torch.arange(n_final - s.n_logits, n_final)]).to(order.device)
    final = torch.empty_like(order)
    final[order] = dest
    return final


def _assemble(run: _Run, s: _Setup, writer: _RowWriter, store: RowStore, visited: torch.Tensor,
              keep_on_device: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The square adjacency in circuit-tracer's order: selected features, errors, tokens, logits."""
    t = time.perf_counter()
    selected, columns = _final_columns(s, visited)
    final = _final_rows(s, writer)
    n_final = s.n_features + (s.total_nodes - s.total_active)
    out_device = s.device if keep_on_device else torch.device("cpu")
    adjacency = torch.zeros(n_final, n_final, device=out_device)
    row_abs_sum = torch.zeros(n_final, device=out_device)
    row_block = max(1, _BLOCK_BYTES // (4 * n_final))
    for r0 in range(0, writer.st, row_block):
        r1 = min(writer.st, r0 + row_block)
        block, sums = store.rows(r0, r1, columns)
        where = final[r0:r1].to(out_device)
        adjacency[where] = block.to(out_device)
        if sums is not None:
            row_abs_sum[where] = sums.to(out_device)
    run.timings["assemble"] = time.perf_counter() - t
    return selected, adjacency, row_abs_sum


@dataclass
class _Rows:
    """What the row phases produce: the square adjacency and what top-k storage records."""

    selected: torch.Tensor
    adjacency: torch.Tensor
    row_abs_sum: torch.Tensor
    node_influence: torch.Tensor | None


def _all_rows(run: _Run, s: _Setup, *, batch_size: int, update_interval: int, verbose: bool, edge_storage: str,
              topk: int | None, keep_on_device: bool) -> _Rows | None:  # fmt: skip
    """Phases 2-4: the logit rows, the feature rows and the assembled adjacency (None on a rank
    that gather="rank0" leaves without the graph)."""
    n_rows = s.n_features + s.n_logits
    # Room for the largest write: the feature loop's (the logit rows come in batch_size).
    spare = s.rows.block_rows(max(batch_size, s.rows.rows_per_write(batch_size, 4 * s.total_nodes)))
    if run.ranks is not None and edge_storage == "dense" and not run.deterministic:
        store: RowStore = _distributed.ShardedDenseRows(n_rows, s.total_nodes, spare, s.device, run.ranks)
    elif edge_storage == "dense":
        store = DenseRows(n_rows, s.total_nodes, spare, s.device)
    else:
        store = TopKRows(n_rows, s.total_nodes, s.n_logits, s.total_active, spare, topk or DEFAULT_TOPK, s.device)
    stream_influence = edge_storage == "topk" and s.n_features == s.total_active
    if stream_influence:
        store.stream_influence(s.targets.logit_probabilities.to(device=s.device, dtype=torch.float32))
    writer = _RowWriter(run, s, store)
    _logit_rows(run, s, writer, batch_size)
    visited = _feature_rows(run, s, writer, store, batch_size=batch_size, update_interval=update_interval,
                            verbose=verbose, stream_influence=stream_influence)  # fmt: skip
    if isinstance(store, _distributed.ShardedDenseRows):
        t = time.perf_counter()
        selected, columns = _final_columns(s, visited)
        if run.gather == "shards":  # each rank's rows to its own file; the graph file holds the rest
            final = _final_rows(s, writer)

            def write() -> None:
                idx, rows = store.own_rows(writer.st, columns)
                n_final = s.n_features + s.total_nodes - s.total_active
                _distributed.write_rows(run.shard_dir, run.ranks, rows, final[idx.to(final.device)], n_final)

            run.ranks.agree(write)
            run.timings["gather"] = time.perf_counter() - t
            return _Rows(selected, torch.empty(0, 0), torch.empty(0), None)
        has_graph = run.ranks.agree(lambda: store.gather_rows(writer.st, run.gather, columns))
        run.timings["gather"] = time.perf_counter() - t
        if not has_graph:
            return None
    selected, adjacency, row_abs_sum = _assemble(run, s, writer, store, visited, keep_on_device)
    node_influence = store.influence.float().to(adjacency.device) if stream_influence else None
    return _Rows(selected, adjacency, row_abs_sum, node_influence)


def _graph(model: Any, s: _Setup, rows: _Rows) -> Any:
    """circuit-tracer's Graph of the run."""
    from circuit_tracer.graph import Graph

    return Graph(**ct.graph_kwargs(
        Graph, ct.model_scan(model),
        input_string=model.tokenizer.decode(s.input_ids),
        input_tokens=s.input_ids,
        logit_targets=s.targets.logit_targets,
        logit_probabilities=s.targets.logit_probabilities,
        vocab_size=s.targets.vocab_size,
        active_features=s.ctx.activation_matrix.indices().T,
        activation_values=s.ctx.activation_matrix.values(),
        selected_features=rows.selected,
        adjacency_matrix=rows.adjacency.detach(),
        cfg=ct.graph_cfg(model),
    ))  # fmt: skip


# ------------------------------------------------------------------------------------- driver


def attribute(
    prompt: str | torch.Tensor | list[int],
    model: Any,
    *,
    attribution_targets: Sequence[str] | Sequence[Any] | torch.Tensor | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 512,
    max_feature_nodes: int | None = None,
    offload: Literal["cpu", "disk", None] = None,
    verbose: bool = False,
    update_interval: int = 4,
    edge_storage: Literal["dense", "topk"] = "dense",
    topk: int | None = None,
    keep_on_device: bool = False,
    engine: Literal["auto", "linear", "autograd"] = "auto",
    deterministic: bool | None = None,
    process_group: Any = None,
    gather: Literal["all", "rank0", "shards"] = "all",
    shard_dir: str | os.PathLike | None = None,
):
    """Compute an attribution graph for ``prompt``: circuit-tracer's ``attribute``, fast.

    Takes circuit-tracer's arguments and returns its ``Graph``. Extra keyword arguments:
        edge_storage: "dense" keeps every edge row on the device (circuit-tracer's graph);
            "topk" keeps only the ``topk`` strongest incoming edges of each row by |weight| plus
            each row's exact |weight| sum, for bounded memory on long prompts. The returned
            adjacency then holds only those edges, and ``graph.row_abs_sum`` the exact sums.
        topk: edges kept per row with edge_storage="topk" (default ``DEFAULT_TOPK``).
        keep_on_device: leave the adjacency on the model's device instead of moving it to the CPU.
        engine: "linear" (one batch-1 forward, explicit transposed maps; no copies of the model),
            "autograd" (circuit-tracer's forward over ``batch_size`` copies and backward passes),
            or "auto": linear wherever it expresses the model, otherwise autograd, with the
            reason logged once. A forced "linear" that cannot express the model is a ValueError.
        deterministic: fixed-order reductions in every fastattr op with float atomics (the
            contraction's repeated rows, the influence matvec), so that two calls with the same
            inputs and batch size give bitwise-identical graphs. None follows
            ``torch.use_deterministic_algorithms``. torch's own kernels (the autograd engine's
            backward passes) follow torch's switch only.
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``)
            whose ranks all call attribute() with the same arguments and the same model: the
            batches of each phase are split over them and the graph is the one-process graph.
            None: this process alone. See docs/distributed.md.
        gather: with a process group, "all" returns the graph on every rank, "rank0" on rank 0
            only (the others return None), "shards" writes it to ``shard_dir`` without gathering
            the rows anywhere (each rank its own rows; every rank returns None):
            :func:`fastattr.load_graph_shards` reads it back as one ``Graph``.
        shard_dir: the directory of gather="shards" (created; an earlier run's files in it are
            removed).
    """
    group = _distributed.check_group(process_group, gather, shard_dir)
    ranks = None if group is None else _distributed.Ranks(group)
    try:
        checks = lambda: (_validate(prompt, batch_size, max_feature_nodes, update_interval, edge_storage, topk,  # noqa: E731
                                    max_n_logits, engine), ct.require_api(model))  # fmt: skip
        checks() if ranks is None else ranks.agree(checks)
        run = _Run(model, verbose, deterministic=_backends.deterministic(deterministic),
                   profile=verbose or os.environ.get("FASTATTR_PROFILE") == "1", ranks=ranks, gather=gather,
                   shard_dir=shard_dir)  # fmt: skip
        start = time.perf_counter()
        try:
            chosen = _choose_engine(model, engine)
            if ranks is not None:
                how = ("rows broadcast after each phase" if edge_storage == "topk" or run.deterministic
                       else "rows kept on their rank, partial influences split by rows")  # fmt: skip
                logger.info("fastattr.attribute: %r, %s engine, batches of each phase dealt round-robin, %s",
                            ranks, chosen, how)  # fmt: skip
                if gather == "shards":  # a clean directory before any rank writes into it
                    ranks.agree(lambda: _distributed.clear_shards(shard_dir) if ranks.rank == 0 else None)
            # Only circuit-tracer's backward passes go through its contexts' (patched) hooks.
            with context_hooks.contraction_patch() if chosen == "autograd" else contextlib.nullcontext():
                setup = lambda: _setup(run, prompt, chosen=chosen, batch_size=batch_size, offload=offload,  # noqa: E731
                                       attribution_targets=attribution_targets, max_n_logits=max_n_logits,
                                       desired_logit_prob=desired_logit_prob, max_feature_nodes=max_feature_nodes)  # fmt: skip
                s = setup() if ranks is None else ranks.agree(setup)
                rows = _all_rows(run, s, batch_size=batch_size, update_interval=update_interval, verbose=verbose,
                                 edge_storage=edge_storage, topk=topk, keep_on_device=keep_on_device)  # fmt: skip
            graph = None if rows is None else _graph(model, s, rows)
            if graph is not None and edge_storage == "topk":
                # Pruning a top-k graph needs its exact row sums; recorded so that they also survive
                # circuit-tracer's Graph.to_pt / from_pt.
                pruning.record_topk(graph, rows.row_abs_sum, rows.node_influence)
        finally:
            for reload in run.offload_handles:
                reload()
        _report(run, s, time.perf_counter() - start, edge_storage)
        if ranks is not None:
            _LAST_RUN.update(ranks=ranks.size, bytes_sent=ranks.bytes_sent, bytes_by_phase=dict(ranks.bytes_by_phase),
                             rows_owned=ranks.rows_owned)  # fmt: skip
            if gather == "shards":
                # Written last, once every rank's rows are (the rows phase ended in a collective).
                ranks.agree(lambda: _distributed.write_graph(shard_dir, graph) if ranks.rank == 0 else None)
                logger.info("fastattr.attribute: graph written to %s (fastattr.load_graph_shards reads it)", shard_dir)
                graph = None
            if gather == "rank0" and ranks.rank != 0:
                graph = None
            ranks.settle()
        return graph
    except BaseException:
        if ranks is not None and ranks.failed_together:  # every rank is raising: end together
            ranks.settle()
        raise


def _report(run: _Run, s: _Setup, total: float, edge_storage: str) -> None:
    timings = dict(run.timings)
    n_updates = int(timings.pop("influence_updates", 0))
    engine_time = timings.pop("engine", None)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    loop = timings.get("logits", 0.0) + timings.get("features", 0.0)
    outside = None if engine_time is None or loop <= 0 else (loop - engine_time) / loop
    peak_bytes = torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else None
    _LAST_RUN.clear()
    _LAST_RUN.update(timings, total=total, engine=s.rows.name, engine_time=engine_time, loop_outside_engine=outside,
                     influence_updates=n_updates, peak_device_bytes=peak_bytes, edge_storage=edge_storage,
                     deterministic=run.deterministic, reader=s.rows.source.get("reader"),
                     architecture=s.rows.source.get("architecture"))  # fmt: skip
    # What the run did, for the benchmarks' floor model (benchmarks/floor.py).
    n_final = s.n_features + s.total_nodes - s.total_active
    work = dict(n_pos=s.n_pos, total_nodes=s.total_nodes, n_rows=s.n_features + s.n_logits,
                n_final=n_final, influence_rows=list(run.influence_rows))  # fmt: skip
    if s.rows.name == "linear":
        work.update(steps=list(s.rows.engine.steps), **s.rows.engine.shapes())
    _LAST_RUN["work"] = work
    detail = "" if outside is None else f"; engine {engine_time:.2f}s, {100 * outside:.1f}% of the loop outside it"
    peak = "" if peak_bytes is None else f", peak device memory {peak_bytes / 2**20:.0f} MiB"
    level = logging.INFO if run.verbose else logging.DEBUG
    logger.log(level, "fastattr.attribute: %.2fs with the %s engine (%s%s; %d influence updates)%s",
               total, s.rows.name, phases, detail, n_updates, peak)  # fmt: skip


# Timings of the last call (seconds per phase, the engine used, and with profiling the engine's
# own time and the loop's share outside it), for the benchmarks; the same numbers are logged.
_LAST_RUN: dict[str, Any] = {}
