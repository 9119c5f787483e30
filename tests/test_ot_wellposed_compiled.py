"""The compiled CPU ``wellposed`` solver (``wprctl.ot.wellposed_cpu``) against the batched tensor
one: same potentials, iterations and convergence, on the golden cases, at a tiny epsilon
(eps-scaling, underflowing plan entries), on an infeasible problem, for any thread count; and
the compiled support edges against the tensor ones, including a support too dense for the slab."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from wprctl.ot import CostGraph, compress_topk, wpr_potentials_topk
from wprctl.ot import wellposed_cpu as C
from wprctl.ot.wellposed import _Batch, _plan, _Precond, support_edges

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "wpr"


def both(pair, graph, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [wpr_potentials_topk(pair, graph, backend=b, **kw) for b in ("compiled", "torch")]


def assert_same(compiled, batched, atol: float) -> None:
    torch.testing.assert_close(compiled.potential, batched.potential, rtol=0, atol=atol)
    assert compiled.converged_fraction == batched.converged_fraction
    # the two order their sums differently: a position at the tolerance's edge may stop a step
    # earlier or later, nothing more
    same = compiled.iterations == batched.iterations
    assert float(same.float().mean()) >= 0.97
    assert int((compiled.iterations - batched.iterations).abs().max()) <= 1


@pytest.mark.skipif(not (GOLDEN / "official_outputs.pt").exists(), reason="no golden cases")
@pytest.mark.parametrize(
    ("name", "k2"),
    [("n2000_cos_k16_eps0.1", 64), ("n512_cos_k64_eps0.05", 16), ("n512_l2_k16_eps0.1", 512)],
)
def test_compiled_equals_batched_on_golden_cases(name: str, k2: int) -> None:
    case = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    graph = CostGraph.from_embeddings(case["emb"], k=case["k1"], metric=case["metric"].lower())
    pair = compress_topk(case["logits"], case["logits_ref"], case["actions"], k2, case["active"])
    compiled, batched = both(pair, graph, epsilon=case["eps"], max_iter=300, tol=1e-8)
    assert compiled.converged_fraction == 1.0
    # float32 results: 1e-5 std is a few ulps
    assert_same(compiled, batched, atol=1e-5 * float(case["f_c_at_action"][case["active"]].std()))


def test_compiled_equals_batched_at_tiny_epsilon_and_when_infeasible() -> None:
    """eps = 1e-3 with L2 costs: eps-scaling stages, plan entries that underflow and Sinkhorn
    steps of hundreds of log units (the compiled plan update falls back to exact exps); plus
    positions whose policy sits two clusters away from the reference (infeasible on the graph)."""
    torch.manual_seed(3)
    V = 300
    emb = torch.randn(V, 8)
    emb[V // 2 :] += 6.0  # two clusters, no kNN edge between them at k1 = 6
    graph = CostGraph.from_embeddings(emb, k=6)
    logits = torch.randn(2, 12, V) * 3
    ref = logits + 0.5 * torch.randn(2, 12, V)
    ref[1, 6:, : V // 2] -= 40.0  # reference mass in the second cluster only
    logits[1, 6:, V // 2 :] -= 40.0  # policy mass in the first only
    actions = torch.distributions.Categorical(logits=logits).sample()
    pair = compress_topk(logits, ref, actions, 16)
    for eps in (0.2, 1e-3):
        compiled, batched = both(pair, graph, epsilon=eps, max_iter=400, tol=1e-6, gauge="raw")
        assert compiled.converged_fraction == 1.0
        assert torch.isfinite(compiled.potential).all()
        assert_same(compiled, batched, atol=1e-5 * max(1.0, float(batched.potential.abs().max())))


def test_compiled_result_does_not_depend_on_the_thread_count() -> None:
    torch.manual_seed(0)
    V = 400
    graph = CostGraph.from_embeddings(torch.randn(V, 16), k=8)
    logits = torch.randn(3, 20, V) * 3
    pair = compress_topk(logits, logits + torch.randn(3, 20, V), logits.argmax(-1), 24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = wpr_potentials_topk(pair, graph, epsilon=0.1, max_iter=200, tol=1e-6)
        torch.set_num_threads(2)
        two = wpr_potentials_topk(pair, graph, epsilon=0.1, max_iter=200, tol=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.potential, two.potential)
    assert torch.equal(one.iterations, two.iterations)


def test_compiled_preconditioner_equals_the_batched_one_with_a_singular_hub_block() -> None:
    # position 0: every dust entry underflows, its hub block is singular (no hub correction)
    la = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.4, 0.4, 0.1]], dtype=torch.float64))
    lb = torch.log(torch.tensor([[0.4, 0.3, 0.2], [0.3, 0.5, 0.1]], dtype=torch.float64))
    laD = torch.log(torch.tensor([0.1, 0.1], dtype=torch.float64))
    lam = torch.ones(2, 3, dtype=torch.float64)
    ep, ei, ej = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0])
    ce = torch.full((4,), 0.5, dtype=torch.float64)
    bt = _Batch(la, lb, laD, laD.clone(), lam, (ep, ei, ej, ce), math.log(2.0))
    F, G = la / 2, lb / 2
    H = torch.tensor([[-1e4, -1e4, -1e4, -1e4], [-1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    damp = 0.0  # undamped, or the damping's diagonal makes the hub block regular
    pl_t = _plan(bt, F, G, H, lam_r=3.0)
    M = _Precond(bt, pl_t)
    q = (torch.ones(2, 3, dtype=torch.float64),) * 2 + (torch.ones(2, 4, dtype=torch.float64),)
    want = M.apply(*q)
    for p in range(2):
        sel = (ep == p).numpy()
        e_i, e_j, e_c = ei.numpy()[sel], ej.numpy()[sel], ce.numpy()[sel]
        pl, Pe, hub = np.empty((7, 3)), np.empty(2), np.empty(8)
        C._plan(F[p].numpy(), G[p].numpy(), H[p].numpy(), lam[p].numpy(), 3.0, e_i, e_j, e_c,
                pl, Pe, hub)  # fmt: skip
        np.testing.assert_allclose(pl[5], pl_t["r"][p].numpy(), rtol=1e-14)
        # (to rounding: vecmath's exp, sums in vectorized order)
        np.testing.assert_allclose(hub[4:], pl_t["rh"][p].numpy(), rtol=1e-14, atol=0)
        act = np.isfinite(la[p].numpy())
        actH = np.array([True, True, True, True])
        abg, Hinv = np.empty((3, 3)), np.empty((4, 4))
        C._precond(pl, hub, damp, act, act, actH, abg, Hinv, np.empty((4, 4, 8)))
        if p == 0:
            assert (Hinv == 0).all()
        np.testing.assert_allclose(Hinv, M.Hinv[p].numpy(), rtol=1e-12, atol=0)
        z = np.empty(3), np.empty(3), np.empty(4)
        C._apply(pl, abg, Hinv, act, act, actH, *(x[p].numpy() for x in q), *z)
        for got, exp in zip(z, want):
            np.testing.assert_allclose(got, exp[p].numpy(), rtol=1e-12, atol=1e-300)


def test_compiled_edges_equal_batched_including_a_support_denser_than_the_slab() -> None:
    """The compiled edge builder keeps 8 edges per slot in its first pass; a clique of 40 tokens
    all within each other's 32 nearest neighbours has ~31 per slot and is computed again."""
    torch.manual_seed(1)
    V = 200
    emb = torch.randn(V, 4)
    emb[:40] = 0.01 * torch.randn(40, 4)  # a tight clique
    graph = CostGraph.from_embeddings(emb, k=32)
    ids = torch.stack([torch.arange(40), torch.randperm(V)[:40].sort().values])
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, ::7] = False  # repeated-id slots of the second position
    compiled = support_edges(graph, ids, valid, "compiled")
    batched = support_edges(graph, ids, valid, "torch")
    assert int((compiled[0] == 0).sum()) > 8 * 40  # the first position overflowed its slab row
    for c, b in zip(compiled, batched):
        assert torch.equal(c, b)
    # the kNN ids as uint16 (vocabularies up to 65536 tokens) or int32 (larger): the same edges
    from wprctl.ot.wellposed_cpu import support_edges_cpu

    args = ids.numpy(), valid.numpy()
    narrow, wide = (
        support_edges_cpu(*args, graph.knn.numpy().astype(dt), graph.knn_cost.numpy(), 2)
        for dt in (np.uint16, np.int32)
    )
    for n, w in zip(narrow, wide, strict=True):
        np.testing.assert_array_equal(n, w)


def test_a_first_call_that_compiles_says_so(monkeypatch, capsys) -> None:
    """The first use on a machine compiles for up to a minute: ``launch`` prints a notice when a
    first call is still running after ``NOTICE_AFTER`` seconds, never for a compiled one, and
    once per process however many solvers compile."""
    import threading

    from numba import njit

    import wprctl.ot.compiled as compiled

    @njit  # not cached: its first call compiles
    def work(out):
        for i in range(out.shape[0]):
            out[i] = math.sqrt(i + 1.0)

    @njit
    def other(out):
        out[0] = -1.0

    out = np.zeros(4)
    monkeypatch.setattr(compiled, "NOTICE_AFTER", 0.0)
    monkeypatch.setattr(compiled, "_NOTICE_SAID", threading.Event())  # as in a new process
    compiled.launch(work, work, 1, 4, out)
    assert "Compiling the CPU optimal-transport solvers" in capsys.readouterr().err
    assert out[3] == 2.0
    compiled.launch(work, work, 1, 4, out)
    compiled.launch(other, other, 1, 4, out)  # a second solver compiles: no second notice
    assert capsys.readouterr().err == "" and out[0] == -1.0
