"""Entry points of the WPR penalty: per-position entropic-OT dual potentials at the actions.

``wpr_potentials`` takes full (B, T, V) logits; ``wpr_potentials_topk`` takes the compressed
``TopKPair`` made once at rollout (what PPO uses: O(k2) memory per token). Two methods:
``paper`` (see ``wprctl.ot.paper``) and ``wellposed`` (see ``wprctl.ot.wellposed``, where its
math is documented). Both return a ``WPRResult`` with (B, T) tensors; positions outside the mask
get 0 and count as neither converged nor infeasible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from wprctl.errors import UserError
from wprctl.ot.graph import CostGraph, check_epsilon
from wprctl.ot.paper import (
    local_problems,
    paper_kernel_weights,
    paper_mutual,
    paper_reverse_live,
    paper_sinkhorn,
    paper_sinkhorn_local,
    paper_support,
    support_kernel,
    tile_columns,
)
from wprctl.ot.threads import backend_threads, single_threaded_when
from wprctl.ot.topk import (
    TopKPair,
    batch_support,
    check_finite_rows,
    check_logits,
    compress_topk,
)
from wprctl.ot.wellposed import support_edges, wellposed_solve

Method = Literal["wellposed", "paper"]
# Below this many (support x positions) entries the paper solver runs on one intra-op thread
_SMALL = 2**20
Gauge = Literal["centered", "raw"]
Support = Literal["position", "batch"]


@dataclass
class WPRResult:
    potential: torch.Tensor  # (B, T) float32: the penalty phi at the action (0 where masked)
    ot_value: torch.Tensor | None  # (B, T) float32 entropic OT value, when requested
    iterations: torch.Tensor  # (B, T) int64 Sinkhorn iterations run
    marginal_error: torch.Tensor  # (B, T) float32 L1 marginal error of the returned scalings
    converged_fraction: float  # over masked-in positions
    infeasible_fraction: float | None  # paper only: detected infeasible truncated problems
    support_size: (
        int  # paper: batch-wide support + the dust bin; wellposed: largest per-position support
    )
    method: str = "wellposed"


def _check_common(
    graph: CostGraph, epsilon: float, max_iter: int, tol: float, gauge: str, method: str, V: int
) -> None:
    check_epsilon(epsilon)
    if not isinstance(graph, CostGraph):
        raise UserError(f"WPR: graph must be a CostGraph, got {type(graph).__name__}")
    if graph.num_tokens != V:
        raise UserError(
            f"WPR: the cost graph has {graph.num_tokens} tokens but the logits have a vocabulary "
            f"of {V}; build the graph from the same model's embeddings"
        )
    if not isinstance(max_iter, int) or max_iter < 1:
        raise UserError(f"WPR: max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not tol > 0:
        raise UserError(f"WPR: tol must be > 0, got {tol!r}")
    if gauge not in ("centered", "raw"):
        raise UserError(f"WPR: gauge must be 'centered' or 'raw', got {gauge!r}")
    if method not in ("wellposed", "paper"):
        raise UserError(f"WPR: method must be 'wellposed' or 'paper', got {method!r}")


def _scatter_bt(mask: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out[mask] = values.to(dtype)
    return out


def _times(mass: torch.Tensor, pot: torch.Tensor) -> torch.Tensor:
    """mass * potential with 0 * (-inf) = 0 (an empty dust bin has potential -inf)."""
    return torch.where(mass > 0, mass * pot, torch.zeros_like(pot))


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x log y with 0 log y = 0."""
    return torch.where(x > 0, x * torch.log(y), torch.zeros_like(x))


