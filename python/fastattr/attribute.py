"""``fastattr.attribute``: circuit-tracer's attribution loop with the edge rows kept on the device.

circuit-tracer's loop copies every batch of edge rows to a dense CPU matrix and copies the whole
matrix back to the GPU at every partial-influence update. Here the contraction writes each batch
straight into a preallocated edge buffer on the model's device (the attribution context's hooks
are pointed at a strided view of the buffer's rows), partial influences run on that buffer in
place, and the final adjacency is assembled once, row block by row block, on the CPU (or kept on
the device with ``keep_on_device=True``).

It uses the model's own attribution API (``setup_attribution``, ``run_forward_pass``) and
circuit-tracer's target selection, so node order and meaning are circuit-tracer's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch

from fastattr import influence as _influence

logger = logging.getLogger("fastattr")

# Rows of the final adjacency moved to the CPU per copy: bounds the transient to a few MB per row block.
_ROW_BLOCK = 1024


def _validate(prompt: Any, batch_size: int, max_feature_nodes: int | None, update_interval: int, edge_storage: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int) or max_feature_nodes <= 0):
        raise ValueError(f"max_feature_nodes: expected a positive integer or None, got {max_feature_nodes!r}")
    if not isinstance(update_interval, int) or update_interval <= 0:
        raise ValueError(f"update_interval: expected a positive integer, got {update_interval!r}")
    if edge_storage != "dense":
        raise ValueError(f"edge_storage: expected 'dense', got {edge_storage!r}")
    empty = (isinstance(prompt, str) and not prompt.strip()) or (
        not isinstance(prompt, str) and len(prompt) == 0 if not isinstance(prompt, torch.Tensor) else prompt.numel() == 0
    )
    if empty:
        raise ValueError("prompt: expected at least one token, got an empty prompt")


def _check_fits(n_rows: int, n_cols: int, device: torch.device) -> None:
    need = n_rows * n_cols * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise MemoryError(
                f"edge_storage='dense' needs {need / 2**30:.2f} GiB on {device} for a {n_rows} x {n_cols} fp32 edge "
                f"buffer, but only {free / 2**30:.2f} GiB is free; lower max_feature_nodes"
            )


def _model_device(ctx: Any) -> torch.device:
    return ctx.decoder_vecs.device


def _require_api(model: Any) -> None:
    missing = [name for name in ("ensure_tokenized", "setup_attribution", "run_forward_pass") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"model: expected a circuit-tracer 0.5.0 ReplacementModel (with {', '.join(missing)}), got "
            f"{type(model).__name__}; for other circuit-tracer versions use circuit_tracer.attribute under "
            "fastattr.patch_circuit_tracer(attribute=False)"
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
    edge_storage: Literal["dense"] = "dense",
    keep_on_device: bool = False,
):
    """Compute an attribution graph for ``prompt``: circuit-tracer's ``attribute`` with device-resident rows.

    Takes circuit-tracer's arguments and returns its ``Graph``. Extra keyword arguments:
        edge_storage: "dense" keeps every edge row on the device.
        keep_on_device: leave the adjacency on the model's device instead of moving it to the CPU.
    """
    from circuit_tracer.attribution.targets import AttributionTargets, log_attribution_target_info
    from circuit_tracer.graph import Graph
    from circuit_tracer.utils.disk_offload import offload_modules
    from tqdm import tqdm

    from fastattr.patch import contraction_patch

    _validate(prompt, batch_size, max_feature_nodes, update_interval, edge_storage)
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
                offload_handles += offload_modules(model.get_offload_targets_phase0(), offload)
            timings["precompute"] = time.perf_counter() - t

            t = time.perf_counter()
            model.run_forward_pass(input_ids, batch_size, ctx)
            if offload:
                offload_handles += offload_modules(model.get_offload_targets_phase1(), offload)
            timings["forward"] = time.perf_counter() - t

            feat_layers, feat_pos, _ = activation_matrix.indices()
            n_layers, n_pos, _ = activation_matrix.shape
            total_active = activation_matrix._nnz()
            targets = AttributionTargets(
                attribution_targets=attribution_targets,
                logits=ctx.logits[0, -1],
                unembed_proj=model.unembed_proj,
                tokenizer=model.tokenizer,
                max_n_logits=max_n_logits,
                desired_logit_prob=desired_logit_prob,
            )
            log_attribution_target_info(targets, attribution_targets, logger)
            if offload:
                offload_handles += offload_modules(model.get_offload_targets_phase2(), offload)

            logit_offset = total_active + (n_layers + 1) * n_pos
            n_logits = len(targets)
            total_nodes = logit_offset + n_logits
            n_features = min(max_feature_nodes or total_active, total_active)
            n_rows = n_features + n_logits
            logger.info("fastattr.attribute: %d active features, %d of them as nodes, %d logits", total_active, n_features, n_logits)

            # The forward pass ran with `batch_size` copies, so every backward pass fills
            # `batch_size` rows; the spare rows at the end absorb the last, partial batch.
            forward_batch = ctx._resid_activations[0].shape[0]
            _check_fits(n_rows + forward_batch, total_nodes, device)
            edges = torch.zeros(n_rows + forward_batch, total_nodes, device=device)
            row_to_node_index = torch.zeros(n_rows, dtype=torch.int64, device=device)
            logit_p = targets.logit_probabilities.to(device=device, dtype=torch.float32)

            def run_rows(st: int, **batch) -> None:
                edges[st : st + forward_batch].zero_()
                ctx._fastattr_out = edges[st : st + forward_batch, :logit_offset].T
                try:
                    ctx.compute_batch(**batch)
                finally:
                    ctx._fastattr_out = None

            t = time.perf_counter()
            for i in range(0, n_logits, batch_size):
                vecs = targets.logit_vectors[i : i + batch_size]
                run_rows(
                    i,
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
                    pending = torch.arange(total_active)
                else:
                    influences = _influence.compute_partial_influences(edges[:st], logit_p, row_to_node_index[:st])
                    n_updates += 1
                    feature_rank = torch.argsort(influences[:total_active], descending=True).cpu()
                    queue_size = min(update_interval * batch_size, n_features - n_visited)
                    pending = feature_rank[~visited[feature_rank]][:queue_size]
                for idx_batch in (pending[i : i + batch_size] for i in range(0, len(pending), batch_size)):
                    n_visited += len(idx_batch)
                    run_rows(
                        st,
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
            for r0 in range(0, n_rows, _ROW_BLOCK):
                block = edges[order[r0 : r0 + _ROW_BLOCK]]
                if columns is not None:
                    block = block[:, columns]
                adjacency[dest[r0 : r0 + _ROW_BLOCK].to(out_device)] = block.to(out_device)
            del edges
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
            cfg=model.model_config,
            scan=model.scan,
        )
    finally:
        for reload in offload_handles:
            reload()

    total = time.perf_counter() - start
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    peak = ""
    if torch.device(device).type == "cuda":
        peak = f", peak device memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    level = logging.INFO if verbose else logging.DEBUG
    logger.log(level, "fastattr.attribute: %.2fs (%s; %d influence updates)%s", total, phases, n_updates, peak)
    return graph
