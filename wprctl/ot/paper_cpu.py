"""The ``paper`` method's per-position problems compiled for the CPU, from a ``TopKPair``.

``sinkhorn._paper_local`` (the batch support, each position's masses, dust bin and action row,
``paper.local_problems`` + ``paper.paper_sinkhorn_local``) in one call: the batch support as
flags over the vocabulary with its kernel's row sums (``_batch_support``, as
``paper.first_row_sums``), then one position per loop turn, the positions spread over threads
(``wprctl.ot.compiled``): the position's kernel on its own tokens (its kNN edges among them,
both directions, a row's own kNN value first, 1 on the diagonal, the dust bin only on its
diagonal), then the official float32 iteration from u = v = 1, with the batch support entering
through the first u-update's row sums. No tensor op runs between the pair and the results.

The tensor version builds one block-diagonal CSR kernel for all positions with sorts and
searches over every candidate edge. Here:

* a position's edges are found with a slot map, each entry once (``paper.paper_reverse_live``
  says which end of a mutual edge supplies it), so there is no sort or dedupe; or, when the
  batch support is small (at most ``BATCH_KERNEL_MAX`` tokens: a small vocabulary such as the
  demo's), its kernel is built once as a dense matrix and each position's block gathered from it;
* the problem is compacted to the slots with mass (the others stay exactly 0);
* the kernel is a CSR matrix, or a dense one when that is no more work (m^2 <= 4 nnz: a small
  vocabulary's top-k tokens are each other's neighbours, ~20 entries per row on the demo), whose
  matvec vectorizes;
* the position's problem stays in cache.

All arithmetic is float32 as in the official code (float64 for the OT value, as in the tensor
version); sums run in another order, so results agree to float32 rounding
(tests/test_ot_paper.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from wprctl.ot.compiled import OPTS, chunk_bounds, launch

_TINY = np.float32(1e-16)  # paper._TINY
_SLACK = np.float32(1e-6)  # paper._SLACK


@njit(**OPTS)
def _edges(tok, knn, w, back_live, slot, count, cols, vals, fill):
    """Every live kNN edge among the position's tokens ``tok`` (row i = token tok[i]), found from
    its source's list: an entry of row i, and of row j too unless j's own list holds it live
    (``paper.paper_reverse_live``), so each kernel entry comes once, from the row's own list
    when it can. Counted into ``count`` (fill False), or written at ``count``, the next free
    place of each CSR row. (``_dense_edges``: the same into a dense kernel.)"""
    for i in range(tok.shape[0]):
        t = tok[i]
        for r in range(knn.shape[1]):
            j = slot[knn[t, r]]
            if j >= 0 and w[t, r] > 0:
                if fill:
                    cols[count[i]], vals[count[i]] = j, w[t, r]
                count[i] += 1
                if not back_live[t, r]:
                    if fill:
                        cols[count[j]], vals[count[j]] = i, w[t, r]
                    count[j] += 1


@njit(**OPTS)
def _dense_edges(tok, knn, w, back_live, slot, flat, m):
    """``_edges`` into the transposed dense kernel, the (m, m) head of ``flat``, without branches:
    whether a list entry is a kernel entry is a coin flip per entry (its neighbour in the
    position's tokens or not), which branches mispredict. A miss writes to a scratch cell after
    the matrix, one per list column r: a miss that rewrote a cell of the matrix (its own value)
    would load and store one address again and again, a chain through memory that costs more
    than the branch. Hits are written in the same order as by ``_edges``."""
    k1 = knn.shape[1]
    scratch = m * m
    for i in range(tok.shape[0]):
        t = tok[i]
        for r in range(k1):
            j = slot[knn[t, r]]
            x = w[t, r]
            hit = (j >= 0) & (x > 0)
            back = hit & ~back_live[t, r]
            flat[j * m + i if hit else scratch + r] = x
            flat[i * m + j if back else scratch + k1 + r] = x


@njit(**OPTS)
def _kernel(tok, knn, w, back_live, slot, count, indptr, cols, vals, dense_buf, bpos, batch):
    """The position's kernel over m = n + 1 rows (its n tokens ``tok``, then the dust bin, which
    only has its diagonal 1): as CSR into indptr (m + 1), cols, vals (each row: the diagonal
    first, then its edges unsorted), or, when that is no more work (m^2 <= 4 nnz) and fits the
    flat ``dense_buf``, as the transposed dense (m, m) matrix, returned (else an empty one). ``slot``
    (V,) is all -1 on entry and on return. With the batch support's kernel ``batch`` (non-empty,
    ``_batch_kernel``) and a dense block that fits, the kernel is read from it instead."""
    n = tok.shape[0]
    m = n + 1
    if batch.shape[0] and m * m <= dense_buf.shape[0]:
        return _gathered_kernel(tok, bpos, batch, count, indptr, cols, vals, dense_buf)
    for i in range(n):
        slot[tok[i]] = i
    # The number of entries decides the layout: a reduction without branches (see _dense_edges)
    # that vectorizes; the entries of each row are counted only for the CSR layout.
    k1 = knn.shape[1]
    nnz = m
    for i in range(n):
        t = tok[i]
        for r in range(k1):
            hit = (slot[knn[t, r]] >= 0) & (w[t, r] > 0)
            nnz += int(hit) + int(hit & ~back_live[t, r])
    dense = dense_buf[:0].reshape((0, 0))  # none: CSR
    if m * m + 2 * k1 <= dense_buf.shape[0] and m * m <= 4 * nnz:
        # C-contiguous (a 2-D slice of a larger matrix would not be, and would not vectorize)
        dense = dense_buf[: m * m].reshape((m, m))
        dense[:, :] = 0.0
        _dense_edges(tok, knn, w, back_live, slot, dense_buf, m)
        for i in range(m):
            dense[i, i] = 1.0
    else:
        count[:m] = 1  # the diagonal
        _edges(tok, knn, w, back_live, slot, count, cols, vals, False)
        indptr[0] = 0
        for i in range(m):
            indptr[i + 1] = indptr[i] + count[i]
            cols[indptr[i]], vals[indptr[i]] = i, 1.0
            count[i] = indptr[i] + 1
        _edges(tok, knn, w, back_live, slot, count, cols, vals, True)
    for i in range(n):
        slot[tok[i]] = -1
    return dense


@njit(**OPTS)
def _batch_kernel(inside, knn, w, back_live):
    """The kernel of the batch support as one transposed dense (Nb, Nb) matrix (``_dense_edges``
    over all its tokens, no diagonal), with every token's index in it (``bpos``, -1 outside):
    an entry depends on its two tokens only, so a position's kernel is a block of it."""
    V = knn.shape[0]
    bpos = np.full(V, -1, dtype=np.int64)
    tok = np.empty(V, dtype=np.int64)
    nb = 0
    for t in range(V):
        if inside[t]:
            bpos[t], tok[nb] = nb, t
            nb += 1
    flat = np.zeros(nb * nb + 2 * knn.shape[1], dtype=np.float32)  # + _dense_edges' scratch
    _dense_edges(tok[:nb], knn, w, back_live, bpos, flat, nb)
    return bpos, flat[: nb * nb].reshape((nb, nb))


