"""The identities of "Rethinking KL Regularization in RLHF", checked exactly on a categorical policy.

A single decision step: pi_theta = softmax(theta) over 5 actions, pi_ref = softmax(theta_ref).
Expectations are exact sums over the actions. The plug-ins are exercised as PPO calls them, with
one batch row per action and the float mask set to the sampling probabilities (detached), so that
their masked token mean is exactly the expectation under the sampling policy.
"""

from __future__ import annotations

import pytest
import torch

from wprctl.manifest import RegularizerConfig
from wprctl.regularizers import RegBatch, build_regularizer
from wprctl.regularizers.estimators import kl_coefficient, kl_estimate, kl_loss_surrogate

N_ACTIONS = 5


def thetas(seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta_ref, direction): a reference's logits and a random direction away from it."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N_ACTIONS, generator=g, dtype=torch.float64),
        scale * torch.randn(N_ACTIONS, generator=g, dtype=torch.float64),
    )


def logp_of(theta: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(theta, dim=0)


def true_reverse_kl_grad(theta: torch.Tensor, theta_ref: torch.Tensor) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_()
    lp, lq = logp_of(th), logp_of(theta_ref)
    (g,) = torch.autograd.grad((lp.exp() * (lp - lq)).sum(), th)
    return g


def true_forward_kl_grad(theta: torch.Tensor, theta_ref: torch.Tensor) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_()
    lp, lq = logp_of(th), logp_of(theta_ref)
    (g,) = torch.autograd.grad((lq.exp() * (lq - lp)).sum(), th)
    return g


def enumerated_batch(sample_logp: torch.Tensor, ref_logp: torch.Tensor) -> RegBatch:
    """One row per action; mask = the sampling probabilities, so masked means are expectations."""
    return RegBatch(
        actions=torch.arange(N_ACTIONS).unsqueeze(1),
        mask=sample_logp.detach().exp().unsqueeze(1),
        old_logprobs=sample_logp.detach().unsqueeze(1),
        ref_logprobs=ref_logp.detach().unsqueeze(1),
    )


def kl_cfg(**kl) -> RegularizerConfig:
    extra = {k: kl.pop(k) for k in ("penalty_clip",) if k in kl}
    return RegularizerConfig.model_validate({"kind": "kl", "kl": kl, **extra})


def loss_grad(
    cfg: RegularizerConfig,
    theta: torch.Tensor,
    theta_ref: torch.Tensor,
    theta_old: torch.Tensor | None = None,
    clip_range: float = 0.2,
) -> torch.Tensor:
    """Exact expected gradient of the plug-in's loss term, samples from pi_old (default pi_theta)."""
    reg = build_regularizer(cfg, clip_range=clip_range)
    th = theta.detach().clone().requires_grad_()
    lp = logp_of(th)
    old = logp_of(theta_old if theta_old is not None else theta).detach()
    batch = enumerated_batch(old, logp_of(theta_ref))
    (g,) = torch.autograd.grad(reg.loss_penalty(batch, lp.unsqueeze(1)), th)
    return g


def reward_grad(
    cfg: RegularizerConfig, theta: torch.Tensor, theta_ref: torch.Tensor
) -> torch.Tensor:
    """REINFORCE gradient of the plug-in's detached reward penalty: E_pi[sg(penalty) grad logp]."""
    reg = build_regularizer(cfg)
    th = theta.detach().clone().requires_grad_()
    lp = logp_of(th)
    batch = enumerated_batch(lp, logp_of(theta_ref))
    penalty = reg.reward_penalty(batch)
    assert penalty is not None and not penalty.requires_grad
    # The mask already holds the probabilities, so penalty = pi * k; sum(pi k grad logp).
    (g,) = torch.autograd.grad((penalty.squeeze(1) * lp).sum(), th)
    return g


# ---------------------------------------------------------------------------- the identities


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_policy_k2_as_loss_equals_k1_in_reward_equals_reverse_kl_gradient(seed: int) -> None:
    theta_ref, d = thetas(seed)
    theta = theta_ref + d
    g_true = true_reverse_kl_grad(theta, theta_ref)
    assert g_true.norm() > 1e-2
    g_k1_reward = reward_grad(kl_cfg(estimator="k1", placement="reward"), theta, theta_ref)
    g_k2_loss = loss_grad(
        kl_cfg(estimator="k2", placement="loss", is_correction=False), theta, theta_ref
    )
    # On-policy the IS-corrected form has rho = 1 and must give the same gradient.
    g_k2_is = loss_grad(
        kl_cfg(estimator="k2", placement="loss", is_correction=True), theta, theta_ref
    )
    torch.testing.assert_close(g_k1_reward, g_true, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_k2_loss, g_true, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_k2_is, g_true, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("is_correction", [False, True])
def test_k1_as_loss_has_zero_expected_gradient(is_correction: bool) -> None:
    theta_ref, d = thetas(3)
    theta = theta_ref + d
    assert true_reverse_kl_grad(theta, theta_ref).norm() > 1e-2
    g = loss_grad(
        kl_cfg(estimator="k1", placement="loss", is_correction=is_correction), theta, theta_ref
    )
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)


def test_k3_as_loss_matches_reverse_kl_gradient_only_to_first_order() -> None:
    theta_ref, d = thetas(4)
    cfg = kl_cfg(estimator="k3", placement="loss", is_correction=False)
    rel = {}
    for t in (1e-3, 1e-2, 2.0):
        theta = theta_ref + t * d
        g3 = loss_grad(cfg, theta, theta_ref)
        # What it does follow exactly: the forward KL's gradient.
        torch.testing.assert_close(
            g3, true_forward_kl_grad(theta, theta_ref), rtol=1e-9, atol=1e-14
        )
        g_true = true_reverse_kl_grad(theta, theta_ref)
        rel[t] = float((g3 - g_true).norm() / g_true.norm())
    # Equal as pi -> pi_ref: the relative error vanishes linearly in the distance ...
    assert rel[1e-3] < 2e-3
    assert 5.0 < rel[1e-2] / rel[1e-3] < 20.0
    # ... and is measurably different far away.
    assert rel[2.0] > 0.3


def test_is_corrected_off_policy_k2_loss_gives_on_policy_gradient() -> None:
    theta_ref, d = thetas(5)
    theta = theta_ref + d
    _, d_old = thetas(6, scale=0.08)
    theta_old = theta + d_old  # pi_old != pi_theta, ratios inside PPO's [0.8, 1.2]
    rho = (logp_of(theta) - logp_of(theta_old)).exp()
    assert (rho - 1).abs().max() > 0.03 and ((rho > 0.8) & (rho < 1.2)).all()
    g_true = true_reverse_kl_grad(theta, theta_ref)
    g_is = loss_grad(
        kl_cfg(estimator="k2", placement="loss", is_correction=True), theta, theta_ref, theta_old
    )
    g_naive = loss_grad(
        kl_cfg(estimator="k2", placement="loss", is_correction=False), theta, theta_ref, theta_old
    )
    torch.testing.assert_close(g_is, g_true, rtol=1e-10, atol=1e-12)
    assert (g_naive - g_true).norm() / g_true.norm() > 0.02


def test_is_correction_is_exact_far_off_policy_when_the_clip_does_not_bind() -> None:
    theta_ref, d = thetas(7)
    theta = theta_ref + d
    _, d_old = thetas(8, scale=1.0)
    theta_old = theta + d_old
    rho = (logp_of(theta) - logp_of(theta_old)).exp()
    assert rho.max() > 1.5 or rho.min() < 0.5
    g_true = true_reverse_kl_grad(theta, theta_ref)
    cfg = kl_cfg(estimator="k2", placement="loss", is_correction=True)
    g_wide = loss_grad(cfg, theta, theta_ref, theta_old, clip_range=100.0)
    torch.testing.assert_close(g_wide, g_true, rtol=1e-10, atol=1e-12)
    # With PPO's 0.2 the clip binds somewhere and the gradient is no longer the exact one.
    g_ppo = loss_grad(cfg, theta, theta_ref, theta_old, clip_range=0.2)
    assert (g_ppo - g_true).norm() > 1e-3


def test_is_surrogate_value_and_pessimistic_clip() -> None:
    # Four tokens: rho above / below the range, coefficient c = lr (k2) positive / negative.
    old = torch.log(torch.tensor([0.1, 0.1, 0.5, 0.5], dtype=torch.float64))
    rho = torch.tensor([1.5, 1.5, 0.5, 0.5], dtype=torch.float64)
    logp = (old + rho.log()).requires_grad_()
    lr = torch.tensor([0.3, -0.3, 0.3, -0.3], dtype=torch.float64)
    ref = logp.detach() - lr
    loss, binding = kl_loss_surrogate(logp, ref, "k2", old_logp=old, clip_range=0.2)
    torch.testing.assert_close(loss.detach(), kl_estimate(lr, "k2"))  # value: k2 at pi_theta
    (g,) = torch.autograd.grad(loss.sum(), logp)
    # d(rho c)/dlogp = rho c where the unclipped branch is selected, else 0: the KL term may
    # still pull pi_theta back toward pi_old but never pushes it further out of the trust region.
    expected = torch.tensor([1.5 * 0.3, 0.0, 0.0, 0.5 * -0.3], dtype=torch.float64)
    torch.testing.assert_close(g, expected)
    assert binding.tolist() == [False, True, True, False]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_coefficient_is_the_derivative_of_the_estimator(estimator: str) -> None:
    lr = torch.linspace(-3, 3, 13, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(kl_estimate(lr, estimator).sum(), lr)
    torch.testing.assert_close(g, kl_coefficient(lr.detach(), estimator))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_kl_values_k2_is_not(estimator: str) -> None:
    theta_ref, d = thetas(9)
    lp, lq = logp_of(theta_ref + d), logp_of(theta_ref)
    kl = (lp.exp() * (lp - lq)).sum()
    torch.testing.assert_close((lp.exp() * kl_estimate(lp - lq, estimator)).sum(), kl)
    assert abs(float((lp.exp() * kl_estimate(lp - lq, "k2")).sum() - kl)) > 1e-3


# ---------------------------------------------------------------------------- the plug-in


def seq_batch() -> tuple[RegBatch, torch.Tensor]:
    """A (2, 4) batch with one padded position and log-ratios of both signs."""
    ref = torch.log(torch.tensor([[0.2, 0.5, 0.1, 0.3], [0.4, 0.05, 0.3, 0.6]]))
    old = torch.log(torch.tensor([[0.6, 0.1, 0.1, 0.9], [0.2, 0.5, 0.3, 0.6]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    batch = RegBatch(torch.zeros(2, 4, dtype=torch.long), mask, old, ref)
    return batch, old - ref


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_reward_placement_penalty_divergence_and_no_loss(estimator: str) -> None:
    batch, lr = seq_batch()
    reg = build_regularizer(kl_cfg(estimator=estimator, placement="reward"))
    pen = reg.reward_penalty(batch)
    torch.testing.assert_close(pen, kl_estimate(lr, estimator) * batch.mask)
    assert pen[0, 3] == 0
    assert reg.loss_penalty(batch, batch.old_logprobs.clone().requires_grad_()) is None
    torch.testing.assert_close(
        reg.divergence(batch), (kl_estimate(lr, estimator) * batch.mask).sum(-1)
    )


def test_penalty_clip_clips_reward_penalty_not_divergence() -> None:
    batch, lr = seq_batch()
    assert lr.abs().max() > 1.5
    reg = build_regularizer(kl_cfg(estimator="k1", placement="reward", penalty_clip=0.5))
    pen = reg.reward_penalty(batch)
    assert pen.abs().max() == pytest.approx(0.5)
    torch.testing.assert_close(pen, lr.clamp(-0.5, 0.5) * batch.mask)
    torch.testing.assert_close(reg.divergence(batch), (lr * batch.mask).sum(-1))


@pytest.mark.parametrize("is_correction", [False, True])
def test_loss_placement_value_gradient_and_coefficient_clip(is_correction: bool) -> None:
    batch, lr = seq_batch()
    logp = batch.old_logprobs.clone().requires_grad_()  # on-policy: rho = 1
    m = batch.mask
    reg = build_regularizer(kl_cfg(estimator="k2", placement="loss", is_correction=is_correction))
    assert reg.reward_penalty(batch) is None
    loss = reg.loss_penalty(batch, logp)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.detach(), (0.5 * lr**2 * m).sum() / m.sum())
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, lr * m / m.sum())
    clipped = build_regularizer(
        kl_cfg(estimator="k2", placement="loss", is_correction=is_correction, penalty_clip=0.5)
    )
    loss_c = clipped.loss_penalty(batch, logp)
    torch.testing.assert_close(loss_c.detach(), loss.detach())  # the logged value is still k2
    (g_c,) = torch.autograd.grad(loss_c, logp)
    torch.testing.assert_close(g_c, lr.clamp(-0.5, 0.5) * m / m.sum())
    if is_correction:
        assert clipped.metrics() == {"is_clip_fraction": 0.0}
