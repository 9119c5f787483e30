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
exchanging with every slot and with D at the cost Lambda = ``reservoir_scale`` (default 2) *
max(largest kNN cost, largest lambda_i) + ``reservoir_margin`` (default 10) * eps. Now a coupling
always exists and is strictly positive: P_ii = min(a_i, b_i), P_iR = (a_i - b_i)^+,
P_Rj = (b_j - a_j)^+, P_DD = min(a_D, b_D), P_DR, P_RD the remaining dust mass,
P_RR = rho - (moved mass) >= rho - 1 > 0; so finite dual potentials exist. Mass routed
i -> R -> j costs 2 Lambda, far more than any legitimate route (one graph edge, or i -> D -> j at
lambda_i + lambda_j <= 2 max cost), so a feasible problem does not notice R and its result is the
untruncated exact one when k2 >= V, while an infeasible one still has an answer: the unmovable
mass pays 2 Lambda. How far is far enough is empirical: a nearly infeasible problem has large
potentials (mass squeezed through a few dear edges) and then does feel R. With Lambda = max + 10
eps one golden position (n512_cos_k64, k2 = V) moved by 0.17 std; with the default 2 max + 10 eps
none moves by 1e-4 std. The potentials of an infeasible problem are of the order of Lambda/eps
in log units, which is what costs Newton its extra steps (Lambda = max + 10 eps is ~30% faster
on the benchmark, at the price above).

Masses. Both sides are renormalized so that a(S) + a_D = b(S) + b_D = 1 exactly (float32
log-probabilities of large logits are off by ~1e-5, and with a tail clamped at 0 the two totals
would differ: no coupling would exist and the marginal error could not reach tol).

Solver. With F = f/eps, G = g/eps over the n = |S| + 2 nodes of each side (slots, D, R) and the
plan P_ij = exp(F_i + G_j - C_ij/eps) on the edges E (self-loops, in-support graph edges, every
slot <-> D and R, D <-> R), the dual objective

    Phi(F, G) = <a, F> + <b, G> - sum_{(i,j) in E} P_ij        (a, b including a_D, b_D, rho)

is concave; its gradient is the marginal error (a - P 1, b - P^T 1) and its negative Hessian is
the signless Laplacian J = [[diag(P 1), P], [P^T, diag(P^T 1)]] (null vector (1, -1): the gauge).
Each iteration of the damped Newton method:

1. a Sinkhorn sweep, G += log b - log(P^T 1) then F += log a - log(P 1): keeps J's diagonal
   matched to the masses (without it whole-vocabulary problems stall on badly scaled directions)
   and makes every iteration at least a Sinkhorn iteration;
