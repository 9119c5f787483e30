"""The ``wellposed`` Newton stage compiled for the CPU: one position per loop turn, positions in
parallel.

The same algorithm as ``wellposed._stage_torch`` (see the ``wellposed`` module docstring), step
for step: Sinkhorn sweep, damped Newton system by PCG with the arrow preconditioner, gauge
removal, step cap, Armijo backtracking, Sinkhorn fallback. The batched tensor version pays for
every one of its ~70k small ops in Python and dispatch overhead (the arithmetic of a 512-position
batch at V = 32k is ~0.2 s of its 1.6 s); here a position's problem (~150 slots, ~300 in-support
edges) lives in cache for its whole solve, a converged position costs nothing more, and the
positions spread over the cores.

One difference in arithmetic, not in the method: after each Sinkhorn half step, and for the line
search's candidates, the plan is updated by scaling the old entries (``_rescale``: one exp per
variable instead of one per entry), with an exact recomputation for large changes and at every
8th Newton step. The sums (plan marginals, dot products, the Schur complement) are added in
whatever order vectorizes (``compiled.SUM_OPTS``), and exp and log are ``vecmath``'s (within 3
ulp, so the loops that hold them vectorize). tests/test_ot_wellposed_compiled.py checks
that both versions give the same potentials (to float32 output precision) and the same iteration
counts.

Division and logarithm follow IEEE (``error_model="numpy"``: 1/0 = inf, log 0 = -inf), as in
torch, and the same guards make the same non-finite values harmless.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from wprctl.ot.compiled import OPTS as _OPTS
from wprctl.ot.compiled import SUM_OPTS as _SUM_OPTS
from wprctl.ot.compiled import VEC_OPTS as _VEC_OPTS
from wprctl.ot.compiled import chunk_bounds, launch, prefetch_row
from wprctl.ot.vecmath import exp64, log64

_TINY = np.finfo(np.float64).tiny
_RIDGE = 1e-10  # the preconditioner's relative ridge (``wellposed._Precond``)


@njit(**_VEC_OPTS)
def _plan(F, G, H, lam, lam_r, ei, ej, ce, pl, Pe, hub):
    """Plan entries and marginals. pl rows: Pd, PiD, PDj, PiR, PRj, r, c; hub: PDD, PDR, PRD,
    PRR, then the hub marginals rh (FD, GD, FR, GR). The per-slot loop has no sum across slots,
    so it vectorizes (``vecmath.exp64``); the hubs' sums are ``_hub_marginals``."""
    FD, GD, FR, GR = H[0], H[1], H[2], H[3]
    for i in range(F.shape[0]):
        Pd = exp64(F[i] + G[i])
        PiD = exp64(F[i] + GD - lam[i])
        PDj = exp64(FD + G[i] - lam[i])
        PiR = exp64(F[i] + (GR - lam_r))
        PRj = exp64((FR - lam_r) + G[i])
        pl[0, i], pl[1, i], pl[2, i], pl[3, i], pl[4, i] = Pd, PiD, PDj, PiR, PRj
        pl[5, i] = Pd + PiD + PiR
        pl[6, i] = Pd + PDj + PRj
    for k in range(ei.shape[0]):
        pe = exp64(F[ei[k]] + G[ej[k]] - ce[k])
        Pe[k] = pe
        pl[5, ei[k]] += pe
        pl[6, ej[k]] += pe
    hub[0] = exp64(FD + GD)
    hub[1] = exp64(FD + GR - lam_r)
    hub[2] = exp64(FR + GD - lam_r)
    hub[3] = exp64(FR + GR)
    _hub_marginals(pl, hub)


@njit(**_SUM_OPTS)
def _hub_marginals(pl, hub):
    """hub[4:8], the marginals of FD, GD, FR, GR, from the slots' entries and hub[:4]."""
    sPDj = sPiD = sPRj = sPiR = 0.0
    for i in range(pl.shape[1]):
        sPDj += pl[2, i]
        sPiD += pl[1, i]
        sPRj += pl[4, i]
        sPiR += pl[3, i]
    hub[4] = hub[0] + hub[1] + sPDj
    hub[5] = hub[0] + hub[2] + sPiD
    hub[6] = hub[3] + hub[2] + sPRj
    hub[7] = hub[3] + hub[1] + sPiR


@njit(**_OPTS)
def _big_of(x):
    m = 0.0
    for i in range(x.shape[0]):
        m = max(m, abs(x[i]))
    return m


@njit(**_VEC_OPTS)
def _exp_or_one(d, out):
    """out = exp(d), skipping the exps where d is all 0 (a half step's other side)."""
    if _big_of(d) > 0:
        for i in range(d.shape[0]):
            out[i] = exp64(d[i])
    else:
        out[:] = 1.0


