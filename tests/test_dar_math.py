"""DAR's math on a one-step bandit with enumerable actions, in exact expectation.

With y ~ pi_t the expected DAR loss is sum_y pi_t(y) w(y) (-log pi_theta(y)), and
pi_t w = pi_0^alpha pi_t^(1-alpha) exp(A/beta) = Z pi*, so gradient steps on it move a softmax
policy to pi*. These tests run the library's weights and loss through real gradient steps and
compare with the closed form computed independently here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from wprctl.rl.dar_math import (
    dar_weights,
    mc_advantages,
    sequence_logprobs,
    weight_stats,
    weighted_nll,
)

N_ACTIONS = 6


@pytest.fixture(autouse=True)
def _float64():
    """Exact-expectation checks in float64 (autouse: set before the other fixtures build tensors)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def closed_form(
    pi0: torch.Tensor, pit: torch.Tensor, adv: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    return torch.softmax(alpha * pi0.log() + (1 - alpha) * pit.log() + adv / beta, 0)


def dar_update(
    pit: torch.Tensor,
    pi0: torch.Tensor,
    adv: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    w_clip: float = 1e30,
    plain_steps: int | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """One DAR iteration in exact expectation: gradient steps on a softmax policy started at pi_t.

    `plain_steps` runs that many plain gradient steps (step size 1 <= 1/L for a softmax
    cross-entropy) and records KL(target || pi_theta) after each; by default L-BFGS runs the
    same loss to convergence, which is faster. Returns pi_{t+1} and the distances.
    """
    w = dar_weights(pi0.log(), pit.log(), adv, alpha=alpha, beta=beta, w_clip=w_clip).weights
    mass = w * pit  # the expectation over y ~ pi_t, enumerated
    logits = pit.log().clone().requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        # Dividing by the normalizer Z makes the loss CE(pi*, pi_theta): a unit-scale gradient.
        return weighted_nll(torch.log_softmax(logits, 0), mass, denominator=float(mass.sum()))

    dists: list[float] = []
    if plain_steps is None:
        opt = torch.optim.LBFGS(
            [logits], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
        return torch.softmax(logits.detach(), 0), dists
    sgd = torch.optim.SGD([logits], lr=1.0)
    for _ in range(plain_steps):
        sgd.zero_grad()
        loss_fn().backward()
        sgd.step()
        if target is not None:
            dists.append(kl(target, torch.softmax(logits.detach(), 0)))
    return torch.softmax(logits.detach(), 0), dists


@pytest.fixture
def bandit() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pi0 = torch.softmax(torch.randn(N_ACTIONS, generator=g), 0)
    pit = torch.softmax(torch.randn(N_ACTIONS, generator=g), 0)
    adv = torch.linspace(-0.1, 0.1, N_ACTIONS)[torch.randperm(N_ACTIONS, generator=g)]
    return pi0, pit, adv


# --------------------------------------------------------------------------------------------
# the bandit check


def test_gradient_steps_converge_to_the_closed_form_target(bandit) -> None:
    pi0, pit, adv = bandit
    alpha, beta = 0.1, 0.05  # the paper's defaults; |A| <= 0.1 keeps exp(A/beta) unclipped
    target = closed_form(pi0, pit, adv, alpha, beta)
    new, dists = dar_update(pit, pi0, adv, alpha=alpha, beta=beta, plain_steps=3000, target=target)
    start = kl(target, pit)
    assert start > 0.1  # the target is far from where we start
    # Gradient descent on a convex smooth loss with step 1/L: the distance never increases...
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(dists))
    # ...and it reaches pi* (float64: 1e-10 of the starting KL).
    assert dists[-1] < 1e-10 * start
    assert torch.allclose(new, target, atol=1e-6)
    # Any other target is not where it goes: pi_t or pi_0 tilted alone is measurably different.
    assert kl(closed_form(pi0, pit, adv, 0.0, beta), new) > 1e-3
    assert kl(closed_form(pi0, pit, adv, 1.0, beta), new) > 1e-3


def test_iterations_follow_the_recursion_to_the_fixed_point(bandit) -> None:
    """pi_{t+1} ∝ pi_0^a pi_t^(1-a) exp(A/b): the fixed point is pi_0 exp(A/(a b)), reached
    geometrically (the log-ratio to it shrinks by 1 - a per iteration)."""
    pi0, pit, adv = bandit
    alpha, beta = 0.3, 0.5
    fixed = torch.softmax(pi0.log() + adv / (alpha * beta), 0)
    dists, pi = [kl(fixed, pit)], pit
    for _ in range(12):
        expected = closed_form(pi0, pi, adv, alpha, beta)
        pi, _ = dar_update(pi, pi0, adv, alpha=alpha, beta=beta)
        assert torch.allclose(pi, expected, atol=1e-7)
        dists.append(kl(fixed, pi))
    assert all(b < a for a, b in itertools.pairwise(dists))
    assert dists[-1] < 1e-3 * dists[0]

    def centered_log_ratio(p: torch.Tensor) -> torch.Tensor:
        d = p.log() - fixed.log()
        return d - d.mean()

    r0 = centered_log_ratio(pit).norm()
    assert float(centered_log_ratio(pi).norm()) == pytest.approx(
        float(r0) * (1 - alpha) ** 12, rel=1e-3
    )


# --------------------------------------------------------------------------------------------
# limits


def test_alpha_one_anchors_to_the_reference(bandit) -> None:
    """alpha = 1: pi_{t+1} ∝ pi_0 exp(A/beta), whatever pi_t, so the first iteration reaches the
    fixed point and later ones stay on it."""
    pi0, pit, adv = bandit
    beta = 0.05
    anchored = torch.softmax(pi0.log() + adv / beta, 0)
    other = torch.softmax(torch.randn(N_ACTIONS, generator=torch.Generator().manual_seed(9)), 0)
    first, _ = dar_update(pit, pi0, adv, alpha=1.0, beta=beta)
    from_other, _ = dar_update(other, pi0, adv, alpha=1.0, beta=beta)
    assert torch.allclose(first, anchored, atol=1e-6)
    assert torch.allclose(from_other, anchored, atol=1e-6)
    again, _ = dar_update(first, pi0, adv, alpha=1.0, beta=beta)
    assert torch.allclose(again, anchored, atol=1e-6)


def test_alpha_zero_is_a_trust_region_around_the_current_policy(bandit) -> None:
    """alpha = 0: pi_{t+1} ∝ pi_t exp(A/beta). pi_0 plays no part; each step's KL from pi_t is at
    most (max A - min A)/beta and shrinks as beta grows; nothing holds the policy near pi_0, so
    it drifts further every iteration toward the best action."""
    pi0, pit, adv = bandit
    other_ref = torch.softmax(torch.randn(N_ACTIONS, generator=torch.Generator().manual_seed(5)), 0)
    a, _ = dar_update(pit, pi0, adv, alpha=0.0, beta=0.05)
    b, _ = dar_update(pit, other_ref, adv, alpha=0.0, beta=0.05)
    assert torch.allclose(a, b, atol=1e-9)
    assert torch.allclose(a, torch.softmax(pit.log() + adv / 0.05, 0), atol=1e-6)

    steps = []
    for beta in (0.05, 0.2, 1.0):
        new, _ = dar_update(pit, pi0, adv, alpha=0.0, beta=beta)
        steps.append(kl(new, pit))
        assert steps[-1] <= float(adv.max() - adv.min()) / beta
    assert steps[0] > steps[1] > steps[2] > 0

    # No anchor: iterating keeps tilting toward the best action, far past pi_0's own preference,
    # while with alpha > 0 the same iterations stop at pi_0 exp(A/(alpha beta)).
    free, anchored = pit, pit
    for _ in range(25):
        free, _ = dar_update(free, pi0, adv, alpha=0.0, beta=0.2)
        anchored, _ = dar_update(anchored, pi0, adv, alpha=0.5, beta=0.2)
    best = int(adv.argmax())
    assert torch.allclose(free, torch.softmax(pit.log() + 25 * adv / 0.2, 0), atol=1e-5)
    assert float(free[best]) > 0.98
    assert torch.allclose(anchored, torch.softmax(pi0.log() + adv / 0.1, 0), atol=1e-5)
    assert float(anchored[best]) < 0.9
    assert kl(free, pi0) > kl(anchored, pi0) + 1.0


# --------------------------------------------------------------------------------------------
# weights and clipping


def test_weights_are_the_formula_clipped_at_w_clip() -> None:
    ref = torch.tensor([-10.0, -12.0, -9.0, -30.0, -11.0])
    old = torch.tensor([-11.0, -10.0, -9.5, -8.0, -11.0])
    adv = torch.tensor([0.2, -0.3, 0.05, 0.0, 1000.0])  # the last: exp(A/beta) overflows float64
    alpha, beta, c = 0.1, 0.05, 20.0
    out = dar_weights(ref, old, adv, alpha=alpha, beta=beta, w_clip=c)
    raw = [
        math.exp(alpha * (r - o) + a / beta)
        for r, o, a in zip(ref[:4].tolist(), old[:4].tolist(), adv[:4].tolist(), strict=True)
    ]
    expect = [min(x, c) for x in raw] + [c]
    assert out.weights.tolist() == pytest.approx(expect, rel=1e-12)
    assert out.clipped.tolist() == [x > c for x in raw] + [True]
    assert torch.isfinite(out.weights).all()
    stats = weight_stats(out.weights, out.clipped)
    assert stats["weight_max"] == c
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["weight_mean"] == pytest.approx(sum(expect) / 5)


def test_clipped_weights_converge_to_the_clipped_target(bandit) -> None:
    """With the clip active the expected update goes to pi ∝ pi_t min(w, w_clip), not pi*."""
    pi0, pit, _ = bandit
    adv = torch.linspace(-0.3, 0.3, N_ACTIONS)
    alpha, beta, c = 0.1, 0.05, 5.0
    w = (pi0 / pit) ** alpha * torch.exp(adv / beta)
    assert (w > c).sum() >= 2 and (w < c).sum() >= 2
    clipped_target = pit * w.clamp(max=c) / (pit * w.clamp(max=c)).sum()
    new, _ = dar_update(pit, pi0, adv, alpha=alpha, beta=beta, w_clip=c)
    assert torch.allclose(new, clipped_target, atol=1e-6)
    # The clip caps how far the best actions can be pulled: they gain less than under pi*.
    unclipped = closed_form(pi0, pit, adv, alpha, beta)
    best = int(adv.argmax())
    assert new[best] < unclipped[best] - 0.1


def test_self_normalized_weights_average_one_per_prompt() -> None:
    ref = torch.tensor([[-5.0, -6.0, -7.0], [-3.0, -3.0, -4.0]])
    old = torch.tensor([[-5.5, -6.0, -6.0], [-3.0, -2.0, -4.0]])
    adv = torch.tensor([[1.0, 0.0, -1.0], [0.01, -0.02, 0.01]])
    plain = dar_weights(ref, old, adv, alpha=0.1, beta=0.05, w_clip=20.0)
    norm = dar_weights(ref, old, adv, alpha=0.1, beta=0.05, w_clip=20.0, self_normalize=True)
    assert norm.weights.mean(1).tolist() == pytest.approx([1.0, 1.0])
    # Clipped first, then normalized: within a prompt the ratios are those of the clipped weights.
    assert (norm.weights / plain.weights).std(1).max() < 1e-12
    assert torch.equal(norm.clipped, plain.clipped)
    with pytest.raises(ValueError):
        dar_weights(ref[0], old[0], adv[0], alpha=0.1, beta=0.05, w_clip=20.0, self_normalize=True)


def test_effective_sample_size() -> None:
    none = torch.zeros(4, dtype=torch.bool)
    assert weight_stats(torch.full((4,), 3.0), none)["ess"] == pytest.approx(1.0)
    assert weight_stats(torch.tensor([5.0, 0.0, 0.0, 0.0]), none)["ess"] == pytest.approx(0.25)
    assert weight_stats(torch.tensor([2.0, 2.0, 0.0, 0.0]), none)["ess"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# advantages and the loss


def test_advantages_are_centered_per_prompt_and_unit_scale() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-1.0, -1.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    adv = mc_advantages(rewards)
    assert adv.mean(1).abs().max() < 1e-12
    assert float(adv.pow(2).mean()) == pytest.approx(1.0, rel=1e-6)
    assert adv[2].abs().max() == 0  # equal rewards: no signal, no NaN
    raw = mc_advantages(rewards, normalize=False)
    assert raw[0].tolist() == [-2.0, -1.0, 0.0, 3.0]
    assert torch.allclose(mc_advantages(rewards, std=2.0), raw / 2.0)
    assert mc_advantages(torch.full((2, 3), 1.5)).abs().max() == 0
    with pytest.raises(ValueError):
        mc_advantages(torch.ones(4))


def test_loss_is_the_weighted_sequence_likelihood_and_chunks_add_up() -> None:
    tok = torch.tensor(
        [[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0], [-4.0, -1.0, -1.0], [-2.0, -2.0, -2.0]]
    )
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    seq = sequence_logprobs(tok, mask)
    assert seq.tolist() == [-6.0, -1.0, -4.0, -6.0]  # padding is not part of the answer
    w = torch.tensor([2.0, 0.5, 0.0, 1.0])
    whole = weighted_nll(seq, w)
    assert float(whole) == pytest.approx((12 + 0.5 + 0 + 6) / 4)
    # Micro-batches with denominator n / n_chunks, averaged over chunks, give the whole batch's.
    halves = [weighted_nll(seq[i : i + 2], w[i : i + 2], denominator=4 / 2) for i in (0, 2)]
    assert float(sum(halves) / 2) == pytest.approx(float(whole))