@njit(**OPTS)
def _gathered_kernel(tok, bpos, batch, count, indptr, cols, vals, dense_buf):
    """``_kernel`` read from the batch support's kernel: the position's block of it gathered into
    the transposed dense (m, m) matrix (its entries counted on the way), which stays when
    m^2 <= 4 nnz (the same matrix, and choice, as ``_kernel``'s own); else its CSR form (each
    row: the diagonal first, then its edges by column) is read off it. ``count``: scratch."""
    n = tok.shape[0]
    m = n + 1
    for i in range(n):
        count[i] = bpos[tok[i]]
    dense = dense_buf[: m * m].reshape((m, m))
    nnz = m
    for a in range(n):
        row = batch[count[a]]
        for c in range(n):
            x = row[count[c]]
            dense[a, c] = x
            nnz += x > 0
        dense[a, n] = 0.0
    dense[n, :] = 0.0
    for i in range(m):
        dense[i, i] = 1.0
    if m * m <= 4 * nnz:
        return dense
    e = 0
    for i in range(m):  # row i of the kernel is column i of the transpose
        indptr[i] = e
        cols[e], vals[e] = i, 1.0
        e += 1
        for j in range(m):
            x = dense[j, i]
            if x > 0 and j != i:
                cols[e], vals[e] = j, x
                e += 1
    indptr[m] = e
    return dense_buf[:0].reshape((0, 0))


