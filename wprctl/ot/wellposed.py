"""``wellposed``: a truncated entropic OT problem that always has a solution, solved to tolerance.

Per position, with a = policy, b = reference, y = the action and the cost graph C:

Support and dust. S = top-k2(a) U top-k2(b) U {y} (the whole vocabulary when k2 >= V). The
tokens outside S are lumped into one dust bin D holding the tail masses a_D = 1 - a(S) and
b_D = 1 - b(S). Token i in S and the dust exchange mass in both directions at the finite cost
lambda_i = ``dust_scale`` * (mean cost of i's k1 nearest neighbours): for a support token the
rest of the vocabulary is "somewhere in its kNN neighbourhood"; C_DD = 0. Aggregating the tail
of any exact plan into D gives a plan of this problem, so it is feasible whenever the full
problem is.

Reservoir (feasibility). One more bin R with mass rho > 1 on both sides (default 2), C_RR = 0,
exchanging with every slot and with D at the cost Lambda = ``reservoir_scale`` * (largest kNN
cost) + ``reservoir_margin`` * eps. Now a coupling always exists and is strictly positive:
P_ii = min(a_i, b_i), P_iR = (a_i - b_i)^+, P_Rj = (b_j - a_j)^+, P_DD = min(a_D, b_D),
P_DR, P_RD the remaining dust mass, P_RR = rho - (moved mass) >= rho - 1 > 0; so finite dual
potentials exist and Sinkhorn converges. Mass routed i -> R -> j costs 2 Lambda: more than any
path the graph offers and, by the margin, exp(-Lambda/eps) < 1e-13, so a feasible problem never
notices the reservoir (its result is the untruncated exact one when k2 >= V) while an
infeasible one still has an answer: the unmovable mass pays 2 Lambda.

Solver. Log-domain Sinkhorn on F = f/eps, G = g/eps (never exp(-C/eps) itself, so eps = 1e-3
with L2 costs is fine): F_i = log a_i - LSE_j(G_j - C_ij/eps) over j in N(i) U {i, D, R}, the
same for G. Each position stops as soon as the L1 error of its b-marginal (the a-marginal is
exact after the F step) is <= tol; it is then frozen, so the result does not depend on
``max_iter`` once converged. ``omega`` (default 1.5) over-relaxes the updates that drive the next step; the stopping
certificate is always a plain step, so omega changes speed, not what "converged" means.
The in-support graph is gathered per position as padded neighbour lists (P, S, m) from the
(V, k1) kNN lists; nothing is V x V.

Gauge. ``raw``: the gauge with f_R = g_R (potentials measured against the reservoir).
``centered``: f(y) - (sum_{i in S} a_i f_i + a_D f_D), with the real tail mass a_D, as in the
golden cases.

OT value. <a,f> + <b,g> - eps <a, log a> - eps <b, log b> over S U {D} with the real masses
(both sum to 1, so it is gauge invariant); without truncation it is the entropic OT value
<P,C> + eps KL(P | a x b).

Known limits (measured on the golden cases, see benchmarks/wpr_penalty.py): the single dust bin
is a coarse model of the truncated tail, so at k2 = 64 the error is 0.06-0.4 std depending on
the case; plain Sinkhorn on the untruncated sparse graph can need thousands of iterations.
"""

from __future__ import annotations

import math

import torch

from wprctl.ot.graph import CostGraph