def _finish(
    mask: torch.Tensor,
    phi: torch.Tensor,
    value: torch.Tensor | None,
    out: dict[str, torch.Tensor],
    infeasible: torch.Tensor | None,
    support_size: int,
    method: str,
) -> WPRResult:
    n = int(mask.sum())
    return WPRResult(
        potential=_scatter_bt(mask, phi, torch.float32),
        ot_value=None if value is None else _scatter_bt(mask, value, torch.float32),
        iterations=_scatter_bt(mask, out["iterations"], torch.long),
        marginal_error=_scatter_bt(mask, out["marginal_error"], torch.float32),
        converged_fraction=float(out["converged"].float().mean()) if n else 1.0,
        infeasible_fraction=(
            None if infeasible is None else (float(infeasible.float().mean()) if n else 0.0)
        ),
        support_size=support_size,
        method=method,
    )


# ------------------------------------------------------------------------------------ paper


@single_threaded_when(
    lambda support, a_sub, *_: a_sub.device.type == "cpu" and a_sub.numel() < _SMALL
)
def _paper_core(
    support: torch.Tensor,
    a_sub: torch.Tensor,
    b_sub: torch.Tensor,
    action_ids: torch.Tensor,
    graph: CostGraph,
    mask: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
    gauge: str,
    return_value: bool,
) -> WPRResult:
    """``a_sub``, ``b_sub``: (P, Ns) float32 masses of the active positions on the support."""
    Ns = support.numel()
    tail_a = (1.0 - a_sub.sum(1, keepdim=True)).clamp_min(0.0)
    tail_b = (1.0 - b_sub.sum(1, keepdim=True)).clamp_min(0.0)
    a = torch.cat([a_sub, tail_a], 1)
    b = torch.cat([b_sub, tail_b], 1)
    K = support_kernel(graph, support, epsilon, tile_columns(a.shape[0]))
    col = torch.searchsorted(support, action_ids)
    in_support = (col < Ns) & (support[col.clamp_max(Ns - 1)] == action_ids)
    col = torch.where(in_support, col, Ns)  # outside the support: the dust bin
    out = paper_sinkhorn(
        K, a, b, col, epsilon, max_iter, tol, centered=gauge == "centered", value=return_value
    )
    return _paper_finish(mask, out, gauge, return_value, Ns)


def _paper_finish(
    mask: torch.Tensor, out: dict[str, torch.Tensor], gauge: str, return_value: bool, Ns: int
) -> WPRResult:
    phi = out["f_action"]
    if gauge == "centered":
        phi = phi - out["f_mean"]
    value = out["value"] if return_value else None
    return _finish(mask, phi, value, out, out["infeasible"], Ns + 1, "paper")


@single_threaded_when(
    lambda policy_logits, ref_logits, actions, mask, *_: (
        policy_logits.device.type == "cpu"
        and int(mask.sum()) * policy_logits.shape[-1] < 4 * _SMALL
    )
)
def _paper_full(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    graph: CostGraph,
    epsilon: float,
    top_k: int,
    max_iter: int,
    tol: float,
    gauge: str,
    pad_id: int,
    eos_id: int,
    start: int | None,
    return_value: bool,
) -> WPRResult:
    V = policy_logits.shape[-1]
    if bool(mask.all()):  # a view: the masked gather copies two (positions, V) tensors
        flat_p, flat_q = policy_logits.reshape(-1, V).float(), ref_logits.reshape(-1, V).float()
    else:
        flat_p, flat_q = policy_logits[mask].float(), ref_logits[mask].float()
    check_finite_rows(flat_p, flat_q, mask.reshape(-1).nonzero().squeeze(1), mask.shape[1])
    k = min(top_k, V)
    tops = [torch.topk(x, k, dim=-1).indices for x in (flat_q, flat_p)] if flat_p.numel() else []
    extra = actions[:, start:] if start is not None else actions[mask]
    support = paper_support(
        torch.cat([t.reshape(-1) for t in tops]) if tops else actions.new_empty(0),
        extra.long(),
        pad_id,
        eos_id,
    )
    lse_p = torch.logsumexp(flat_p, dim=-1, keepdim=True)
    lse_q = torch.logsumexp(flat_q, dim=-1, keepdim=True)
    # index_select: several times faster than advanced indexing for this gather on CPU
    a_sub = torch.exp(flat_p.index_select(1, support) - lse_p)
    b_sub = torch.exp(flat_q.index_select(1, support) - lse_q)
    return _paper_core(
        support, a_sub, b_sub, actions[mask].long(), graph, mask, epsilon, max_iter, tol, gauge,
        return_value,
    )  # fmt: skip