# Largest change (log units) ``_rescale`` applies by multiplication. An entry that underflowed
# (< 1e-308) and is scaled by at most e^(2 * 30) stays below 1e-282, negligible against any mass
# the solver resolves, so no entry needs to be recomputed; larger changes recompute the plan.
_RESCALE_MAX = 30.0


@njit(**_SUM_OPTS)
def _rescale(F, G, H, dF, dG, dH, lam, lam_r, ei, ej, ce, pl, Pe, hub, ew):
    """The plan after F += dF, G += dG, H += dH (F, G, H already updated), from the old plan:
    each entry times exp(its row's change + its column's change). One exp per variable instead
    of one per entry (5 per slot, 1 per edge), and the products vectorize. ``ew`` (2, S):
    scratch."""
    S = F.shape[0]
    if not max(_big_of(dF), _big_of(dG), _big_of(dH)) <= _RESCALE_MAX:
        _plan(F, G, H, lam, lam_r, ei, ej, ce, pl, Pe, hub)
        return
    # a half step changes one side only: no exp for the other (its changes are exactly 0)
    eF, eG = ew[0], ew[1]
    _exp_or_one(dF, eF)
    _exp_or_one(dG, eG)
    # (math.exp: this function sums with reassociation, which vecmath.exp64 must not be under)
    eFD, eGD, eFR, eGR = math.exp(dH[0]), math.exp(dH[1]), math.exp(dH[2]), math.exp(dH[3])
    for i in range(S):
        pl[0, i] *= eF[i] * eG[i]
        pl[1, i] *= eF[i] * eGD
        pl[2, i] *= eFD * eG[i]
        pl[3, i] *= eF[i] * eGR
        pl[4, i] *= eFR * eG[i]
        pl[5, i] = pl[0, i] + pl[1, i] + pl[3, i]
        pl[6, i] = pl[0, i] + pl[2, i] + pl[4, i]
    for k in range(ei.shape[0]):
        pe = Pe[k] * (eF[ei[k]] * eG[ej[k]])
        Pe[k] = pe
        pl[5, ei[k]] += pe
        pl[6, ej[k]] += pe
    hub[0] *= eFD * eGD
    hub[1] *= eFD * eGR
    hub[2] *= eFR * eGD
    hub[3] *= eFR * eGR
    _hub_marginals(pl, hub)


@njit(**_SUM_OPTS)
def _objective(F, G, H, mF, mG, mH, pl, hub):
    """Phi = <a, F> + <b, G> + <hubs' masses, H> - total plan mass (0 * -inf = 0)."""
    phi = 0.0
    for i in range(F.shape[0]):
        if mF[i] > 0:
            phi += mF[i] * F[i]
        if mG[i] > 0:
            phi += mG[i] * G[i]
        phi -= pl[5, i]
    for h in range(4):
        if mH[h] > 0:
            phi += mH[h] * H[h]
    return phi - hub[4] - hub[6]


@njit(**_SUM_OPTS)
def _gradient(mF, mG, mH, actF, actG, actH, pl, hub, gF, gG, gH):
    """The marginal error (a - P 1, b - P^T 1) on the active variables; returns its L1 norm."""
    err = 0.0
    for i in range(mF.shape[0]):
        gF[i] = mF[i] - pl[5, i] if actF[i] else 0.0
        gG[i] = mG[i] - pl[6, i] if actG[i] else 0.0
        err += abs(gF[i]) + abs(gG[i])
    for h in range(4):
        gH[h] = mH[h] - hub[4 + h] if actH[h] else 0.0
        err += abs(gH[h])
    return err


@njit(**_SUM_OPTS)
def _matvec(pl, Pe, hub, damp, ei, ej, vF, vG, vH, oF, oG, oH):
    """J v with J = [[diag r, P], [P^T, diag c]] + damp I over (F, G, hubs)."""
    vFD, vGD, vFR, vGR = vH[0], vH[1], vH[2], vH[3]
    s0 = s1 = s2 = s3 = 0.0
    for i in range(vF.shape[0]):
        Pd, PiD, PDj, PiR, PRj = pl[0, i], pl[1, i], pl[2, i], pl[3, i], pl[4, i]
        oF[i] = (pl[5, i] + damp) * vF[i] + Pd * vG[i] + PiD * vGD + PiR * vGR
        oG[i] = (pl[6, i] + damp) * vG[i] + Pd * vF[i] + PDj * vFD + PRj * vFR
        s0 += PDj * vG[i]
        s1 += PiD * vF[i]
        s2 += PRj * vG[i]
        s3 += PiR * vF[i]
    for k in range(ei.shape[0]):
        oF[ei[k]] += Pe[k] * vG[ej[k]]
        oG[ej[k]] += Pe[k] * vF[ei[k]]
    PDD, PDR, PRD, PRR = hub[0], hub[1], hub[2], hub[3]
    oH[0] = (hub[4] + damp) * vFD + s0 + PDD * vGD + PDR * vGR
    oH[1] = (hub[5] + damp) * vGD + s1 + PDD * vFD + PRD * vFR
    oH[2] = (hub[6] + damp) * vFR + s2 + PRD * vGD + PRR * vGR
    oH[3] = (hub[7] + damp) * vGR + s3 + PDR * vFD + PRR * vFR