2. (J + delta I) d = grad Phi (Levenberg-Marquardt, delta = 1e-10 in mass units: a variable with
   a tiny mass cannot ask for an arbitrarily large step) by preconditioned conjugate gradients,
   inexactly (relative residual min(0.1, sqrt(error)), at most ``max_cg`` * (1 + k // 8) steps at
   iteration k: cheap while every position is in the batch, more for the few stragglers);
3. the gauge component of d removed (f_R = g_R), the step capped at max(``step_cap``,
   Lambda / (4 eps)) in log units (far from the optimum the quadratic model is poor), then
   backtracking on Phi (Armijo) per position; where it fails, one more Sinkhorn half step on G
   (exact block ascent), so the method never stalls.

The preconditioner is J + delta I without the off-diagonal graph couplings P_ij (i != j in S),
keeping their diagonal contributions: a 2x2 block [[r_i, P_ii], [P_ii, c_i]] per slot plus the
four hub variables (F_D, G_D, F_R, G_R) coupled to every slot, inverted exactly in O(|S|) by
eliminating the slots and solving the 4x4 Schur complement. It dominates J in the Loewner order,
so PCG is well defined, and it is exact when no in-support graph edge carries mass: the dust and
reservoir couplings, which made Sinkhorn take thousands of iterations, are handled exactly.

eps-scaling. When Lambda/eps exceeds 4 * 40 log units (eps = 0.01 or 1e-3 with L2 costs), a
route that must carry mass (infeasible mass through R, a slot through D) starts at
exp(-hundreds or thousands), 0 in float64, and no method gets a signal along it. The solve then
starts at eps0 = Lambda/40 and divides eps by 4 per stage down to the target, each stage started
from the previous potentials in cost units (intermediate stages to tolerance 1e-3, iterations of
all stages counted).

Measured: 5-15 Newton steps on feasible positions, 15-40 on infeasible ones (their potentials are
of the order of Lambda/eps). Everything is in log space (the kernel exp(-C/eps) is never formed)
and batched over all positions: one flat edge list, no Python loop over positions. A position
stops as soon as the L1 error of both marginals (slots, D and R) is <= tol and is then frozen, so
the result does not depend on ``max_iter`` (the Newton step budget) once converged.

Two implementations of each eps stage. On the CPU, ``wellposed_cpu`` runs it compiled (numba), one
position per loop turn, the positions spread over the caller's intra-op threads: a position's
problem (~150 slots, ~300 edges at V = 32k) stays in cache for its whole solve, and the two
Sinkhorn half steps update the plan by one exp per variable instead of one per entry. The batched
tensor version below (``_stage_torch``; any device, so CUDA) runs every step as a few ops over the
working set of positions, single-threaded on CPU (the tensors are small and the ops many). Both
give the same potentials and iteration counts (tests/test_ot_wellposed_compiled.py); at V = 32k
the compiled one is about 7x faster.

Tail correction (the dust bin is one lumped token). The penalty is centered with the a-weighted
mean of f over the whole vocabulary, and a lumped bin's potential is not the mean potential of
the tokens it stands for. With a kernel close to the identity, u (K v) = a gives u_j ~ sqrt(a_j)
up to the common level, i.e. f_j ~ f_D + (eps/2) log(a_j / a_D) for the tail tokens j, so
(TopKPair carries the tail sums sum_{j not in S} a_j log a_j and b_j log b_j, computed once at
rollout from the full distributions)

    sum_{j not in S} a_j f_j ~ a_D f_D + (eps/2) (sum_{j not in S} a_j log a_j - a_D log a_D)

and the same for <b, g> with b. This is exact for identical policies up to the kernel's
off-diagonal terms, where the lumped a_D f_D alone was the dominant error.

Gauge. ``raw``: the gauge with f_R = g_R (potentials measured against the reservoir).
``centered``: f(y) - (sum_{i in S} a_i f_i + sum_{j not in S} a_j f_j), the tail sum as above, as
in the golden cases (a_j f_j over the whole vocabulary).

OT value. <a,f> + <b,g> - eps <a, log a> - eps <b, log b> over the whole vocabulary, the tail
sums as above and the exact tail entropies from the rollout (both marginals sum to 1, so it is
gauge invariant); without truncation it is the entropic OT value <P,C> + eps KL(P | a x b).

Known limits (measured on the golden cases, see benchmarks/wpr_penalty.py): a truncated support
knows the tail only through its totals and entropies, not which tail tokens neighbour which
support token, so on the 'diffuse' golden cases (the reference moves a fraction of every token's
mass to its graph neighbours, mostly tail tokens) the mean error at k2 = 64 stays at 0.26-0.52
std. What was measured about it (k2 = 64, mean error in std units):

* The error is in the shape of the potentials over the support, not in the centering: centering
  ours and the exact f over the support alone leaves 0.33-0.49 on the three worst cases.
* ``dust_scale`` in 0.5-3 moves the worst cases by at most 0.05 and never below 0.25.
* Locality is what the lumped dust misses. With the whole 1-hop neighbourhood of the support as
  explicit slots (1156 of 2000 tokens on n2000_cos_k16) and the dust exchanging with every slot,
  the error is still 0.43; cutting the support <-> dust edges (the remaining tail is 2 hops away)
  brings it to 0.18; with the 2-hop neighbourhood (almost the whole vocabulary) it is 0.06.
* O(k2) stand-ins for that neighbourhood did not work: per-slot "satellite" nodes holding the
  tail mass next to each slot make the lumped problem infeasible (in the exact plan a tail
  token's surplus is also served by other tail tokens), and a mass-weighted dust kernel
  (K_iD = sum over the tail neighbours j of i of w_j K_ij / w_D) helps two cases (0.52 -> 0.42,
  0.38 -> 0.35) and hurts two others (0.26 -> 0.47).
* Per-slot dust costs from the graph (k2 = 64): lambda_i = the soft-min -eps log((1/k1) sum over
  i's kNN neighbours outside S of exp(-C_ij/eps)) gives n2000_cos 0.52 -> 0.40, n2000_l2
  0.38 -> 0.36, n512_l2 0.31 -> 0.22, but the 'noise' case n512_cos 0.26 -> 0.53; weighting each
  neighbour by sqrt of its share of the tail mass (the tail potentials of a near-identity kernel,
  see "Tail correction" above) does about the same (0.42-0.48, 0.34-0.38, 0.25, 0.56); the plain
  minimum, mean or unnormalized soft-min are no better than the mean kNN cost used here.
* The support's size is not the remedy. On the official's batch-wide support (``support="batch"``
  of ``wpr_potentials``: 1204 of 2000 tokens on n2000_cos_k16 at k2 = 64, 7% of the mass left in
  the dust) the error is still 0.49 (n2000_l2: 0.24); with 1897 tokens and 0.5% of the mass left
  it is 0.36, whatever ``dust_scale`` (0.5-8: 0.32-0.43) or ``reservoir_scale``; from 1999
  tokens on it is < 0.01. So a few tokens of tiny mass decide it: in these 'diffuse' cases they
  are the bridges between groups of support tokens that the sparse graph joins only through
  them, and the potentials' relative level across groups (a per-group gauge, nearly free) is set
  by the vanishing flow over the bridges, which no lumped bin reproduces. Where the batch support
  is (nearly) the vocabulary the result is exact (n512_l2, n512_cos: 0.000). Nor is a smarter
  choice of extra slots: adding to each position's top-k2 the tail tokens of largest |a - b|
  (where the tail's transport starts and ends) or of largest max(a, b), 64, 256 or 600 of them,
  gives 0.51, 0.47, 0.44 (|a - b|) and 0.50, 0.45 (max, 256 and 600) on n2000_cos, and 0.39,
  0.27, 0.20 and 0.36, 0.26 on n2000_l2 (today 0.52 and 0.38).
* What a per-slot dust cost would have to be. Read off the exact plans of n2000_cos and
  n2000_l2 (k2 = 64, 6 positions each): slot i's effective cost to the tail,
  -eps log sum_{j not in S} K_ij exp(g_j / eps), and from the tail, with f_j in place of g_j,
  differ by 0.28-0.39 cost units (std over the slots, 3-7 eps), so no single lambda_i serves
  both directions. Neither is set by the tail's masses: over the tail tokens, one side's
  potential follows eps log of its own mass (slope 0.95-1.02 eps on the side that was not
  diffused) and the other side does not at all, and what remains is 1.5-2.3 eps (std) of
  structure set by the tail's own transport problem. Two O(1) and O(k2) stand-ins built on that
  were measured (n2000_cos, n2000_l2, n512_l2, n512_cos): splitting the dust into the tail's
  sources sum (a_j - b_j)^+, sinks sum (b_j - a_j)^+ and a balanced rest, 0.50, 0.29, 0.32,
  0.28 (today 0.52, 0.38, 0.31, 0.26); with direction-specific kernels weighted by the tail's
  excess next to each slot, 0.46, 0.39, 0.33, 0.27; the split dust with the soft-min per-slot
  costs above, 0.42, 0.36, 0.25, 0.54.
* Coarse-graining the tail by embedding clusters does not reach it either, even with the best
  lumped kernel (k-means clusters of the vocabulary, each cluster's tail tokens one node; the
  kernel between nodes summed exactly over the graph edges they contain, each tail token weighted
  by the near-identity profile sqrt of its mass; per position, so O(V k1) work PPO cannot spend).
  With 1, 16, 64 and 128 clusters: n2000_cos 0.42, 0.36, 0.39, 0.36; n2000_l2 0.37, 0.35, 0.29,
  0.25; n512_l2 0.25, 0.17, 0.12, 0.06; n512_cos 0.56, 0.35, 0.12, 0.07. Only with about one
  cluster per four tokens do the 512-token cases come under 0.1; the 2000-token ones do not.
* Dropping the tail instead of lumping it (its tokens removed, both sides renormalized, no dust)
  shows how much of it counts. On n2000_cos, keeping the 1900 tokens of largest max(a, b) gives
  0.02, keeping 1500 (0.26% of the policy's mass dropped) 0.28, keeping 1000 1.06; on the batch
  support (1204 tokens) the dropped problem is infeasible and the error is 4.2. Mass at the 0.3%
  level decides the potentials through the graph's structure, which a truncation to O(k2)
  tokens per position cannot see. At k2 = 64 per position, dropping gives 6.0, 2.2, 4.7 and 0.23
  on n2000_cos, n2000_l2, n512_l2, n512_cos: at the support sizes PPO can afford the lumped dust
  is the right model; only near the whole vocabulary does it cost accuracy.
* Speed: the solver's 15-16 mean Newton steps at V = 32k are mostly the first 4-5, which travel
  from f = eps/2 log a to the level the dust sets; an exact start that ignores the in-support
  edges (closed-form slots, Newton on the 4 hub variables) was tried and is useless, because at
  the default costs an in-support edge is as cheap as the dust route and carries a large share
  of the plan. In the batched version the time per step is in thousands of small ops on the
  shrinking set of straggler positions (op overhead, not arithmetic), which is why the CPU runs
  the compiled one; there the time is in exp() (plan entries) and the ~6 CG iterations per
  Newton step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wprctl.ot.graph import CostGraph
from wprctl.ot.threads import backend_threads, single_thread

_COMPILED_EDGES_MAX_SLOTS = 2048


def support_edges(
    graph: CostGraph, ids: torch.Tensor, valid: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-support graph edges of every position as one flat list (p, i, j, cost).

    ``ids`` (P, S) token ids per slot, ``valid`` (P, S) False for repeated ids. Off-diagonal
    edges only, both directions (i, j) and (j, i), sorted by (p, i, j). An edge is found from
    i's kNN list: a per-position slot map over the vocabulary (int16, a few positions at a time so
    it stays in cache) answers "is this neighbour in the support, and in which slot".
    ``backend`` as in ``wellposed_solve`` (``compiled``: ``wellposed_cpu.support_edges_cpu``).
    """
    P, S = ids.shape
    device = ids.device
    g = graph.on(device)
    knn, knn_cost = g["knn"], g["knn_cost"]
    # the compiled builder dedupes on a dense S x S adjacency per running chunk (9 bytes an
    # entry): fine for truncated supports, not for an untruncated large vocabulary
    threads = backend_threads(backend, device)
    if threads > 0 and S <= _COMPILED_EDGES_MAX_SLOTS:
        from wprctl.ot.wellposed_cpu import support_edges_cpu

        ptr, ei, ej, c = support_edges_cpu(
            ids.contiguous().numpy(), valid.contiguous().numpy(), graph.knn_narrow().numpy(),
            knn_cost.contiguous().numpy(), threads,
        )  # fmt: skip
        ep = torch.repeat_interleave(torch.arange(P), torch.from_numpy(ptr).diff())
        return ep, torch.from_numpy(ei), torch.from_numpy(ej), torch.from_numpy(c)
    V, k1 = knn.shape
    dt = torch.int16 if S < 2**15 else torch.int32
    # about 1 MB of slot map and 16 MB of gathered neighbour ids per chunk
    chunk = max(1, min(P, (2**20) // (2 * V), (2 * 2**20) // max(1, S * k1)))
    empty = torch.empty(0, dtype=torch.long, device=device)
    ps, is_, js, cs = [empty], [empty], [empty], [knn_cost.new_empty(0)]
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


def _gather(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """x.reshape(-1)[flat]; index_select is about 4x faster than advanced indexing on CPU."""
    return x.reshape(-1).index_select(0, flat)


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
        self.mH = torch.stack(
            [laD.exp(), lbD.exp(), la.new_full((W,), rho), la.new_full((W,), rho)], -1
        )
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
    Pe = torch.exp(_gather(F, bt.fi) + _gather(G, bt.fj) - bt.ce)
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
    return dict(
        Pd=Pd,
        Pe=Pe,
        PiD=PiD,
        PDj=PDj,
        PiR=PiR,
        PRj=PRj,
        PDD=PDD,
        PDR=PDR,
        PRD=PRD,
        PRR=PRR,
        r=r,
        c=c,
        rh=rh,
    )


def _objective(
    bt: _Batch, F: torch.Tensor, G: torch.Tensor, H: torch.Tensor, pl: Plan
) -> torch.Tensor:
    """Phi of the module docstring (total plan mass = sum of the row marginals)."""
    return (
        _safe_dot(bt.mF, F)
        + _safe_dot(bt.mG, G)
        + _safe_dot(bt.mH, H)
        - pl["r"].sum(1)
        - pl["rh"][:, 0]
        - pl["rh"][:, 2]
    )


def _matvec(bt: _Batch, pl: Plan, vF: torch.Tensor, vG: torch.Tensor, vH: torch.Tensor) -> Vec:
    """J v with J = [[diag r, P], [P^T, diag c]] over (F, G, hubs)."""
    W, S = vF.shape
    vFD, vGD, vFR, vGR = vH.unbind(-1)
    Pd, Pe = pl["Pd"], pl["Pe"]
    oF = pl["r"] * vF + Pd * vG + pl["PiD"] * vGD[:, None] + pl["PiR"] * vGR[:, None]
    oF = oF.reshape(-1).index_add(0, bt.fi, Pe * _gather(vG, bt.fj)).view(W, S)
    oG = pl["c"] * vG + Pd * vF + pl["PDj"] * vFD[:, None] + pl["PRj"] * vFR[:, None]
    oG = oG.reshape(-1).index_add(0, bt.fj, Pe * _gather(vF, bt.fi)).view(W, S)
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
        tiny = torch.finfo(pl["r"].dtype).tiny
        r = torch.where(bt.actF, pl["r"], torch.ones_like(pl["r"])).clamp_min(tiny)
        c = torch.where(bt.actG, pl["c"], torch.ones_like(pl["c"])).clamp_min(tiny)
        Pd = pl["Pd"]
        # [[r, Pd], [Pd, c]]^-1 with a relative ridge, in a form that neither underflows
        # (masses ~1e-170 square to 0) nor divides by a cancelled determinant:
        # det = r c ((1 + ridge)^2 - (Pd / r)(Pd / c)), the bracket >= 2 ridge
        pr, pc = Pd / r, Pd / c
        dd = (1 + ridge) ** 2 - pr * pc
        self.al, self.be, self.ga = 1 / (r * dd), -pr / (c * dd), 1 / (c * dd)
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
        Schur = Schur + ridge * torch.diag_embed(Schur.diagonal(dim1=1, dim2=2).abs())
        # a singular hub block (hub couplings underflowed) drops the hub correction
        Hinv, info = torch.linalg.inv_ex(Schur)
        Hinv = torch.where((info == 0).view(-1, 1, 1), Hinv, torch.zeros_like(Hinv))
        self.Hinv = torch.nan_to_num(Hinv, nan=0.0, posinf=0.0, neginf=0.0)
        self.actF, self.actG, self.actH = bt.actF, bt.actG, act

    def apply(self, qF: torch.Tensor, qG: torch.Tensor, qH: torch.Tensor) -> Vec:
        """M^-1 q: eliminate the slots' 2x2 blocks, solve the hubs' 4x4 Schur complement."""
        al, be, ga = self.al, self.be, self.ga
        tF = al * qF + be * qG
        tG = be * qF + ga * qG
        rhs = qH - torch.stack(
            [
                (self.PDj * tG).sum(1),
                (self.PiD * tF).sum(1),
                (self.PRj * tG).sum(1),
                (self.PiR * tF).sum(1),
            ],
            -1,
        )
        rhs = torch.where(self.actH, rhs, torch.zeros_like(rhs))
        # a 4x4 matvec per position: elementwise beats bmm's per-matrix overhead on CPU
        h = (self.Hinv * rhs.unsqueeze(1)).sum(-1)
        hFD, hGD, hFR, hGR = h.unbind(-1)
        uF = qF - self.PiD * hGD[:, None] - self.PiR * hGR[:, None]
        uG = qG - self.PDj * hFD[:, None] - self.PRj * hFR[:, None]
        zF = al * uF + be * uG
        zG = be * uF + ga * uG
        zF = torch.where(self.actF & torch.isfinite(zF), zF, torch.zeros_like(zF))
        zG = torch.where(self.actG & torch.isfinite(zG), zG, torch.zeros_like(zG))
        return zF, zG, torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)


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
        alpha = torch.where(
            active & (pq > 0),
            rz / torch.where(pq > 0, pq, torch.ones_like(pq)),
            torch.zeros_like(rz),
        )
        x = tuple(xi + alpha.view(-1, 1) * pi for xi, pi in zip(x, p))
        res = tuple(ri - alpha.view(-1, 1) * qi for ri, qi in zip(res, q))
        z = M.apply(*res)
        rz_new = _dot(res, z)
        active = active & (rz_new > stop) & (pq > 0)
        beta = torch.where(
            active, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz)
        )
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
    max_cg: int = 4,
    step_cap: float = 16.0,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Damped Newton of the module docstring on P positions with S slots each.

    ``la``, ``lb`` (P, S): log-masses, -inf on unused slots; ``edges`` from ``support_edges``;
    ``dust_cost`` (P, S) lambda_i; ``reservoir_cost`` Lambda. Returns scaled potentials F, G
    (P, S), FD, GD (dust), FR, GR (reservoir) (P,), Newton iterations, the L1 marginal error
    (both sides) and converged flags.

    ``backend``: ``compiled`` runs each position's Newton stage as compiled code
    (``wellposed_cpu``, CPU tensors only), positions spread over the caller's intra-op threads;
    ``torch`` runs the batched tensor version (any device); ``auto`` picks ``compiled`` on the CPU.
    """
    cpu = la.device.type == "cpu"
    threads = backend_threads(backend, la.device)
    flushed = torch.set_flush_denormal(True)  # subnormal exp() results slow the CPU down a lot
    try:
        with single_thread(cpu):
            problem = _Problem(la, lb, tail_a, tail_b, edges, dust_cost, reservoir_cost)
            settings = _Settings(reservoir, max_cg, step_cap, threads)
            return _newton(problem, epsilon, max_iter, tol, settings)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


# Potentials in log units that a start can "see": exp(-x) of a route at most this far from the
# start's level is far from underflow, so Newton and Sinkhorn get a gradient along it.
_VISIBLE = 40.0
_STAGE_FACTOR = 4.0
# Levenberg-Marquardt damping of the Newton system, in mass units (masses sum to 1 per side)
_DAMPING = 1e-10


@dataclass(frozen=True)
class _Problem:
    """The per-position inputs of ``wellposed_solve`` (see there)."""

    la: torch.Tensor
    lb: torch.Tensor
    tail_a: torch.Tensor
    tail_b: torch.Tensor
    edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    dust_cost: torch.Tensor
    reservoir_cost: float


@dataclass(frozen=True)
class _Settings:
    reservoir: float
    max_cg: int
    step_cap: float
    # > 0: the compiled per-position stage on this many threads; 0: the batched tensor stage
    compiled_threads: int = 0


def _newton(
    pb: _Problem, epsilon: float, max_iter: int, tol: float, st: _Settings
) -> dict[str, torch.Tensor]:
    """eps-scaling around ``_stage``: when the dearest route (the reservoir, Lambda) is more than
    4 * ``_VISIBLE`` log units away at the target eps, solve first at eps0 = Lambda / _VISIBLE and
    divide eps by 4 per stage, each stage started from the previous potentials (f in cost units).

    Without it, at eps = 1e-3 with L2 costs a route that must carry mass (an infeasible token
    through the reservoir, a slot through the dust) starts at exp(-thousands) = 0 in float64:
    neither Newton nor Sinkhorn gets any signal along it and the solve stalls. Intermediate stages
    only need a rough answer (tolerance 1e-3, a bounded share of the Newton budget); iterations
    of all stages are counted.
    """
    schedule = []
    eps_s = pb.reservoir_cost / _VISIBLE
    if eps_s > epsilon * _STAGE_FACTOR:
        while eps_s > epsilon:
            schedule.append(eps_s)
            eps_s /= _STAGE_FACTOR
    schedule.append(epsilon)
    init = None
    P = pb.la.shape[0]
    iters = torch.zeros(P, dtype=torch.long, device=pb.la.device)
    budget = max_iter
    for n, eps_s in enumerate(schedule):
        final = n == len(schedule) - 1
        stage_iter = budget if final else max(1, min(budget - 1, max(8, max_iter // 4)))
        out = _stage(pb, eps_s, stage_iter, tol if final else max(tol, 1e-3), st, init)
        iters += out["iterations"]
        budget -= int(out["iterations"].max()) if P else 0
        if final or budget < 1:
            break
        # potentials in cost units carry over; the next stage's F = f / eps_next
        scale = eps_s / schedule[n + 1]
        init = tuple(out[k] * scale for k in ("F", "G", "FD", "GD", "FR", "GR"))
    if not final:
        # budget spent before the target eps: report the last stage's potentials in the target's
        # units (F = f / eps), as not converged
        for k in ("F", "G", "FD", "GD", "FR", "GR"):
            out[k] = out[k] * (eps_s / epsilon)
        out["converged"] = torch.zeros_like(out["converged"])
    out["iterations"] = iters
    return out


def _stage(
    pb: _Problem,
    epsilon: float,
    max_iter: int,
    tol: float,
    st: _Settings,
    init: tuple[torch.Tensor, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """One eps stage from ``init`` (or the start below), by the compiled or the batched version."""
    dtype = pb.la.dtype
    lam_r = pb.reservoir_cost / epsilon
    log_rho = math.log(st.reservoir)
    laD = torch.log(pb.tail_a.to(dtype))
    lbD = torch.log(pb.tail_b.to(dtype))
    # u (K v) = a with K ~ I is solved by f = eps/2 log a: the start (a start that already routes
    # each slot's excess through the dust was tried: no faster, and it overflows at eps = 1e-3)
    if init is None:
        F, G = pb.la / 2, pb.lb / 2
        half = torch.full_like(laD, log_rho / 2)
        H = torch.stack([laD / 2, lbD / 2, half, half], -1)
    else:
        F, G = init[0], init[1]
        H = torch.stack(init[2:], -1)
    # potentials move by up to ~Lambda/eps (infeasible mass), so the cap scales with it (the
    # Armijo backtracking still guards every step)
    cap = max(st.step_cap, lam_r / 4)
    ep, ei, ej, cost = pb.edges
    lam = pb.dust_cost.to(dtype) / epsilon
    ce = cost.to(dtype) / epsilon
    if st.compiled_threads > 0:
        from wprctl.ot.wellposed_cpu import solve_stage

        P = pb.la.shape[0]
        ptr = torch.searchsorted(ep, torch.arange(P + 1, dtype=ep.dtype))
        F, G, H = (x.to(dtype).contiguous().clone() for x in (F, G, H))
        res = solve_stage(
            *(x.contiguous().numpy() for x in (pb.la, pb.lb, laD, lbD, lam, ptr, ei, ej, ce)),
            lam_r, log_rho, F.numpy(), G.numpy(), H.numpy(), max_iter, tol, st.max_cg, cap,
            _DAMPING, st.compiled_threads,
        )  # fmt: skip
        res = torch.from_numpy(res)
        FD, GD, FR, GR = H.unbind(-1)
        return dict(
            F=F, G=G, FD=FD, GD=GD, FR=FR, GR=GR,
            iterations=res[:, 0].long(), marginal_error=res[:, 1], converged=res[:, 2] > 0,
            cg_iterations=res[:, 3].sum().long(),
        )  # fmt: skip
    bt = _Batch(pb.la, pb.lb, laD, lbD, lam, (ep, ei, ej, ce), log_rho)
    return _stage_torch(bt, F, G, H, lam_r, cap, max_iter, tol, st.max_cg)


def _stage_torch(
    bt: _Batch,
    F: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor,
    lam_r: float,
    cap: float,
    max_iter: int,
    tol: float,
    max_cg: int,
) -> dict[str, torch.Tensor]:
    """The batched stage: every position's step as a few tensor ops over the working set."""
    P = F.shape[0]
    dtype, device = F.dtype, F.device
    out = {
        "F": F.clone(),
        "G": G.clone(),
        "FD": H[:, 0].clone(),
        "GD": H[:, 1].clone(),
        "FR": H[:, 2].clone(),
        "GR": H[:, 3].clone(),
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
            pl["Pe"] = torch.exp(_gather(F, bt.fi) + _gather(G, bt.fj) - bt.ce)
            err = err[keep]
        iters[work] += 1
        # A Sinkhorn sweep first (columns, then rows exact: G += log b - log(P^T 1), F += log a -
        # log(P 1)). It keeps J's diagonal matched to the masses (without it whole-vocabulary
        # problems stall on badly scaled directions) and makes the method at worst as fast as
        # Sinkhorn when J is numerically singular (tiny eps, masses ~1e-100).
        gfix = bt.actH & torch.tensor([False, True, False, True], device=device)
        ffix = bt.actH & torch.tensor([True, False, True, False], device=device)
        tiny = torch.finfo(dtype).tiny
        G = torch.where(bt.actG, G + torch.log(bt.mG) - torch.log(pl["c"].clamp_min(tiny)), G)
        H = torch.where(gfix, H + torch.log(bt.mH) - torch.log(pl["rh"].clamp_min(tiny)), H)
        pl = _plan(bt, F, G, H, lam_r)
        F = torch.where(bt.actF, F + torch.log(bt.mF) - torch.log(pl["r"].clamp_min(tiny)), F)
        H = torch.where(ffix, H + torch.log(bt.mH) - torch.log(pl["rh"].clamp_min(tiny)), H)
        pl = _plan(bt, F, G, H, lam_r)
        phi = _objective(bt, F, G, H, pl)
        gF = torch.where(bt.actF, bt.mF - pl["r"], torch.zeros_like(F))
        gG = torch.where(bt.actG, bt.mG - pl["c"], torch.zeros_like(G))
        gH = torch.where(bt.actH, bt.mH - pl["rh"], torch.zeros_like(H))
        err = gF.abs().sum(1) + gG.abs().sum(1) + gH.abs().sum(1)
        # Levenberg-Marquardt damping J + delta I: a variable whose mass (so curvature) is below
        # delta moves by at most ~gradient/delta instead of an arbitrarily large Newton step (one
        # such coordinate would otherwise dominate the capped step of its whole position)
        pl_d = dict(pl, r=pl["r"] + _DAMPING, c=pl["c"] + _DAMPING, rh=pl["rh"] + _DAMPING)
        M = _Precond(bt, pl_d)
        rel = torch.clamp(err.sqrt(), max=0.1)
        # a few CG steps suffice for most positions; the stragglers (graph-coupled, often
        # infeasible) need more, and by then the working set is small, so the budget grows
        budget = max_cg * (1 + k // 8)
        (dF, dG, dH), ncg = _cg(bt, pl_d, (gF, gG, gH), M, budget, rel)
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
        scale = torch.clamp(cap / big.clamp_min(1e-300), max=1.0)
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
            ok = (
                pending
                & torch.isfinite(cphi)
                & (cphi >= phi + 1e-4 * t * slope - 1e-12 * (1 + phi.abs()))
            )
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
        # Where the line search failed (the Newton direction is useless, e.g. a nearly singular
        # J at tiny eps), take another Sinkhorn half step on G instead: exact block ascent on Phi.
        if bool(pending.any()):
            sel = pending
            sG = torch.where(bt.actG, G + torch.log(bt.mG) - torch.log(pl["c"].clamp_min(tiny)), G)
            sH = torch.where(gfix, H + torch.log(bt.mH) - torch.log(pl["rh"].clamp_min(tiny)), H)
            nF = torch.where(sel[:, None], F, nF)
            nG = torch.where(sel[:, None], sG, nG)
            nH = torch.where(sel[:, None], sH, nH)
            npl = _plan(bt, nF, nG, nH, lam_r)
            nphi = _objective(bt, nF, nG, nH, npl)
        F, G, H, pl, phi = nF, nG, nH, npl, nphi
    out.update(iterations=iters, marginal_error=err_out, converged=converged)
    out["cg_iterations"] = torch.tensor(cg_total)
    return out