@njit(**OPTS)
def _matvec(indptr, cols, vals, dense, x, out):
    """out = K x, K as ``_kernel`` left it (dense when ``dense`` has rows, else CSR)."""
    m = x.shape[0]
    if dense.shape[0]:
        # row by row of the transpose: the inner loop has no reduction, so it vectorizes
        out[:] = 0.0
        for j in range(m):
            xj = x[j]
            if xj != 0.0:
                for i in range(m):
                    out[i] += dense[j, i] * xj
        return
    for i in range(m):
        s = np.float32(0.0)
        for e in range(indptr[i], indptr[i + 1]):
            s += vals[e] * x[cols[e]]
        out[i] = s


@njit(**OPTS)
def _solve_position(a, b, first_rowsum, outside, action_row, indptr, cols, vals, dense, eps,
                    eps64, max_iter, tol, res, p):  # fmt: skip
    """``paper_sinkhorn_local`` for one position on its own tokens and dust bin (m rows, the
    dust last; the slots without mass are left out: their u and v stay exactly 0 and add
    nothing); results into row p of ``res``."""
    m = a.shape[0]
    u = np.ones(m, dtype=np.float32)
    v = u.copy()
    den = np.empty(m, dtype=np.float32)
    u_new = np.empty(m, dtype=np.float32)
    it = 0
    converged = False
    while it < max_iter:
        if it == 0:
            den[:] = first_rowsum
        else:
            _matvec(indptr, cols, vals, dense, v, den)
        delta = np.float32(0.0)
        for i in range(m):
            u_new[i] = a[i] / (den[i] + _TINY)
            delta = max(delta, abs(u_new[i] - u[i]))
        if it == 0 and outside:  # the batch-support tokens outside the position: u 1 -> 0
            delta = max(delta, np.float32(1.0))
        _matvec(indptr, cols, vals, dense, u_new, den)
        for i in range(m):
            v[i] = b[i] / (den[i] + _TINY)
        u[:] = u_new
        it += 1
        if not delta > tol:
            converged = True
            break
    _matvec(indptr, cols, vals, dense, v, den)
    err = np.float32(0.0)
    for i in range(m):
        err += abs(u[i] * den[i] - a[i])
    at = u[action_row] if action_row >= 0 else np.float32(0.0)
    f_mean = np.float32(0.0)
    value = 0.0
    for i in range(m):
        f = np.log(u[i] + _TINY) * eps
        g = np.log(v[i] + _TINY) * eps
        f_mean += a[i] * f
        value += float(a[i]) * float(f) + float(b[i]) * float(g)
        if a[i] > 0:
            value -= eps64 * float(a[i]) * np.log(float(a[i]))
        if b[i] > 0:
            value -= eps64 * float(b[i]) * np.log(float(b[i]))
    # Hall's condition per slot: the mass adjacent to it on the other side must cover it
    infeasible = abs(a[m - 1] - b[m - 1]) > _SLACK
    sa, sb = u_new, den  # (free now) the masses adjacent to each row
    if dense.shape[0]:
        sa[:] = 0.0
        sb[:] = 0.0
        zero = np.float32(0.0)
        for j in range(m):  # row by row of the transpose, as in _matvec; branch-free
            aj, bj = a[j], b[j]
            for i in range(m):
                live = dense[j, i] > 0
                sa[i] += aj if live else zero
                sb[i] += bj if live else zero
    else:
        for i in range(m):
            sa[i] = 0.0
            sb[i] = 0.0
            for e in range(indptr[i], indptr[i + 1]):
                sa[i] += a[cols[e]]
                sb[i] += b[cols[e]]
    for i in range(m - 1):
        if sb[i] + _SLACK < a[i] or sa[i] + _SLACK < b[i]:
            infeasible = True
    res[p, 0] = it
    res[p, 1] = converged
    res[p, 2] = err
    res[p, 3] = eps * np.log(at + _TINY)
    res[p, 4] = f_mean
    res[p, 5] = value
    res[p, 6] = infeasible