def _paper_topk(
    pair: TopKPair,
    graph: CostGraph,
    epsilon: float,
    max_iter: int,
    tol: float,
    gauge: str,
    pad_id: int,
    eos_id: int,
    return_value: bool,
    per_position: bool | None = None,
    backend: str = "auto",
) -> WPRResult:
    """``per_position``: solve one small problem per position (None: when it is less work; the
    CPU's compiled path always does)."""
    mask, device = pair.mask, pair.indices.device
    threads = backend_threads(backend, device)
    # On the CPU, compiled from the pair's arrays to the results (``paper_cpu``: the batch
    # support, each position's problem and its solve in one call, no tensor glue); it keeps room
    # for 2 S k1 kernel entries per running chunk (8 bytes each).
    if (
        threads > 0
        and per_position is not False
        and bool(mask.any())
        and pair.indices.shape[-1] * graph.knn.shape[1] <= 2**22
    ):
        from wprctl.ot.paper_cpu import paper_topk_cpu

        w = paper_kernel_weights(graph, epsilon, device)
        mutual, live = paper_mutual(graph, device), paper_reverse_live(graph, epsilon, device)
        pair_arrays = (pair.indices, pair.valid, pair.logp, pair.logq, pair.actions)
        Ns, out = paper_topk_cpu(
            *(x[mask].contiguous().numpy() for x in pair_arrays),
            *(x.contiguous().numpy() for x in (graph.knn_narrow(), w, mutual, live)),
            pad_id, eos_id, epsilon, max_iter, tol, threads,
        )  # fmt: skip
        out_t = {k: torch.from_numpy(v) for k, v in out.items()}
        return _paper_finish(mask, out_t, gauge, return_value, Ns)
    ids, valid = pair.indices[mask], pair.valid[mask]
    support = paper_support(ids[valid], pair.actions[mask], pad_id, eos_id)
    P, Ns = ids.shape[0], support.numel()
    # A token of the batch-wide support outside this position's own top-k has mass 0 here (the
    # full-logit path uses its true, small mass): the one documented difference of this path.
    # Its u and v are then exactly 0 after the first iteration, and each position's problem
    # reduces to its own <= 2k + 1 tokens (see ``local_problems``): far less work than the
    # batch-wide support once the batch has more than a few positions.
    if per_position is None:
        per_position = P > 1 and Ns >= 2 * ids.shape[1]
    if per_position:
        return _paper_local(pair, support, graph, epsilon, max_iter, tol, gauge, return_value)
    a_sub = torch.zeros(P, Ns, dtype=torch.float32, device=ids.device)
    b_sub = torch.zeros_like(a_sub)
    rows = torch.searchsorted(support, ids)
    ok = valid & (rows < Ns) & (support[rows.clamp_max(max(Ns - 1, 0))] == ids)
    pos = torch.arange(P, device=ids.device).unsqueeze(1).expand_as(ids)
    a_sub[pos[ok], rows[ok]] = pair.logp[mask][ok].exp()
    b_sub[pos[ok], rows[ok]] = pair.logq[mask][ok].exp()
    return _paper_core(
        support, a_sub, b_sub, pair.actions[mask], graph, mask, epsilon, max_iter, tol, gauge,
        return_value,
    )  # fmt: skip


