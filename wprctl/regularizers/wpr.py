"""Wasserstein Policy Regularization: per-token reward -beta * phi(y_t), phi the Sinkhorn potential.

PPO sees ``topk = cfg.wpr.k2`` and computes ``wprctl.ot.compress_topk(policy_logits, ref_logits,
actions, k2, mask)`` once at rollout, passing the ``TopKPair`` as ``RegBatch.topk``: this plug-in
never sees (B, T, V) logits, and keeps no tensor of vocabulary size per token.

* ``setup`` builds (or loads from ``cache_dir``) the token cost graph from the frozen reference
  model's input embeddings, with k1 capped to V - 1 for small vocabularies, and warns on the
  console when exp(-C/epsilon) underflows on most graph edges (the kernel is then effectively the
  identity and WPR degenerates into a KL-like per-token log-ratio).
* ``reward_penalty`` is the potential at the action, ``method`` ``paper`` (faithful reproduction
  of the official trainer, the default) or ``wellposed``, gauge ``raw`` or ``centered``, clamped to
  +-``penalty_clip`` when set (off by default; the official trainer does not clip WPR).
* ``divergence`` is the per-sequence sum of the entropic OT values ("Average Wasserstein"), in cost
  units. It is not divided by beta (the official code divides its logged figure by beta twice).
* ``metrics`` are figures of the last solve: ``converged_fraction``, ``infeasible_fraction``
  (``paper`` only: truncated problems detected infeasible), ``mean_iterations``,
  ``kernel_underflow`` (fraction of graph edges whose float32 kernel is 0) and ``ot_value_mean``
  (per token).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

from wprctl.console import console, is_main_process
from wprctl.errors import RunError, UserError
from wprctl.manifest import RegularizerConfig
from wprctl.regularizers.base import RegBatch, Regularizer
from wprctl.regularizers.estimators import clip_penalty, masked_mean, masked_sum


class WPRRegularizer(Regularizer):
    name = "wpr"

    def __init__(self, cfg: RegularizerConfig, *, clip_range: float = 0.2) -> None:
        super().__init__(cfg, clip_range=clip_range)
        self.topk = cfg.wpr.k2
        # wellposed's Newton solve: ~65 ms a demo batch, against paper's ~10 and the values' ~10
        self.long_running = cfg.wpr.method == "wellposed"
        self.graph = None
        self.pad_id = 0
        self.eos_id = 1
        self.kernel_underflow = float("nan")
        self._metrics: dict[str, float] = {}
        # The last solve, so that divergence() on the same batch does not run Sinkhorn again.
        self._last_pair: weakref.ref | None = None
        self._last_result = None
        self._warned_unconverged = False

    def setup(
        self, *, ref_embeddings: torch.Tensor, cache_dir: Path | None, pad_id: int, eos_id: int
    ) -> None:
        from wprctl.ot import CostGraph
        from wprctl.ot.graph import DEGENERATE_UNDERFLOW

        w = self.cfg.wpr
        V = int(ref_embeddings.shape[0])
        if V < 2:
            raise UserError(f"WPR needs a vocabulary of at least 2 tokens, the reference has {V}")
        k1 = w.k1
        if k1 > V - 1:
            k1 = V - 1
            console.print(
                f"[yellow]note:[/] ppo.regularizer.wpr.k1 = {w.k1} exceeds the vocabulary size "
                f"minus one; using k1 = {k1} (every token connected to every other)."
            )
        self.graph = CostGraph.from_embeddings(
            ref_embeddings.detach(), k=k1, metric=w.metric, cache_dir=cache_dir
        )
        self.pad_id, self.eos_id = int(pad_id), int(eos_id)
        self.kernel_underflow = self.graph.underflow_fraction(w.epsilon, torch.float32)
        if self.kernel_underflow >= DEGENERATE_UNDERFLOW:
            console.print(
                f"[bold red]WARNING: WPR kernel underflow.[/] exp(-C/epsilon) is 0 in float32 on "
                f"{self.kernel_underflow:.1%} of the cost-graph edges at epsilon = {w.epsilon:g} "
                f"(median kNN cost {self.graph.median_knn_cost():.3g}). The kernel is effectively "
                f"the identity: WPR degenerates into a KL-like per-token log-ratio penalty. Raise "
                f"ppo.regularizer.wpr.epsilon (about the median kNN cost / 20 keeps the kernel "
                f"alive)."
            )

    def _solve(self, batch: RegBatch):
        from wprctl.ot import TopKPair, wpr_potentials_topk

        if self.graph is None:
            raise RunError("WPR regularizer used before setup(): no cost graph was built")
        pair = batch.topk
        if not isinstance(pair, TopKPair):
            raise RunError(
                "WPR regularizer: RegBatch.topk must be the TopKPair computed at rollout "
                f"(compress_topk with k = {self.topk}), got {type(pair).__name__}"
            )
        if self._last_pair is not None and self._last_pair() is pair:
            return self._last_result
        w = self.cfg.wpr
        res = wpr_potentials_topk(
            pair,
            self.graph,
            epsilon=w.epsilon,
            max_iter=w.iterations,
            tol=w.tol,
            gauge=w.gauge,
            method=w.method,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            return_value=True,
        )
        mask = batch.mask.to(res.potential.device)
        active = mask.bool()
        bad = int((~torch.isfinite(res.potential[active])).sum())
        bad += int((~torch.isfinite(res.ot_value[active])).sum())
        if bad:
            # A NaN or inf here would silently poison the rewards (or beta) of the whole run.
            raise RunError(
                f"WPR ({w.method}, epsilon={w.epsilon:g}, k2={self.topk}) returned {bad} non-finite "
                f"potential/OT values on {int(active.sum())} response tokens"
            )
        self._metrics = {
            "converged_fraction": res.converged_fraction,
            "mean_iterations": float(masked_mean(res.iterations.double(), mask)),
            "kernel_underflow": self.kernel_underflow,
            "ot_value_mean": float(masked_mean(res.ot_value.double(), mask)),
        }
        if res.infeasible_fraction is not None:
            self._metrics["infeasible_fraction"] = res.infeasible_fraction
        if w.method == "wellposed" and res.converged_fraction < 1.0:
            self._warn_unconverged(res.converged_fraction)
        self._last_pair, self._last_result = weakref.ref(pair), res
        return res

    def _warn_unconverged(self, converged: float) -> None:
        # paper stops at its fixed iteration count by design; wellposed promises a converged
        # answer that does not depend on max_iter, so a cut-off solve is worth one loud line
        if self._warned_unconverged or not is_main_process():
            return
        self._warned_unconverged = True
        w = self.cfg.wpr
        console.print(
            f"[bold yellow]WARNING: WPR (wellposed) did not converge[/] on {1 - converged:.1%} of "
            f"the positions within max_iter = {w.iterations} Newton steps (tol {w.tol:g}): their "
            f"penalties depend on where the solve stopped. Raise ppo.regularizer.wpr.max_iter "
            f"(the metric train/reg/converged_fraction tracks it; this warning is printed once)."
        )

    def reward_penalty(self, batch: RegBatch) -> torch.Tensor:
        res = self._solve(batch)
        phi = clip_penalty(res.potential, self.cfg.penalty_clip)
        return phi.to(batch.mask.device) * batch.mask

    def divergence(self, batch: RegBatch) -> torch.Tensor:
        res = self._solve(batch)
        return masked_sum(res.ot_value.to(batch.mask.device), batch.mask)

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)