# the largest dense kernel (rows) a position may use: 256 x 256 float32 is 256 KB per thread
_DENSE_MAX = 256
# The largest batch support whose kernel is built once for the batch (1024^2 float32, 4 MB):
# a position's block is then gathered from it, 4x faster than finding its edges in the kNN lists
# (on the demo, a 315-token batch support: 0.6 against 2.4 ms for 207 positions). Beyond, the
# matrix would leave the cache (and at large vocabularies memory).
BATCH_KERNEL_MAX = 1024


def use_batch_kernel(size: int, positions: int, slots: int, k1: int) -> bool:
    """Whether to build the batch support's kernel (``_batch_kernel``): when it is small, and
    filling it is less work than the positions' own edge searches (~2 slots k1 list entries
    each; a few positions with a large batch support are not worth it)."""
    return size <= BATCH_KERNEL_MAX and size * size <= positions * slots * k1


@njit(**OPTS)
def _batch_support(ids, valid, actions, knn, w, mutual, pad, eos):
    """The batch-wide support (``paper.paper_support``) as flags over the vocabulary, its size,
    and the first u-update's row sums of its kernel per token (``paper.first_row_sums``: 1 + every
    in-support edge once, a mutual edge at its source only, with the source's own value)."""
    V = knn.shape[0]
    inside = np.zeros(V, dtype=np.bool_)
    for p in range(ids.shape[0]):
        inside[actions[p]] = True
        for i in range(ids.shape[1]):
            if valid[p, i]:
                inside[ids[p, i]] = True
    inside[pad] = False
    inside[eos] = True
    size = 0
    rowsum = np.ones(V, dtype=np.float32)
    for t in range(V):
        if inside[t]:
            size += 1
            own = np.float32(0.0)
            for r in range(knn.shape[1]):
                own += w[t, r] if inside[knn[t, r]] else np.float32(0.0)
            rowsum[t] += own
    for t in range(V):  # the one-way edges, at their far end
        if inside[t]:
            for r in range(knn.shape[1]):
                j = knn[t, r]
                if inside[j] and not mutual[t, r]:
                    rowsum[j] += w[t, r]
    return inside, size, rowsum


@njit(**OPTS)
def _chunk(ids, valid, logp, logq, actions, inside, size, rowsum, knn, w, back_live, bpos,
           batch, eps, max_iter, tol, lo, hi, res):  # fmt: skip
    eps64 = eps[1]
    eps = np.float32(eps[0])
    S = ids.shape[1]
    m = S + 1
    cap = m + 2 * S * knn.shape[1]
    slot = np.full(knn.shape[0], -1, dtype=np.int32)
    count = np.empty(m, dtype=np.int64)
    indptr = np.empty(m + 1, dtype=np.int64)
    cols, vals = np.empty(cap, dtype=np.int32), np.empty(cap, dtype=np.float32)
    dense_buf = np.empty(min(m, _DENSE_MAX) ** 2 + 2 * knn.shape[1], dtype=np.float32)
    tok = np.empty(S, dtype=ids.dtype)
    ac, bc, fc = np.empty(m, np.float32), np.empty(m, np.float32), np.empty(m, np.float32)
    for p in range(lo, hi):
        # the position's own slots (valid, in the batch support), compacted, then its dust bin;
        # the action's row: its slot, -1 for a batch-support token without one, else the dust
        n = 0
        row = -2
        sa = sb = np.float32(0.0)
        for i in range(S):
            t = ids[p, i]
            if valid[p, i] and inside[t]:
                if t == actions[p] and row == -2:
                    row = n
                tok[n], ac[n], bc[n], fc[n] = t, np.exp(logp[p, i]), np.exp(logq[p, i]), rowsum[t]
                sa += ac[n]
                sb += bc[n]
                n += 1
        ac[n], bc[n], fc[n] = max(np.float32(1.0) - sa, 0.0), max(np.float32(1.0) - sb, 0.0), 1.0
        if row == -2:
            row = -1 if inside[actions[p]] else n
        dense = _kernel(tok[:n], knn, w, back_live, slot, count, indptr, cols, vals, dense_buf,
                        bpos, batch)  # fmt: skip
        _solve_position(ac[: n + 1], bc[: n + 1], fc[: n + 1], n < size, row, indptr, cols,
                        vals, dense, eps, eps64, max_iter, tol, res, p)  # fmt: skip