@njit(**_OPTS)
def _inv4(A, out, M):
    """out = A^-1 by Gauss-Jordan with partial pivoting; zeros when a pivot is 0 (singular).
    ``M`` (4, 8): scratch."""
    for i in range(4):
        for j in range(4):
            M[i, j] = A[i, j]
            M[i, 4 + j] = 1.0 if i == j else 0.0
    for col in range(4):
        piv = col
        for r in range(col + 1, 4):
            if abs(M[r, col]) > abs(M[piv, col]):
                piv = r
        if M[piv, col] == 0.0:
            out[:, :] = 0.0
            return
        if piv != col:
            for j in range(8):
                M[col, j], M[piv, j] = M[piv, j], M[col, j]
        d = M[col, col]
        for j in range(8):
            M[col, j] /= d
        for r in range(4):
            if r != col and M[r, col] != 0.0:
                f = M[r, col]
                for j in range(8):
                    M[r, j] -= f * M[col, j]
    for i in range(4):
        for j in range(4):
            v = M[i, 4 + j]
            out[i, j] = v if np.isfinite(v) else 0.0


@njit(**_SUM_OPTS)
def _precond(pl, hub, damp, actF, actG, actH, abg, Hinv, sw):
    """``wellposed._Precond`` for one position: per-slot 2x2 inverses (al, be, ga in abg) and the
    inverse of the hubs' 4x4 Schur complement. ``sw`` (4, 4, 8): scratch."""
    S = pl.shape[1]
    Sm, Hm, Sc = sw[0, :, :4], sw[1, :, :4], sw[2, :, :4]
    Sm[:, :] = 0.0
    for i in range(S):
        r = max(pl[5, i] + damp if actF[i] else 1.0, _TINY)
        c = max(pl[6, i] + damp if actG[i] else 1.0, _TINY)
        Pd = pl[0, i]
        pr, pc = Pd / r, Pd / c
        dd = (1 + _RIDGE) ** 2 - pr * pc
        al, be, ga = 1 / (r * dd), -pr / (c * dd), 1 / (c * dd)
        abg[0, i], abg[1, i], abg[2, i] = al, be, ga
        PiD, PDj, PiR, PRj = pl[1, i], pl[2, i], pl[3, i], pl[4, i]
        Sm[0, 0] += ga * PDj * PDj
        Sm[2, 2] += ga * PRj * PRj
        Sm[0, 2] += ga * PDj * PRj
        Sm[1, 1] += al * PiD * PiD
        Sm[3, 3] += al * PiR * PiR
        Sm[1, 3] += al * PiD * PiR
        Sm[0, 1] += be * PDj * PiD
        Sm[0, 3] += be * PDj * PiR
        Sm[2, 1] += be * PRj * PiD
        Sm[2, 3] += be * PRj * PiR
    Sm[2, 0], Sm[3, 1], Sm[1, 0], Sm[3, 0], Sm[1, 2], Sm[3, 2] = (
        Sm[0, 2], Sm[1, 3], Sm[0, 1], Sm[0, 3], Sm[2, 1], Sm[2, 3]
    )  # fmt: skip
    Hm[:, :] = 0.0
    for h in range(4):
        Hm[h, h] = (hub[4 + h] + damp) * (1 + _RIDGE) if actH[h] else 1.0
    Hm[0, 1] = Hm[1, 0] = hub[0]
    Hm[0, 3] = Hm[3, 0] = hub[1]
    Hm[2, 1] = Hm[1, 2] = hub[2]
    Hm[2, 3] = Hm[3, 2] = hub[3]
    for i in range(4):
        for j in range(4):
            if actH[i] and actH[j]:
                Sc[i, j] = Hm[i, j] - Sm[i, j]
            else:
                Sc[i, j] = 1.0 if i == j else 0.0
    for h in range(4):
        Sc[h, h] += _RIDGE * abs(Sc[h, h])
    _inv4(Sc, Hinv, sw[3])


