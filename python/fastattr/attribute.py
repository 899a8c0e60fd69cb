"""``fastattr.attribute``: circuit-tracer's attribution loop with the edge rows kept on the device.

circuit-tracer's loop copies every batch of edge rows to a dense CPU matrix and copies the whole
matrix back to the GPU at every partial-influence update. Here the contraction writes each batch
straight into a preallocated edge buffer on the model's device (the attribution context's hooks
are pointed at a strided view of the buffer's rows), partial influences run on that buffer in
place, and the final adjacency is assembled once, row block by row block, on the CPU (or kept on
the device with ``keep_on_device=True``).

It uses the model's own attribution API (``setup_attribution``, the forward pass with the
context's hooks) and circuit-tracer's target selection, so node order and meaning are
circuit-tracer's, on 0.5.0's unified model interface and on upstream's split layout alike.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from fastattr import influence as _influence

logger = logging.getLogger("fastattr")

# Bytes of final-adjacency rows assembled and moved to the CPU per copy: bounds the transient.
_BLOCK_BYTES = 64 << 20
# Incoming edges kept per row by edge_storage="topk" unless topk= says otherwise (see docs/attribute.md).
DEFAULT_TOPK = 1024


def _validate(prompt: Any, batch_size: int, max_feature_nodes: int | None, update_interval: int, edge_storage: str, topk: int | None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int) or max_feature_nodes <= 0):
        raise ValueError(f"max_feature_nodes: expected a positive integer or None, got {max_feature_nodes!r}")
    if not isinstance(update_interval, int) or update_interval <= 0:
        raise ValueError(f"update_interval: expected a positive integer, got {update_interval!r}")
    if edge_storage not in ("dense", "topk"):
        raise ValueError(f"edge_storage: expected 'dense' or 'topk', got {edge_storage!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0):
        raise ValueError(f"topk: expected a positive integer or None, got {topk!r}")
    empty = (isinstance(prompt, str) and not prompt.strip()) or (
        not isinstance(prompt, str) and len(prompt) == 0 if not isinstance(prompt, torch.Tensor) else prompt.numel() == 0
    )
    if empty:
        raise ValueError("prompt: expected at least one token, got an empty prompt")


def _check_fits(n_rows: int, n_cols: int, batch: int, device: torch.device) -> None:
    need = (n_rows + batch) * n_cols * 4
    free = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    elif hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    if free is not None and need > free:
        # top-k: fp32 value + int64 column per kept edge, the dense scratch block and logit rows.
        topk_need = n_rows * DEFAULT_TOPK * 12 + (batch + 64) * n_cols * 4
        raise MemoryError(
            f"edge_storage='dense' needs {need / 2**30:.2f} GiB on {device} for a {n_rows + batch} x {n_cols} fp32 "
            f"edge buffer, but only {free / 2**30:.2f} GiB is free; use edge_storage='topk' (about "
            f"{topk_need / 2**30:.2f} GiB at k={DEFAULT_TOPK}) or lower max_feature_nodes"
        )


class _DenseRows:
    """Every edge row, dense, on the device: exactly circuit-tracer's edge matrix."""

    def __init__(self, n_rows: int, n_cols: int, batch: int, device: torch.device):
        _check_fits(n_rows, n_cols, batch, device)
        # Spare rows at the end absorb the last, partial batch (every backward pass fills `batch` rows).
        self.edges = torch.zeros(n_rows + batch, n_cols, device=device)
        self.batch = batch

    def target(self, st: int, n_written: int) -> torch.Tensor:
        block = self.edges[st : st + self.batch]
        block.zero_()
        return block

    def commit(self, st: int, n: int, nodes: torch.Tensor | None = None, layers: torch.Tensor | None = None) -> None:
        pass

    def select(self, features: torch.Tensor) -> None:
        pass

    def partial_influences(self, st: int, logit_p: torch.Tensor, row_to_node: torch.Tensor) -> torch.Tensor:
        return _influence.compute_partial_influences(self.edges[:st], logit_p, row_to_node)

    def rows(self, index: torch.Tensor, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if columns is None:
            return self.edges[index], None
        return self.edges[index[:, None], columns[None, :]], None  # no full-width intermediate


class _TopKRows:
    """Feature rows as their k strongest incoming edges by |weight| plus exact |weight| sums; logit rows dense.

    A batch is contracted into one dense scratch block (batch x nodes), then reduced; memory is
    O(rows * k + (batch + logits) * nodes) instead of O(rows * nodes). The logit rows stay dense
    (there are at most a few dozen) because every influence starts there: the first hop, which
    ranks features during attribution and seeds pruning, is then exact.

    Two sums per feature row, for the two normalisations circuit-tracer applies to the same row:
    - ``abs_sum`` over every column: the partial influences during attribution see the whole row;
    - ``final_sum`` over the columns the final graph keeps (errors, tokens, selected features).
      The selected set grows while rows are written, so at commit the sum covers the columns
      selected so far (exact), and at assembly the kept entries of columns selected later are
      added. What is missing are dropped entries (each no stronger than the row's k-th) in columns
      selected after the row was written; with every feature selected, none.

    Partial influences, which rank features while ``max_feature_nodes`` limits them, propagate the
    stored entries exactly and add, as a source, the influence the dropped entries carried: each
    row's dropped |weights| (normalised) times its node's partial influence at the last update
    before the row was written, summed per column when the row is written. The weight is stale
    (later updates raise it), so this under-counts, but without it features reached mostly through
    many weak edges are ranked too low.
    """

    _NEVER = torch.iinfo(torch.int64).max

    def __init__(self, n_rows: int, n_cols: int, n_logits: int, n_active: int, batch: int, k: int, device: torch.device):
        self.k = min(k, n_cols)
        self.n_cols, self.n_logits = n_cols, n_logits
        n_feat_rows = n_rows - n_logits
        self.logit_rows = torch.zeros(n_logits, n_cols, device=device)
        self.values = torch.zeros(n_feat_rows, self.k, device=device)
        self.cols = torch.zeros(n_feat_rows, self.k, dtype=torch.int64, device=device)
        self.abs_sum = torch.zeros(n_feat_rows, device=device)
        self.final_sum = torch.zeros(n_feat_rows, device=device)
        self.row_epoch = torch.zeros(n_feat_rows, dtype=torch.int64, device=device)
        # Selection epoch of each column: errors, tokens and logits are always in the graph (-1),
        # features when they are queued, never for the rest.
        self.col_epoch = torch.full((n_cols,), self._NEVER, dtype=torch.int64, device=device)
        self.col_epoch[n_active:] = -1
        self.epoch = 0
        self.scratch = torch.zeros(batch, n_cols, device=device)
        self.influence: torch.Tensor | None = None
        self._logit_p: torch.Tensor | None = None
        # Influence that the dropped entries carried, estimated when their row was written (see
        # partial_influences), and the partial influences of the last update, which weight it.
        self.dropped_flow = torch.zeros(n_cols, device=device)
        self._last_partial: torch.Tensor | None = None

    def stream_influence(self, logit_p: torch.Tensor) -> None:
        """Accumulate the exact node influence while rows are written (see ``_stream``)."""
        self.influence = torch.zeros(self.n_cols, dtype=torch.float64, device=self.scratch.device)
        self._logit_p = logit_p.to(self.scratch.device, torch.float64)

    def _stream(self, magnitude: torch.Tensor, rows_influence: Callable[[], torch.Tensor]) -> None:
        # circuit-tracer's node influence is sum_k w^T Ahat^k with Ahat the row-normalised |A|. Its
        # graph is a DAG (a feature only reads earlier layers), so when rows arrive logits first and
        # then features by descending layer, a row's node has received all its influence by the
        # time the row is written: add influence * Ahat_row to every column, and the totals are
        # exact when the last row is in, from the full dense rows, whatever k keeps.
        norm = magnitude / magnitude.sum(1, keepdim=True).clamp(min=1e-8)
        self.influence += rows_influence() @ norm.to(torch.float64)

    def target(self, st: int, n_written: int) -> torch.Tensor:
        self.scratch.zero_()
        return self.scratch

    def select(self, features: torch.Tensor) -> None:
        self.epoch += 1
        self.col_epoch[features.to(self.col_epoch.device)] = self.epoch

    def commit(self, st: int, n: int, nodes: torch.Tensor | None = None, layers: torch.Tensor | None = None) -> None:
        dense = self.scratch[:n]
        if st < self.n_logits:  # logit batches never mix with feature rows
            self.logit_rows[st : st + n] = dense
            if self.influence is not None:
                self._stream(dense.abs(), lambda: self._logit_p[st : st + n])
            return
        r = slice(st - self.n_logits, st - self.n_logits + n)
        magnitude = dense.abs()
        if self.influence is not None:
            # A batch can straddle layers: let its upper layer's rows reach the lower one first.
            nodes, layers = nodes.to(dense.device), layers.to(dense.device)
            for layer in torch.unique(layers).flip(0).tolist():
                g = torch.nonzero(layers == layer).flatten()
                self._stream(magnitude[g], lambda: self.influence[nodes[g]])
        self.abs_sum[r] = magnitude.sum(1)
        self.final_sum[r] = magnitude @ (self.col_epoch <= self.epoch).to(magnitude.dtype)
        self.row_epoch[r] = self.epoch
        top = torch.topk(magnitude, self.k, dim=1, sorted=False)
        self.cols[r] = top.indices
        self.values[r] = dense.gather(1, top.indices)
        if self._last_partial is not None and self.k < self.n_cols:
            dropped = magnitude.scatter_(1, top.indices, 0.0)  # magnitude is not used after this
            weight = self._last_partial[nodes.to(dense.device)] / self.abs_sum[r].clamp(min=1e-8)
            self.dropped_flow += weight @ dropped

    def partial_influences(self, st: int, logit_p: torch.Tensor, row_to_node: torch.Tensor, max_iter: int = 128) -> torch.Tensor:
        # circuit-tracer's compute_partial_influences (rows normalised by their full |weight| sums,
        # clamp 1e-8, logits seeded in the last columns), on dense logit rows + stored feature entries.
        nf = st - self.n_logits
        logit_w = self.logit_rows.abs()
        logit_w /= logit_w.sum(1, keepdim=True).clamp(min=1e-8)
        weights = self.values[:nf].abs() / self.abs_sum[:nf].clamp(min=1e-8)[:, None]
        cols = self.cols[:nf].reshape(-1)
        feat_nodes = row_to_node[self.n_logits : st]
        logit_nodes = row_to_node[: self.n_logits]
        prod = torch.zeros(self.n_cols, device=weights.device)
        prod[-len(logit_p) :] = logit_p
        total = torch.zeros_like(prod)
        for step in range(max_iter):
            nxt = prod[logit_nodes] @ logit_w
            nxt.index_add_(0, cols, (prod[feat_nodes][:, None] * weights).reshape(-1))
            if step == 0:
                # What the dropped entries carried (each row's influence when it was written times its
                # dropped |weights|) enters as a source and flows on through the stored entries.
                nxt += self.dropped_flow
            prod = nxt
            if not prod.any():
                break
            total += prod
        else:
            raise RuntimeError("Failed to converge")
        self._last_partial = total
        return total

    def rows(self, index: torch.Tensor, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` restricted to ``columns``, dense, and their |weight| sums over those columns."""
        dev = self.values.device
        width = self.n_cols if columns is None else len(columns)
        if columns is None:
            col_map = None
        else:  # stored column -> final column, -1 where the feature was not selected
            col_map = torch.full((self.n_cols,), -1, dtype=torch.int64, device=dev)
            col_map[columns] = torch.arange(width, device=dev)
        is_logit = index < self.n_logits
        block = torch.zeros(len(index), width, device=dev)
        sums = torch.zeros(len(index), device=dev)
        if bool(is_logit.any()):
            logit_rows = self.logit_rows[index[is_logit]]
            block[is_logit] = logit_rows if columns is None else logit_rows[:, columns]
            sums[is_logit] = block[is_logit].abs().sum(1)
        f = index[~is_logit] - self.n_logits
        if len(f):
            cols, vals = self.cols[f], self.values[f]
            later = (self.col_epoch[cols] > self.row_epoch[f][:, None]) & (self.col_epoch[cols] != self._NEVER)
            sums[~is_logit] = self.final_sum[f] + torch.where(later, vals.abs(), 0.0).sum(1)
            if col_map is not None:
                cols = col_map[cols]
                vals = torch.where(cols >= 0, vals, 0.0)
                cols = cols.clamp(min=0)  # dropped columns add 0.0 at column 0
            block[~is_logit] = torch.zeros(len(f), width, device=dev).scatter_add_(1, cols, vals)
        return block, sums


def _model_device(ctx: Any) -> torch.device:
    return ctx.decoder_vecs.device


# circuit-tracer 0.5.0 (PyPI) gives both backends one attribution interface (run_forward_pass,
# unembed_proj, model_config, get_offload_targets_phase*); upstream's split layout has each
# backend's attribute() spell these out inline. The helpers below use the interface when the model
# has it and otherwise do what upstream's attribute_transformerlens.py / attribute_nnsight.py do.


def _is_nnsight(model: Any) -> bool:
    return getattr(model, "backend", None) == "nnsight"


def _run_forward(model: Any, input_ids: torch.Tensor, batch_size: int, ctx: Any) -> None:
    if hasattr(model, "run_forward_pass"):
        model.run_forward_pass(input_ids, batch_size, ctx)
    elif _is_nnsight(model):
        with model.trace() as tracer:
            with tracer.invoke(input_ids.expand(batch_size, -1)):
                pass
            barrier = tracer.barrier(2)
            model.configure_gradient_flow(tracer)
            model.configure_skip_connection(tracer, barrier=barrier)
            ctx.cache_residual(model, tracer, barrier=barrier)
    else:
        with ctx.install_hooks(model):
            residual = model.forward(input_ids.expand(batch_size, -1), stop_at_layer=model.cfg.n_layers)
            ctx._resid_activations[-1] = model.ln_final(residual)


def _unembed(model: Any) -> torch.Tensor:
    if hasattr(model, "unembed_proj"):
        return model.unembed_proj
    return model.unembed_weight if _is_nnsight(model) else model.unembed.W_U


def _graph_cfg(model: Any) -> Any:
    if hasattr(model, "model_config"):
        return model.model_config
    # Upstream's nnsight attribute passes the HF config; a model built from a config may hold it elsewhere.
    if _is_nnsight(model) and getattr(model, "config", None) is not None:
        return model.config
    return model.cfg


def _transcoder_list(model: Any) -> list:
    tc = model.transcoders
    return list(tc) if hasattr(tc, "__iter__") else [tc]


def _offload_targets(model: Any, phase: int) -> list:
    method = getattr(model, f"get_offload_targets_phase{phase}", None)
    if method is not None:
        return method()
    if not _is_nnsight(model):
        return [_transcoder_list(model), [block.mlp for block in model.blocks], [model.unembed, model.embed]][phase]
    skip = bool(getattr(model, "skip_transcoder", False))
    if phase == 0:
        return [] if skip else _transcoder_list(model)
    if phase == 1:
        return [layer.mlp for layer in model.pre_logit_location.layers] + (_transcoder_list(model) if skip else [])
    tied = model.embed_weight.untyped_storage().data_ptr() == model.unembed_weight.untyped_storage().data_ptr()
    return [model.embed_location] + ([] if tied else [model.lm_head])


def _require_api(model: Any) -> None:
    missing = [name for name in ("ensure_tokenized", "setup_attribution", "tokenizer", "scan") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"model: expected a circuit-tracer ReplacementModel (TransformerLens or nnsight backend, with "
            f"{', '.join(missing)}), got {type(model).__name__}"
        )


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
):
    """Compute an attribution graph for ``prompt``: circuit-tracer's ``attribute`` with device-resident rows.

    Takes circuit-tracer's arguments and returns its ``Graph``. Extra keyword arguments:
        edge_storage: "dense" keeps every edge row on the device (circuit-tracer's graph);
            "topk" keeps only the ``topk`` strongest incoming edges of each row by |weight| plus
            each row's exact |weight| sum, for bounded memory on long prompts. The returned
            adjacency then holds only those edges, and ``graph.row_abs_sum`` the exact sums.
        topk: edges kept per row with edge_storage="topk" (default ``DEFAULT_TOPK``).
        keep_on_device: leave the adjacency on the model's device instead of moving it to the CPU.
    """
    from circuit_tracer.attribution.targets import AttributionTargets, log_attribution_target_info
    from circuit_tracer.graph import Graph
    from circuit_tracer.utils.disk_offload import offload_modules
    from tqdm import tqdm

    from fastattr.patch import contraction_patch

    _validate(prompt, batch_size, max_feature_nodes, update_interval, edge_storage, topk)
    _require_api(model)
    timings: dict[str, float] = {}
    offload_handles: list = []
    start = time.perf_counter()
    try:
        with contraction_patch():
            t = time.perf_counter()
            input_ids = model.ensure_tokenized(prompt)
            ctx = model.setup_attribution(input_ids)
            activation_matrix = ctx.activation_matrix
            device = _model_device(ctx)
            if offload:
                offload_handles += offload_modules(_offload_targets(model, 0), offload)
            timings["precompute"] = time.perf_counter() - t

            t = time.perf_counter()
            _run_forward(model, input_ids, batch_size, ctx)
            if offload:
                offload_handles += offload_modules(_offload_targets(model, 1), offload)
            timings["forward"] = time.perf_counter() - t

            feat_layers, feat_pos, _ = activation_matrix.indices()
            n_layers, n_pos, _ = activation_matrix.shape
            total_active = activation_matrix._nnz()
            targets = AttributionTargets(
                attribution_targets=attribution_targets,
                logits=ctx.logits[0, -1],
                unembed_proj=_unembed(model),
                tokenizer=model.tokenizer,
                max_n_logits=max_n_logits,
                desired_logit_prob=desired_logit_prob,
            )
            log_attribution_target_info(targets, attribution_targets, logger)
            if offload:
                offload_handles += offload_modules(_offload_targets(model, 2), offload)

            logit_offset = total_active + (n_layers + 1) * n_pos
            n_logits = len(targets)
            total_nodes = logit_offset + n_logits
            n_features = min(max_feature_nodes or total_active, total_active)
            n_rows = n_features + n_logits
            logger.info("fastattr.attribute: %d active features, %d of them as nodes, %d logits", total_active, n_features, n_logits)

            forward_batch = ctx._resid_activations[0].shape[0]
            if edge_storage == "dense":
                store = _DenseRows(n_rows, total_nodes, forward_batch, device)
            else:
                store = _TopKRows(n_rows, total_nodes, n_logits, total_active, forward_batch, topk or DEFAULT_TOPK, device)
            row_to_node_index = torch.zeros(n_rows, dtype=torch.int64, device=device)
            logit_p = targets.logit_probabilities.to(device=device, dtype=torch.float32)
            streaming = edge_storage == "topk" and n_features == total_active
            if streaming:
                store.stream_influence(logit_p)
                streaming_order = torch.argsort(feat_layers.cpu(), descending=True, stable=True)

            on_cuda = device.type == "cuda"

            def run_rows(st: int, n: int, nodes: torch.Tensor | None = None, **batch) -> None:
                # The hooks accumulate into a (rows x batch) strided view of this batch's edge rows.
                ctx._fastattr_out = store.target(st, n)[:, :logit_offset].T
                if on_cuda:  # so that the backward time is the backward's alone
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                try:
                    ctx.compute_batch(**batch)
                    if on_cuda:
                        torch.cuda.synchronize(device)
                finally:
                    ctx._fastattr_out = None
                    timings["backward"] = timings.get("backward", 0.0) + time.perf_counter() - t0
                store.commit(st, n, nodes, None if nodes is None else batch["layers"])

            t = time.perf_counter()
            for i in range(0, n_logits, batch_size):
                vecs = targets.logit_vectors[i : i + batch_size]
                run_rows(
                    i,
                    vecs.shape[0],
                    layers=torch.full((vecs.shape[0],), n_layers),
                    positions=torch.full((vecs.shape[0],), n_pos - 1),
                    inject_values=vecs,
                )
                row_to_node_index[i : i + vecs.shape[0]] = torch.arange(i, i + vecs.shape[0], device=device) + logit_offset
            timings["logits"] = time.perf_counter() - t

            t = time.perf_counter()
            st = n_logits
            visited = torch.zeros(total_active, dtype=torch.bool)
            n_visited = 0
            n_updates = 0
            pbar = tqdm(total=n_features, desc="Feature influence computation", disable=not verbose)
            while n_visited < n_features:
                if n_features == total_active:
                    # Every feature is a row; top-k storage takes them by descending layer so that the
                    # exact node influence can be accumulated as they arrive.
                    pending = torch.arange(total_active) if not streaming else streaming_order
                else:
                    influences = store.partial_influences(st, logit_p, row_to_node_index[:st])
                    n_updates += 1
                    feature_rank = torch.argsort(influences[:total_active], descending=True).cpu()
                    queue_size = min(update_interval * batch_size, n_features - n_visited)
                    pending = feature_rank[~visited[feature_rank]][:queue_size]
                store.select(pending)
                for idx_batch in (pending[i : i + batch_size] for i in range(0, len(pending), batch_size)):
                    n_visited += len(idx_batch)
                    run_rows(
                        st,
                        len(idx_batch),
                        idx_batch,
                        layers=feat_layers[idx_batch],
                        positions=feat_pos[idx_batch],
                        inject_values=ctx.encoder_vecs[idx_batch],
                        retain_graph=n_visited < n_features,
                    )
                    row_to_node_index[st : st + len(idx_batch)] = idx_batch.to(device)
                    visited[idx_batch] = True
                    st += len(idx_batch)
                    pbar.update(len(idx_batch))
            pbar.close()
            timings["features"] = time.perf_counter() - t

            t = time.perf_counter()
            selected_features = torch.where(visited)[0]
            if n_features < total_active:
                columns = torch.cat([selected_features, torch.arange(total_active, total_nodes)]).to(device)
            else:
                columns = None
            order = torch.argsort(row_to_node_index)
            n_final = n_features + (total_nodes - total_active)
            out_device = device if keep_on_device else torch.device("cpu")
            adjacency = torch.zeros(n_final, n_final, device=out_device)
            # Sorted rows are [features ascending, logits]; in the square matrix the logits go last.
            dest = torch.cat([torch.arange(n_features), torch.arange(n_final - n_logits, n_final)])
            row_abs_sum = torch.zeros(n_final, device=out_device)
            row_block = max(1, _BLOCK_BYTES // (4 * n_final))
            for r0 in range(0, n_rows, row_block):
                index = order[r0 : r0 + row_block]
                block, sums = store.rows(index, columns)
                where = dest[r0 : r0 + row_block].to(out_device)
                adjacency[where] = block.to(out_device)
                if sums is not None:
                    row_abs_sum[where] = sums.to(out_device)
            if streaming:
                node_influence = store.influence.float().to(out_device)
            del store
            timings["assemble"] = time.perf_counter() - t

        graph = Graph(
            input_string=model.tokenizer.decode(input_ids),
            input_tokens=input_ids,
            logit_targets=targets.logit_targets,
            logit_probabilities=targets.logit_probabilities,
            vocab_size=targets.vocab_size,
            active_features=activation_matrix.indices().T,
            activation_values=activation_matrix.values(),
            selected_features=selected_features,
            adjacency_matrix=adjacency.detach(),
            cfg=_graph_cfg(model),
            scan=model.scan,
        )
        if edge_storage == "topk":
            graph.row_abs_sum = row_abs_sum
            if streaming:
                graph.node_influence = node_influence
    finally:
        for reload in offload_handles:
            reload()

    total = time.perf_counter() - start
    backward = timings.pop("backward", 0.0)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    # The loop's own cost: everything in the logit and feature phases that is not a backward pass
    # (its hooks, i.e. the contraction, included): partial influences, top-k, bookkeeping.
    loop = timings.get("logits", 0.0) + timings.get("features", 0.0)
    outside = (loop - backward) / loop if loop > 0 else 0.0
    peak_bytes = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
    peak = "" if peak_bytes is None else f", peak device memory {peak_bytes / 2**20:.0f} MiB"
    _LAST_RUN.clear()
    _LAST_RUN.update(timings, total=total, backward=backward, loop_outside_backward=outside, influence_updates=n_updates,
                     peak_device_bytes=peak_bytes, edge_storage=edge_storage)  # fmt: skip
    level = logging.INFO if verbose else logging.DEBUG
    logger.log(level, "fastattr.attribute: %.2fs (%s; backward passes %.2fs, %.1f%% of the attribution loop outside "
               "them; %d influence updates)%s", total, phases, backward, 100 * outside, n_updates, peak)  # fmt: skip
    return graph


# Timings of the last call (seconds, the phases above plus "backward" and the loop's share outside
# it), for the benchmarks; the same numbers are logged.
_LAST_RUN: dict[str, Any] = {}