@single_threaded_when(lambda pair, *_: pair.indices.device.type == "cpu")  # small tensor ops
def _paper_local(
    pair: TopKPair,
    support: torch.Tensor,
    graph: CostGraph,
    epsilon: float,
    max_iter: int,
    tol: float,
    gauge: str,
    return_value: bool,
) -> WPRResult:
    """``_paper_topk`` as one small problem per position (``paper.local_problems``) in tensor
    code (CUDA; the CPU's is compiled, ``paper_cpu``)."""
    mask = pair.mask
    ids, valid = pair.indices[mask], pair.valid[mask]
    actions = pair.actions[mask]
    P, S = ids.shape
    Ns = support.numel()
    # the slots with mass: valid ids of the batch support (not the pad id, unless it is eos)
    at = torch.searchsorted(support, ids).clamp_max(Ns - 1)
    own = valid & (support[at] == ids)
    a = torch.zeros(P, S + 1, dtype=torch.float32, device=ids.device)
    b = torch.zeros_like(a)
    a[:, :S] = torch.where(own, pair.logp[mask].exp(), a[:, :S])
    b[:, :S] = torch.where(own, pair.logq[mask].exp(), b[:, :S])
    a[:, S] = (1.0 - a[:, :S].sum(1)).clamp_min(0.0)
    b[:, S] = (1.0 - b[:, :S].sum(1)).clamp_min(0.0)
    # the action's slot; -1 if it is a batch-support token without a slot here; else the dust
    slot = torch.searchsorted(ids, actions.unsqueeze(1)).squeeze(1).clamp_max(S - 1)
    has_slot = own.gather(1, slot.unsqueeze(1)).squeeze(1)
    has_slot &= ids.gather(1, slot.unsqueeze(1)).squeeze(1) == actions
    col = torch.searchsorted(support, actions).clamp_max(max(Ns - 1, 0))
    in_support = support[col] == actions
    rows = torch.where(has_slot, slot, torch.where(in_support, -1, S))
    lp = local_problems(graph, support, ids, own, epsilon)
    out = paper_sinkhorn_local(
        lp, a, b, rows, epsilon, max_iter, tol, centered=gauge == "centered", value=return_value
    )
    return _paper_finish(mask, out, gauge, return_value, Ns)


# ------------------------------------------------------------------------------------ wellposed


