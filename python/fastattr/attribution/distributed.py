"""One attribution graph over the ranks of a ``torch.distributed`` process group.

circuit-tracer's feature selection only changes between partial-influence updates: the batches of
one phase (the logit rows, then each queue of features) are fixed before the phase starts. Every
rank runs the setup, the batches of a phase are dealt round-robin over the ranks, and after the
phase each batch's rows are broadcast from the rank that computed them and committed on every rank
in the one-process order. Each batch is computed exactly as one process computes it, and every
store then holds the one-process rows in the one-process order, so selection, partial influences,
streamed node influence and pruning are those of one process, whatever the number of ranks.

Rows travel once per phase (see docs/distributed.md for the bytes); the partial influences are
computed on every rank, not split.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("fastattr")

GATHER = ("all", "rank0")


class RankFailed(RuntimeError):
    """Another rank raised; carries its rank and message."""


def check_group(process_group: Any, gather: Any) -> Any:
    """``process_group`` validated (None: no distribution)."""
    if gather not in GATHER:
        raise ValueError(f"gather: expected one of {', '.join(map(repr, GATHER))}, got {gather!r}")
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
        # Bytes this rank sent, per phase of the row-sharded store: "influence" (row sums and the
        # partial vectors of every mat-vec), "gather" (its rows at the end); and the mat-vec count.
        self.bytes_by_phase = {"influence": 0, "gather": 0}
        self.matvecs = 0
        self.rows_owned = 0

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
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list = [None] * self.size
        self.dist.all_gather_object(messages, message, group=self.group)
        if error is not None:
            raise error
        for r, m in enumerate(messages):
            if m is not None:
                raise RankFailed(f"fastattr.attribute: rank {r} of {self.size} failed: {m}")
        return result

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


# Rows per block of the row-sharded partial influences (64 rows of 16k float64 columns: 8 MiB).
_ROW_BLOCK = 64


class ShardedDenseRows:
    """Dense edge rows split by rows over the ranks: each rank holds only the rows it computed.

    Every rank allocates the one-process matrix (the wrapped DenseRows) but writes only its own
    batches' rows into it; the other ranks' rows are never read there (the store does not fill
    them) until they arrive at the end (``gather_rows``), so nothing row-sized travels during
    attribution. The partial influences are circuit-tracer's
    power series with each term a mat-vec split by rows: a rank multiplies its own rows, and the
    partial vectors are all-gathered and summed in rank order, so every rank ranks the same
    features. Sums are ordered by rank, not as one process orders them: equal to one process to
    float64 rounding of float32 terms, not bitwise (``deterministic=True`` takes the broadcast path).
    """

    def __init__(self, local: Any, ranks: Ranks):
        self.local, self.ranks = local, ranks
        # Which rank computed each row (-1: not yet written); known on every rank.
        self.owner = torch.full((local.edges.shape[0],), -1, dtype=torch.int64)

    def target(self, st: int, n: int) -> torch.Tensor:
        return self.local.target(st, n)

    def written(self, st: int, n: int, block_rows: int, owner: int) -> None:
        """Rows ``st .. st + n`` were computed by ``owner`` (here when it is this rank)."""
        if owner == self.ranks.rank and block_rows > n:
            # An autograd pass fills a whole batch: clear what it wrote into other ranks' rows.
            self.local.edges[st + n : st + block_rows].zero_()
        self.owner[st : st + n] = owner
        if owner == self.ranks.rank:
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

    def partial_influences(self, st: int, logit_p: torch.Tensor, row_to_node: torch.Tensor, *,
                           deterministic: bool | None = None, max_iter: int = 128) -> torch.Tensor:  # fmt: skip
        # circuit-tracer's series total = sum_k c_k |A| with c_1 = seed[nodes] / rowsum and
        # c_{k+1} = (c_k |A|)[nodes] / rowsum: only the rows' node columns feed the next term, so a
        # step is a mat-vec over |A|[mine, nodes] (and its partial vectors are st long, not N); the
        # full row width is read once, for sum_k c_k. Each node-column term is rounded to float32 as
        # one process rounds its terms.
        from fastattr.ops import influence as _influence

        edges = self.local.edges
        nodes = row_to_node[:st].to(edges.device)
        mine = torch.nonzero(self.owner[:st] == self.ranks.rank).flatten().to(edges.device)
        # Row blocks small enough to stay in cache: one read of the rows here, one for the total.
        blocks = [mine[i : i + _ROW_BLOCK] for i in range(0, len(mine), _ROW_BLOCK)]
        at_nodes = torch.empty(len(mine), st, dtype=torch.float64, device=edges.device)
        sums = torch.zeros(st, dtype=torch.float64, device=edges.device)
        for i, rows in zip(range(0, len(mine), _ROW_BLOCK), blocks):
            block = edges[rows].abs_()
            sums[rows] = block.sum(1, dtype=torch.float64)
            at_nodes[i : i + len(rows)] = block[:, nodes]
        row_abs_sum = self._combine(sums)  # each row is non-zero on one rank only: exact
        inv = 1.0 / row_abs_sum.float().clamp(min=_influence.PARTIAL_EPS).double()
        seed = torch.zeros(edges.shape[1], dtype=torch.float32, device=edges.device)
        if logit_p.numel():
            seed[-logit_p.numel() :] = logit_p.to(seed.device)
        coef = seed[nodes].double() * inv
        total_coef = torch.zeros(st, dtype=torch.float64, device=edges.device)
        for _ in range(max_iter):
            peak = float(coef.abs().max()) if coef.numel() else 0.0
            if peak == 0.0:
                break
            total_coef += coef
            if not torch.isfinite(torch.tensor(peak)):
                break
            self.ranks.matvecs += 1
            coef = self._combine(coef[mine] @ at_nodes).float().double() * inv
        else:
            raise _influence._partial_converge_error()
        total = torch.zeros(edges.shape[1], dtype=torch.float64, device=edges.device)
        for rows in blocks:
            total += total_coef[rows] @ edges[rows].abs_().double()
        return self._combine(total).float()

    def gather_rows(self, st: int, gather: str) -> bool:
        """Every rank's rows onto every rank (``"all"``) or rank 0 (``"rank0"``); whether this rank
        now holds the whole matrix."""
        r, edges = self.ranks, self.local.edges
        dev = r.comm_device or edges.device
        for src in range(r.size):
            idx = torch.nonzero(self.owner[:st] == src).flatten().to(edges.device)
            if not len(idx):
                continue
            if gather == "all":
                buf = edges[idx].to(dev) if src == r.rank else torch.empty(len(idx), edges.shape[1], device=dev)
                r.dist.broadcast(buf, src=r.global_ranks[src], group=r.group)
                if src == r.rank:
                    r.bytes_sent += buf.numel() * buf.element_size() * (r.size - 1)
                    r.bytes_by_phase["gather"] += buf.numel() * buf.element_size() * (r.size - 1)
                else:
                    edges[idx] = buf.to(edges.device)
            elif src != 0 and r.rank == src:
                r.dist.send(edges[idx].to(dev).contiguous(), dst=r.global_ranks[0], group=r.group)
                r.bytes_sent += len(idx) * edges.shape[1] * edges.element_size()
                r.bytes_by_phase["gather"] += len(idx) * edges.shape[1] * edges.element_size()
            elif src != 0 and r.rank == 0:
                buf = torch.empty(len(idx), edges.shape[1], device=dev)
                r.dist.recv(buf, src=r.global_ranks[src], group=r.group)
                edges[idx] = buf.to(edges.device)
        return gather == "all" or r.rank == 0

    def rows(self, index: torch.Tensor, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.local.rows(index, columns)
