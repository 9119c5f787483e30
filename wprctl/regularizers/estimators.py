"""Per-token divergence estimators and loss surrogates, as pure functions on tensors.

Notation (all tensors (B, T) or any common shape, one entry per sampled token y_t):

* ``logp = log pi_theta(y|s)``, the policy being trained; ``ref_logp = log pi_ref(y|s)``;
  ``old_logp = log pi_old(y|s)``, the rollout policy that sampled y.
* ``lr = logp - ref_logp``, the log-ratio; ``r = exp(lr) = pi/pi_ref``.

KL estimators (Schulman, "Approximating KL divergence") of KL(pi || pi_ref) from one y ~ pi:

* k1 = lr                       (unbiased, high variance, can be negative)
* k2 = lr^2 / 2                 (biased, low variance, >= 0)
* k3 = exp(-lr) - 1 + lr        (unbiased, >= 0)

"k_n in reward" versus "k_n as loss" ("Rethinking KL Regularization in RLHF", Liu et al. 2025).
Every per-token term acts on the policy only through its *gradient-equivalent coefficient* c: the
scalar that multiplies the score function grad log pi(y). In the reward, a detached penalty k is
its own coefficient (REINFORCE: E[sg(k) grad logp]). As a loss, the coefficient is the derivative
c_n = d k_n / d logp, since grad k_n(lr) = k_n'(lr) grad logp:

* k1 as loss: c = 1                -> E_pi[grad logp] = 0: no regularization at all in expectation.
* k2 as loss: c = lr               -> E_pi[lr grad logp] = grad KL(pi || pi_ref): the same gradient
  as k1 in the reward (on-policy), i.e. the true reverse-KL gradient.
* k3 as loss: c = 1 - pi_ref/pi    -> E_pi[(1 - pi_ref/pi) grad logp] = -sum_y pi_ref grad logp
  = grad KL(pi_ref || pi): the *forward* KL's gradient. Both KLs agree to second order around
  pi = pi_ref (each is chi^2/2 locally), so k3-as-loss matches the reverse-KL gradient only to first
  order; far from pi_ref it pulls toward covering pi_ref's mass instead.

The identities above need y ~ pi_theta. PPO's later minibatches and epochs draw y from pi_old, so
E_{pi_old}[c grad logp] is not the on-policy gradient: the off-policy correction is the importance
weight rho = pi_theta/pi_old, since E_{pi_old}[rho c grad logp] = E_{pi_theta}[c grad logp]. See
``kl_loss_surrogate`` for the exact, clipped form used here.

f-divergences, estimated at y ~ pi by importance weighting (``fdiv_estimate``):

    D_f(pi || pi_ref) = sum_y pi_ref(y) f(r(y)) = E_pi[f(r) / r],   f convex, f(1) = 0

so the per-token estimate is f(r)/r. ``FDIV_GENERATORS`` lists the generator f of each divergence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from wprctl.errors import UserError

KLEstimator = Literal["k1", "k2", "k3"]
FDivergence = Literal["rkl", "fkl", "js", "alpha", "tv", "chi2"]

# Generator f(r) of each f-divergence D_f(pi || pi_ref) = sum pi_ref f(pi/pi_ref); documentation
# for users, the code below evaluates f(r)/r in a numerically careful form.
FDIV_GENERATORS: dict[str, str] = {
    "rkl": "f(r) = r log r: KL(pi || pi_ref); estimate f(r)/r = log r (= k1)",
    "fkl": "f(r) = -log r: KL(pi_ref || pi); estimate f(r)/r = -log(r) / r",
    "js": (
        "f(r) = (r log r - (1 + r) log((1 + r) / 2)) / 2: Jensen-Shannon, "
        "(KL(pi || m) + KL(pi_ref || m)) / 2 with m = (pi + pi_ref) / 2; in [0, log 2]"
    ),
    "alpha": (
        "f(r) = (r^a - a r - (1 - a)) / (a (a - 1)): the alpha-divergence "
        "(sum pi^a pi_ref^(1-a) - 1) / (a (a - 1)); a -> 1 is rkl, a -> 0 is fkl"
    ),
    "tv": "f(r) = |r - 1| / 2: total variation, sum |pi - pi_ref| / 2; in [0, 1]",
    "chi2": "f(r) = (r - 1)^2: Pearson chi^2, sum (pi - pi_ref)^2 / pi_ref",
}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (0 when the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over the last dim of ``x`` where ``mask`` is 1: (B, T) -> (B,)."""
    return (x * mask.to(x.dtype)).sum(-1)


