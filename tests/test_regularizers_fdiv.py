"""f-divergence estimators: E_{y~pi}[f(r)/r] equals the closed-form D_f(pi || pi_ref), by enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from wprctl.manifest import RegularizerConfig
from wprctl.regularizers import RegBatch, build_regularizer
from wprctl.regularizers.estimators import FDIV_GENERATORS, fdiv_estimate

P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
Q = torch.tensor([0.1, 0.3, 0.2, 0.3, 0.1], dtype=torch.float64)


def closed_form(name: str, p: torch.Tensor, q: torch.Tensor, alpha: float = 0.5) -> float:
    """Each divergence written directly from its definition (not through the generator f)."""
    if name == "rkl":
        return float((p * (p / q).log()).sum())
    if name == "fkl":
        return float((q * (q / p).log()).sum())
    if name == "js":
        m = (p + q) / 2
        return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())
    if name == "alpha":
        if alpha == 1.0:
            return closed_form("rkl", p, q)
        if alpha == 0.0:
            return closed_form("fkl", p, q)
        return float(((p**alpha * q ** (1 - alpha)).sum() - 1) / (alpha * (alpha - 1)))
    if name == "tv":
        return float(0.5 * (p - q).abs().sum())
    if name == "chi2":
        return float(((p - q) ** 2 / q).sum())
    raise AssertionError(name)


CASES = [("rkl", 0.5), ("fkl", 0.5), ("js", 0.5), ("tv", 0.5), ("chi2", 0.5)] + [
    ("alpha", a) for a in (0.5, 2.0, -1.0, 0.3, 0.0, 1.0)
]


@pytest.mark.parametrize(("name", "alpha"), CASES)
@pytest.mark.parametrize("pair", ["pq", "qp", "same"])
def test_fdiv_estimate_expectation_equals_closed_form(name: str, alpha: float, pair: str) -> None:
    p, q = {"pq": (P, Q), "qp": (Q, P), "same": (P, P)}[pair]
    expected = closed_form(name, p, q, alpha)
    estimate = float((p * fdiv_estimate(p.log() - q.log(), name, alpha)).sum())
    assert estimate == pytest.approx(expected, rel=1e-10, abs=1e-13)
    if pair == "same":
        assert expected == pytest.approx(0.0, abs=1e-13)
    else:
        assert expected > 1e-3


def test_js_and_tv_are_bounded_divergences_with_unbounded_per_token_estimates() -> None:
    far_p = torch.tensor([1 - 1e-9, 1e-9], dtype=torch.float64)
    far_q = torch.tensor([1e-9, 1 - 1e-9], dtype=torch.float64)
    assert closed_form("js", far_p, far_q) == pytest.approx(math.log(2), rel=1e-6)
    assert closed_form("tv", far_p, far_q) == pytest.approx(1.0, rel=1e-6)
    lr = far_p.log() - far_q.log()
    for name in ("js", "tv"):
        est = fdiv_estimate(lr, name)
        assert float((far_p * est).sum()) == pytest.approx(
            closed_form(name, far_p, far_q), rel=1e-6
        )
        assert est.max() > 1e6  # the 1/r weight at the token pi hardly ever samples


@pytest.mark.parametrize(("name", "alpha"), CASES)
def test_estimates_are_accurate_for_large_log_ratios(name: str, alpha: float) -> None:
    lr = torch.tensor([-30.0, -5.0, 0.0, 5.0, 30.0], dtype=torch.float64)
    ref64 = fdiv_estimate(lr, name, alpha)
    got32 = fdiv_estimate(lr.float(), name, alpha)
    assert got32.dtype == torch.float32 and torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), ref64, rtol=1e-6, atol=1e-6)


def fdiv_cfg(divergence: str, alpha: float = 0.5, penalty_clip: float | None = None):
    return RegularizerConfig.model_validate(
        {
            "kind": "fdiv",
            "fdiv": {"divergence": divergence, "alpha": alpha},
            "penalty_clip": penalty_clip,
        }
    )


@pytest.mark.parametrize(("name", "alpha"), CASES)
def test_fdiv_plugin_reward_penalty_and_divergence(name: str, alpha: float) -> None:
    old = torch.stack([P.log(), Q.log()]).float()
    ref = torch.stack([Q.log(), Q.log()]).float()
    mask = torch.tensor([[1.0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    batch = RegBatch(torch.zeros(2, 5, dtype=torch.long), mask, old, ref)
    reg = build_regularizer(fdiv_cfg(name, alpha))
    assert reg.topk is None  # needs only the sampled tokens' log-probs
    pen = reg.reward_penalty(batch)
    est = fdiv_estimate(old - ref, name, alpha)
    torch.testing.assert_close(pen, est * mask)
    assert reg.loss_penalty(batch, old.clone().requires_grad_()) is None
    torch.testing.assert_close(reg.divergence(batch), (est * mask).sum(-1))
    assert reg.divergence(batch)[1].abs() < 1e-6  # pi_old == pi_ref on row 1


@pytest.mark.parametrize("name", ["rkl", "chi2", "fkl"])
def test_penalty_clip_clips_fdiv_penalty(name: str) -> None:
    lr = torch.tensor([[-4.0, -1.0, 0.1, 1.0, 4.0]])
    batch = RegBatch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5), lr, torch.zeros(1, 5))
    raw = build_regularizer(fdiv_cfg(name)).reward_penalty(batch)
    assert raw.abs().max() > 2.5  # unclipped by default, unlike the official trainer
    clipped = build_regularizer(fdiv_cfg(name, penalty_clip=2.5)).reward_penalty(batch)
    torch.testing.assert_close(clipped, raw.clamp(-2.5, 2.5))
    assert clipped.abs().max() == pytest.approx(2.5)


def test_every_generator_is_documented() -> None:
    from typing import get_args

    from wprctl.manifest import FDivConfig

    options = set(get_args(FDivConfig.model_fields["divergence"].annotation))
    assert options == set(FDIV_GENERATORS)
    assert options == {name for name, _ in CASES}
