"""DAR's math as pure functions on tensors: advantages, clipped weights, their statistics, the loss.

DAR (Dual-regularized Advantage Regression) regularizes toward both the reference pi_0 and the
sampling policy pi_t; the closed-form target of

    max E[A] - beta * ( alpha * KL(pi || pi_0) + (1 - alpha) * KL(pi || pi_t) )

is pi* ∝ pi_0^alpha * pi_t^(1-alpha) * exp(A / beta). With y ~ pi_t the importance weight of
pi* is w = (pi_0 / pi_t)^alpha * exp(A / beta), and the weighted log-likelihood
-E_{pi_t}[w * log pi_theta] is, up to the normalizer, the cross-entropy of pi* and pi_theta:
its minimizer is pi*. Weights are clipped at w_clip for variance.

Shapes: rewards and advantages are (n_prompts, K) for K samples per prompt; sequence log-probs
and weights are flat (n,) or the same (n_prompts, K) shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def mc_advantages(
    rewards: torch.Tensor, *, normalize: bool = True, std: float | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Monte-Carlo advantages of (n_prompts, K) rewards: reward minus its prompt's mean over K.

    With `normalize`, they are divided by their standard deviation over the whole batch (the
    per-prompt centering already makes the batch mean 0), so beta acts on a unit scale whatever
    the reward model's scale. `std` overrides the batch's own (multi-process: the global one).
    A batch whose prompts all have equal rewards has zero advantages, not NaN.
    """
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be (n_prompts, K >= 2), got {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize:
        return centered
    scale = float(centered.pow(2).mean().sqrt()) if std is None else std
    return centered / (scale + eps)


def log_weights(
    ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """log w = alpha * (log pi_0(y) - log pi_t(y)) + A / beta, from sequence log-probs."""
    return alpha * (ref_logprobs - old_logprobs) + advantages / beta


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 log-probs lose the precision exp() needs), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class Weights:
    weights: torch.Tensor  # what the loss uses (clipped, and self-normalized if asked)
    clipped: torch.Tensor  # bool: the raw weight exceeded w_clip


def dar_weights(
    ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    w_clip: float,
    self_normalize: bool = False,
) -> Weights:
    """w = min((pi_0/pi_t)^alpha * exp(A/beta), w_clip), computed in log space.

    exp(A/beta) overflows float32 at A/beta > 88 (A = 4.4 at beta = 0.05); clipping the log
    weight at log(w_clip) before exponentiating never forms the large number.

    `self_normalize` divides each prompt's K clipped weights by their mean (inputs must be
    (n_prompts, K)): the self-normalized importance-sampling estimate of E_{pi*(.|x)}, in which
    the per-prompt normalizer of pi* cancels; the weights then average 1 per prompt.
    """
    logw = log_weights(_wide(ref_logprobs), _wide(old_logprobs), _wide(advantages), alpha, beta)
    cap = math.log(w_clip)
    clipped = logw > cap
    w = torch.where(clipped, torch.full_like(logw, w_clip), logw.clamp(max=cap).exp())
    if self_normalize:
        if w.dim() != 2:
            raise ValueError("self-normalization needs (n_prompts, K) weights")
        w = w / w.mean(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return Weights(w.detach(), clipped)


def weight_stats(weights: torch.Tensor, clipped: torch.Tensor) -> dict[str, float]:
    """Mean, max, clip fraction and the normalized effective sample size (sum w)^2 / sum w^2 / n.

    ESS is 1 for uniform weights and 1/n when a single sample carries all the weight.
    """
    w = weights.double().flatten()
    n = w.numel()
    sq = float(w.pow(2).sum())
    return {
        "weight_mean": float(w.mean()),
        "weight_max": float(w.max()),
        "clip_fraction": float(clipped.double().mean()),
        "ess": float(w.sum()) ** 2 / sq / n if sq > 0 else 0.0,
    }


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = the sum of the response tokens' log-probs (mask: 1 on tokens, 0 on padding)."""
    return (token_logprobs * mask).sum(-1)


def weighted_nll(
    seq_logprobs: torch.Tensor, weights: torch.Tensor, *, denominator: float | None = None
) -> torch.Tensor:
    """The DAR loss -sum(w * log pi_theta(y|x)) / denominator (default: the number of sequences).

    `denominator` lets micro-batches of one batch add up to the whole batch's mean.
    """
    denom = float(seq_logprobs.numel()) if denominator is None else denominator
    return -(weights.detach() * seq_logprobs).sum() / denom


def global_weights(
    rewards: torch.Tensor,
    ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    w_clip: float,
    self_normalize: bool = False,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    rank: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One process's (n_prompts, K) weights and the weight statistics, both over the global batch.

    `gather` concatenates every process's rows in rank order (identity on one process), so the
    advantage normalization, the weights and their statistics do not depend on the world size.
    """
    n = rewards.size(0)
    adv = mc_advantages(gather(rewards))
    w = dar_weights(
        gather(ref_logprobs),
        gather(old_logprobs),
        adv,
        alpha=alpha,
        beta=beta,
        w_clip=w_clip,
        self_normalize=self_normalize,
    )
    stats = weight_stats(w.weights, w.clipped)
    stats["advantage_abs"] = float(adv.abs().mean())
    return w.weights[rank * n : (rank + 1) * n], stats
