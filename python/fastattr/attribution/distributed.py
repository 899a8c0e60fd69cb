"""One attribution graph over the ranks of a ``torch.distributed`` process group.

circuit-tracer's feature selection only changes between partial-influence updates: the batches of
one phase (the logit rows, then each queue of features) are fixed before the phase starts. Every
rank runs the setup, and each phase's rows are computed by one rank each, exactly as one process
computes them. Two stores (see docs/distributed.md for the bytes):

- :class:`ShardedDenseRows` (dense storage, not deterministic): each rank keeps the rows it
  computed; a partial-influence update all-gathers the ranks' pieces of one process's series state
  (rows x rows), every rank runs one process's series, and each row's owner adds its rows' share
  of the result; rows travel once, at the end, at the graph's columns.
- the broadcast path (top-k storage, or ``deterministic=True``): after each phase each batch's
  rows are broadcast from the rank that computed them and committed on every rank in the
  one-process order, so every store holds the one-process rows in that order and everything
  downstream is one process's, bitwise.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("fastattr")

GATHER = ("all", "rank0", "shards")
# Files of gather="shards" in shard_dir: each rank's rows, then the graph without them (written last).
GRAPH_FILE = "graph.pt"
ROWS_FILE = "rows-{rank:05d}-of-{world:05d}.pt"


class RankFailed(RuntimeError):
    """Another rank raised; carries its rank and message."""


def check_group(process_group: Any, gather: Any, shard_dir: Any = None) -> Any:
    """``process_group`` validated (None: no distribution), with ``gather`` and ``shard_dir``."""
    if gather not in GATHER:
        raise ValueError(f"gather: expected one of {', '.join(map(repr, GATHER))}, got {gather!r}")
    if gather == "shards":
        if process_group is None:
            raise ValueError("gather: 'shards' writes one file per rank of a process_group; got process_group=None")
        if not isinstance(shard_dir, (str, os.PathLike)):
            raise TypeError(f"shard_dir: expected a directory path with gather='shards', got {type(shard_dir).__name__}")
        if Path(shard_dir).exists() and not Path(shard_dir).is_dir():
            raise ValueError(f"shard_dir: expected a directory (it is created if missing), got the file {shard_dir}")
    elif shard_dir is not None:
        raise ValueError(f"shard_dir: expected None unless gather='shards', got {shard_dir!r} with gather={gather!r}")
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: expected a group of an initialised torch.distributed "
                         f"(call torch.distributed.init_process_group first), got {process_group!r}")  # fmt: skip
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}")
    return process_group


class Ranks:
    """The rank layout of one attribute() call, and its collectives."""

    def __init__(self, group: Any):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # Ranks are numbered in the group; collectives name global ranks.
        self.global_ranks = [dist.get_global_rank(group, r) if hasattr(dist, "get_global_rank") else r
                             for r in range(self.size)]  # fmt: skip
        backend = dist.get_backend(group)
        # NCCL moves device tensors only; gloo moves CPU tensors.
        self.comm_device = None if backend == "nccl" else torch.device("cpu")
        self.bytes_sent = 0
        # Bytes this rank sent, per phase of the row-sharded store: "influence" (its share of the
        # series' state and of each result), "gather" (its rows at the end).
        self.bytes_by_phase = {"influence": 0, "gather": 0}
        self.rows_owned = 0
        # True once every rank knows the call failed (agree's messages): ending then is collective too.
        self.failed_together = False

    def __repr__(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.dist.get_backend(self.group)})"

    def owner(self, batch: int) -> int:
        return batch % self.size

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` here, then make every rank raise if any rank raised: the failing rank its own
        error, the others a RankFailed naming it. Without this the others would wait in the next
        collective until the group's timeout."""
        error, result = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        # One small all-reduce says whether any rank raised (gloo: ~0.15 ms, where gathering the
        # pickled messages costs ~1.4 ms and two collectives); the messages travel only then.
        device = self.comm_device or torch.device("cuda", torch.cuda.current_device())
        failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
        self.dist.all_reduce(failed, group=self.group)
        self.failed_together = bool(failed.item())
        if not self.failed_together:
            return result
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list = [None] * self.size
        self.dist.all_gather_object(messages, message, group=self.group)
        if error is not None:
            raise error
        for r, m in enumerate(messages):
            if m is not None:
                raise RankFailed(f"fastattr.attribute: rank {r} of {self.size} failed: {m}")
        return result

    def settle(self) -> None:
        """A last barrier, so that gloo's worker threads have released the call's tensors before it
        returns. A worker releases a finished collective's tensors after the caller has resumed, and
        releasing them takes the GIL; if the interpreter is exiting by then, the thread is ended
        inside C++ and the process aborts ("terminate called without an active exception", exit
        -6). That happens whenever something keeps the group alive past destroy_process_group:
        importing transformers' modeling code after init_process_group does (torch.distributed.fsdp
        binds the default group in function defaults). The barrier's enqueue waits for the worker
        to finish the previous collective, tensors included, and the wait gives up the GIL."""
        self.dist.barrier(group=self.group)

    def share(self, rows: torch.Tensor | None, shape: tuple[int, int], owner: int, like: torch.Tensor) -> torch.Tensor:
        """The rows a batch's owner computed, on every rank."""
        device = self.comm_device or like.device
        if self.rank == owner:
            buf = rows.to(device).contiguous()
            self.bytes_sent += buf.numel() * buf.element_size() * (self.size - 1)
        else:
            buf = torch.empty(shape, dtype=like.dtype, device=device)
        self.dist.broadcast(buf, src=self.global_ranks[owner], group=self.group)
        return buf.to(like.device)


