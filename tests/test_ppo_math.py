"""PPO's math on known tensors: GAE by hand, clipped policy and value losses."""

from __future__ import annotations

import torch

from wprctl.rl.ppo_math import gae, masked_mean, policy_loss, value_loss, whiten


def test_gae_matches_a_hand_computed_example() -> None:
    # One row, 3 response tokens then padding; gamma 0.9, lam 0.8.
    rewards = torch.tensor([[0.0, -0.1, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    g, lam = 0.9, 0.8
    d2 = 1.0 + g * 0.0 - 0.2  # the value after the last token is 0
    d1 = -0.1 + g * 0.2 - 0.4
    d0 = 0.0 + g * 0.4 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(rewards, values, mask, g, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.2, 0.0]]), atol=1e-6)


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    to_go = torch.tensor([[0.6, 0.5, 0.3], [1.0, 0.0, 0.0]])
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-6)


def test_policy_loss_clips_only_in_the_pessimistic_direction() -> None:
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clipfrac = policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: ratio 1.5, A>0 -> clipped to 1.2; token 1: ratio 0.5, A<0 -> clipped to 0.8;
    # token 2: inside; token 3: ratio 1.5, A<0 -> unclipped (-A r = 1.5 is the max).
    expected = torch.tensor([-1.2, 0.8, -1.1, 1.5]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert float(clipfrac) == 0.5


def test_value_loss_takes_the_larger_error() -> None:
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[0.5, 1.0]])
    loss, clipfrac = value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-0.5)^2 = 0.25, clipped (0.2-0.5)^2 = 0.09 -> 0.25
    # token 1: unclipped (0.1-1)^2 = 0.81, clipped (0.1-1)^2 = 0.81 -> 0.81
    assert torch.allclose(loss, torch.tensor(0.5 * (0.25 + 0.81) / 2), atol=1e-6)
    assert float(clipfrac) == 0.0


def test_whiten_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert abs(float(masked_mean(w, mask))) < 1e-6 and float(w[0, 3]) == 0.0
    assert abs(float(masked_mean(w**2, mask)) - 1.0) < 1e-4