@njit(**_SUM_OPTS)
def _apply(pl, abg, Hinv, actF, actG, actH, qF, qG, qH, zF, zG, zH):
    """z = M^-1 q (``wellposed._Precond.apply``). The hubs' 4-vectors are scalars: it runs once
    per CG iteration, and an array view costs a reference-count update."""
    S = qF.shape[0]
    r0, r1, r2, r3 = qH[0], qH[1], qH[2], qH[3]
    for i in range(S):
        tF = abg[0, i] * qF[i] + abg[1, i] * qG[i]
        tG = abg[1, i] * qF[i] + abg[2, i] * qG[i]
        r0 -= pl[2, i] * tG
        r1 -= pl[1, i] * tF
        r2 -= pl[4, i] * tG
        r3 -= pl[3, i] * tF
    r0 = r0 if actH[0] else 0.0
    r1 = r1 if actH[1] else 0.0
    r2 = r2 if actH[2] else 0.0
    r3 = r3 if actH[3] else 0.0
    h0 = Hinv[0, 0] * r0 + Hinv[0, 1] * r1 + Hinv[0, 2] * r2 + Hinv[0, 3] * r3
    h1 = Hinv[1, 0] * r0 + Hinv[1, 1] * r1 + Hinv[1, 2] * r2 + Hinv[1, 3] * r3
    h2 = Hinv[2, 0] * r0 + Hinv[2, 1] * r1 + Hinv[2, 2] * r2 + Hinv[2, 3] * r3
    h3 = Hinv[3, 0] * r0 + Hinv[3, 1] * r1 + Hinv[3, 2] * r2 + Hinv[3, 3] * r3
    for i in range(S):
        uF = qF[i] - pl[1, i] * h1 - pl[3, i] * h3
        uG = qG[i] - pl[2, i] * h0 - pl[4, i] * h2
        a = abg[0, i] * uF + abg[1, i] * uG
        b = abg[1, i] * uF + abg[2, i] * uG
        zF[i] = a if actF[i] and np.isfinite(a) else 0.0
        zG[i] = b if actG[i] and np.isfinite(b) else 0.0
    zH[0] = h0 if np.isfinite(h0) else 0.0
    zH[1] = h1 if np.isfinite(h1) else 0.0
    zH[2] = h2 if np.isfinite(h2) else 0.0
    zH[3] = h3 if np.isfinite(h3) else 0.0


@njit(**_SUM_OPTS)
def _dot3(aF, aG, aH, bF, bG, bH):
    # plain loops: numba's np.dot needs SciPy's BLAS
    s = 0.0
    for i in range(aF.shape[0]):
        s += aF[i] * bF[i] + aG[i] * bG[i]
    for h in range(4):
        s += aH[h] * bH[h]
    return s


@njit(**_OPTS)
def _axpy(alpha, aF, aG, aH, yF, yG, yH):
    """y += alpha a over (F, G, hubs)."""
    for i in range(aF.shape[0]):
        yF[i] += alpha * aF[i]
        yG[i] += alpha * aG[i]
    for h in range(4):
        yH[h] += alpha * aH[h]


@njit(**_OPTS)
def _cg(pl, Pe, hub, damp, ei, ej, abg, Hinv, actF, actG, actH, gF, gG, gH, max_cg, rel, x, w):
    """Preconditioned CG on (J + damp I) d = g to relative residual ``rel``; x (3, S + 4 packed
    as F, G, H views) receives d; ``w`` (12, S + 4): scratch for the residual, the preconditioned
    residual, the product and the direction. Returns the iterations."""
    S = gF.shape[0]
    xF, xG, xH = x[0, :S], x[1, :S], x[2, :4]
    xF[:] = 0.0
    xG[:] = 0.0
    xH[:] = 0.0
    rF, rG, rH = w[0, :S], w[1, :S], w[2, :4]
    zF, zG, zH = w[3, :S], w[4, :S], w[5, :4]
    qF, qG, qH = w[6, :S], w[7, :S], w[8, :4]
    pF, pG, pH = w[9, :S], w[10, :S], w[11, :4]
    rF[:] = gF
    rG[:] = gG
    rH[:] = gH
    _apply(pl, abg, Hinv, actF, actG, actH, rF, rG, rH, zF, zG, zH)
    pF[:] = zF
    pG[:] = zG
    pH[:] = zH
    rz = _dot3(rF, rG, rH, zF, zG, zH)
    stop = rz * rel * rel
    if not rz > 0:
        return 0
    it = 0
    while it < max_cg:
        it += 1
        _matvec(pl, Pe, hub, damp, ei, ej, pF, pG, pH, qF, qG, qH)
        pq = _dot3(pF, pG, pH, qF, qG, qH)
        if not pq > 0:
            break
        alpha = rz / pq
        _axpy(alpha, pF, pG, pH, xF, xG, xH)
        _axpy(-alpha, qF, qG, qH, rF, rG, rH)
        _apply(pl, abg, Hinv, actF, actG, actH, rF, rG, rH, zF, zG, zH)
        rz_new = _dot3(rF, rG, rH, zF, zG, zH)
        if not rz_new > stop:
            break
        beta = rz_new / rz
        for i in range(S):
            pF[i] = zF[i] + beta * pF[i]
            pG[i] = zG[i] + beta * pG[i]
        for h in range(4):
            pH[h] = zH[h] + beta * pH[h]
        rz = rz_new
    return it


