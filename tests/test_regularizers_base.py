"""The plug-in interface across every RegularizerConfig option, and the beta controller."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest
import torch

from wprctl.manifest import FDivConfig, KLConfig, RegularizerConfig
from wprctl.regularizers import BetaController, RegBatch, build_regularizer
from wprctl.regularizers.base import REGISTRY, Regularizer


def options(model, field: str) -> list:
    return list(get_args(model.model_fields[field].annotation))


def test_registry_covers_every_kind() -> None:
    assert set(options(RegularizerConfig, "kind")) == set(REGISTRY)


def random_batch(seed: int = 0) -> RegBatch:
    g = torch.Generator().manual_seed(seed)
    old = torch.log_softmax(torch.randn(3, 6, 7, generator=g) * 2, -1)[..., 0]
    ref = torch.log_softmax(torch.randn(3, 6, 7, generator=g) * 2, -1)[..., 0]
    mask = torch.ones(3, 6)
    mask[0, 4:] = 0
    return RegBatch(torch.zeros(3, 6, dtype=torch.long), mask, old, ref)


KL_OPTIONS = list(
    itertools.product(
        options(KLConfig, "estimator"), options(KLConfig, "placement"), [False, True], [None, 0.3]
    )
)
FDIV_OPTIONS = list(itertools.product(options(FDivConfig, "divergence"), [0.5, 2.0], [None, 0.3]))


@pytest.mark.parametrize(("estimator", "placement", "is_correction", "clip"), KL_OPTIONS)
def test_every_kl_option(estimator: str, placement: str, is_correction: bool, clip) -> None:
    cfg = RegularizerConfig.model_validate(
        {
            "kind": "kl",
            "penalty_clip": clip,
            "kl": {"estimator": estimator, "placement": placement, "is_correction": is_correction},
        }
    )
    reg = build_regularizer(cfg, clip_range=0.2)
    batch = random_batch()
    logp = (batch.old_logprobs + 0.3 * torch.randn(3, 6)).requires_grad_()  # off-policy
    pen, loss = reg.reward_penalty(batch), reg.loss_penalty(batch, logp)
    div = reg.divergence(batch)
    assert div.shape == (3,) and torch.isfinite(div).all()
    if placement == "reward":
        assert loss is None and pen.shape == (3, 6) and not pen.requires_grad
        assert (pen[batch.mask == 0] == 0).all()
        assert pen.abs().max() <= (clip if clip is not None else float("inf"))
        assert clip is None or pen.abs().max() == pytest.approx(clip)  # it did bind
    else:
        assert pen is None and loss.dim() == 0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, logp)
        assert (g[batch.mask == 0] == 0).all()
        if estimator != "k1" or is_correction:
            assert g.abs().max() > 0
        if clip is not None:
            # The clipped coefficient bounds the per-token gradient, times the token-mean weight
            # and, with the correction, the importance weight rho.
            rho = (logp - batch.old_logprobs).exp().detach() if is_correction else 1.0
            bound = clip * rho / batch.mask.sum()
            assert (g.abs() <= bound + 1e-7).all()
        assert ("is_clip_fraction" in reg.metrics()) == is_correction


@pytest.mark.parametrize(("divergence", "alpha", "clip"), FDIV_OPTIONS)
def test_every_fdiv_option(divergence: str, alpha: float, clip) -> None:
    cfg = RegularizerConfig.model_validate(
        {"kind": "fdiv", "penalty_clip": clip, "fdiv": {"divergence": divergence, "alpha": alpha}}
    )
    reg = build_regularizer(cfg)
    batch = random_batch(1)
    pen = reg.reward_penalty(batch)
    assert pen.shape == (3, 6) and (pen[batch.mask == 0] == 0).all()
    assert reg.loss_penalty(batch, batch.old_logprobs.clone().requires_grad_()) is None
    assert reg.divergence(batch).shape == (3,)
    if clip is not None:
        assert pen.abs().max() <= clip


def test_none_regularizer_contributes_nothing_but_logs_k1() -> None:
    reg = build_regularizer(RegularizerConfig(kind="none"))
    assert type(reg) is Regularizer and reg.topk is None
    batch = random_batch(2)
    assert reg.reward_penalty(batch) is None
    assert reg.loss_penalty(batch, batch.old_logprobs) is None
    lr = batch.old_logprobs - batch.ref_logprobs
    torch.testing.assert_close(reg.divergence(batch), (lr * batch.mask).sum(-1))


# ---------------------------------------------------------------------------- beta


def test_fixed_beta_never_moves() -> None:
    ctl = BetaController(RegularizerConfig(kl_ctl=0.05, adaptive=False))
    for div in (0.0, 100.0, 1e6):
        ctl.update(div, n_samples=64)
    assert ctl.value == 0.05


def test_adaptive_beta_moves_toward_the_target() -> None:
    cfg = RegularizerConfig(kl_ctl=0.05, adaptive=True, target=6.0, horizon=1000)
    up, down, at = BetaController(cfg), BetaController(cfg), BetaController(cfg)
    up.update(9.0, n_samples=100)  # divergence above target: penalize more
    down.update(3.0, n_samples=100)  # below: penalize less
    at.update(6.0, n_samples=100)
    assert up.value == pytest.approx(0.05 * (1 + 0.2 * 100 / 1000))  # error clipped at +0.2
    assert down.value == pytest.approx(0.05 * (1 - 0.2 * 100 / 1000))
    assert at.value == pytest.approx(0.05)
    small = BetaController(cfg)
    small.update(6.6, n_samples=100)  # error 0.1, inside the clip
    assert small.value == pytest.approx(0.05 * (1 + 0.1 * 100 / 1000))
    # Repeated over-target steps keep raising beta; state round-trips (resume).
    for _ in range(10):
        up.update(9.0, n_samples=100)
    assert up.value > 0.05 * 1.2
    restored = BetaController(cfg)
    restored.load_state_dict(up.state_dict())
    assert restored.value == up.value
