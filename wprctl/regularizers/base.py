"""The regularizer plug-in interface PPO talks to, and the beta (kl_ctl) controller.

A regularizer declares what it needs (`topk`: compressed distributions of the policy and the
reference, computed once at rollout; otherwise only the log-probabilities of the sampled tokens)
and contributes a per-token reward term, a loss term, or both:

    rewards  -= beta * reg.reward_penalty(batch)          (detached, at experience time)
    loss     += beta * reg.loss_penalty(batch, logprobs)  (back-propagated, at learning time)

`divergence(batch)` is its per-sequence divergence estimate, used for logging and by the adaptive
beta controller. `metrics()` returns figures of its last call (e.g. WPR's convergence fraction).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wprctl.manifest import RegularizerConfig


@dataclass
class RegBatch:
    """What a regularizer sees of a batch of rollouts. All (B, T) over response positions."""

    actions: torch.Tensor  # long: the sampled tokens
    mask: torch.Tensor  # float: 1 on response tokens
    old_logprobs: torch.Tensor  # log pi_old(y_t | s_t), the rollout policy
    ref_logprobs: torch.Tensor  # log pi_ref(y_t | s_t)
    topk: Any | None = None  # wprctl.ot.TopKPair when the regularizer asks for it


class Regularizer:
    """Base class: no penalty. Subclasses override what they contribute."""

    name = "none"
    topk: int | None = None  # >0: PPO computes a TopKPair of this size at rollout
    # Its per-token term takes far longer than the critic's values (an iterative solve): PPO
    # then computes the reward model's score beside it too (wprctl.stages.ppo, "Overlap").
    long_running: bool = False

    def __init__(self, cfg: RegularizerConfig, *, clip_range: float = 0.2) -> None:
        self.cfg = cfg
        # PPO's ratio clip (ppo.clip_range): the off-policy KL-as-loss correction uses the same one.
        self.clip_range = clip_range

    def setup(
        self, *, ref_embeddings: torch.Tensor, cache_dir: Path, pad_id: int, eos_id: int
    ) -> None:
        """Called once before training with the frozen reference model's input embeddings."""

    def reward_penalty(self, batch: RegBatch) -> torch.Tensor | None:
        """Per-token penalty (B, T), detached; PPO subtracts beta times it from the reward."""
        return None

    def loss_penalty(self, batch: RegBatch, logprobs: torch.Tensor) -> torch.Tensor | None:
        """A scalar loss term (with grad through `logprobs` = log pi_theta(y_t|s_t)); PPO adds beta times it."""
        return None

    def divergence(self, batch: RegBatch) -> torch.Tensor:
        """Per-sequence divergence estimate (B,), for logging and the adaptive beta."""
        return ((batch.old_logprobs - batch.ref_logprobs) * batch.mask).sum(-1)

    def metrics(self) -> dict[str, float]:
        return {}


REGISTRY = {
    "none": "wprctl.regularizers.base:Regularizer",
    "kl": "wprctl.regularizers.kl:KLRegularizer",
    "fdiv": "wprctl.regularizers.fdiv:FDivRegularizer",
    "wpr": "wprctl.regularizers.wpr:WPRRegularizer",
}


def build_regularizer(cfg: RegularizerConfig, *, clip_range: float = 0.2) -> Regularizer:
    """The plug-in for ``cfg.kind``; pass ``clip_range=ppo.clip_range``."""
    module, cls = REGISTRY[cfg.kind].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, clip_range=clip_range)


class BetaController:
    """beta fixed at kl_ctl, or adapted toward a target divergence (Ziegler et al. 2019):

    beta <- beta * (1 + clip(div / target - 1, -0.2, 0.2) * n / horizon)
    """

    def __init__(self, cfg: RegularizerConfig) -> None:
        self.value = cfg.kl_ctl
        self.adaptive = cfg.adaptive
        self.target = cfg.target
        self.horizon = cfg.horizon

    def update(self, divergence: float, n_samples: int) -> None:
        if not self.adaptive:
            return
        error = min(max(divergence / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
