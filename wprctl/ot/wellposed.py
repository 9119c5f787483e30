"""``wellposed``: a truncated entropic OT problem that always has a solution, solved by Newton.

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
potentials exist. Mass routed i -> R -> j costs 2 Lambda: more than any path the graph offers
and, by the margin, exp(-Lambda/eps) < 1e-13, so a feasible problem never notices the reservoir
(its result is the untruncated exact one when k2 >= V) while an infeasible one still has an
answer: the unmovable mass pays 2 Lambda.

Solver. With F = f/eps, G = g/eps over the n = |S| + 2 nodes of each side (slots, D, R) and the
plan P_ij = exp(F_i + G_j - C_ij/eps) on the edges E (self-loops, in-support graph edges, every
slot <-> D and R, D <-> R), the dual objective

    Phi(F, G) = <a, F> + <b, G> - sum_{(i,j) in E} P_ij        (a, b including a_D, b_D, rho)

is concave; its gradient is the marginal error (a - P 1, b - P^T 1) and its negative Hessian is
the signless Laplacian J = [[diag(P 1), P], [P^T, diag(P^T 1)]] (null vector (1, -1): the gauge).
Damped Newton: solve J d = grad Phi by preconditioned conjugate gradients, cap the step at
``step_cap`` in log units (far from the optimum the quadratic model is poor: potentials must move
by up to Lambda/eps), then backtrack on Phi (Armijo) per position. The preconditioner is J
without the off-diagonal graph couplings P_ij (i != j in S), keeping their diagonal
contributions: a 2x2 block [[r_i, P_ii], [P_ii, c_i]] per slot plus the four hub variables
(F_D, G_D, F_R, G_R) coupled to every slot, inverted exactly in O(|S|) by eliminating the slots
and solving the 4x4 Schur complement. It dominates J in the Loewner order, so PCG is well defined,
and it is exact when no in-support graph edge carries mass (the common case for a truncated
support: dust and reservoir couplings, which force thousands of Sinkhorn iterations, are
handled exactly), so Newton typically converges in 5-20 steps. Everything is in log space (the
kernel exp(-C/eps) is never formed, so eps = 1e-3 with L2 costs is fine) and batched over all
positions: one flat edge list, no Python loop over positions. A position stops as soon as the L1
error of both marginals (slots, D and R) is <= tol and is then frozen, so the result does not
depend on ``max_iter`` (the Newton step budget) once converged.

Tail correction (the dust bin is one lumped token). The penalty is centered with the a-weighted
mean of f over the whole vocabulary, and a lumped bin's potential is not the mean potential of
the tokens it stands for: with a kernel close to the identity a token's potentials are about
f_j ~ g_j ~ (eps/2) log sqrt(a_j b_j) up to the common level, so (TopKPair carries the tail sums
sum_{j not in S} a_j log a_j, a_j log b_j, b_j log b_j, b_j log a_j, computed once at rollout)

    sum_{j not in S} a_j f_j ~ a_D f_D + (eps/4) (sum a_j log a_j + sum a_j log b_j - a_D log(a_D b_D))

and the same for <b, g> with the roles of a and b swapped. This makes the identical-policies
case exact up to the kernel's off-diagonal terms (it was the dominant error there).

Gauge. ``raw``: the gauge with f_R = g_R (potentials measured against the reservoir).
``centered``: f(y) - (sum_{i in S} a_i f_i + sum_{j not in S} a_j f_j), the tail sum as above, as
in the golden cases (a_j f_j over the whole vocabulary).

OT value. <a,f> + <b,g> - eps <a, log a> - eps <b, log b> over the whole vocabulary, the tail
sums as above and the exact tail entropies from the rollout (both marginals sum to 1, so it is
gauge invariant); without truncation it is the entropic OT value <P,C> + eps KL(P | a x b).

Known limits (measured on the golden cases, see benchmarks/wpr_penalty.py): a truncated support
knows the tail only through its totals and entropies, not which tail tokens neighbour which
support token, so on the 'diffuse' golden cases (the reference moves a fraction of every token's
mass to its graph neighbours, mostly tail tokens) the error at k2 = 64 stays around 0.2-0.5 std.
"""

from __future__ import annotations

import math

import torch

from wprctl.ot.graph import CostGraph

import os
_DEBUG = bool(os.environ.get("WPR_DEBUG"))


