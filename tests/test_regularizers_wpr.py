"""The WPR plug-in: top-k data only, same penalties as the full-logit solver, metrics, setup."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wprctl.manifest import RegularizerConfig
from wprctl.ot import CostGraph, TopKPair, compress_topk, wpr_potentials
from wprctl.regularizers import RegBatch, build_regularizer

V, D, B, T = 40, 8, 2, 5
PAD, EOS = 0, 1
EPS = {"l2": 0.3, "cos": 0.05}  # about median kNN cost / 8: the kernel is alive


def embeddings() -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(0))


def wpr_cfg(**wpr) -> RegularizerConfig:
    clip = wpr.pop("penalty_clip", None)
    metric = wpr.setdefault("metric", "l2")
    wpr.setdefault("epsilon", EPS[metric])
    wpr.setdefault("k1", 6)
    wpr.setdefault("max_iter", 50)
    return RegularizerConfig.model_validate({"kind": "wpr", "wpr": wpr, "penalty_clip": clip})


def rollout(seed: int = 1):
    """Policy and reference logits (B, T, V), sampled actions and a mask with one padded token."""
    g = torch.Generator().manual_seed(seed)
    ref = 2.0 * torch.randn(B, T, V, generator=g)
    pol = ref + 0.7 * torch.randn(B, T, V, generator=g)
    probs = torch.softmax(pol, -1).reshape(B * T, V)
    actions = torch.multinomial(probs, 1, generator=g).reshape(B, T)
    mask = torch.ones(B, T)
    mask[1, -1] = 0
    return pol, ref, actions, mask


def reg_batch(pol, ref, actions, mask, k: int) -> RegBatch:
    """What PPO hands the plug-in: log-probs of the sampled tokens and the compressed pair."""
    pair = compress_topk(pol, ref, actions, k, mask=mask.bool())
    lp = torch.log_softmax(pol, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    lq = torch.log_softmax(ref, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return RegBatch(actions, mask, lp, lq, topk=pair)


def setup_reg(cfg: RegularizerConfig, tmp_path=None):
    reg = build_regularizer(cfg)
    reg.setup(ref_embeddings=embeddings(), cache_dir=tmp_path, pad_id=PAD, eos_id=EOS)
    return reg


def held_tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dataclass fields and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in held_tensors(item, seen)]


def test_wpr_receives_and_keeps_only_topk_compressed_data() -> None:
    k2 = 3
    reg = setup_reg(wpr_cfg(k2=k2, method="wellposed"))
    assert reg.topk == k2  # PPO reads this to compress at rollout
    pol, ref, actions, mask = rollout()
    batch = reg_batch(pol, ref, actions, mask, reg.topk)
    del pol, ref  # the full logits are gone before the regularizer runs
    pen = reg.reward_penalty(batch)
    div = reg.divergence(batch)
    assert pen.shape == (B, T) and div.shape == (B,)
    pair_tensors = held_tensors(batch.topk)
    assert len(pair_tensors) == 11
    for t in pair_tensors:
        assert t.shape[:2] == (B, T) and t.dim() <= 3
        assert t.dim() == 2 or t.shape[-1] == 2 * k2 + 1 < V
    reg_tensors = held_tensors(reg)
    assert reg_tensors  # the graph and the last solve's (B, T) results are held ...
    for t in reg_tensors:  # ... but nothing with a vocabulary-sized last dim beyond 1-D
        assert not (t.dim() >= 2 and t.shape[-1] == V), tuple(t.shape)
        assert not (t.dim() == 3 and t.shape[:2] == (B, T))


@pytest.mark.parametrize("method", ["paper", "wellposed"])
@pytest.mark.parametrize("gauge", ["raw", "centered"])
@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_wpr_penalties_equal_full_logit_solver_when_k2_covers_the_vocabulary(
    method: str, gauge: str, metric: str
) -> None:
    cfg = wpr_cfg(k2=V + 3, method=method, gauge=gauge, metric=metric)
    reg = setup_reg(cfg)
    pol, ref, actions, mask = rollout(2)
    batch = reg_batch(pol, ref, actions, mask, reg.topk)
    graph = CostGraph.from_embeddings(embeddings(), k=6, metric=metric)
    full = wpr_potentials(
        pol, ref, actions, graph, epsilon=cfg.wpr.epsilon, top_k=cfg.wpr.k2,
        max_iter=cfg.wpr.max_iter, tol=cfg.wpr.tol, mask=mask.bool(), gauge=gauge, method=method,
        pad_id=PAD, eos_id=EOS, return_value=True,
    )  # fmt: skip
    pen = reg.reward_penalty(batch)
    # paper runs in float32 like the official trainer, and the two paths round the softmax
    # differently (exp(x - lse) vs exp(log_softmax)); wellposed runs in float64.
    tol = {"rtol": 1e-4, "atol": 2e-5} if method == "paper" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(pen, full.potential * mask, **tol)
    assert pen.abs().max() > 1e-3 and pen[1, -1] == 0
    # "Average Wasserstein": the per-sequence sum of OT values, not divided by beta.
    torch.testing.assert_close(reg.divergence(batch), (full.ot_value * mask).sum(-1), **tol)
    m = reg.metrics()
    assert m["converged_fraction"] == pytest.approx(full.converged_fraction)
    assert 0.0 <= m["converged_fraction"] <= 1.0
    assert m["mean_iterations"] == pytest.approx(
        float(full.iterations[mask.bool()].double().mean())
    )
    assert 1.0 <= m["mean_iterations"] <= cfg.wpr.max_iter
    assert m["kernel_underflow"] == graph.underflow_fraction(cfg.wpr.epsilon)
    assert m["ot_value_mean"] == pytest.approx(float(full.ot_value[mask.bool()].double().mean()))
    if method == "paper":
        assert m["infeasible_fraction"] == pytest.approx(full.infeasible_fraction)
    else:
        assert "infeasible_fraction" not in m


def test_wpr_solves_each_new_batch_and_clips_when_asked() -> None:
    reg = setup_reg(wpr_cfg(k2=4, method="wellposed"))
    clipped = setup_reg(wpr_cfg(k2=4, method="wellposed", penalty_clip=0.05))
    b1, b2 = reg_batch(*rollout(3), k=4), reg_batch(*rollout(4), k=4)
    p1, p2 = reg.reward_penalty(b1), reg.reward_penalty(b2)
    assert not torch.allclose(p1, p2)
    torch.testing.assert_close(reg.reward_penalty(b1), p1)  # not the cached b2 result
    assert p1.abs().max() > 0.05
    torch.testing.assert_close(clipped.reward_penalty(b1), p1.clamp(-0.05, 0.05))
    assert reg.loss_penalty(b1, b1.old_logprobs) is None


def test_wpr_setup_caps_k1_caches_the_graph_and_warns_on_kernel_underflow(tmp_path, capsys) -> None:
    reg = setup_reg(wpr_cfg(k1=512, k2=4), tmp_path)
    out = capsys.readouterr().out
    assert reg.graph.k == V - 1 and "k1 = 39" in out
    assert "underflow" not in out.lower()
    assert list(tmp_path.glob("cost_graph_*.pt"))
    # The paper's default epsilon on these costs: exp(-C/eps) is 0 on every edge.
    dead = setup_reg(wpr_cfg(k2=4, epsilon=0.01))
    out = capsys.readouterr().out
    assert dead.kernel_underflow == 1.0
    assert "kernel underflow" in out and "identity" in out
    with pytest.warns(UserWarning):  # the solver repeats the warning at its first call
        dead.reward_penalty(reg_batch(*rollout(5), k=4))
    assert dead.metrics()["kernel_underflow"] == 1.0


def test_wpr_without_setup_or_pair_is_a_clear_error() -> None:
    from wprctl.errors import RunError

    batch = reg_batch(*rollout(6), k=4)
    with pytest.raises(RunError, match="setup"):
        build_regularizer(wpr_cfg(k2=4)).reward_penalty(batch)
    reg = setup_reg(wpr_cfg(k2=4))
    with pytest.raises(RunError, match="TopKPair"):
        reg.reward_penalty(dataclasses.replace(batch, topk=None))
    assert isinstance(batch.topk, TopKPair)


@pytest.mark.parametrize("method", ["paper", "wellposed"])
@pytest.mark.parametrize("gauge", ["raw", "centered"])
def test_wpr_is_finite_when_the_topk_holds_all_the_mass(method: str, gauge: str) -> None:
    # Peaked distributions (common late in training): the top-k tail masses are exactly 0.
    pol, ref, actions, mask = rollout(2)
    batch = reg_batch(15 * pol, 15 * ref, actions, mask, k=4)
    assert (batch.topk.tail_p == 0).any() and (batch.topk.tail_q == 0).any()
    reg = setup_reg(wpr_cfg(k2=4, method=method, gauge=gauge))
    assert torch.isfinite(reg.reward_penalty(batch)).all()
    assert torch.isfinite(reg.divergence(batch)).all()


def test_wpr_max_iter_defaults_per_method_and_a_cut_off_wellposed_solve_warns_once(capsys) -> None:
    # The manifest's max_iter counts Sinkhorn iterations for paper and Newton steps for
    # wellposed; unset, each method gets its own budget.
    for method, expected in [("paper", 10), ("wellposed", 100)]:
        cfg = RegularizerConfig.model_validate({"kind": "wpr", "wpr": {"method": method}})
        assert cfg.wpr.max_iter is None and cfg.wpr.iterations == expected
    batch = reg_batch(*rollout(7), k=8)
    full = setup_reg(wpr_cfg(k2=8, method="wellposed", max_iter=None))
    full.reward_penalty(batch)
    assert full.metrics()["converged_fraction"] == 1.0
    assert "did not converge" not in capsys.readouterr().out
    cut = setup_reg(wpr_cfg(k2=8, method="wellposed", max_iter=1))
    capsys.readouterr()
    cut.reward_penalty(batch)
    converged = cut.metrics()["converged_fraction"]
    assert converged < 1.0
    out = capsys.readouterr().out
    assert "did not converge" in out and f"{1 - converged:.1%}" in out and "max_iter = 1" in out
    cut.reward_penalty(reg_batch(*rollout(8), k=8))
    assert "did not converge" not in capsys.readouterr().out
    # paper stops at its fixed count by design: no warning however far from converged
    paper = setup_reg(wpr_cfg(k2=8, method="paper", max_iter=1))
    capsys.readouterr()
    paper.reward_penalty(batch)
    assert paper.metrics()["converged_fraction"] < 1.0
    assert "did not converge" not in capsys.readouterr().out