def clip_penalty(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clamp a per-token penalty to [-clip, clip]; identity when ``clip`` is None."""
    return x if clip is None else x.clamp(-clip, clip)


# ------------------------------------------------------------------------------------ KL


def _check_estimator(estimator: str) -> None:
    if estimator not in ("k1", "k2", "k3"):
        raise UserError(
            f"ppo.regularizer.kl.estimator: expected 'k1', 'k2' or 'k3', got {estimator!r}"
        )


def kl_estimate(lr: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Schulman's k1, k2 or k3 of KL(pi || pi_ref) at the sampled token, from ``lr`` = log pi/pi_ref.

    Differentiable in ``lr``: applied to ``logp - ref_logp`` with grad through ``logp`` this is
    "k_n as loss" (see the module docstring for what each one's gradient does).
    """
    _check_estimator(estimator)
    if estimator == "k1":
        return lr
    if estimator == "k2":
        return 0.5 * lr * lr
    return torch.expm1(-lr) + lr  # exp(-lr) - 1 + lr, accurate near lr = 0


def kl_coefficient(lr: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """The gradient-equivalent coefficient c_n = d k_n / d logp of "k_n as loss" (k1: 1, k2: lr,
    k3: 1 - exp(-lr)): grad k_n(logp - ref_logp) = c_n * grad logp."""
    _check_estimator(estimator)
    if estimator == "k1":
        return torch.ones_like(lr)
    if estimator == "k2":
        return lr
    return -torch.expm1(-lr)


def kl_as_loss(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token "k_n as loss": k_n(logp - ref_logp), with the gradient through ``logp``."""
    return kl_estimate(logp - ref_logp.detach(), estimator)


def _straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` (detached) in the forward pass, the gradient of ``surrogate`` in the backward."""
    return value.detach() + (surrogate - surrogate.detach())


def clipped_ratio_weight(
    logp: torch.Tensor, old_logp: torch.Tensor, coef: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic clipped importance-weighted term and where its clip binds.

    Returns ``max(rho * c, clip(rho, 1 - eps, 1 + eps) * c)`` (to be minimized; ``c`` detached,
    the gradient flows through rho = exp(logp - old_logp)) and a bool tensor, True where the
    clipped branch is selected with rho outside the range (there the gradient is 0).
    """
    if not clip_range > 0:
        raise UserError(f"clip_range must be > 0, got {clip_range!r}")
    rho = torch.exp(logp - old_logp.detach())
    rho_c = rho.clamp(1.0 - clip_range, 1.0 + clip_range)
    unclipped, clipped = rho * coef, rho_c * coef
    binding = (clipped > unclipped).detach()
    return torch.maximum(unclipped, clipped), binding


def kl_loss_surrogate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: KLEstimator,
    *,
    old_logp: torch.Tensor | None = None,
    clip_range: float = 0.2,
    coef_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss-placement KL term and the bool mask of tokens where the ratio clip binds.

    Forward value: always k_n(logp - ref_logp), the estimator's value at the current policy (so the
    logged loss is a KL estimate). Gradient, with c = sg(c_n(lr)) (``kl_coefficient``, clamped to
    [-coef_clip, coef_clip] when ``coef_clip`` is set):

    * ``old_logp`` None and no ``coef_clip``: the literal "k_n as loss", grad = c_n * grad logp.
    * ``old_logp`` None with ``coef_clip``: grad = clamp(c_n) * grad logp.
    * ``old_logp`` given (the off-policy importance-sampling correction)::

          S = max(rho * c, clip(rho, 1 - eps, 1 + eps) * c),   rho = pi_theta / pi_old
          L = sg(k_n) + S - sg(S)

      i.e. the KL coefficient enters PPO's clipped surrogate exactly like an advantage A = -c. Why:
      with y ~ pi_old, E_{pi_old}[rho * c * grad logp] = E_{pi_theta}[c * grad logp], the on-policy
      gradient of k_n-as-loss (for k2: the reverse-KL gradient, as k1 in the reward gives), whereas
      the uncorrected E_{pi_old}[c * grad logp] weights tokens by the stale policy. The gradient of
      rho * c is rho * c * grad logp, the weight pi_theta/pi_old on the gradient-equivalent
      coefficient. The clip is PPO's pessimistic one (not a truncation of rho): inside
      [1 - eps, 1 + eps] the correction is exact; outside, the gradient is 0 where it would move
      pi_theta further from pi_old and keeps the full weight rho where it pulls back toward it, so
      the KL term obeys the same trust region as the policy loss (and, like it, is not truncated
      on the pull-back side).
    """
    lr = logp - ref_logp.detach()
    value = kl_estimate(lr, estimator)
    no_clip = torch.zeros_like(lr, dtype=torch.bool)
    if old_logp is None and coef_clip is None:
        return value, no_clip
    coef = clip_penalty(kl_coefficient(lr.detach(), estimator), coef_clip)
    if old_logp is None:
        return _straight_through(value, coef * logp), no_clip
    term, binding = clipped_ratio_weight(logp, old_logp, coef, clip_range)
    return _straight_through(value, term), binding


# ------------------------------------------------------------------------------------ f-div


def check_fdiv(divergence: str, alpha: float) -> None:
    if divergence not in FDIV_GENERATORS:
        raise UserError(
            f"ppo.regularizer.fdiv.divergence: expected one of {', '.join(FDIV_GENERATORS)}, "
            f"got {divergence!r}"
        )
    if divergence == "alpha" and not math.isfinite(alpha):
        raise UserError(f"ppo.regularizer.fdiv.alpha: expected a finite number, got {alpha!r}")


def fdiv_estimate(lr: torch.Tensor, divergence: FDivergence, alpha: float = 0.5) -> torch.Tensor:
    """Per-token importance-weighted estimate f(r)/r of D_f(pi || pi_ref) at y ~ pi, r = exp(lr).

    E_{y~pi}[f(r)/r] = D_f exactly (when pi_ref > 0 wherever pi > 0). ``alpha`` exactly 1 or 0 is
    taken as its limit (rkl or fkl). rkl, fkl, alpha and chi2 estimates are unbounded (e.g. chi2
    grows like r); ``penalty_clip`` bounds them when wanted.
    """
    check_fdiv(divergence, alpha)
    # float64 inside: exp(+-lr) overflows float32 beyond |lr| ~ 88 (alpha divides it further).
    return _fdiv_f_over_r(lr.double(), divergence, alpha).to(lr.dtype)


def _fdiv_f_over_r(lr: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    if divergence == "alpha":
        if alpha == 1.0:
            divergence = "rkl"
        elif alpha == 0.0:
            divergence = "fkl"
    if divergence == "rkl":
        return lr
    if divergence == "fkl":
        return -lr * torch.exp(-lr)
    if divergence == "js":
        # log((1 + r) / 2) = softplus(lr) - log 2, stable for large |lr|.
        return 0.5 * (lr - (1.0 + torch.exp(-lr)) * (F.softplus(lr) - math.log(2.0)))
    if divergence == "alpha":
        a = float(alpha)
        num = torch.exp((a - 1.0) * lr) - a - (1.0 - a) * torch.exp(-lr)
        return num / (a * (a - 1.0))
    if divergence == "tv":
        return 0.5 * torch.expm1(-lr).abs()  # |r - 1| / (2 r) = |1 - 1/r| / 2
    return 4.0 * torch.sinh(0.5 * lr) ** 2  # (r - 1)^2 / r = r - 2 + 1/r