@njit(**_VEC_OPTS)
def _sinkhorn_step(X, H, lm, lmH, act, actH, marg, hub, side, dX, dH):
    """The Sinkhorn half step of one side (side 0: rows F, FD, FR; 1: columns G, GD, GR): its
    change dX = log mass - log marginal on the active variables (0 elsewhere), applied to X, H in
    place; the other side's change is left 0. ``lm``, ``lmH``: the log masses (log of the masses
    the solver uses, computed once per position: the same numbers as the tensor version's)."""
    for i in range(X.shape[0]):
        dX[i] = lm[i] - log64(max(marg[i], _TINY)) if act[i] else 0.0
        X[i] += dX[i]
    dH[:] = 0.0
    for h in (side, side + 2):
        if actH[h]:
            dH[h] = lmH[h] - log64(max(hub[4 + h], _TINY))
            H[h] += dH[h]


@njit(**_OPTS)
def solve_position(
    la, lb, laD, lbD, lam, ei, ej, ce, lam_r, log_rho, F, G, H, max_iter, tol, max_cg, cap, damp
):
    """One position's stage; F, G, H hold the start and receive the result (in place).
    Returns (Newton iterations, L1 marginal error, converged, CG iterations).

    Solved on the slots with a mass on either side only: a support top-k(a) U top-k(b) U {y}
    keeps a repeated token's second slot unused (-inf on both sides), ~110 of 257 slots at
    V = 32k, k2 = 128. Such a slot's plan entries, gradient and steps are exactly 0 and its
    potentials never change, so leaving it out changes nothing but the work of every per-slot
    loop."""
    used = (la > -math.inf) | (lb > -math.inf)
    kept = np.flatnonzero(used)
    n = kept.shape[0]
    if n == la.shape[0]:
        return _solve_slots(la, lb, laD, lbD, lam, ei, ej, ce, lam_r, log_rho, F, G, H,
                            max_iter, tol, max_cg, cap, damp)  # fmt: skip
    slot_of = np.full(la.shape[0], -1, np.int64)
    slot_of[kept] = np.arange(n)
    # an edge to an unused slot carries exp(-inf) = 0
    ci, cj, cc = np.empty_like(ei), np.empty_like(ej), np.empty_like(ce)
    E = 0
    for e in range(ei.shape[0]):
        i, j = slot_of[ei[e]], slot_of[ej[e]]
        if i >= 0 and j >= 0:
            ci[E], cj[E], cc[E] = i, j, ce[e]
            E += 1
    ci, cj, cc = ci[:E], cj[:E], cc[:E]
    cF, cG = F[kept], G[kept]
    out = _solve_slots(la[kept], lb[kept], laD, lbD, lam[kept], ci, cj, cc, lam_r, log_rho,
                       cF, cG, H, max_iter, tol, max_cg, cap, damp)  # fmt: skip
    F[kept] = cF
    G[kept] = cG
    return out