def describe_failure(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


# Rows per block of the row-sharded series' full-width pass (64 rows of 16k float32 columns: 4 MiB).
_ROW_BLOCK = 64


def _regrown(t: torch.Tensor, keep: tuple[int, ...], need: tuple[int, ...]) -> torch.Tensor:
    """``t`` (1-D or 2-D) with room for ``need`` (at least doubling), its ``keep`` corner kept."""
    bigger = torch.empty([max(n, 2 * d, 64) for n, d in zip(need, t.shape)], dtype=t.dtype)
    bigger[tuple(slice(k) for k in keep)] = t[tuple(slice(k) for k in keep)]
    return bigger


class ShardedDenseRows:
    """Dense edge rows split by rows over the ranks: each rank holds only the rows it computed.

    A rank's rows sit compact in its own (rows it owns, N) matrix, so memory and the series' reads
    shrink with R, and nothing row-sized travels during attribution. Every rank records which rank
    owns each row. A partial-influence update all-gathers the ranks' pieces of one process's
    rows x rows series state, every rank runs one process's series on it (the same coefficients,
    bitwise), and each owner adds its rows' full-width share of the result; the shares are summed
    in rank order, so every rank ranks the same features, equal to one process to float64
    rounding, not bitwise (``deterministic=True`` takes the broadcast path). At the end only the
    graph's columns of each row travel (:meth:`gather_rows`), or none (:meth:`own_rows` to files).
    """

    def __init__(self, n_rows: int, n_cols: int, spare: int, device: torch.device, ranks: Ranks):
        from fastattr.attribution.edge_store import _check_fits

        self.ranks, self.spare, self.n_cols = ranks, spare, n_cols
        # A rank owns about rows / R of them (the driver deals each phase evenly); the matrix grows
        # if a rank is dealt more.
        cap = -(-n_rows // ranks.size) + spare
        _check_fits(cap, n_cols, 0, device)
        self.edges = torch.empty(cap, n_cols, device=device)
        self.m = 0  # rows written here
        # Which rank computed each row (-1: not yet written), and where this rank keeps its own.
        self.owner = torch.full((n_rows + spare,), -1, dtype=torch.int64)
        self.local = torch.full((n_rows + spare,), -1, dtype=torch.int64)
        # The series' state over this rank's rows (see partial_influences): each row's |sum|, and
        # every own row's |entry| at every row's node column, kept as rows only ever arrive.
        self._lsum, self._lblock = torch.empty(0), torch.empty(0, 0)  # this rank's rows (host)
        self._gsum, self._gblock = torch.empty(0), torch.empty(0, 0)  # every row, the same on every rank
        self._state_rows, self._state_nodes = 0, 0
        self.gathered: torch.Tensor | None = None

    def target(self, st: int, n: int) -> torch.Tensor:
        """A zeroed block for this rank's next ``n`` rows (``st`` is their global index)."""
        if self.m + n > self.edges.shape[0]:
            bigger = torch.empty(max(self.m + n, self.edges.shape[0] * 3 // 2), self.n_cols, device=self.edges.device)
            bigger[: self.m] = self.edges[: self.m]
            self.edges = bigger
        block = self.edges[self.m : self.m + n]
        block.zero_()
        return block

    def written(self, st: int, n: int, owner: int) -> None:
        """Rows ``st .. st + n`` were computed by ``owner`` (into this rank's last target when it is
        this rank)."""
        self.owner[st : st + n] = owner
        if owner == self.ranks.rank:
            self.local[st : st + n] = torch.arange(self.m, self.m + n)
            self.m += n
            self.ranks.rows_owned += n

    def commit(self, st: int, n: int, nodes: torch.Tensor | None = None, layers: torch.Tensor | None = None) -> None:
        pass

    def select(self, features: torch.Tensor) -> None:
        pass

    def _combine(self, part: torch.Tensor) -> torch.Tensor:
        """sum over ranks of each rank's ``part``, added in rank order (the same on every rank)."""
        r = self.ranks
        dev = r.comm_device or part.device
        parts = [torch.empty_like(part, device=dev) for _ in range(r.size)]
        r.dist.all_gather(parts, part.to(dev).contiguous(), group=r.group)
        sent = part.numel() * part.element_size() * (r.size - 1)
        r.bytes_sent += sent
        r.bytes_by_phase["influence"] += sent
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total.to(part.device)

    def _replicated_state(self, st: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One process's partial-influence state (every row's |sum| and |entry| at every row's node
        column, :class:`fastattr.ops.influence.PartialInfluenceState`), the same on every rank:
        each rank reads its own new rows at every node column and its old rows at the new nodes'
        columns, and the pieces are all-gathered once per update."""
        from fastattr.ops import influence as _influence

        m0, m, st0 = self._state_rows, self.m, self._state_nodes
        if m > self._lblock.shape[0] or st > self._lblock.shape[1]:
            self._lblock = _regrown(self._lblock, (m0, st0), (m, st))
            self._lsum = _regrown(self._lsum, (m0,), (m,))
        if st > self._gblock.shape[0]:
            self._gblock = _regrown(self._gblock, (st0, st0), (st, st))
            self._gsum = _regrown(self._gsum, (st0,), (st,))
        error = None
        try:
            _influence.grow_partial_rows(self.edges[:m], nodes, rows0=m0, st0=st0, row_sum=self._lsum,
                                         block=self._lblock)  # fmt: skip
        except ValueError as exc:  # shared below, so that every rank raises instead of waiting
            error = exc
        r = self.ranks
        owners = self.owner[:st]
        news = [int(((owners == q) & (torch.arange(st) >= st0)).sum()) for q in range(r.size)]
        olds = [int((owners[:st0] == q).sum()) for q in range(r.size)]
        sizes = [n * (1 + st) + o * (st - st0) for n, o in zip(news, olds)]
        # One flag, then this rank's new rows (|sum|, entries at every node column), then its old
        # rows at the new columns; padded to the longest share (gloo gathers equal sizes).
        mine = torch.zeros(1 + max(sizes), dtype=torch.float32)
        mine[0] = error is not None
        if error is None:
            new_part = torch.cat([self._lsum[m0:m, None], self._lblock[m0:m, :st]], 1).flatten()
            old_part = self._lblock[:m0, st0:st].flatten()
            mine[1 : 1 + sizes[r.rank]] = torch.cat([new_part, old_part])
        parts = [torch.empty_like(mine) for _ in range(r.size)]
        r.dist.all_gather(parts, mine, group=r.group)
        sent = mine.numel() * mine.element_size() * (r.size - 1)
        r.bytes_sent += sent
        r.bytes_by_phase["influence"] += sent
        if error is not None:
            raise error
        for q, part in enumerate(parts):
            if part[0] != 0:
                raise RankFailed(f"fastattr.attribute: rank {q} of {r.size} failed: non-finite edge rows")
            rows = torch.nonzero(owners == q).flatten()
            new_rows, old_rows = rows[rows >= st0], rows[rows < st0]
            body = part[1 : 1 + sizes[q]]
            head = body[: news[q] * (1 + st)].view(news[q], 1 + st)
            self._gsum[new_rows] = head[:, 0]
            self._gblock[new_rows, :st] = head[:, 1:]
            self._gblock[old_rows, st0:st] = body[news[q] * (1 + st) :].view(olds[q], st - st0)
        self._state_rows, self._state_nodes = m, st
        return self._gsum[:st], self._gblock[:st, :st]

    def _on_host(self) -> bool:
        """Whether the compiled host kernels take this shard (float32 on the CPU); elsewhere the
        series is circuit-tracer's, each term a full-width mat-vec split by rows."""
        return self.edges.device.type == "cpu" and self.edges.dtype == torch.float32

    def _own_total(self, coef: torch.Tensor) -> torch.Tensor:
        """sum over this rank's rows r of coef[r] |E_r| (coef over all rows), float64, full width."""
        from fastattr.ops import influence as _influence

        own = torch.nonzero(self.local[: len(coef)] >= 0).flatten()  # ascending: the local order
        if self._on_host():
            return _influence.abs_weighted_row_sum(self.edges[: self.m], coef[own])
        weights = coef[own.to(coef.device)].float()
        total = torch.zeros(self.edges.shape[1], dtype=torch.float64, device=self.edges.device)
        for i in range(0, self.m, _ROW_BLOCK):
            total += (weights[i : i + _ROW_BLOCK] @ self.edges[i : min(self.m, i + _ROW_BLOCK)].abs()).double()
        return total

    def partial_influences(self, st: int, logit_p: torch.Tensor, row_to_node: torch.Tensor, *,
                           deterministic: bool | None = None, max_iter: int = 128) -> torch.Tensor:  # fmt: skip
        # circuit-tracer's series total = sum_k c_k |A| with c_1 = seed[nodes] / rowsum and
        # c_{k+1} = (c_k |A|)[nodes] / rowsum: only the rows' node columns feed the next term, so
        # with those (rows x rows) on every rank, every rank runs one process's series and gets its
        # coefficients bitwise; the full row width is read once, by each row's owner, for
        # sum_r (sum_k c_k[r]) |A_r|, summed over ranks in rank order.
        from fastattr.ops import influence as _influence

        nodes = row_to_node[:st].to(torch.int64)
        if not self._on_host():  # circuit-tracer's series, each term a mat-vec split by rows
            sums = torch.zeros(st, dtype=torch.float64, device=self.edges.device)
            own = torch.nonzero(self.local[:st] >= 0).flatten().to(sums.device)
            sums[own] = self.edges[: self.m].abs().sum(1, dtype=torch.float64)
            return _influence.partial_influence_series(
                lambda y: self._combine(self._own_total(y)).float(), self._combine(sums), logit_p.to(sums.device),
                nodes.to(sums.device), self.edges.shape[1], max_iter=max_iter)  # fmt: skip
        row_sum, block = self._replicated_state(st, nodes.cpu())
        total_coef, last = _influence.partial_coefficients(row_sum, block, logit_p.cpu(), nodes.cpu(),
                                                           self.edges.shape[1], max_iter=max_iter)  # fmt: skip
        if last is not None and bool((self._combine(self._own_total(last)).float() != 0).any()):
            raise _influence._partial_converge_error()
        return self._combine(self._own_total(total_coef)).float()

    def own_rows(self, st: int, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(global index, rows at ``columns``) of the rows this rank computed, in index order."""
        idx = torch.nonzero(self.owner[:st] == self.ranks.rank).flatten()
        local = self.local[idx].to(self.edges.device)
        rows = self.edges[local] if columns is None else self.edges[local[:, None], columns[None, :]]
        return idx, rows

    def gather_rows(self, st: int, gather: str, columns: torch.Tensor | None) -> bool:
        """Every rank's rows, at ``columns`` only (the graph's; None: all), onto every rank
        (``"all"``) or rank 0 (``"rank0"``); whether this rank now holds them (:meth:`rows`)."""
        r, edges = self.ranks, self.edges
        dev = r.comm_device or edges.device
        width = edges.shape[1] if columns is None else len(columns)
        receives = gather == "all" or r.rank == 0
        if receives:
            self.gathered = torch.empty(st, width, device=edges.device)
        for src in range(r.size):
            idx = torch.nonzero(self.owner[:st] == src).flatten()
            if not len(idx):
                continue
            if src == r.rank:
                mine = self.own_rows(st, columns)[1]
                if receives:
                    self.gathered[idx.to(edges.device)] = mine
                if gather == "all" or src != 0:
                    sent = mine.numel() * mine.element_size() * ((r.size - 1) if gather == "all" else 1)
                    r.bytes_sent += sent
                    r.bytes_by_phase["gather"] += sent
                if gather == "all":
                    r.dist.broadcast(mine.to(dev).contiguous(), src=r.global_ranks[src], group=r.group)
                elif src != 0:
                    r.dist.send(mine.to(dev).contiguous(), dst=r.global_ranks[0], group=r.group)
            elif receives:
                buf = torch.empty(len(idx), width, device=dev)
                if gather == "all":
                    r.dist.broadcast(buf, src=r.global_ranks[src], group=r.group)
                else:
                    r.dist.recv(buf, src=r.global_ranks[src], group=r.group)
                self.gathered[idx.to(edges.device)] = buf.to(edges.device)
        # The shard is no longer needed once its rows are gathered.
        self.edges = self.edges[:0]
        return receives

    def rows(self, start: int, stop: int, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``start .. stop - 1`` at the columns :meth:`gather_rows` gathered (``columns`` must be those)."""
        if self.gathered is None:
            raise RuntimeError("ShardedDenseRows.rows: gather_rows first")
        return self.gathered[start:stop], None


# ------------------------------------------------------------------------------------ shard files


def _save_whole(obj: Any, path: Path) -> None:
    """torch.save through a temporary and a rename: a file under its final name is whole."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def clear_shards(shard_dir: str | os.PathLike) -> None:
    """Rank 0, before any rank writes: the directory without an earlier run's files."""
    d = Path(shard_dir)
    d.mkdir(parents=True, exist_ok=True)
    for f in [d / GRAPH_FILE, *d.glob("rows-*-of-*.pt")]:
        f.unlink(missing_ok=True)


def write_rows(shard_dir: str | os.PathLike, ranks: Ranks, rows: torch.Tensor, final_rows: torch.Tensor, n_final: int) -> None:
    """This rank's rows of the final adjacency (``final_rows`` says which), for :func:`load_graph_shards`."""
    path = Path(shard_dir) / ROWS_FILE.format(rank=ranks.rank, world=ranks.size)
    _save_whole({"rows": rows.cpu(), "final_rows": final_rows.cpu(), "n_final": n_final}, path)


def write_graph(shard_dir: str | os.PathLike, graph: Any) -> None:
    """Rank 0, after every rank wrote its rows: the graph (its adjacency empty when the rows are in
    the rank files), circuit-tracer's ``Graph.to_pt`` format. Its presence marks a whole set."""
    path = Path(shard_dir) / GRAPH_FILE
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    graph.to_pt(str(tmp))
    os.replace(tmp, path)


def load_graph_shards(shard_dir: str | os.PathLike) -> Any:
    """The circuit-tracer ``Graph`` that ``fastattr.attribute(..., gather="shards",
    shard_dir=shard_dir)`` wrote over its ranks: the graph file with every rank's rows put back in
    its adjacency. ValueError naming ``shard_dir`` when the set is not whole."""
    from circuit_tracer.graph import Graph

    d = Path(shard_dir)
    meta = d / GRAPH_FILE
    if not meta.is_file():
        raise ValueError(f"shard_dir: expected {meta} (written last by attribute(gather='shards')), got no such file")
    graph = Graph.from_pt(str(meta))
    if graph.adjacency_matrix.numel():
        return graph  # the broadcast path: rank 0 held the whole graph
    files = sorted(d.glob("rows-*-of-*.pt"))
    worlds = {int(f.stem.split("-of-")[1]) for f in files}
    if len(worlds) != 1:
        raise ValueError(f"shard_dir: expected the row files of one run, got files for {sorted(worlds) or 'no'} ranks in {d}")
    world = worlds.pop()
    found = {int(f.stem.split("-")[1]) for f in files}
    if found != set(range(world)):
        raise ValueError(f"shard_dir: expected rows of ranks 0..{world - 1} in {d}, missing {sorted(set(range(world)) - found)}")
    adjacency = None
    for f in files:
        part = torch.load(f, weights_only=True)
        if adjacency is None:
            adjacency = torch.zeros(part["n_final"], part["n_final"])
        adjacency[part["final_rows"]] = part["rows"]
    graph.adjacency_matrix = adjacency
    return graph
