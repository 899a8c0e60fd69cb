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
