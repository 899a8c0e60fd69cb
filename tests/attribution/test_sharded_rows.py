"""The row-sharded store against one process, in this process (a one-rank gloo group).

A one-rank group runs every line of ShardedDenseRows' series: its own rows' state, the exchange
(with itself), the replicated series in C++ and the owners' full-width pass. The multi-rank runs
(test_distributed.py) check the split itself; here the series is compared with
compute_partial_influences on the same rows, bitwise, at every growth step and at max_iter's edge.
"""

from __future__ import annotations

import pytest
import torch

from fastattr import reference
from fastattr.attribution import distributed
from fastattr.ops import influence


@pytest.fixture
def ranks():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield distributed.Ranks(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _rows(gen: torch.Generator, n: int, cols: int) -> torch.Tensor:
    rows = torch.randn(n, cols, generator=gen)
    return rows * (torch.rand(n, cols, generator=gen) < 0.2)


def _write(store: distributed.ShardedDenseRows, st: int, rows: torch.Tensor, owner: int = 0) -> None:
    store.target(st, len(rows))[:] = rows
    store.written(st, len(rows), owner)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("host", [True, False], ids=["host-kernels", "device-path"])
def test_series_equals_one_process_at_every_update(ranks, seed, host, monkeypatch):
    # host=False runs, on the CPU, the path a CUDA shard takes (circuit-tracer's series, each term
    # a full-width mat-vec split by rows): equal to one process to rounding, not bitwise.
    if not host:
        monkeypatch.setattr(distributed.ShardedDenseRows, "_on_host", lambda self: False)
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_logits, cols = 90, 3, 400
    logit_p = torch.rand(n_logits, generator=gen)
    # Logit rows first, then feature rows at distinct feature nodes, as attribution writes them.
    nodes = torch.cat([torch.arange(cols - n_logits, cols), torch.randperm(cols - 60, generator=gen)[: n_rows - n_logits]])
    edges = _rows(gen, n_rows, cols)
    store = distributed.ShardedDenseRows(n_rows, cols, 8, torch.device("cpu"), ranks)
    one = influence.PartialInfluenceState()
    st = 0
    for step in (n_logits, 10, 31, 30, 16):
        _write(store, st, edges[st : st + step])
        st += step
        got = store.partial_influences(st, logit_p, nodes[:st])
        # One process keeps its state over the same rows (attribution's path).
        want = influence.compute_partial_influences(edges[:st], logit_p, nodes[:st], state=one, backend="cpu")
        if host:
            assert torch.equal(got, want), f"rows {st}: {float((got - want).abs().max())}"
        torch.testing.assert_close(got, reference.compute_partial_influences(edges[:st], logit_p, nodes[:st]),
                                   rtol=1e-5, atol=1e-7)  # fmt: skip


def _chain(tail_elsewhere: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: the logit's row reads feature 0; feature 0's row reads no row's node, only column
    2 (a token), with weight ``tail_elsewhere``. The series' second term is zero at both nodes."""
    cols = 4
    edges = torch.zeros(2, cols)
    edges[0, 0] = 0.5  # logit row (node 3) <- feature 0
    edges[1, 2] = tail_elsewhere  # feature 0's row <- the token
    edges[1, 1] = 0.25  # and a column that is no row's node
    return edges, torch.tensor([3, 0]), torch.tensor([1.0])


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_series_ends_at_max_iter_as_one_process(ranks, max_iter):
    # With max_iter = 2 the last allowed term is zero at every node column but not elsewhere: only
    # the rows' owner can tell, and one process raises there.
    edges, nodes, logit_p = _chain(0.75)
    store = distributed.ShardedDenseRows(2, edges.shape[1], 2, torch.device("cpu"), ranks)
    _write(store, 0, edges)
    try:
        want = influence.compute_partial_influences(edges, logit_p, nodes, max_iter=max_iter, backend="cpu",
                                                    state=influence.PartialInfluenceState())  # fmt: skip
    except RuntimeError as exc:
        with pytest.raises(RuntimeError, match=str(exc)):
            store.partial_influences(2, logit_p, nodes, max_iter=max_iter)
        return
    assert torch.equal(store.partial_influences(2, logit_p, nodes, max_iter=max_iter), want)


def test_coefficients_say_when_only_the_rows_can_tell():
    edges, nodes, logit_p = _chain(0.75)
    row_sum = edges.abs().sum(1)
    block = edges.abs()[:, nodes].contiguous()
    total, last = influence.partial_coefficients(row_sum, block, logit_p, nodes, edges.shape[1], max_iter=2)
    assert last is not None and last[1] > 0 and last[0] == 0
    total, last = influence.partial_coefficients(row_sum, block, logit_p, nodes, edges.shape[1], max_iter=3)
    assert last is None
    out = influence.abs_weighted_row_sum(edges, total).float()
    one = influence.compute_partial_influences(edges, logit_p, nodes, max_iter=3, backend="cpu",
                                               state=influence.PartialInfluenceState())  # fmt: skip
    assert torch.equal(out, one)


def test_non_finite_row_is_named(ranks):
    edges, nodes, logit_p = _chain(0.75)
    edges[1, 3] = float("nan")
    store = distributed.ShardedDenseRows(2, edges.shape[1], 2, torch.device("cpu"), ranks)
    _write(store, 0, edges)
    with pytest.raises(ValueError, match="edge_matrix"):
        store.partial_influences(2, logit_p, nodes)


def test_gather_keeps_only_the_graph_columns(ranks):
    gen = torch.Generator().manual_seed(3)
    edges = _rows(gen, 12, 50)
    store = distributed.ShardedDenseRows(12, 50, 4, torch.device("cpu"), ranks)
    _write(store, 0, edges[:5])
    _write(store, 5, edges[5:])
    columns = torch.tensor([0, 7, 8, 30, 49])
    assert store.gather_rows(12, "all", columns)
    got, sums = store.rows(3, 11, columns)
    assert sums is None and torch.equal(got, edges[3:11][:, columns])
    assert ranks.bytes_by_phase["gather"] == 0  # one rank sends nothing


@pytest.mark.parametrize("bad", [False, True], ids=["returns", "every-rank-raises"])
def test_call_ends_in_a_barrier_once_every_rank_is_done(ranks, bad, monkeypatch):
    # Ranks.settle's barrier is what keeps gloo's workers from releasing the last collective's
    # tensors during interpreter exit (an abort, exit -6): it must end every call that ends on
    # all ranks, returning or raising together.
    import fastattr
    from fastattr import synthetic

    settled = []
    monkeypatch.setattr(distributed.Ranks, "settle", lambda self: settled.append(self.failed_together))
    model = synthetic.make_replacement_model(transcoder="plt", n_layers=2, d_model=16, d_transcoder=32, seed=0)
    prompt = synthetic.random_prompt(5, seed=1)
    if bad:
        with pytest.raises(ValueError, match="batch_size"):
            fastattr.attribute(prompt, model, batch_size=0, process_group=ranks.group)
        assert settled == [True]
    else:
        graph = fastattr.attribute(prompt, model, batch_size=4, max_feature_nodes=8, process_group=ranks.group)
        assert graph is not None and settled == [False]