@njit(parallel=True, **OPTS)
def _solve_parallel(ids, valid, logp, logq, actions, inside, size, rowsum, knn, w, back_live,
                    bpos, batch, eps, max_iter, tol, chunks, res):  # fmt: skip
    for c in prange(chunks.shape[0] - 1):
        _chunk(ids, valid, logp, logq, actions, inside, size, rowsum, knn, w, back_live, bpos,
               batch, eps, max_iter, tol, chunks[c], chunks[c + 1], res)  # fmt: skip


@njit(**OPTS)
def _solve_serial(ids, valid, logp, logq, actions, inside, size, rowsum, knn, w, back_live,
                  bpos, batch, eps, max_iter, tol, chunks, res):  # fmt: skip
    _chunk(ids, valid, logp, logq, actions, inside, size, rowsum, knn, w, back_live, bpos, batch,
           eps, max_iter, tol, 0, ids.shape[0], res)  # fmt: skip


def paper_topk_cpu(
    ids: np.ndarray,
    valid: np.ndarray,
    logp: np.ndarray,
    logq: np.ndarray,
    actions: np.ndarray,
    knn: np.ndarray,
    w: np.ndarray,
    mutual: np.ndarray,
    back_live: np.ndarray,
    pad_id: int,
    eos_id: int,
    epsilon: float,
    max_iter: int,
    tol: float,
    threads: int,
) -> tuple[int, dict[str, np.ndarray]]:
    """The batch support's size and the outputs of ``paper_sinkhorn_local`` (``f_mean`` and
    ``value`` always) for the P positions of a ``TopKPair``: ``ids``, ``valid``, ``logp``,
    ``logq`` (P, S) and ``actions`` (P,) of its masked positions; ``knn`` (V, k1) uint16 or int32
    from ``CostGraph.knn_narrow``, ``w`` (V, k1) float32 from ``paper.paper_kernel_weights``,
    ``mutual`` (V, k1) bool from ``paper.paper_mutual`` and ``back_live`` from
    ``paper.paper_reverse_live``."""
    P = ids.shape[0]
    res = np.zeros((P, 7), dtype=np.float64)
    inside, size, rowsum = _batch_support(ids, valid, actions, knn, w, mutual, pad_id, eos_id)
    if use_batch_kernel(size, P, ids.shape[1], knn.shape[1]):
        bpos, batch = _batch_kernel(inside, knn, w, back_live)
    else:
        bpos, batch = np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    chunks = chunk_bounds(P, threads)
    # eps as float64 (the OT value's entropy terms) and, inside, as float32 (the iteration)
    eps = np.array([epsilon, epsilon], dtype=np.float64)
    args = (ids, valid, logp, logq, actions, inside, size, rowsum, knn, w, back_live, bpos, batch,
            eps, int(max_iter), np.float32(tol), chunks, res)  # fmt: skip
    launch(_solve_parallel, _solve_serial, threads, P, *args)
    return int(size), {
        "iterations": res[:, 0].astype(np.int64),
        "converged": res[:, 1] > 0,
        "marginal_error": res[:, 2].astype(np.float32),
        "f_action": res[:, 3].astype(np.float32),
        "f_mean": res[:, 4].astype(np.float32),
        "value": res[:, 5],
        "infeasible": res[:, 6] > 0,
    }