def _wellposed(
    pair: TopKPair,
    graph: CostGraph,
    epsilon: float,
    max_iter: int,
    tol: float,
    gauge: str,
    return_value: bool,
    dust_scale: float,
    reservoir: float,
    reservoir_scale: float,
    reservoir_margin: float = 10.0,
    backend: str = "auto",
) -> WPRResult:
    # float64: in float32 the Newton solve does not reach tol = 1e-6 (0.89 of the positions at
    # V = 32k, 5x the steps) and its potentials are 0.57 std off the float64 ones
    dtype = torch.float64
    mask = pair.mask
    ids, valid = pair.indices[mask], pair.valid[mask]
    slot = pair.action_slot[mask].unsqueeze(1)
    # Valid slots first, then drop the columns no position uses: the union of the two top-k2
    # sets is often much smaller than 2 k2 + 1 and every solver step is O(slots).
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    width = max(1, int(valid.sum(1).max())) if valid.numel() else 1
    order = order[:, :width]
    slot = torch.argsort(torch.argsort((~valid).to(torch.int8), dim=1, stable=True), dim=1).gather(
        1, slot
    )
    ids, valid = ids.gather(1, order), valid.gather(1, order)
    la = pair.logp[mask].gather(1, order).to(dtype).masked_fill(~valid, -math.inf)
    lb = pair.logq[mask].gather(1, order).to(dtype).masked_fill(~valid, -math.inf)
    tail_a, tail_b = pair.tail_p[mask].to(dtype), pair.tail_q[mask].to(dtype)
    # Both sides must carry exactly the same total mass, or no coupling exists and the marginal
    # error can never drop below the difference. float32 log-probabilities of large logits are
    # off by ~1e-5, and a tail clamped at 0 then leaves a(S) > 1: renormalize each side to 1.
    for lx, tail in ((la, tail_a), (lb, tail_b)):
        total = torch.logsumexp(lx, dim=1).exp() + tail
        lx -= torch.log(total).unsqueeze(1)
        tail /= total
    edges = support_edges(graph, ids, valid, backend)
    g = graph.on(ids.device)
    if "knn_mean" not in g:
        g["knn_mean"] = g["knn_cost"].mean(dim=1)
    lam = (dust_scale * g["knn_mean"][ids]).masked_fill(~valid, 0.0)
    # 2 Lambda exceeds the dearest legitimate route (one graph edge, or slot -> dust -> slot at
    # lambda_i + lambda_j) by 2 * margin * eps: a feasible problem leaks < exp(-2 margin) of its
    # mass through the reservoir, i.e. never notices it
    top = max(float(graph.knn_cost.max()), float(lam.max()) if lam.numel() else 0.0)
    lam_r = reservoir_scale * top + reservoir_margin * epsilon
    out = wellposed_solve(
        la, lb, tail_a, tail_b, edges, lam, lam_r, epsilon, max_iter, tol, reservoir=reservoir,
        backend=backend,
    )  # fmt: skip
    F, G, FD, GD = out["F"], out["G"], out["FD"], out["GD"]
    a = la.exp()
    # the tail's sum a_j F_j: the lumped a_D F_D plus the correction of the module docstring
    # of ``wellposed``, (1/2) (sum_tail a_j log a_j - a_D log a_D) (in units of eps)
    t_aa, t_bb = pair.tail_plogp[mask].to(dtype), pair.tail_qlogq[mask].to(dtype)
    zero = torch.zeros_like(tail_a)
    corr_a = torch.where(tail_a > 0, (t_aa - _xlogy(tail_a, tail_a)) / 2, zero)
    corr_b = torch.where(tail_b > 0, (t_bb - _xlogy(tail_b, tail_b)) / 2, zero)
    # zero-mass slots (unused, or a -inf logit) have potential -inf: 0 * (-inf) must be 0
    Fz = torch.where(a > 0, F, torch.zeros_like(F))
    mean_f = (a * Fz).sum(1) + _times(tail_a, FD) + corr_a
    if gauge == "raw":
        phi = epsilon * (F.gather(1, slot).squeeze(1) - (out["FR"] - out["GR"]) / 2)
    else:
        phi = epsilon * (F.gather(1, slot).squeeze(1) - mean_f)
    value = None
    if return_value:
        b = lb.exp()
        Gz = torch.where(b > 0, G, torch.zeros_like(G))
        mean_g = (b * Gz).sum(1) + _times(tail_b, GD) + corr_b
        neg_entropy = (
            _times(a, la).sum(1) + _times(b, lb).sum(1)
            + t_aa + t_bb
        )  # fmt: skip
        value = epsilon * (mean_f + mean_g - neg_entropy)
    return _finish(
        mask, phi, value, out, None, int(valid.sum(1).max()) if valid.numel() else 0, "wellposed"
    )


# ------------------------------------------------------------------------------------ public