@njit(**_OPTS)
def _solve_slots(
    la, lb, laD, lbD, lam, ei, ej, ce, lam_r, log_rho, F, G, H, max_iter, tol, max_cg, cap, damp
):
    """``solve_position`` on the given slots."""
    S = la.shape[0]
    mF, mG = np.exp(la), np.exp(lb)
    rho = math.exp(log_rho)
    mH = np.array([math.exp(laD), math.exp(lbD), rho, rho])
    actF, actG, actH = np.isfinite(la), np.isfinite(lb), mH > 0
    lmF, lmG, lmH = np.log(mF), np.log(mG), np.log(mH)
    E = ei.shape[0]
    pl, Pe, hub = np.empty((7, S)), np.empty(E), np.empty(8)
    cpl, cPe, chub = np.empty((7, S)), np.empty(E), np.empty(8)
    gF, gG, gH = np.empty(S), np.empty(S), np.empty(4)
    cF, cG, cH = np.empty(S), np.empty(S), np.empty(4)
    abg, Hinv = np.empty((3, S)), np.empty((4, 4))
    d = np.empty((3, max(S, 4)))
    cgw, sw = np.empty((12, max(S, 4))), np.empty((4, 4, 8))
    ew = np.empty((2, S))
    zero, dX, dHs = np.zeros(S), np.empty(S), np.empty(4)
    tF, tG, tH = np.empty(S), np.empty(S), np.empty(4)
    sign = np.array([1.0, -1.0, 1.0, -1.0])
    _plan(F, G, H, lam, lam_r, ei, ej, ce, pl, Pe, hub)
    phi = _objective(F, G, H, mF, mG, mH, pl, hub)
    iters = cg_total = 0
    err = math.inf
    converged = False
    for k in range(max_iter + 1):
        err = _gradient(mF, mG, mH, actF, actG, actH, pl, hub, gF, gG, gH)
        if err <= tol:
            converged = True
            break
        if k == max_iter:
            break
        iters += 1
        # Sinkhorn sweep (columns, then rows), as in the batched version
        _sinkhorn_step(G, H, lmG, lmH, actG, actH, pl[6], hub, 1, dX, dHs)
        _rescale(F, G, H, zero, dX, dHs, lam, lam_r, ei, ej, ce, pl, Pe, hub, ew)
        _sinkhorn_step(F, H, lmF, lmH, actF, actH, pl[5], hub, 0, dX, dHs)
        _rescale(F, G, H, dX, zero, dHs, lam, lam_r, ei, ej, ce, pl, Pe, hub, ew)
        phi = _objective(F, G, H, mF, mG, mH, pl, hub)
        err = _gradient(mF, mG, mH, actF, actG, actH, pl, hub, gF, gG, gH)
        # damped Newton system by PCG
        _precond(pl, hub, damp, actF, actG, actH, abg, Hinv, sw)
        rel = min(math.sqrt(err), 0.1)
        budget = max_cg * (1 + k // 8)
        cg_total += _cg(pl, Pe, hub, damp, ei, ej, abg, Hinv, actF, actG, actH, gF, gG, gH,
                        budget, rel, d, cgw)  # fmt: skip
        dF, dG, dH = d[0, :S], d[1, :S], d[2, :4]
        # the gauge component (f_R = g_R fixed), inactive variables, the step cap
        shift = (dH[2] - dH[3]) / 2
        big = 0.0
        for i in range(S):
            dF[i] = dF[i] - shift if actF[i] else 0.0
            dG[i] = dG[i] + shift if actG[i] else 0.0
            big = max(big, abs(dF[i]), abs(dG[i]))
        for h in range(4):
            dH[h] = dH[h] - shift * sign[h] if actH[h] else 0.0
            big = max(big, abs(dH[h]))
        scale = min(cap / max(big, 1e-300), 1.0)
        dF *= scale
        dG *= scale
        dH *= scale
        slope = _dot3(gF, gG, gH, dF, dG, dH)
        # Armijo backtracking; where it fails, a Sinkhorn half step on G instead
        t = 1.0
        accepted = False
        cphi = phi
        for _ls in range(30):
            cF[:] = F
            cG[:] = G
            cH[:] = H
            _axpy(t, dF, dG, dH, cF, cG, cH)
            if k % 8 == 7:  # now and then an exact plan, so rounding cannot pile up
                _plan(cF, cG, cH, lam, lam_r, ei, ej, ce, cpl, cPe, chub)
            else:
                cpl[:] = pl
                cPe[:] = Pe
                chub[:] = hub
                tF[:] = 0.0
                tG[:] = 0.0
                tH[:] = 0.0
                _axpy(t, dF, dG, dH, tF, tG, tH)
                _rescale(cF, cG, cH, tF, tG, tH, lam, lam_r, ei, ej, ce, cpl, cPe, chub, ew)
            cphi = _objective(cF, cG, cH, mF, mG, mH, cpl, chub)
            if np.isfinite(cphi) and cphi >= phi + 1e-4 * t * slope - 1e-12 * (1 + abs(phi)):
                accepted = True
                break
            t /= 2
        if accepted:
            F[:] = cF
            G[:] = cG
            H[:] = cH
            pl, cpl = cpl, pl
            Pe, cPe = cPe, Pe
            hub, chub = chub, hub
            phi = cphi
        else:
            _sinkhorn_step(G, H, lmG, lmH, actG, actH, pl[6], hub, 1, dX, dHs)
            _plan(F, G, H, lam, lam_r, ei, ej, ce, pl, Pe, hub)
            phi = _objective(F, G, H, mF, mG, mH, pl, hub)
    return iters, err, converged, cg_total


@njit(parallel=True, **_OPTS)
def _solve_parallel(la, lb, laD, lbD, lam, ptr, ei, ej, ce, lam_r, log_rho, F, G, H, settings, out):
    for p in prange(la.shape[0]):
        _solve_into(
            la, lb, laD, lbD, lam, ptr, ei, ej, ce, lam_r, log_rho, F, G, H, settings, out, p
        )


@njit(**_OPTS)
def _solve_serial(la, lb, laD, lbD, lam, ptr, ei, ej, ce, lam_r, log_rho, F, G, H, settings, out):
    for p in range(la.shape[0]):
        _solve_into(
            la, lb, laD, lbD, lam, ptr, ei, ej, ce, lam_r, log_rho, F, G, H, settings, out, p
        )


@njit(**_OPTS)
def _solve_into(la, lb, laD, lbD, lam, ptr, ei, ej, ce, lam_r, log_rho, F, G, H, settings, out, p):
    max_iter, tol, max_cg, cap, damp = settings
    e0, e1 = ptr[p], ptr[p + 1]
    it, err, conv, cg = solve_position(
        la[p], lb[p], laD[p], lbD[p], lam[p], ei[e0:e1], ej[e0:e1], ce[e0:e1], lam_r, log_rho,
        F[p], G[p], H[p], int(max_iter), tol, int(max_cg), cap, damp,
    )  # fmt: skip
    out[p, 0], out[p, 1], out[p, 2], out[p, 3] = it, err, conv, cg


def solve_stage(
    la: np.ndarray,
    lb: np.ndarray,
    laD: np.ndarray,
    lbD: np.ndarray,
    lam: np.ndarray,
    ptr: np.ndarray,
    ei: np.ndarray,
    ej: np.ndarray,
    ce: np.ndarray,
    lam_r: float,
    log_rho: float,
    F: np.ndarray,
    G: np.ndarray,
    H: np.ndarray,
    max_iter: int,
    tol: float,
    max_cg: int,
    cap: float,
    damp: float,
    threads: int,
) -> np.ndarray:
    """All positions (rows); F, G (P, S) and H (P, 4) in place. Returns (P, 4): iterations, L1
    marginal error, converged, CG iterations. ``threads`` > 1 spreads the positions over that many
    threads (at most numba's pool size)."""
    out = np.zeros((la.shape[0], 4))
    settings = np.array([max_iter, tol, max_cg, cap, damp], dtype=np.float64)
    args = (la, lb, laD, lbD, lam, ptr, ei, ej, ce, lam_r, log_rho, F, G, H, settings, out)
    launch(_solve_parallel, _solve_serial, threads, la.shape[0], *args, long=True)
    return out


@njit(**_OPTS)
def _position_edges(ids, valid, knn, knn_cost, slot, member, adj, keys, vals, out_i, out_j,
                    out_c):  # fmt: skip
    """One position's in-support edges, sorted by (i, j), into out_* (as many as fit); returns
    their number. ``slot`` (V,) all -1, ``member`` (V / 8 + 1,) all 0 and ``adj`` (S, S) all
    False on entry and on return; ``keys``, ``vals``: scratch for 2 S k1 edges.

    Each support token's k1 neighbours are looked up in ``member``, a bitmap of the support (4 KB
    at V = 32k, so it stays in L1 where the vocabulary-sized slot map does not); the slot map is
    read only on a hit, ~2 per slot among the top tokens of 32k; the next slot's kNN row is
    prefetched while this one is scanned (the lists, 16 MB at V = 32k, come from memory: the
    edges took 0.73x the time with it). The edges found are sorted by key, not read off a scan
    of the whole S x S adjacency (66k entries at k2 = 128)."""
    S = ids.shape[0]
    k1 = knn.shape[1]
    for i in range(S):
        if valid[i]:
            slot[ids[i]] = i
            member[ids[i] >> 3] |= np.uint8(1 << (ids[i] & 7))
    n = 0
    for i in range(S):
        if not valid[i]:
            continue
        t = ids[i]
        if i + 1 < S:
            prefetch_row(knn, ids[i + 1])
        for r in range(k1):
            nb = np.int64(knn[t, r])
            if not member[nb >> 3] & (1 << (nb & 7)):
                continue
            j = slot[nb]
            if j != i and not adj[i, j]:
                adj[i, j] = adj[j, i] = True
                keys[n], keys[n + 1] = i * S + j, j * S + i
                vals[n] = vals[n + 1] = knn_cost[t, r]
                n += 2
    order = np.argsort(keys[:n])
    cap = out_i.shape[0]
    for e in range(min(n, cap)):
        key = keys[order[e]]
        out_i[e], out_j[e], out_c[e] = key // S, key % S, vals[order[e]]
    for e in range(n):
        adj[keys[e] // S, keys[e] % S] = False
    for i in range(S):
        if valid[i]:
            slot[ids[i]] = -1
            member[ids[i] >> 3] = 0
    return n


@njit(**_OPTS)
def _edges_chunk(ids, valid, knn, knn_cost, lo, hi, slab_i, slab_j, slab_c, counts):
    """Positions lo..hi into their slab rows (first ``cap`` edges) and their true counts; one
    vocabulary-sized slot map and one S x S adjacency for the chunk."""
    S = ids.shape[1]
    slot = np.full(knn.shape[0], -1, dtype=np.int32)
    member = np.zeros(knn.shape[0] // 8 + 1, dtype=np.uint8)
    adj = np.zeros((S, S), dtype=np.bool_)
    keys = np.empty(2 * S * knn.shape[1], dtype=np.int64)
    vals = np.empty(2 * S * knn.shape[1], dtype=knn_cost.dtype)
    for p in range(lo, hi):
        counts[p] = _position_edges(
            ids[p], valid[p], knn, knn_cost, slot, member, adj, keys, vals, slab_i[p], slab_j[p],
            slab_c[p],
        )  # fmt: skip


@njit(parallel=True, **_OPTS)
def _edges_parallel(ids, valid, knn, knn_cost, chunks, slab_i, slab_j, slab_c, counts):
    for c in prange(chunks.shape[0] - 1):
        _edges_chunk(ids, valid, knn, knn_cost, chunks[c], chunks[c + 1], slab_i, slab_j, slab_c,
                     counts)  # fmt: skip


@njit(**_OPTS)
def _edges_serial(ids, valid, knn, knn_cost, chunks, slab_i, slab_j, slab_c, counts):
    _edges_chunk(ids, valid, knn, knn_cost, 0, ids.shape[0], slab_i, slab_j, slab_c, counts)


@njit(**_OPTS)
def _edges_flatten(ids, valid, knn, knn_cost, slab_i, slab_j, slab_c, ptr, out_i, out_j, out_c):
    """The flat lists: each position's slab row, or, where it overflowed, computed again."""
    S = ids.shape[1]
    cap = slab_i.shape[1]
    for p in range(ids.shape[0]):
        e0, e1 = ptr[p], ptr[p + 1]
        if e1 - e0 <= cap:
            out_i[e0:e1] = slab_i[p, : e1 - e0]
            out_j[e0:e1] = slab_j[p, : e1 - e0]
            out_c[e0:e1] = slab_c[p, : e1 - e0]
        else:
            _position_edges(
                ids[p], valid[p], knn, knn_cost, np.full(knn.shape[0], -1, dtype=np.int32),
                np.zeros(knn.shape[0] // 8 + 1, dtype=np.uint8), np.zeros((S, S), dtype=np.bool_), np.empty(2 * S * knn.shape[1], dtype=np.int64),
                np.empty(2 * S * knn.shape[1], dtype=knn_cost.dtype),
                out_i[e0:e1], out_j[e0:e1], out_c[e0:e1],
            )  # fmt: skip


def support_edges_cpu(
    ids: np.ndarray, valid: np.ndarray, knn: np.ndarray, knn_cost: np.ndarray, threads: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``wellposed.support_edges`` compiled: (ptr (P + 1,), i, j, cost), sorted by (p, i, j).

    One pass over the kNN lists: each position writes into a slab row of 8 edges per slot (a
    support of top tokens has ~2; at most 64 MB of slabs in all); a position with more is
    computed again when flattening."""
    P, S = ids.shape
    cap = max(1, min(8 * S, (64 * 2**20 // 24) // max(1, P)))
    chunks = chunk_bounds(P, threads)
    counts = np.zeros(P, dtype=np.int64)
    slab_i, slab_j = np.empty((P, cap), dtype=np.int64), np.empty((P, cap), dtype=np.int64)
    slab_c = np.empty((P, cap), dtype=knn_cost.dtype)
    args = (ids, valid, knn, knn_cost, chunks, slab_i, slab_j, slab_c, counts)
    launch(_edges_parallel, _edges_serial, threads, P, *args)
    ptr = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    E = int(ptr[-1])
    ei, ej = np.empty(E, dtype=np.int64), np.empty(E, dtype=np.int64)
    c = np.empty(E, dtype=knn_cost.dtype)
    _edges_flatten(ids, valid, knn, knn_cost, slab_i, slab_j, slab_c, ptr, ei, ej, c)
    return ptr, ei, ej, c
