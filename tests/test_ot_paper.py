"""The ``paper`` solver's computational shortcuts give the plain formulation's numbers.

Each test runs the official iteration twice: once as the solver does it (column blocks and
kernel tiles, or one small problem per position on the top-k path) and once in the plain form
(one block, one tile, the batch-wide support with zero masses), and compares.
"""

from __future__ import annotations

import pytest
import torch

import wprctl.ot.paper as paper
from wprctl.ot import CostGraph, compress_topk, wpr_potentials, wpr_potentials_topk
from wprctl.ot.sinkhorn import WPRResult, _paper_topk
from wprctl.ot.wellposed import support_edges


def problem(V: int, B: int, T: int, seed: int, scale: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, 16, generator=gen)
    logits = torch.randn(B, T, V, generator=gen) * 3
    ref = logits + scale * torch.randn(B, T, V, generator=gen)
    actions = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.15
    return emb, logits, ref, actions, mask


def assert_same(res: WPRResult, ref: WPRResult, rtol: float) -> None:
    assert torch.equal(res.iterations, ref.iterations)
    assert res.converged_fraction == ref.converged_fraction
    assert res.support_size == ref.support_size
    for name in ("potential", "ot_value", "marginal_error"):
        x, y = getattr(res, name), getattr(ref, name)
        if y is None:
            assert x is None
            continue
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("gauge", ["raw", "centered"])
def test_column_blocks_and_kernel_tiles_change_nothing(monkeypatch, gauge: str) -> None:
    emb, logits, ref, actions, mask = problem(V=700, B=3, T=30, seed=0)
    graph = CostGraph.from_embeddings(emb, k=12)
    eps = graph.median_knn_cost() / 5
    # tol 5e-2: positions stop at different iterations, so the working set is repacked
    kw = dict(epsilon=eps, top_k=16, max_iter=40, tol=5e-2, mask=mask, method="paper")
    kw.update(gauge=gauge, return_value=True)
    monkeypatch.setattr(paper, "_BLOCK", 10**6)  # one block of all positions ...
    monkeypatch.setattr(paper, "_TILE_BYTES", 2**40)  # ... and one kernel tile
    plain = wpr_potentials(logits, ref, actions, graph, **kw)
    assert 0.1 < plain.converged_fraction < 0.9  # some positions leave the working set early
    monkeypatch.setattr(paper, "_BLOCK", 8)  # 9 blocks, the last one partly empty
    monkeypatch.setattr(paper, "_TILE_BYTES", 4 * 8 * 50)  # tiles of 50 columns
    blocked = wpr_potentials(logits, ref, actions, graph, **kw)
    assert_same(blocked, plain, rtol=1e-5)
    assert blocked.infeasible_fraction == plain.infeasible_fraction


def dense_topk_reference(
    pair, graph, pad_id: int, eos_id: int, epsilon, max_iter, tol, gauge, return_value
) -> WPRResult:
    """The top-k ``paper`` problem on the batch-wide support (zero mass off a position's own)."""
    return _paper_topk(
        pair, graph, epsilon, max_iter, tol, gauge, pad_id, eos_id, return_value,
        per_position=False,
    )  # fmt: skip


@pytest.mark.parametrize("pad_id,eos_id", [(0, 1), (3, 3)])  # also pad == eos (kept in support)
@pytest.mark.parametrize("gauge", ["raw", "centered"])
def test_topk_per_position_problems_equal_the_batch_support_problem(
    pad_id: int, eos_id: int, gauge: str
) -> None:
    emb, logits, ref, actions, mask = problem(V=1500, B=4, T=20, seed=1)
    actions[0, :4] = pad_id  # padded steps: the action is outside the support (dust bin)
    actions[1, 0] = eos_id
    graph = CostGraph.from_embeddings(emb, k=16)
    eps = graph.median_knn_cost() / 5
    pair = compress_topk(logits, ref, actions, 8, mask)
    for max_iter, tol in ((10, 1e-6), (60, 5e-2)):  # the second stops positions early
        kw = dict(epsilon=eps, max_iter=max_iter, tol=tol, gauge=gauge, return_value=True)
        res = wpr_potentials_topk(pair, graph, method="paper", pad_id=pad_id, eos_id=eos_id, **kw)
        ref_res = dense_topk_reference(pair, graph, pad_id, eos_id, **kw)
        # float32 rounding of the dust masses and of the first iteration's row sums differs
        assert_same(res, ref_res, rtol=1e-5)
        assert res.infeasible_fraction == ref_res.infeasible_fraction
    assert 0.0 < res.converged_fraction < 1.0