def support_neighbours(
    graph: CostGraph, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded in-support neighbour lists of each slot: (P, S, m) local slot ids and costs.

    Column 0 is the slot itself (cost 0); padding points at the slot itself with cost +inf.
    An edge (i, j) is found from i's kNN list or j's kNN list (the symmetrized graph).
    """
    P, S = ids.shape
    device = ids.device
    g = graph.on(device)
    knn, knn_cost = g["knn"], g["knn_cost"]
    V, k1 = knn.shape
    chunk = max(1, min(P, (4 * 2**20) // max(1, S * k1), (16 * 2**20) // (V + 1)))
    ps, is_, js, cs = [], [], [], []
    for lo in range(0, P, chunk):
        hi = min(P, lo + chunk)
        n = hi - lo
        slot_map = torch.full((n, V + 1), -1, dtype=torch.int32, device=device)
        # invalid (duplicate) slots write to the spare column V
        target = torch.where(valid[lo:hi], ids[lo:hi], V)
        slot_map.scatter_(1, target, torch.arange(S, dtype=torch.int32, device=device).expand(n, S))
        hit = slot_map.gather(1, knn[ids[lo:hi]].reshape(n, S * k1)).view(n, S, k1)
        hit = hit.masked_fill_(~valid[lo:hi].unsqueeze(-1), -1)
        p, i, r = (hit >= 0).nonzero(as_tuple=True)
        j = hit[p, i, r].long()
        ps.append(p + lo)
        is_.append(i)
        js.append(j)
        cs.append(knn_cost[ids[lo:hi][p, i], r])
    p, i, j, c = (torch.cat(x) for x in (ps, is_, js, cs))
    # symmetrize and deduplicate (an edge found from both ends appears twice)
    p, i, j, c = torch.cat([p, p]), torch.cat([i, j]), torch.cat([j, i]), torch.cat([c, c])
    key = (p * S + i) * S + j
    key, order = torch.sort(key)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    key, c = key[first], c[order[first]]
    row, j = key // S, key % S
    counts = torch.bincount(row, minlength=P * S)
    m = 1 + (int(counts.max()) if counts.numel() and row.numel() else 0)
    rank = torch.arange(row.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[row]
    self_ids = torch.arange(S, device=device).expand(P, S)
    nb = self_ids.unsqueeze(-1).repeat(1, 1, m).reshape(P * S, m)
    nc = torch.full((P * S, m), math.inf, dtype=torch.float64, device=device)
    nc[:, 0] = 0.0
    nb[row, rank + 1] = j
    nc[row, rank + 1] = c
    return nb.view(P, S, m), nc.view(P, S, m)


def _lse_rows(
    X: torch.Tensor,
    XD: torch.Tensor,
    XR: torch.Tensor,
    nb_global: torch.Tensor,
    cn: torch.Tensor,
    lam: torch.Tensor,
    lam_r: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSE of the other side's scaled potentials minus costs, for every slot, the dust, the reservoir."""
    gathered = X.reshape(-1)[nb_global] - cn
    extra = torch.stack([XD.unsqueeze(-1) - lam, (XR - lam_r).unsqueeze(-1).expand_as(lam)], -1)
    per_slot = torch.logsumexp(torch.cat([gathered, extra], dim=-1), dim=-1)
    dust = torch.logsumexp(torch.cat([torch.stack([XD, XR - lam_r], -1), X - lam], -1), dim=-1)
    res = torch.logsumexp(torch.cat([torch.stack([XR, XD - lam_r], -1), X - lam_r], -1), dim=-1)
    return per_slot, dust, res


def _relax(old: torch.Tensor, new: torch.Tensor, omega: float) -> torch.Tensor:
    """old + omega (new - old), keeping -inf (empty slots) as -inf."""
    return torch.where(torch.isfinite(new) & torch.isfinite(old), old + omega * (new - old), new)


def wellposed_sinkhorn(*args, **kwargs) -> dict[str, torch.Tensor]:
    """``_sinkhorn`` with subnormal floats flushed to zero (exp of very negative log-masses
    otherwise makes CPU arithmetic several times slower; subnormals are far below tol)."""
    flushed = torch.set_flush_denormal(True)
    try:
        return _sinkhorn(*args, **kwargs)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _sinkhorn(
    la: torch.Tensor,
    lb: torch.Tensor,
    tail_a: torch.Tensor,
    tail_b: torch.Tensor,
    nb: torch.Tensor,
    cost: torch.Tensor,
    dust_cost: torch.Tensor,
    reservoir_cost: float,
    epsilon: float,
    max_iter: int,
    tol: float,
    reservoir: float = 2.0,
    omega: float = 1.5,
) -> dict[str, torch.Tensor]:
    """Log-domain Sinkhorn of the module docstring on P positions with S slots each.

    ``la``, ``lb`` (P, S): log-masses, -inf on unused slots; ``nb``, ``cost`` (P, S, m) from
    ``support_neighbours``; ``dust_cost`` (P, S) lambda_i; ``reservoir_cost`` Lambda. Returns
    scaled potentials F, G (P, S), FD, GD (dust), FR, GR (reservoir) (P,), iterations, the L1
    b-marginal error and converged flags.
    """
    P, S = la.shape
    device, dtype = la.device, la.dtype
    lam_r = reservoir_cost / epsilon
    log_rho = math.log(max(reservoir, 1e-300))
    state = {
        "la": la,
        "lb": lb,
        "b": lb.exp(),
        "laD": torch.log(tail_a.to(dtype)),
        "lbD": torch.log(tail_b.to(dtype)),
        "cn": cost.to(dtype) / epsilon,
        "lam": dust_cost.to(dtype) / epsilon,
        "nb": nb,
        # u (K u) = a with K ~ I is solved by f = eps/2 log a: a good start
        "G": lb / 2,
        "GD": torch.zeros(P, dtype=dtype, device=device),
        "GR": torch.zeros(P, dtype=dtype, device=device),
    }
    names = ("F", "G", "FD", "GD", "FR", "GR")
    out = {n: torch.zeros(P, S, dtype=dtype, device=device) for n in ("F", "G")}
    out.update({n: torch.zeros(P, dtype=dtype, device=device) for n in names[2:]})
    iters = torch.zeros(P, dtype=torch.long, device=device)
    err_out = torch.full((P,), math.inf, dtype=dtype, device=device)
    converged = torch.zeros(P, dtype=torch.bool, device=device)
    work = torch.arange(P, device=device)

    def nb_global(nb_local: torch.Tensor) -> torch.Tensor:
        n = nb_local.shape[0]
        return nb_local + (torch.arange(n, device=device) * S).view(n, 1, 1)

    nbg = nb_global(nb)
    st = state
    for _ in range(max_iter):
        if work.numel() == 0:
            break
        L, LD, LR = _lse_rows(st["G"], st["GD"], st["GR"], nbg, st["cn"], st["lam"], lam_r)
        F, FD, FR = st["la"] - L, st["laD"] - LD, log_rho - LR
        Lg, LgD, LgR = _lse_rows(F, FD, FR, nbg, st["cn"], st["lam"], lam_r)
        Fr, FDr, FRr = F, FD, FR
        if omega != 1.0 and "F" in st:
            # over-relaxed F drives the next G step; (F, G_old) stays the certificate
            Fr = _relax(st["F"], F, omega)
            FDr, FRr = _relax(st["FD"], FD, omega), _relax(st["FR"], FR, omega)
            Lg_r = _lse_rows(Fr, FDr, FRr, nbg, st["cn"], st["lam"], lam_r)
        else:
            Lg_r = (Lg, LgD, LgR)
        G, GD, GR = st["G"], st["GD"], st["GR"]
        col_err = torch.nan_to_num((torch.exp(G + Lg) - st["b"]).abs(), nan=0.0).sum(-1)
        dust_err = torch.nan_to_num((torch.exp(GD + LgD) - torch.exp(st["lbD"])).abs(), nan=0.0)
        err = col_err + dust_err + (torch.exp(GR + LgR) - reservoir).abs()
        iters[work] += 1
        # a finished position keeps (F, G_old): exact a-marginal, b-marginal within tol
        for n, x in zip(names, (F, G, FD, GD, FR, GR), strict=True):
            out[n][work] = x
        err_out[work] = err
        done = err <= tol
        converged[work[done]] = True
        newG = (st["lb"] - Lg_r[0], st["lbD"] - Lg_r[1], log_rho - Lg_r[2])
        if omega != 1.0:
            newG = tuple(_relax(o, n, omega) for o, n in zip((G, GD, GR), newG, strict=True))
            st["F"], st["FD"], st["FR"] = Fr, FDr, FRr
        st["G"], st["GD"], st["GR"] = newG
        if bool(done.any()):
            keep = ~done
            work = work[keep]
            st = {n: x[keep] for n, x in st.items()}
            nbg = nb_global(st["nb"])
    out.update(iterations=iters, marginal_error=err_out, converged=converged)
    return out
