"""``wellposed``: a truncated entropic OT problem that always has a solution, solved to tolerance.

Per position, with a = policy, b = reference, y = the action and the cost graph C:

Support and dust. S = top-k2(a) U top-k2(b) U {y} (the whole vocabulary when k2 >= V). The
tokens outside S are lumped into one dust bin D holding the tail masses a_D = 1 - a(S) and
b_D = 1 - b(S).

Costs. Inside S the graph costs (C_ii = 0, +inf off the graph). Token i and the dust exchange
mass in both directions at the finite cost lambda_i = ``dust_scale`` * (mean cost of i's k1
nearest neighbours): the tail of the vocabulary is, for a support token, "somewhere in its kNN
neighbourhood". C_DD = 0.

Reservoir (feasibility). Both dust masses get an extra ``reservoir`` rho >= 1:
a_D' = a_D + rho, b_D' = b_D + rho, so both sides have mass 1 + rho. This problem is always
feasible: P_ii = min(a_i, b_i), P_iD = (a_i - b_i)^+, P_Dj = (b_j - a_j)^+,
P_DD = a_D' - sum_j (b_j - a_j)^+ >= rho - 1 >= 0 is a coupling (strictly positive on every
allowed entry after an arbitrarily small perturbation when rho > 1), so finite dual potentials
exist and Sinkhorn converges. The reservoir only carries mass D -> D at cost 0; moving mass
i -> D -> j through it costs lambda_i + lambda_j, so it is used only where the graph cannot
move the mass (the infeasible part of the truncated or even the full problem) and is
negligible when the one-hop graph transport is cheaper.

Solver. Log-domain Sinkhorn on F = f/eps, G = g/eps (never exp(-C/eps) itself, so eps = 1e-3
with L2 costs is fine): F_i = log a_i - LSE_j(G_j - C_ij/eps) over j in N(i) U {i, D}, the same
for G. Each position stops as soon as the L1 error of its b-marginal (the a-marginal is exact
after the F step) is <= tol; it is then frozen, so the result does not depend on ``max_iter``
once converged. The in-support graph is gathered per position as padded neighbour lists
(P, S, m) from the (V, k1) kNN lists; nothing is V x V.

Gauge. ``raw``: the gauge with f_D = g_D (potentials measured against the reservoir, i.e. the
rest of the vocabulary). ``centered``: f(y) - (sum_{i in S} a_i f_i + a_D f_D), with the real
tail mass a_D (not the reservoir), as in the golden cases.

OT value. <a,f> + <b,g> - eps <a, log a> - eps <b, log b> over S U {D} with the real masses
(both sum to 1, so it is gauge invariant); without truncation it is the entropic OT value
<P,C> + eps KL(P | a x b).
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


def _lse_neighbours(
    X: torch.Tensor, XD: torch.Tensor, nb_global: torch.Tensor, cn: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE over each slot's neighbours and the dust, and the dust's LSE over all slots."""
    gathered = X.reshape(-1)[nb_global] - cn
    dust_term = (XD.unsqueeze(-1) - lam).unsqueeze(-1)
    per_slot = torch.logsumexp(torch.cat([gathered, dust_term], dim=-1), dim=-1)
    dust = torch.logsumexp(torch.cat([XD.unsqueeze(-1), X - lam], dim=-1), dim=-1)
    return per_slot, dust


def wellposed_sinkhorn(
    la: torch.Tensor,
    lb: torch.Tensor,
    tail_a: torch.Tensor,
    tail_b: torch.Tensor,
    nb: torch.Tensor,
    cost: torch.Tensor,
    dust_cost: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
    reservoir: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Log-domain Sinkhorn of the module docstring on P positions with S slots each.

    ``la``, ``lb`` (P, S): log-masses, -inf on unused slots; ``nb``, ``cost`` (P, S, m) from
    ``support_neighbours``; ``dust_cost`` (P, S) lambda_i. Returns scaled potentials F, G (P, S),
    FD, GD (P,), iterations, marginal error and converged flags.
    """
    P, S = la.shape
    device, dtype = la.device, la.dtype
    cn_all = cost.to(dtype) / epsilon
    lam_all = dust_cost.to(dtype) / epsilon
    laD_all = torch.log(tail_a.to(dtype) + reservoir)
    lbD_all = torch.log(tail_b.to(dtype) + reservoir)
    b_all = lb.exp()
    bD_all = lbD_all.exp()
    F_out = torch.zeros_like(la)
    G_out = lb / 2  # u (Ku) = a with K ~ I is solved by f = eps/2 log a: a good start
    FD_out = torch.zeros(P, dtype=dtype, device=device)
    GD_out = torch.zeros(P, dtype=dtype, device=device)
    iters = torch.zeros(P, dtype=torch.long, device=device)
    err_out = torch.full((P,), math.inf, dtype=dtype, device=device)
    converged = torch.zeros(P, dtype=torch.bool, device=device)

    work = torch.arange(P, device=device)
    G, GD = G_out.clone(), GD_out.clone()
    la_w, lb_w, b_w, laD, lbD, bD = la, lb, b_all, laD_all, lbD_all, bD_all
    cn, lam, nb_w = cn_all, lam_all, nb

    def nb_global(nb_local: torch.Tensor) -> torch.Tensor:
        n = nb_local.shape[0]
        return nb_local + (torch.arange(n, device=device) * S).view(n, 1, 1)

    nbg = nb_global(nb_w)
    for _ in range(max_iter):
        if work.numel() == 0:
            break
        L, LD = _lse_neighbours(G, GD, nbg, cn, lam)
        F, FD = la_w - L, laD - LD
        Lg, LgD = _lse_neighbours(F, FD, nbg, cn, lam)
        col = torch.exp(G + Lg)
        err = torch.nan_to_num((col - b_w).abs(), nan=0.0).sum(-1) + (torch.exp(GD + LgD) - bD).abs()
        iters[work] += 1
        done = err <= tol
        # a finished position keeps (F, G_old): exact a-marginal, b-marginal within tol
        F_out[work], FD_out[work], err_out[work] = F, FD, err
        G_out[work], GD_out[work] = G, GD
        converged[work[done]] = True
        G, GD = lb_w - Lg, lbD - LgD
        keep = ~done
        if bool(done.any()):
            work = work[keep]
            G, GD = G[keep], GD[keep]
            la_w, lb_w, b_w = la_w[keep], lb_w[keep], b_w[keep]
            laD, lbD, bD = laD[keep], lbD[keep], bD[keep]
            cn, lam, nb_w = cn[keep], lam[keep], nb_w[keep]
            nbg = nb_global(nb_w)
    return {
        "F": F_out,
        "G": G_out,
        "FD": FD_out,
        "GD": GD_out,
        "iterations": iters,
        "marginal_error": err_out,
        "converged": converged,
    }