def support_edges(
    graph: CostGraph, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-support graph edges of every position as one flat list (p, i, j, cost).

    ``ids`` (P, S) token ids per slot, ``valid`` (P, S) False for repeated ids. Off-diagonal
    edges only, both directions (i, j) and (j, i), sorted by (p, i, j). An edge is found from
    i's kNN list: a per-position slot map over the vocabulary (int16, a few positions at a time so
    it stays in cache) answers "is this neighbour in the support, and in which slot".
    """
    P, S = ids.shape
    device = ids.device
    g = graph.on(device)
    knn, knn_cost = g["knn"], g["knn_cost"]
    V, k1 = knn.shape
    dt = torch.int16 if S < 2**15 else torch.int32
    # about 1 MB of slot map and 16 MB of gathered neighbour ids per chunk
    chunk = max(1, min(P, (2**20) // (2 * V), (2 * 2**20) // max(1, S * k1)))
    ps, is_, js, cs = [], [], [], []
    for lo in range(0, P, chunk):
        hi = min(P, lo + chunk)
        p, i = valid[lo:hi].nonzero(as_tuple=True)
        tok = ids[lo:hi][p, i]
        slot_map = torch.full(((hi - lo) * V,), -1, dtype=dt, device=device)
        slot_map[p * V + tok] = i.to(dt)
        rows = knn.index_select(0, tok)
        rows += (p * V).unsqueeze(1)
        hit = slot_map[rows]
        e, r = (hit >= 0).nonzero(as_tuple=True)
        ps.append(p[e] + lo)
        is_.append(i[e])
        js.append(hit[e, r].long())
        cs.append(knn_cost[tok[e], r])
    p, i, j, c = (torch.cat(x) for x in (ps, is_, js, cs))
    # symmetrize and deduplicate (an edge found from both ends appears twice)
    p, i, j, c = torch.cat([p, p]), torch.cat([i, j]), torch.cat([j, i]), torch.cat([c, c])
    key = (p * S + i) * S + j
    key, order = torch.sort(key)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    key, c = key[first], c[order[first]]
    return key // (S * S), (key // S) % S, key % S, c



def _safe_dot(mass: torch.Tensor, pot: torch.Tensor) -> torch.Tensor:
    """sum(mass * pot) over the last dim with 0 * (-inf) = 0."""
    return torch.where(mass > 0, mass * pot, torch.zeros_like(pot)).sum(-1)


class _Batch:
    """The working set of positions: masses, scaled costs and the flat in-support edge list."""

    def __init__(
        self,
        la: torch.Tensor,
        lb: torch.Tensor,
        laD: torch.Tensor,
        lbD: torch.Tensor,
        lam: torch.Tensor,
        edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        log_rho: float,
    ) -> None:
        ep, ei, ej, ce = edges
        W, S = la.shape
        self.W, self.S = W, S
        self.la, self.lb = la, lb
        self.mF = la.exp()
        self.mG = lb.exp()
        rho = math.exp(log_rho)
        self.mH = torch.stack([laD.exp(), lbD.exp(), la.new_full((W,), rho), la.new_full((W,), rho)], -1)
        self.actF = torch.isfinite(la)
        self.actG = torch.isfinite(lb)
        self.actH = self.mH > 0
        self.lam = lam
        self.ep, self.ei, self.ej, self.ce = ep, ei, ej, ce
        self.fi = ep * S + ei
        self.fj = ep * S + ej

    def subset(self, keep: torch.Tensor) -> _Batch:
        """The positions where ``keep`` is True (edges re-indexed)."""
        new = object.__new__(_Batch)
        W, S = self.W, self.S
        idx = keep.nonzero().squeeze(1)
        remap = torch.full((W,), -1, dtype=torch.long, device=keep.device)
        remap[idx] = torch.arange(idx.numel(), device=keep.device)
        ek = keep[self.ep]
        new.W, new.S = idx.numel(), S
        for n in ("la", "lb", "mF", "mG", "mH", "actF", "actG", "actH", "lam"):
            setattr(new, n, getattr(self, n)[idx])
        new.ep = remap[self.ep[ek]]
        new.ei, new.ej, new.ce = self.ei[ek], self.ej[ek], self.ce[ek]
        new.fi = new.ep * S + new.ei
        new.fj = new.ep * S + new.ej
        return new


Plan = dict[str, torch.Tensor]
Vec = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (slots of F, slots of G, hubs)


def _plan(bt: _Batch, F: torch.Tensor, G: torch.Tensor, H: torch.Tensor, lam_r: float) -> Plan:
    """Every plan entry and the marginals; H = (F_D, G_D, F_R, G_R)."""
    W, S = F.shape
    FD, GD, FR, GR = H.unbind(-1)
    Pd = torch.exp(F + G)
    Pe = torch.exp(F.reshape(-1)[bt.fi] + G.reshape(-1)[bt.fj] - bt.ce)
    PiD = torch.exp(F + GD[:, None] - bt.lam)
    PDj = torch.exp(FD[:, None] + G - bt.lam)
    PiR = torch.exp(F + (GR[:, None] - lam_r))
    PRj = torch.exp((FR[:, None] - lam_r) + G)
    PDD = torch.exp(FD + GD)
    PDR = torch.exp(FD + GR - lam_r)
    PRD = torch.exp(FR + GD - lam_r)
    PRR = torch.exp(FR + GR)
    r = Pd + PiD + PiR
    r = r.reshape(-1).index_add(0, bt.fi, Pe).view(W, S)
    c = Pd + PDj + PRj
    c = c.reshape(-1).index_add(0, bt.fj, Pe).view(W, S)
    rh = torch.stack(
        [
            PDD + PDR + PDj.sum(1),
            PDD + PRD + PiD.sum(1),
            PRR + PRD + PRj.sum(1),
            PRR + PDR + PiR.sum(1),
        ],
        -1,
    )
    return dict(Pd=Pd, Pe=Pe, PiD=PiD, PDj=PDj, PiR=PiR, PRj=PRj, PDD=PDD, PDR=PDR, PRD=PRD, PRR=PRR, r=r, c=c, rh=rh)


def _objective(
    bt: _Batch, F: torch.Tensor, G: torch.Tensor, H: torch.Tensor, pl: Plan
) -> torch.Tensor:
    """Phi of the module docstring (total plan mass = sum of the row marginals)."""
    return (
        _safe_dot(bt.mF, F) + _safe_dot(bt.mG, G) + _safe_dot(bt.mH, H)
        - pl["r"].sum(1) - pl["rh"][:, 0] - pl["rh"][:, 2]
    )


def _matvec(bt: _Batch, pl: Plan, vF: torch.Tensor, vG: torch.Tensor, vH: torch.Tensor) -> Vec:
    """J v with J = [[diag r, P], [P^T, diag c]] over (F, G, hubs)."""
    W, S = vF.shape
    vFD, vGD, vFR, vGR = vH.unbind(-1)
    Pd, Pe = pl["Pd"], pl["Pe"]
    oF = pl["r"] * vF + Pd * vG + pl["PiD"] * vGD[:, None] + pl["PiR"] * vGR[:, None]
    oF = oF.reshape(-1).index_add(0, bt.fi, Pe * vG.reshape(-1)[bt.fj]).view(W, S)
    oG = pl["c"] * vG + Pd * vF + pl["PDj"] * vFD[:, None] + pl["PRj"] * vFR[:, None]
    oG = oG.reshape(-1).index_add(0, bt.fj, Pe * vF.reshape(-1)[bt.fi]).view(W, S)
    rh = pl["rh"]
    oH = torch.stack(
        [
            rh[:, 0] * vFD + (pl["PDj"] * vG).sum(1) + pl["PDD"] * vGD + pl["PDR"] * vGR,
            rh[:, 1] * vGD + (pl["PiD"] * vF).sum(1) + pl["PDD"] * vFD + pl["PRD"] * vFR,
            rh[:, 2] * vFR + (pl["PRj"] * vG).sum(1) + pl["PRD"] * vGD + pl["PRR"] * vGR,
            rh[:, 3] * vGR + (pl["PiR"] * vF).sum(1) + pl["PDR"] * vFD + pl["PRR"] * vFR,
        ],
        -1,
    )
    return oF, oG, oH


class _Precond:
    """Exact inverse of J without the off-diagonal graph couplings: 2x2 blocks + 4 hubs (arrow)."""

    def __init__(self, bt: _Batch, pl: Plan, ridge: float = 1e-10) -> None:
        # inactive variables (zero mass: empty slot, empty dust side) get an identity row
        r = torch.where(bt.actF, pl["r"] * (1 + ridge), torch.ones_like(pl["r"]))
        c = torch.where(bt.actG, pl["c"] * (1 + ridge), torch.ones_like(pl["c"]))
        Pd = pl["Pd"]
        det = r * c - Pd * Pd
        self.al, self.be, self.ga = c / det, -Pd / det, r / det
        self.PiD, self.PiR, self.PDj, self.PRj = pl["PiD"], pl["PiR"], pl["PDj"], pl["PRj"]
        al, be, ga = self.al, self.be, self.ga
        PiD, PiR, PDj, PRj = self.PiD, self.PiR, self.PDj, self.PRj
        W = r.shape[0]
        rh = torch.where(bt.actH, pl["rh"] * (1 + ridge), torch.ones_like(pl["rh"]))
        Hm = torch.diag_embed(rh)
        # hub order: FD, GD, FR, GR
        Hm[:, 0, 1] = Hm[:, 1, 0] = pl["PDD"]
        Hm[:, 0, 3] = Hm[:, 3, 0] = pl["PDR"]
        Hm[:, 2, 1] = Hm[:, 1, 2] = pl["PRD"]
        Hm[:, 2, 3] = Hm[:, 3, 2] = pl["PRR"]
        # minus sum_i U_i^T Binv U_i; U rows: F_i -> (GD: PiD, GR: PiR), G_i -> (FD: PDj, FR: PRj)
        s = lambda x: x.sum(1)  # noqa: E731
        Sm = torch.zeros(W, 4, 4, dtype=r.dtype, device=r.device)
        Sm[:, 0, 0] = s(ga * PDj * PDj)
        Sm[:, 2, 2] = s(ga * PRj * PRj)
        Sm[:, 0, 2] = Sm[:, 2, 0] = s(ga * PDj * PRj)
        Sm[:, 1, 1] = s(al * PiD * PiD)
        Sm[:, 3, 3] = s(al * PiR * PiR)
        Sm[:, 1, 3] = Sm[:, 3, 1] = s(al * PiD * PiR)
        Sm[:, 0, 1] = Sm[:, 1, 0] = s(be * PDj * PiD)
        Sm[:, 0, 3] = Sm[:, 3, 0] = s(be * PDj * PiR)
        Sm[:, 2, 1] = Sm[:, 1, 2] = s(be * PRj * PiD)
        Sm[:, 2, 3] = Sm[:, 3, 2] = s(be * PRj * PiR)
        Schur = Hm - Sm
        act = bt.actH
        eye = torch.eye(4, dtype=r.dtype, device=r.device).expand(W, 4, 4)
        both = act.unsqueeze(-1) & act.unsqueeze(-2)
        Schur = torch.where(both, Schur, eye * 1.0)
        self.Hinv = torch.linalg.inv(Schur)
        self.actF, self.actG, self.actH = bt.actF, bt.actG, act

    def apply(self, qF: torch.Tensor, qG: torch.Tensor, qH: torch.Tensor) -> Vec:
        """M^-1 q: eliminate the slots' 2x2 blocks, solve the hubs' 4x4 Schur complement."""
        al, be, ga = self.al, self.be, self.ga
        tF = al * qF + be * qG
        tG = be * qF + ga * qG
        rhs = qH - torch.stack(
            [(self.PDj * tG).sum(1), (self.PiD * tF).sum(1), (self.PRj * tG).sum(1), (self.PiR * tF).sum(1)], -1
        )
        rhs = torch.where(self.actH, rhs, torch.zeros_like(rhs))
        h = (self.Hinv @ rhs.unsqueeze(-1)).squeeze(-1)
        hFD, hGD, hFR, hGR = h.unbind(-1)
        uF = qF - self.PiD * hGD[:, None] - self.PiR * hGR[:, None]
        uG = qG - self.PDj * hFD[:, None] - self.PRj * hFR[:, None]
        zF = al * uF + be * uG
        zG = be * uF + ga * uG
        zF = torch.where(self.actF, zF, torch.zeros_like(zF))
        zG = torch.where(self.actG, zG, torch.zeros_like(zG))
        return zF, zG, h


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return (a[0] * b[0]).sum(1) + (a[1] * b[1]).sum(1) + (a[2] * b[2]).sum(1)


def _cg(
    bt: _Batch, pl: Plan, g: Vec, M: _Precond, max_cg: int, rel: torch.Tensor
) -> tuple[Vec, int]:
    """Batched preconditioned CG on J d = g; each position stops at its own relative residual."""
    x = tuple(torch.zeros_like(t) for t in g)
    res = g
    z = M.apply(*res)
    p = z
    rz = _dot(res, z)
    stop = rz * rel * rel
    active = rz > 0
    it = 0
    for it in range(max_cg):  # noqa: B007 (the count is returned)
        if not bool(active.any()):
            break
        q = _matvec(bt, pl, *p)
        pq = _dot(p, q)
        alpha = torch.where(active & (pq > 0), rz / torch.where(pq > 0, pq, torch.ones_like(pq)), torch.zeros_like(rz))
        x = tuple(xi + alpha.view(-1, 1) * pi for xi, pi in zip(x, p))
        res = tuple(ri - alpha.view(-1, 1) * qi for ri, qi in zip(res, q))
        z = M.apply(*res)
        rz_new = _dot(res, z)
        active = active & (rz_new > stop) & (pq > 0)
        beta = torch.where(active, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = tuple(zi + beta.view(-1, 1) * pi for zi, pi in zip(z, p))
        rz = rz_new
    return x, it + 1


def _select(sel: torch.Tensor, new: Plan, old: Plan, ep: torch.Tensor) -> Plan:
    """Per position: ``new`` where ``sel`` else ``old`` (edge entries follow their position)."""
    out = {}
    for n, v in new.items():
        s = sel[ep] if n == "Pe" else sel.view(-1, *([1] * (v.dim() - 1)))
        out[n] = torch.where(s, v, old[n])
    return out


def wellposed_solve(
    la: torch.Tensor,
    lb: torch.Tensor,
    tail_a: torch.Tensor,
    tail_b: torch.Tensor,
    edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    dust_cost: torch.Tensor,
    reservoir_cost: float,
    epsilon: float,
    max_iter: int,
    tol: float,
    reservoir: float = 2.0,
    max_cg: int = 50,
    step_cap: float = 8.0,
) -> dict[str, torch.Tensor]:
    """Damped Newton of the module docstring on P positions with S slots each.

    ``la``, ``lb`` (P, S): log-masses, -inf on unused slots; ``edges`` from ``support_edges``;
    ``dust_cost`` (P, S) lambda_i; ``reservoir_cost`` Lambda. Returns scaled potentials F, G
    (P, S), FD, GD (dust), FR, GR (reservoir) (P,), Newton iterations, the L1 marginal error
    (both sides) and converged flags.
    """
    flushed = torch.set_flush_denormal(True)  # subnormal exp() results slow the CPU down a lot
    try:
        return _newton(
            la, lb, tail_a, tail_b, edges, dust_cost, reservoir_cost, epsilon, max_iter, tol,
            reservoir, max_cg, step_cap,
        )  # fmt: skip
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _newton(
    la: torch.Tensor,
    lb: torch.Tensor,
    tail_a: torch.Tensor,
    tail_b: torch.Tensor,
    edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    dust_cost: torch.Tensor,
    reservoir_cost: float,
    epsilon: float,
    max_iter: int,
    tol: float,
    reservoir: float,
    max_cg: int,
    step_cap: float,
) -> dict[str, torch.Tensor]:
    P = la.shape[0]
    dtype, device = la.dtype, la.device
    lam_r = reservoir_cost / epsilon
    log_rho = math.log(reservoir)
    laD = torch.log(tail_a.to(dtype))
    lbD = torch.log(tail_b.to(dtype))
    ep, ei, ej, cost = edges
    bt = _Batch(
        la, lb, laD, lbD, dust_cost.to(dtype) / epsilon, (ep, ei, ej, cost.to(dtype) / epsilon),
        log_rho,
    )  # fmt: skip
    # u (K v) = a with K ~ I is solved by f = eps/2 log a: a good start
    F = la / 2
    G = lb / 2
    H = torch.stack([laD / 2, lbD / 2, torch.full_like(laD, log_rho / 2), torch.full_like(laD, log_rho / 2)], -1)
    out = {
        "F": F.clone(), "G": G.clone(),
        "FD": H[:, 0].clone(), "GD": H[:, 1].clone(), "FR": H[:, 2].clone(), "GR": H[:, 3].clone(),
    }
    iters = torch.zeros(P, dtype=torch.long, device=device)
    err_out = torch.full((P,), math.inf, dtype=dtype, device=device)
    converged = torch.zeros(P, dtype=torch.bool, device=device)
    work = torch.arange(P, device=device)
    pl = _plan(bt, F, G, H, lam_r)
    phi = _objective(bt, F, G, H, pl)
    cg_total = 0
    for k in range(max_iter + 1):
        gF = torch.where(bt.actF, bt.mF - pl["r"], torch.zeros_like(F))
        gG = torch.where(bt.actG, bt.mG - pl["c"], torch.zeros_like(G))
        gH = torch.where(bt.actH, bt.mH - pl["rh"], torch.zeros_like(H))
        err = gF.abs().sum(1) + gG.abs().sum(1) + gH.abs().sum(1)
        out["F"][work], out["G"][work] = F, G
        out["FD"][work], out["GD"][work], out["FR"][work], out["GR"][work] = H.unbind(-1)
        err_out[work] = err
        done = err <= tol
        converged[work[done]] = True
        if k == max_iter:
            break
        if bool(done.any()):
            keep = ~done
            work = work[keep]
            if work.numel() == 0:
                break
            bt = bt.subset(keep)
            F, G, H, phi = F[keep], G[keep], H[keep], phi[keep]
            gF, gG, gH = gF[keep], gG[keep], gH[keep]
            pl = {n: (v if n == "Pe" else v[keep]) for n, v in pl.items()}
            pl["Pe"] = torch.exp(F.reshape(-1)[bt.fi] + G.reshape(-1)[bt.fj] - bt.ce)
            err = err[keep]
        iters[work] += 1
        M = _Precond(bt, pl)
        rel = torch.clamp(err.sqrt(), max=0.1)
        (dF, dG, dH), ncg = _cg(bt, pl, (gF, gG, gH), M, max_cg, rel)
        cg_total += ncg
        # PCG leaves an arbitrary component along the null vector (1, -1) (the gauge): remove it
        # (keep f_R = g_R fixed) so that it neither inflates the step cap nor drifts the potentials
        shift = (dH[:, 2] - dH[:, 3]) / 2
        dF, dG = dF - shift[:, None], dG + shift[:, None]
        dH = dH - shift[:, None] * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype, device=device)
        dF = torch.where(bt.actF, dF, torch.zeros_like(dF))
        dG = torch.where(bt.actG, dG, torch.zeros_like(dG))
        dH = torch.where(bt.actH, dH, torch.zeros_like(dH))
        # cap the step: far from the solution the quadratic model is poor
        big = torch.stack([dF.abs().amax(1), dG.abs().amax(1), dH.abs().amax(1)], -1).amax(-1)
        scale = torch.clamp(step_cap / big.clamp_min(1e-300), max=1.0)
        dF, dG, dH = dF * scale[:, None], dG * scale[:, None], dH * scale[:, None]
        slope = _dot((gF, gG, gH), (dF, dG, dH))
        t = torch.ones_like(phi)
        pending = torch.ones_like(phi, dtype=torch.bool)
        nF, nG, nH, npl, nphi = F, G, H, pl, phi
        for _ls in range(30):
            cF = F + t[:, None] * dF
            cG = G + t[:, None] * dG
            cH = H + t[:, None] * dH
            cpl = _plan(bt, cF, cG, cH, lam_r)
            cphi = _objective(bt, cF, cG, cH, cpl)
            ok = pending & torch.isfinite(cphi) & (cphi >= phi + 1e-4 * t * slope - 1e-12 * (1 + phi.abs()))
            if _ls == 0:
                nF, nG, nH, npl, nphi = cF, cG, cH, cpl, cphi
            else:
                nF = torch.where(ok[:, None], cF, nF)
                nG = torch.where(ok[:, None], cG, nG)
                nH = torch.where(ok[:, None], cH, nH)
                nphi = torch.where(ok, cphi, nphi)
                npl = _select(ok, cpl, npl, bt.ep)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            t = torch.where(pending, t / 2, t)
        # positions whose line search failed keep the old point
        if bool(pending.any()):
            sel = pending
            nF = torch.where(sel[:, None], F, nF)
            nG = torch.where(sel[:, None], G, nG)
            nH = torch.where(sel[:, None], H, nH)
            nphi = torch.where(sel, phi, nphi)
            npl = _select(sel, pl, npl, bt.ep)
        if _DEBUG:
            print(k, "err", float(err.max()), "t", t.min().item(), "cg", ncg, "pend", int(pending.sum()))
        F, G, H, pl, phi = nF, nG, nH, npl, nphi
    out.update(iterations=iters, marginal_error=err_out, converged=converged)
    out["cg_iterations"] = torch.tensor(cg_total)
    return out