def wpr_potentials(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    graph: CostGraph,
    *,
    epsilon: float,
    top_k: int | None,
    max_iter: int,
    tol: float,
    mask: torch.Tensor | None = None,
    gauge: Gauge = "centered",
    method: Method = "wellposed",
    pad_id: int = 0,
    eos_id: int = 1,
    start: int | None = None,
    return_value: bool = False,
    dust_scale: float = 1.0,
    reservoir: float = 2.0,
    reservoir_scale: float = 2.0,
    reservoir_margin: float = 10.0,
    support: Support = "position",
) -> WPRResult:
    """WPR penalty phi (B, T) at ``actions`` from full (B, T, V) logits (policy a, reference b).

    ``top_k`` is k2 (None: no truncation). ``mask`` marks the positions that get a penalty (all
    when None). ``start`` (``paper`` only): add ``actions[:, start:]`` to the support as the
    official trainer does, instead of the actions at the masked positions.

    ``support`` (``wellposed`` only): ``position``, each position's own top-k2(a) U top-k2(b) U
    {y} (what the top-k entry point and PPO use: O(k2) per position); or ``batch``, the union of
    those over the batch for every position (the official's support, ``paper`` always uses it),
    each position with its true masses there. ``batch`` compares the two methods on the same
    support; its cost grows with the batch's support, which nears V for large batches.
    """
    mask_b = check_logits(policy_logits, ref_logits, actions, mask)
    V = policy_logits.shape[-1]
    _check_common(graph, epsilon, max_iter, tol, gauge, method, V)
    k = V if top_k is None else top_k
    if not isinstance(k, int) or k < 1:
        raise UserError(f"WPR: top_k (k2) must be an integer >= 1 or None, got {top_k!r}")
    if support not in ("position", "batch"):
        raise UserError(f"WPR: support must be 'position' or 'batch', got {support!r}")
    if method == "paper":
        graph.check_underflow(epsilon, torch.float32)
        return _paper_full(
            policy_logits, ref_logits, actions, mask_b, graph, epsilon, k, max_iter, tol, gauge,
            pad_id, eos_id, start, return_value,
        )  # fmt: skip
    common = None
    if support == "batch" and k < V:
        common = batch_support(policy_logits, ref_logits, actions, k, mask_b)
    pair = compress_topk(policy_logits, ref_logits, actions, k, mask_b, support=common)
    return wpr_potentials_topk(
        pair, graph, epsilon=epsilon, max_iter=max_iter, tol=tol, gauge=gauge, method=method,
        pad_id=pad_id, eos_id=eos_id, return_value=return_value, dust_scale=dust_scale,
        reservoir=reservoir, reservoir_scale=reservoir_scale, reservoir_margin=reservoir_margin,
    )  # fmt: skip


def wpr_potentials_topk(
    pair: TopKPair,
    graph: CostGraph,
    *,
    epsilon: float,
    max_iter: int,
    tol: float,
    gauge: Gauge = "centered",
    method: Method = "wellposed",
    pad_id: int = 0,
    eos_id: int = 1,
    return_value: bool = False,
    dust_scale: float = 1.0,
    reservoir: float = 2.0,
    reservoir_scale: float = 2.0,
    reservoir_margin: float = 10.0,
    backend: str = "auto",
) -> WPRResult:
    """WPR penalty from the compressed form (see ``compress_topk``); same result fields.

    ``paper`` here differs from the full-logit path in one way: a batch-support token outside a
    position's own top-k2 has mass 0 instead of its (small) true mass. ``backend``: ``auto``,
    ``compiled`` or ``torch``, see ``threads.backend_threads``.
    """
    if not isinstance(pair, TopKPair):
        raise UserError(f"WPR: expected a TopKPair from compress_topk, got {type(pair).__name__}")
    _check_common(graph, epsilon, max_iter, tol, gauge, method, pair.vocab_size)
    if method == "paper":
        graph.check_underflow(epsilon, torch.float32)
        return _paper_topk(
            pair, graph, epsilon, max_iter, tol, gauge, pad_id, eos_id, return_value,
            backend=backend,
        )  # fmt: skip
    if not dust_scale > 0 or not math.isfinite(dust_scale):
        raise UserError(f"WPR: dust_scale must be a finite number > 0, got {dust_scale!r}")
    if not reservoir > 1 or not math.isfinite(reservoir):
        raise UserError(f"WPR: reservoir must be a finite number > 1, got {reservoir!r}")
    graph.check_underflow(epsilon, torch.float32)
    return _wellposed(
        pair,
        graph,
        epsilon,
        max_iter,
        tol,
        gauge,
        return_value,
        dust_scale,
        reservoir,
        reservoir_scale,
        reservoir_margin=reservoir_margin,
        backend=backend,
    )