@pytest.mark.parametrize("gauge", ["raw", "centered"])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("batch_kernel", [True, False])
def test_compiled_per_position_problems_equal_the_tensor_ones(
    gauge: str, layout: str, batch_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``paper_cpu`` (the CPU's per-position path) against ``local_problems`` +
    ``paper_sinkhorn_local`` (the tensor path, as on CUDA): where each position's ~20 tokens have
    many kNN edges among them (~7 per row: the compiled path iterates on a dense kernel), and
    where they have few (~2 per row: a CSR kernel); each position's kernel read from the batch
    support's (``batch_kernel``) or found in the kNN lists."""
    from wprctl.ot import paper_cpu

    monkeypatch.setattr(paper_cpu, "use_batch_kernel", lambda *_: batch_kernel)
    V, k1 = (200, 64) if layout == "dense" else (300, 24)
    emb, logits, ref, actions, mask = problem(V=V, B=4, T=20, seed=2)
    actions[0, :3] = 0  # the pad id: outside the support (dust bin)
    ref[2] = logits[2]  # a = b: feasible (the truncated problems of the others are not)
    graph = CostGraph.from_embeddings(emb, k=k1)
    eps = graph.median_knn_cost() / 5
    pair = compress_topk(logits, ref, actions, 16, mask)
    # which kernel layout the compiled path picks per position (m^2 <= 4 nnz: dense)
    ids, valid = pair.indices[pair.mask], pair.valid[pair.mask]
    m = valid.sum(1) + 1
    nnz = m + torch.bincount(support_edges(graph, ids, valid)[0], minlength=len(m))
    dense = m * m <= 4 * nnz
    assert bool(dense.all()) if layout == "dense" else not bool(dense.any())
    for max_iter, tol in ((10, 1e-6), (60, 5e-2)):
        kw = dict(epsilon=eps, max_iter=max_iter, tol=tol, gauge=gauge, return_value=True)
        compiled = wpr_potentials_topk(pair, graph, method="paper", backend="compiled", **kw)
        tensor = wpr_potentials_topk(pair, graph, method="paper", backend="torch", **kw)
        # float32 exp and sums in another order (the masses, the dust, the first row sums),
        # grown over the iterations
        assert_same(compiled, tensor, rtol=5e-5)
        assert compiled.infeasible_fraction == tensor.infeasible_fraction
    assert 0.0 < compiled.converged_fraction < 1.0
    assert 0.0 < compiled.infeasible_fraction < 1.0


def test_reverse_live_flags_are_the_mutual_live_kernel_entries() -> None:
    """``paper_reverse_live`` (which end of an edge supplies a kernel entry) against its
    definition, at an epsilon where part of the kernel underflows to 0 in float32."""
    emb, *_ = problem(V=150, B=1, T=1, seed=4)
    graph = CostGraph.from_embeddings(emb, k=7)
    eps = float(graph.knn_cost.to(torch.float32).median()) / 95  # exp(-C/eps) ~ 1e-41 at the median
    knn, w = paper.paper_knn_kernel(graph, eps, torch.device("cpu"))
    assert 0.2 < float((w == 0).float().mean()) < 0.8
    flags = paper.paper_reverse_live(graph, eps, torch.device("cpu"))
    for i in range(knn.shape[0]):
        for c in range(knn.shape[1]):
            j = int(knn[i, c])
            back = (knn[j] == i).nonzero()
            expect = back.numel() == 1 and bool(w[j, int(back)] > 0)
            assert bool(flags[i, c]) == expect, (i, c)
    assert flags.any() and not flags.all()


def test_compiled_paper_reads_uint16_and_int32_knn_ids_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled solvers stream the kNN rows as ``CostGraph.knn_narrow`` (the paper solver's
    kernel rows, the well-posed one's edge builder, which prefetches them): uint16 up to 65536
    tokens, int32 above. Both give the same results, bit for bit."""
    emb, logits, ref, actions, mask = problem(V=300, B=2, T=20, seed=3)
    graph = CostGraph.from_embeddings(emb, k=24)
    pair = compress_topk(logits, ref, actions, 16, mask)
    kw = dict(epsilon=graph.median_knn_cost() / 5, tol=1e-6, return_value=True)
    iters = {"paper": 20, "wellposed": 200}
    assert graph.knn_narrow().dtype == torch.uint16
    narrow = {
        m: wpr_potentials_topk(pair, graph, method=m, backend="compiled", max_iter=n, **kw)
        for m, n in iters.items()
    }
    monkeypatch.setattr(CostGraph, "knn_narrow", lambda self: self.knn.to(torch.int32))
    for method, n in iters.items():
        wide = wpr_potentials_topk(pair, graph, method=method, backend="compiled", max_iter=n, **kw)
        for name in ("potential", "ot_value", "iterations", "marginal_error"):
            assert torch.equal(getattr(narrow[method], name), getattr(wide, name)), (method, name)
    assert narrow["wellposed"].converged_fraction == 1.0
