"""WPR identities, numerical stability, the graph cache and bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from wprctl.errors import UserError
from wprctl.ot import (
    CostGraph,
    KernelUnderflowWarning,
    compress_topk,
    wpr_potentials,
    wpr_potentials_topk,
)
from wprctl.ot.wellposed import support_edges

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "wpr"
needs_golden = pytest.mark.skipif(
    not (GOLDEN / "official_outputs.pt").exists(), reason=f"golden WPR cases not found in {GOLDEN}"
)


def random_problem(V: int = 300, d: int = 16, B: int = 2, T: int = 5, seed: int = 0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, d, generator=gen) * scale
    logits = torch.randn(B, T, V, generator=gen) * 3
    ref = logits + 0.5 * torch.randn(B, T, V, generator=gen)
    actions = torch.distributions.Categorical(logits=logits).sample()
    return emb, logits, ref, actions


@needs_golden
def test_cat_kitten_table_near_neighbour_penalized_less() -> None:
    case = torch.load(GOLDEN / "n512_cat_kitten_table_l2_k16_eps0.1.pt", weights_only=True)
    graph = CostGraph.from_embeddings(case["emb"], k=16, metric="l2")
    res = wpr_potentials(
        case["logits"], case["logits_ref"], case["actions"], graph, epsilon=case["eps"],
        top_k=64, max_iter=3000, tol=1e-6,
    )  # fmt: skip
    kitten, table = res.potential[0], res.potential[1]
    assert torch.allclose(case["log_ratio_at_action"][0], case["log_ratio_at_action"][1])
    assert (kitten < table).all(), (kitten, table)
    assert torch.allclose(kitten.double(), case["f_c_at_action"][0], atol=0.03)


@needs_golden
def test_identical_policies_have_entropic_bias() -> None:
    case = torch.load(GOLDEN / "n512_identical_l2_k16_eps0.1.pt", weights_only=True)
    graph = CostGraph.from_embeddings(case["emb"], k=16, metric="l2")
    mask = case["active"].clone()
    mask[1:] = False
    mask[0, 7:] = False  # 3 positions keep the untruncated solve fast
    res = wpr_potentials(
        case["logits"], case["logits_ref"], case["actions"], graph, epsilon=case["eps"],
        top_k=None, max_iter=3000, tol=1e-6, mask=mask,
    )  # fmt: skip
    assert torch.equal(case["logits"], case["logits_ref"])
    assert res.potential[mask].std() > 0.05  # not constant
    gold = case["f_c_at_action"][mask]
    std = case["f_c_at_action"][case["active"]].std()
    assert ((res.potential[mask].double() - gold).abs() / std).mean() < 0.01


def test_gauge_shift_leaves_centered_unchanged() -> None:
    emb, logits, ref, actions = random_problem()
    graph = CostGraph.from_embeddings(emb, k=12)
    pair = compress_topk(logits, ref, actions, 20)
    kw = dict(epsilon=0.5, max_iter=2000, tol=1e-6, gauge="centered", return_value=True)
    base = wpr_potentials_topk(pair, graph, **kw)
    raw = wpr_potentials_topk(pair, graph, **{**kw, "gauge": "raw"})
    # Shift every potential by c: the centered penalty and the value must not move, the raw does.
    from wprctl.ot import sinkhorn as S

    orig = S.wellposed_solve

    def shifted(*a, **k):
        out = orig(*a, **k)
        for n in ("F", "FD", "FR"):
            out[n] = out[n] + 3.0
        for n in ("G", "GD", "GR"):
            out[n] = out[n] - 3.0
        return out

    S.wellposed_solve = shifted
    try:
        moved = wpr_potentials_topk(pair, graph, **kw)
        moved_raw = wpr_potentials_topk(pair, graph, **{**kw, "gauge": "raw"})
    finally:
        S.wellposed_solve = orig
    assert torch.allclose(base.potential, moved.potential, atol=1e-5)
    assert torch.allclose(base.ot_value, moved.ot_value, atol=1e-5)
    # raw is measured against the reservoir (f_R = g_R), which the shift also fixes
    assert torch.allclose(raw.potential, moved_raw.potential, atol=1e-5)
    assert not torch.allclose(raw.potential, base.potential, atol=1e-3)


@pytest.mark.parametrize("eps", [0.01, 0.001])
def test_small_epsilon_l2_is_finite_and_warns(eps: float) -> None:
    emb, logits, ref, actions = random_problem(scale=1.0)  # kNN L2 costs around 4
    graph = CostGraph.from_embeddings(emb, k=12, metric="l2")
    assert graph.underflow_fraction(eps) > 0.99
    for method in ("wellposed", "paper"):
        with pytest.warns(KernelUnderflowWarning, match="degenerates"):
            graph._warned.clear()
            res = wpr_potentials(
                logits, ref, actions, graph, epsilon=eps, top_k=16, max_iter=50, tol=1e-6,
                method=method, return_value=True,
            )  # fmt: skip
        assert torch.isfinite(res.potential).all() and torch.isfinite(res.ot_value).all()
        assert torch.isfinite(res.marginal_error).all()


@pytest.mark.parametrize("eps", [0.3, 0.01, 0.001])
@pytest.mark.parametrize("sharpness", [1.0, 30.0])
def test_wellposed_converges_on_peaked_distributions_and_small_epsilon(
    eps: float, sharpness: float
) -> None:
    """Regimes that used to stall: masses down to 1e-100 (logits x 30), an unmovable mass whose
    reservoir route starts at exp(-Lambda/eps) ~ exp(-1000), float32 log-probabilities whose
    masses do not sum to exactly 1."""
    V = 50
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(V, 4, generator=gen)
    graph = CostGraph.from_embeddings(emb, k=4)
    logits = torch.randn(2, 3, V, generator=gen) * 3
    ref = logits + 0.5 * torch.randn(2, 3, V, generator=gen)
    actions = torch.randint(0, V, (2, 3), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelUnderflowWarning)
        res = wpr_potentials(
            logits * sharpness, ref * sharpness, actions, graph, epsilon=eps, top_k=5,
            max_iter=300, tol=1e-6, return_value=True,
        )  # fmt: skip
    assert res.converged_fraction == 1.0, res.iterations
    assert (res.marginal_error <= 1e-6).all()
    assert torch.isfinite(res.potential).all() and torch.isfinite(res.ot_value).all()
    if eps == 0.001:
        # a budget spent in an eps-scaling stage before the target eps: reported, still finite
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KernelUnderflowWarning)
            short = wpr_potentials(
                logits * sharpness, ref * sharpness, actions, graph, epsilon=eps, top_k=5,
                max_iter=2, tol=1e-6,
            )  # fmt: skip
        assert short.converged_fraction < 1.0 and (short.iterations <= 2).all()
        assert torch.isfinite(short.potential).all()


def test_no_warning_when_kernel_alive() -> None:
    emb, logits, ref, actions = random_problem(scale=0.05)
    graph = CostGraph.from_embeddings(emb, k=12)
    eps = graph.median_knn_cost() / 5
    assert graph.underflow_fraction(eps) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelUnderflowWarning)
        wpr_potentials(logits, ref, actions, graph, epsilon=eps, top_k=8, max_iter=5, tol=1e-6)


def test_infeasible_case_reported_and_wellposed_still_solves() -> None:
    """Policy mass on a token with no graph path to the reference's token: no exact coupling."""
    V = 40
    torch.manual_seed(0)
    emb = torch.cat([torch.zeros(20, 2), torch.full((20, 2), 100.0)]) + 0.01 * torch.randn(V, 2)
    graph = CostGraph.from_embeddings(emb, k=3)
    logits = torch.full((1, 2, V), -30.0)
    ref = torch.full((1, 2, V), -30.0)
    logits[0, :, 5] = 5.0  # policy: cluster A
    ref[0, :, 30] = 5.0  # reference: cluster B, not reachable in one hop
    actions = torch.tensor([[5, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paper = wpr_potentials(
            logits, ref, actions, graph, epsilon=0.5, top_k=4, max_iter=20, tol=1e-6,
            method="paper",
        )  # fmt: skip
    assert paper.infeasible_fraction == 1.0
    for eps in (0.5, 0.001):
        well = wpr_potentials(
            logits, ref, actions, graph, epsilon=eps, top_k=4, max_iter=500, tol=1e-6, gauge="raw"
        )
        assert well.converged_fraction == 1.0
        assert (well.marginal_error <= 1e-6).all()
        # the unmovable mass pays the reservoir's price Lambda (raw gauge: f_R = g_R), more than
        # any move on the graph
        assert torch.isfinite(well.potential).all()
        assert (well.potential > graph.knn_cost.max() + 5 * eps).all(), well.potential
    short = wpr_potentials(logits, ref, actions, graph, epsilon=0.5, top_k=4, max_iter=2, tol=1e-12)
    assert short.converged_fraction == 0.0 and (short.iterations == 2).all()


def test_compressed_tail_sums_match_the_full_distributions() -> None:
    """TopKPair's tail sums (a log a, b log b outside the support) are what the centering uses."""
    _emb, logits, ref, actions = random_problem(V=200)
    pair = compress_topk(logits, ref, actions, 10)
    for lx, ids, tail in (
        (logits, pair.indices, pair.tail_plogp),
        (ref, pair.indices, pair.tail_qlogq),
    ):
        lp = torch.log_softmax(lx.double(), -1)
        outside = torch.ones_like(lp, dtype=torch.bool).scatter_(-1, ids, False)
        expect = torch.where(outside, lp.exp() * lp, torch.zeros_like(lp)).sum(-1)
        torch.testing.assert_close(tail, expect, rtol=1e-4, atol=1e-6)
    # without truncation there is no tail: the sums are the lumped rounding rest, so the tail
    # correction (sum a log a - a_D log a_D) / 2 is exactly 0
    full = compress_topk(logits, ref, actions, 200)
    rest = torch.special.xlogy(full.tail_p, full.tail_p)
    torch.testing.assert_close(full.tail_plogp, rest, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_support_edges_are_the_symmetric_graph(backend: str) -> None:
    emb, logits, ref, actions = random_problem(V=60)
    graph = CostGraph.from_embeddings(emb, k=5)
    pair = compress_topk(logits, ref, actions, 10)
    ids, valid = (
        pair.indices.reshape(-1, pair.indices.shape[-1]),
        pair.valid.reshape(-1, pair.indices.shape[-1]),
    )
    ep, ei, ej, ec = support_edges(graph, ids, valid, backend)
    dense = torch.full((60, 60), float("inf"), dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(60), graph.indptr[1:] - graph.indptr[:-1])
    dense[rows, graph.indices] = graph.costs
    dense.fill_diagonal_(0.0)
    for p in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            if not valid[p, i]:
                continue
            sel = (ep == p) & (ei == i)
            found = {int(ids[p, i]): 0.0}
            found.update({int(ids[p, j]): float(c) for j, c in zip(ej[sel], ec[sel], strict=True)})
            expect = {
                int(ids[p, j]): float(dense[ids[p, i], ids[p, j]])
                for j in range(ids.shape[1])
                if valid[p, j] and dense[ids[p, i], ids[p, j]] < float("inf")
            }
            assert found == pytest.approx(expect)


def test_cache_is_keyed_by_content(tmp_path: Path) -> None:
    emb = torch.randn(100, 8)
    g1 = CostGraph.from_embeddings(emb, k=5, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    again = CostGraph.from_embeddings(emb.clone(), k=5, cache_dir=tmp_path)
    assert torch.equal(again.knn, g1.knn) and len(list(tmp_path.glob("*.pt"))) == 1
    other = emb.flip(0)  # same rows, different tokens: a different model
    g2 = CostGraph.from_embeddings(other, k=5, cache_dir=tmp_path)
    assert not torch.equal(g2.knn, g1.knn)
    assert torch.equal(g2.knn, CostGraph.from_embeddings(other, k=5).knn)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    # a file whose stored key does not match (renamed, stale, corrupt) is rebuilt, not trusted
    f2 = next(f for f in tmp_path.glob("*.pt") if f != files[0])
    f2.write_bytes(files[0].read_bytes())
    g3 = CostGraph.from_embeddings(other, k=5, cache_dir=tmp_path)
    assert torch.equal(g3.knn, g2.knn)
    assert CostGraph.from_embeddings(emb, k=6, cache_dir=tmp_path).k == 6


def test_neighbors_sorted_and_symmetric() -> None:
    emb = torch.randn(50, 4)
    graph = CostGraph.from_embeddings(emb, k=3, metric="cos")
    ids, costs = graph.neighbors(7, 100)
    assert (costs[1:] >= costs[:-1]).all() and len(ids) >= 3
    for j, c in zip(ids.tolist(), costs.tolist(), strict=True):
        back, back_c = graph.neighbors(j, None)
        assert 7 in back.tolist()
        assert back_c[back.tolist().index(7)].item() == pytest.approx(c)
        cos = torch.nn.functional.cosine_similarity(emb[7:8].double(), emb[j : j + 1].double())
        assert c == pytest.approx(1 - cos.item(), abs=1e-9)


def test_bad_input_raises_user_error() -> None:
    emb, logits, ref, actions = random_problem(V=50)
    graph = CostGraph.from_embeddings(emb, k=4)
    kw = dict(epsilon=0.1, top_k=8, max_iter=10, tol=1e-6)
    with pytest.raises(UserError, match="k1.*\\[1, 49\\]"):
        CostGraph.from_embeddings(emb, k=50)
    with pytest.raises(UserError, match="same \\(B, T, V\\) shape"):
        wpr_potentials(logits, ref[:, :3], actions, graph, **kw)
    with pytest.raises(UserError, match="actions must be"):
        wpr_potentials(logits, ref, actions[:, :2], graph, **kw)
    with pytest.raises(UserError, match="epsilon must be"):
        wpr_potentials(logits, ref, actions, graph, **{**kw, "epsilon": 0.0})
    with pytest.raises(UserError, match="epsilon must be"):
        graph.underflow_fraction(-1.0)
    with pytest.raises(UserError, match="vocabulary of 60"):
        wpr_potentials(*random_problem(V=60)[1:], graph, **kw)
    with pytest.raises(UserError, match="method"):
        wpr_potentials(logits, ref, actions, graph, **kw, method="exact")
    with pytest.raises(UserError, match="metric"):
        CostGraph.from_embeddings(emb, k=4, metric="dot")


def _build_into_cache(args: tuple[str, int]) -> list[int]:
    cache, seed = args
    emb = torch.randn(400, 8, generator=torch.Generator().manual_seed(seed))
    return CostGraph.from_embeddings(emb, k=6, cache_dir=cache).knn[0].tolist()


def test_concurrent_builders_share_one_cache_file(tmp_path: Path) -> None:
    # Every rank of a multi-process run builds the same graph at start-up; they used to race
    # on one temporary file name.
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(4) as pool:
        rows = pool.map(_build_into_cache, [(str(tmp_path), 0)] * 8)
    assert all(r == rows[0] for r in rows)
    assert [f.name for f in tmp_path.iterdir() if f.suffix != ".pt"] == []
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_compression_skips_positions_outside_the_mask() -> None:
    """The masked-out positions are not computed (a placeholder: the action alone, probability 1
    under both); the others are bit for bit what an unmasked compression gives."""
    _emb, logits, ref, actions = random_problem(V=200)
    mask = torch.rand(actions.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    assert 0 < int(mask.sum()) < mask.numel()
    part, whole = (
        compress_topk(logits, ref, actions, 10, mask),
        compress_topk(logits, ref, actions, 10),
    )
    for name in ("indices", "logp", "logq", "valid", "tail_p", "tail_q", "tail_plogp", "tail_qlogq",
                 "action_slot"):  # fmt: skip
        assert torch.equal(getattr(part, name)[mask], getattr(whole, name)[mask]), name
    out = ~mask
    assert (part.indices[out] == actions[out].unsqueeze(-1)).all()
    assert part.valid[out].sum(-1).eq(1).all() and (part.logp[out][:, 0] == 0).all()
    assert (part.tail_p[out] == 0).all() and (part.action_slot[out] == 0).all()


def test_compression_of_a_slice_of_longer_logits() -> None:
    """PPO compresses the response positions of prompt + response logits, a (B, T, V) slice that
    is not one (B * T, V) block: the same result as its contiguous copy, masked or not."""
    _emb, logits, ref, actions = random_problem(V=200)
    B, T, V = logits.shape
    g = torch.Generator().manual_seed(4)
    longer = [torch.randn(B, T + 5, V, generator=g) for _ in range(2)]
    for x, full_x in zip((logits, ref), longer, strict=True):
        full_x[:, 4:-1] = x
    pol, rf = longer[0][:, 4:-1], longer[1][:, 4:-1]
    assert not pol.is_contiguous()
    mask = torch.rand(B, T, generator=g) > 0.3
    for m in (None, mask):
        got, want = (
            compress_topk(pol, rf, actions, 10, m),
            compress_topk(logits, ref, actions, 10, m),
        )
        for name in ("indices", "logp", "logq", "valid", "tail_p", "tail_q", "tail_plogp"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


_PAIR_FIELDS = ("indices", "logp", "logq", "valid", "tail_p", "tail_q", "tail_plogp", "tail_qlogq",
                "action_slot")  # fmt: skip


@pytest.mark.parametrize(("V", "k"), [(200, 10), (967, 64), (3000, 128), (40, 16)])
def test_compiled_support_selection_equals_torch_topk(V: int, k: int) -> None:
    """The CPU's compiled compression (block maxima and quickselect for the support, one pass
    for both softmax sums) gives the tensor path's support bit for bit on tie-free logits,
    whatever the ratio of V to k, and its masses to float32 rounding (the sums run in another
    order, and exp is Cephes' polynomial, not libm's)."""
    _emb, logits, ref, actions = random_problem(V=V, B=3, T=7, seed=V)
    logits[0, 1, : V // 3] = -torch.inf  # masked tokens: probability 0, no NaN in the sums
    mask = torch.rand(actions.shape, generator=torch.Generator().manual_seed(5)) > 0.3
    for m in (None, mask):
        got, want = (
            compress_topk(logits, ref, actions, k, m, backend="compiled"),
            compress_topk(logits, ref, actions, k, m, backend="torch"),
        )
        for name in ("indices", "valid", "action_slot"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        for name in ("logp", "logq", "tail_p", "tail_q"):
            a, b = getattr(got, name), getattr(want, name)  # -inf where a logit is -inf
            assert a.dtype == b.dtype and not a.isnan().any(), name
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=name)
        # The tail sums against float64: the compiled pass sums in float64, the tensor path's
        # p . x in float32 (off by up to ~3e-4 at V = 3000). (Both from float32 logits.)
        for name, x in (("tail_plogp", logits), ("tail_qlogq", ref)):
            lx = torch.log_softmax(x.double(), -1)
            outside = torch.ones_like(lx, dtype=torch.bool).scatter_(-1, got.indices, False)
            exact = torch.where(outside & (lx > -torch.inf), lx.exp() * lx, 0.0).sum(-1)
            exact = torch.where(got.mask, exact, 0.0)
            torch.testing.assert_close(getattr(got, name), exact, rtol=0, atol=5e-6, msg=name)
            torch.testing.assert_close(getattr(want, name), exact, rtol=0, atol=1e-3, msg=name)
        assert m is not None or bool((got.logp == -torch.inf).any())  # the -inf case is tried


def test_compiled_exp_is_within_two_ulp_and_zero_below_the_float32_range() -> None:
    """The compression's vectorizable exp (Cephes' expf) against float64, over the range a
    softmax uses (x - max <= 0), and 0 for -inf and below float32's normal range."""
    import numpy as np

    from wprctl.ot.topk_cpu import _exp_shifted, _sum_and_dot

    x = np.concatenate([-np.geomspace(1e-6, 86.9, 20000), [0.0, -87.5, -200.0, -np.inf]])
    x = x.astype(np.float32)
    e = np.empty_like(x)
    _exp_shifted(x, 0.0, e)  # a float64 max, as the compression passes it
    want = np.exp(x[:-3].astype(np.float64))
    assert np.max(np.abs(e[:-3] - want) / want) < 2 * 2.0**-23
    assert list(e[-3:]) == [0.0, 0.0, 0.0]
    s, d = _sum_and_dot(x, 0.0, e)
    assert s == pytest.approx(want.sum(), rel=1e-6)
    assert d == pytest.approx((want * x[:-3]).sum(), rel=1e-6)


def test_vectorizable_exp_and_log_match_numpy_to_three_ulp_with_their_edge_values() -> None:
    """``vecmath.exp64`` and ``log64`` (the compiled Newton solver's) against numpy over their
    whole ranges, compiled as the solver compiles them (fused multiply-adds allowed), and at the
    values where the range reductions switch: ties of the rounding, the sqrt(2) split, the ends."""
    import numpy as np
    from numba import njit

    from wprctl.ot.compiled import VEC_OPTS
    from wprctl.ot.vecmath import exp64, log64

    @njit(**dict(VEC_OPTS, cache=False))
    def both(x, y, ex, lg):
        for i in range(x.shape[0]):
            ex[i] = exp64(x[i])
        for i in range(y.shape[0]):
            lg[i] = log64(y[i])

    rng = np.random.default_rng(0)
    ln2 = np.log(2.0)
    x = np.concatenate(
        [rng.uniform(-708, 709, 200_000), np.arange(-1021, 1022) * ln2 / 2, [0.0, -0.0, 1e-300]]
    )
    y = np.concatenate(
        [
            np.exp(rng.uniform(-708, 709, 200_000)),
            rng.uniform(0.5, 2.0, 100_000),
            [1.0, np.sqrt(2.0), np.nextafter(np.sqrt(2.0), 0), np.finfo(np.float64).tiny],
            [np.finfo(np.float64).max, 2.0**-1000, 2.0**1000],
        ]
    )
    ex, lg = np.empty_like(x), np.empty_like(y)
    both(x, y, ex, lg)
    want = np.exp(x)
    assert np.max(np.abs(ex - want) / np.spacing(want)) <= 3
    want = np.log(y)
    ulp = np.spacing(np.abs(want))
    ulp[want == 0] = np.spacing(1.0)  # log 1 = 0 exactly: an absolute bound
    assert np.max(np.abs(lg - want) / ulp) <= 2
    assert lg[np.flatnonzero(y == 1.0)[0]] == 0.0

    special = np.array([-np.inf, -745.0, -708.5, np.inf, 710.0, np.nan])
    got = np.empty_like(special)
    both(special, np.array([np.inf, np.nan]), got, lg[:2])
    assert list(got[:5]) == [0.0, 0.0, 0.0, np.inf, np.inf] and np.isnan(got[5])
    assert lg[0] == np.inf and np.isnan(lg[1])


def test_compiled_support_selection_breaks_ties_by_the_lower_id() -> None:
    """Tied logits at the k-th place (a flat row, a row of -inf but a few) go by increasing token
    id."""
    x = torch.zeros(3, 30)
    x[0, 7] = 1.0  # one best, then 29 ties for 3 places: ids 0, 1, 2
    x[1] = -torch.inf
    x[1, [4, 20]] = 0.5  # two finite entries, then -inf ties: ids 0, 1
    x[2, [3, 9, 25]] = 2.0  # three tied maxima, then ties at 0
    z = x.flip(-1)  # the same rows read backwards: ties still by the lower id
    y = torch.tensor([29, 0, 5])
    pair = compress_topk(x.unsqueeze(0), z.unsqueeze(0), y.unsqueeze(0), 4, backend="compiled")
    want_x = [[0, 1, 2, 7], [0, 1, 4, 20], [0, 3, 9, 25]]
    want_z = [[0, 1, 2, 22], [0, 1, 9, 25], [0, 4, 20, 26]]
    for r in range(3):
        assert pair.indices[0, r].tolist() == sorted(want_x[r] + want_z[r] + [int(y[r])])


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_compression_in_row_blocks_equals_one_block(monkeypatch, backend: str) -> None:
    """Rows are compressed a block at a time (a bound on the copies and, for tensor ops, the
    cache): blocks of 3 rows, masked rows skipped, give what one block does."""
    import wprctl.ot.topk as topk

    _emb, logits, ref, actions = random_problem(V=90, B=3, T=7)
    mask = torch.rand(actions.shape, generator=torch.Generator().manual_seed(2)) > 0.25
    for masked in (None, mask):
        whole = compress_topk(logits, ref, actions, 6, masked, backend=backend)
        with monkeypatch.context() as m:
            m.setattr(topk, "BLOCK_ENTRIES_COMPILED", 3 * 90)
            m.setattr(topk, "BLOCK_ENTRIES_TENSOR", 3 * 90)
            blocks = compress_topk(logits, ref, actions, 6, masked, backend=backend)
        for name in ("indices", "logp", "logq", "valid", "tail_p", "tail_q", "tail_plogp",
                     "tail_qlogq", "action_slot"):  # fmt: skip
            assert torch.equal(getattr(blocks, name), getattr(whole, name)), name


def test_a_given_support_is_every_positions_slots() -> None:
    """``compress_topk(support=...)``: the batch-wide union as every position's slots, with its
    true masses there; the whole vocabulary as support is the untruncated compression."""
    from wprctl.ot.topk import batch_support

    _emb, logits, ref, actions = random_problem(V=120)
    mask = torch.rand(actions.shape, generator=torch.Generator().manual_seed(6)) > 0.3
    own = compress_topk(logits, ref, actions, 8, mask)
    union = batch_support(logits, ref, actions, 8, mask)
    assert torch.equal(union, torch.unique(own.indices[mask][own.valid[mask]]))
    pair = compress_topk(logits, ref, actions, 8, mask, support=union)
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    assert torch.equal(pair.indices[mask], union.expand(int(mask.sum()), -1))
    assert torch.allclose(pair.logp[mask], lp[mask][:, union], atol=1e-5)
    assert torch.allclose(pair.logq[mask], lq[mask][:, union], atol=1e-5)
    assert torch.equal(pair.indices[mask].gather(1, pair.action_slot[mask, None]).squeeze(1),
                       actions[mask])  # fmt: skip
    rest = torch.ones(120, dtype=torch.bool)
    rest[union] = False
    tail = lp.exp()[mask][:, rest].double().sum(-1)
    assert torch.allclose(pair.tail_p[mask], tail, atol=1e-6)
    # a larger support than a position's own top-k: the own one's tail is covered
    assert bool((pair.tail_p[mask] <= own.tail_p[mask] + 1e-6).all())
    everything = compress_topk(logits, ref, actions, 8, mask, support=torch.arange(120))
    untruncated = compress_topk(logits, ref, actions, 120, mask)
    for name in _PAIR_FIELDS:
        assert torch.equal(getattr(everything, name), getattr(untruncated, name)), name


@pytest.mark.parametrize(
    ("support", "message"),
    [
        (torch.tensor([5, 3, 9]), "sorted"),
        (torch.tensor([-1, 3]), "sorted token ids in"),
        (torch.tensor([], dtype=torch.long), "non-empty"),
        (torch.tensor([3, 4]), "action of every masked position"),
    ],
)
def test_a_bad_support_is_a_clear_error(support: torch.Tensor, message: str) -> None:
    _emb, logits, ref, actions = random_problem(V=50)
    with pytest.raises(UserError, match=message):
        compress_topk(logits, ref, actions, 4, support=support)


def test_the_support_rule_is_checked() -> None:
    emb, logits, ref, actions = random_problem(V=50)
    graph = CostGraph.from_embeddings(emb, k=4)
    with pytest.raises(UserError, match="support must be 'position' or 'batch'"):
        wpr_potentials(
            logits, ref, actions, graph, epsilon=0.1, top_k=4, max_iter=10, tol=1e-6,
            support="global",  # type: ignore[arg-type]
        )  # fmt: skip


@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize("bad", [torch.nan, torch.inf, "row of -inf"])
def test_nan_or_inf_logits_are_a_clear_error(backend: str, bad: float | str) -> None:
    """A diverged model's logits, or a position with every token masked: the error names the
    tensor and the position, on either path (-inf, a masked token, is fine)."""
    _emb, logits, ref, actions = random_problem(V=80)
    ref[0, 2, 7] = -torch.inf
    compress_topk(logits, ref, actions, 8, backend=backend)
    if bad == "row of -inf":
        ref[1, 3, :] = -torch.inf
    else:
        ref[1, 3, 11] = bad
    with pytest.raises(UserError, match=r"ref_logits at position \(b=1, t=3\) hold NaN or \+inf"):
        compress_topk(logits, ref, actions, 8, backend=backend)


@pytest.mark.parametrize("method", ["paper", "wellposed"])
def test_bad_logits_from_the_full_logit_entry_point(method: str) -> None:
    """wpr_potentials checks the positions it computes: a NaN policy logit or a reference row of
    -inf at a masked position is named; the same at a position outside the mask is not read."""
    emb, logits, ref, actions = random_problem(V=80)
    graph = CostGraph.from_embeddings(emb, k=4)
    mask = torch.ones(actions.shape, dtype=torch.bool)
    mask[0, 1] = False
    logits[0, 1, 5], ref[0, 1, :] = torch.nan, -torch.inf
    kw = dict(epsilon=0.5, top_k=8, max_iter=10, tol=1e-6, method=method)
    res = wpr_potentials(logits, ref, actions, graph, mask=mask, **kw)
    assert bool(torch.isfinite(res.potential[mask]).all())
    for b, t, where in ((1, 2, "policy_logits"), (1, 4, "ref_logits")):
        bad_p, bad_q = logits.clone(), ref.clone()
        if where == "policy_logits":
            bad_p[b, t, 9] = torch.nan
        else:
            bad_q[b, t, :] = -torch.inf
        with pytest.raises(UserError, match=rf"{where} at position \(b={b}, t={t}\)"):
            wpr_potentials(bad_p, bad_q, actions, graph, mask=mask, **kw)
