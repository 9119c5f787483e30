"""f-divergence regularizers in the reward: rkl | fkl | js | alpha | tv | chi2.

Per token, at the sampled y ~ pi_old (the rollout policy), with r = pi_old(y)/pi_ref(y), the
penalty is the importance-weighted estimate f(r)/r of D_f(pi || pi_ref) = E_pi[f(r)/r], as the
paper's baselines place it (generators in ``estimators.FDIV_GENERATORS``). It is detached and PPO
subtracts beta times it from the reward.

Clipping, and how this differs from the official code: the official trainer clamps every baseline
penalty to +-2.5 by a bug: the condition meant to decide whether to clamp compares a string
with a list, so as written it always selects the clamp. Here clipping is the
explicit option ``ppo.regularizer.penalty_clip`` (clamp to +-penalty_clip), off by default; set it
to 2.5 to reproduce the official baselines' behaviour. Without it every per-token estimate is
unbounded: the 1/r importance weight blows up where pi << pi_ref (even for the bounded js and tv
divergences), and rkl, alpha (a > 1) and chi2 also grow with r where pi >> pi_ref. rkl and fkl
estimates can be negative; their expectation is not.
"""

from __future__ import annotations

import torch

from wprctl.manifest import RegularizerConfig
from wprctl.regularizers.base import RegBatch, Regularizer
from wprctl.regularizers.estimators import check_fdiv, clip_penalty, fdiv_estimate, masked_sum


class FDivRegularizer(Regularizer):
    name = "fdiv"

    def __init__(self, cfg: RegularizerConfig, *, clip_range: float = 0.2) -> None:
        super().__init__(cfg, clip_range=clip_range)
        check_fdiv(cfg.fdiv.divergence, cfg.fdiv.alpha)

    def _estimate(self, batch: RegBatch) -> torch.Tensor:
        lr = (batch.old_logprobs - batch.ref_logprobs).detach()
        return fdiv_estimate(lr, self.cfg.fdiv.divergence, self.cfg.fdiv.alpha)

    def reward_penalty(self, batch: RegBatch) -> torch.Tensor | None:
        return clip_penalty(self._estimate(batch), self.cfg.penalty_clip) * batch.mask

    def divergence(self, batch: RegBatch) -> torch.Tensor:
        """Per-sequence sum of the per-token estimates (unclipped)."""
        return masked_sum(self._estimate(batch), batch.mask)
