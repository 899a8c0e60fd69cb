"""Where ``fastattr.attribute`` keeps its edge rows while it attributes: one protocol, two stores.

- :class:`DenseRows` keeps every row dense on the model's device: circuit-tracer's edge matrix.
- :class:`TopKRows` keeps each feature row's k strongest entries by |weight| plus exact |weight|
  sums, for bounded memory on long prompts (see docs/attribute.md).

The loop asks a store for a block to write a batch of rows into (``target``), tells it when the
rows are written (``commit``) and which features were queued (``select``), asks it for partial
influences to rank features, and finally reads rows back restricted to the graph's columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch

from fastattr._runtime import backends as _backends
from fastattr.ops import influence as _influence

# Incoming edges kept per row by edge_storage="topk" unless topk= says otherwise (see docs/attribute.md).
DEFAULT_TOPK = 1024


class RowStore(Protocol):
    def target(self, st: int, n: int) -> torch.Tensor:
        """A zeroed (at least n, n_cols) block that rows ``st .. st + n`` are written into."""

    def commit(self, st: int, n: int, nodes: torch.Tensor | None = None, layers: torch.Tensor | None = None) -> None:
        """Rows ``st .. st + n`` of the target block are final."""

    def select(self, features: torch.Tensor) -> None:
        """``features`` were queued for attribution."""

    def partial_influences(self, st: int, logit_p: torch.Tensor, row_to_node: torch.Tensor, *,
                           deterministic: bool | None = None) -> torch.Tensor:  # fmt: skip
        """circuit-tracer's compute_partial_influences over the first ``st`` rows; ``deterministic``
        as in :func:`fastattr.compute_partial_influences`."""

    def rows(self, start: int, stop: int, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``start .. stop - 1`` restricted to ``columns`` (all if None), and their |weight| sums if kept."""


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


class DenseRows:
    """Every edge row, dense, on the device: exactly circuit-tracer's edge matrix."""

    def __init__(self, n_rows: int, n_cols: int, batch: int, device: torch.device):
        _check_fits(n_rows, n_cols, batch, device)
        # Spare rows at the end absorb the last, partial batch (an autograd pass fills `batch` rows).
        # Uninitialised: every block is zeroed by target() before it is written, and nothing reads
        # a row before it is committed, so a zero fill here would write the whole matrix twice.
        self.edges = torch.empty(n_rows + batch, n_cols, device=device)
        self.batch = batch
        self._partial = _influence.PartialInfluenceState()

    def target(self, st: int, n: int) -> torch.Tensor:
        block = self.edges[st : st + n]
        block.zero_()
        return block

    def commit(self, st: int, n: int, nodes: torch.Tensor | None = None, layers: torch.Tensor | None = None) -> None:
        pass

    def select(self, features: torch.Tensor) -> None:
        pass

    def partial_influences(self, st: int, logit_p: torch.Tensor, row_to_node: torch.Tensor, *,
                           deterministic: bool | None = None) -> torch.Tensor:  # fmt: skip
        return _influence.compute_partial_influences(self.edges[:st], logit_p, row_to_node, deterministic=deterministic,
                                                     state=self._partial)  # fmt: skip

    def rows(self, start: int, stop: int, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        block = self.edges[start:stop]
        # A row slice read at the kept columns: one gather, no full-width intermediate.
        return (block if columns is None else block.index_select(1, columns)), None


class TopKRows:
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
        norm = magnitude / magnitude.sum(1, keepdim=True).clamp(min=_influence.NORMALIZE_EPS)  # normalize_matrix's floor
        self.influence += rows_influence() @ norm.to(torch.float64)

    def target(self, st: int, n: int) -> torch.Tensor:
        block = self.scratch[:n]
        block.zero_()
        return block

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
            weight = self._last_partial[nodes.to(dense.device)] / self.abs_sum[r].clamp(min=_influence.PARTIAL_EPS)
            self.dropped_flow += weight @ dropped

    def partial_influences(self, st: int, logit_p: torch.Tensor, row_to_node: torch.Tensor, *,
                           deterministic: bool | None = None, max_iter: int = 128) -> torch.Tensor:  # fmt: skip
        # circuit-tracer's compute_partial_influences (rows normalised by their full |weight| sums,
        # logits seeded in the last columns) over the dense logit rows and the stored feature
        # entries; what the dropped entries carried enters as a source with the first term.
        nf = st - self.n_logits
        row_abs_sum = torch.cat([self.logit_rows.abs().sum(1), self.abs_sum[:nf]])
        total = _influence.partial_influence_series(
            self._matvec(nf, _backends.deterministic(deterministic)), row_abs_sum, logit_p.to(self.scratch.device),
            row_to_node[:st].to(self.scratch.device), self.n_cols, max_iter=max_iter, source=self.dropped_flow,
        )
        self._last_partial = total
        return total

    def _matvec(self, nf: int, deterministic: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """y (logit rows, then the first ``nf`` feature rows) -> sum_r y_r |row r|, float32. Products
        are float32, as circuit-tracer's: an (nf, k) temporary per step of 4 bytes per stored edge."""
        logit_abs = self.logit_rows.abs()
        values_abs = self.values[:nf].abs()
        cols = self.cols[:nf].reshape(-1)
        nl = self.n_logits

        def matvec(y: torch.Tensor) -> torch.Tensor:
            y = y.float()
            out = y[:nl] @ logit_abs
            return _influence.scatter_add(out, cols, (y[nl:, None] * values_abs).reshape(-1), deterministic=deterministic)

        return matvec

    def rows(self, start: int, stop: int, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start .. stop - 1`` restricted to ``columns``, dense, and their |weight| sums over those columns."""
        dev = self.values.device
        index = torch.arange(start, stop, device=dev)
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


