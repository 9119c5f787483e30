"""KL(pi || pi_ref) regularizer: Schulman's k1 | k2 | k3, in the reward or as a loss.

``placement = "reward"`` (PPO's classic form): a detached per-token penalty k_n(lr) at the rollout
log-probs, lr = old_logp - ref_logp, clamped to +-``penalty_clip`` when set. PPO subtracts
beta * penalty from the reward, so it reaches the policy through the returns and GAE.

``placement = "loss"``: ``loss_penalty`` is the masked token mean of ``kl_loss_surrogate`` with the
gradient through the current log-probs. Per token, with lr = logp - ref_logp, c_n = d k_n/d logp
(k1: 1, k2: lr, k3: 1 - exp(-lr)) and rho = exp(logp - old_logp):

* ``is_correction = false``: L = k_n(lr) (literal "k_n as loss"; grad = c_n grad logp).
* ``is_correction = true``: L = sg(k_n(lr)) + S - sg(S), S = max(rho sg(c_n), clip(rho, 1 - eps,
  1 + eps) sg(c_n)), eps = ppo.clip_range. Value k_n, gradient the importance-weighted on-policy
  one (see ``wprctl.regularizers.estimators.kl_loss_surrogate`` for why).

With ``penalty_clip`` set, the loss placement clamps the coefficient c_n to +-penalty_clip (the
analogue of clamping the reward penalty, whose coefficient is the penalty itself); the logged value
stays k_n. Only k2 as loss (on-policy or IS-corrected) has the reverse-KL gradient; k1 as loss has
zero expected gradient and k3 as loss follows the forward KL's gradient (kept as options because
they are what other trainers do and what "Rethinking KL" compares).

Scope of the equivalence "k2 as loss == k1 in reward": it is per decision (checked exactly on a
one-step categorical policy in tests/test_regularizers_kl.py). In a sequence, the reward placement
goes through the returns, so with gamma = 1 GAE also credits token t with the k1 penalties of the
tokens after it (the part of the sequence-level KL gradient that flows through the state
distribution); the per-token loss regularizes each position's KL at its visited state only.
"""

from __future__ import annotations

import torch

from wprctl.manifest import RegularizerConfig
from wprctl.regularizers.base import RegBatch, Regularizer
from wprctl.regularizers.estimators import (
    clip_penalty,
    kl_estimate,
    kl_loss_surrogate,
    masked_mean,
    masked_sum,
)


class KLRegularizer(Regularizer):
    name = "kl"

    def __init__(self, cfg: RegularizerConfig, *, clip_range: float = 0.2) -> None:
        super().__init__(cfg, clip_range=clip_range)
        kl_estimate(torch.zeros(1), cfg.kl.estimator)  # validates the estimator name early
        self._metrics: dict[str, float] = {}

    def _rollout_estimate(self, batch: RegBatch) -> torch.Tensor:
        lr = (batch.old_logprobs - batch.ref_logprobs).detach()
        return kl_estimate(lr, self.cfg.kl.estimator)

    def reward_penalty(self, batch: RegBatch) -> torch.Tensor | None:
        if self.cfg.kl.placement != "reward":
            return None
        return clip_penalty(self._rollout_estimate(batch), self.cfg.penalty_clip) * batch.mask

    def loss_penalty(self, batch: RegBatch, logprobs: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.kl.placement != "loss":
            return None
        per_token, binding = kl_loss_surrogate(
            logprobs,
            batch.ref_logprobs,
            self.cfg.kl.estimator,
            old_logp=batch.old_logprobs if self.cfg.kl.is_correction else None,
            clip_range=self.clip_range,
            coef_clip=self.cfg.penalty_clip,
        )
        if self.cfg.kl.is_correction:
            self._metrics = {"is_clip_fraction": float(masked_mean(binding.float(), batch.mask))}
        return masked_mean(per_token, batch.mask)

    def divergence(self, batch: RegBatch) -> torch.Tensor:
        """Per-sequence sum of the chosen estimator at the rollout log-probs (unclipped)."""
        return masked_sum(self._rollout_estimate(batch), batch.mask)

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)
