"""``compress_topk``'s support selection compiled for the CPU: top-k(a) U top-k(b) U {y} per row.

``torch.topk`` on the CPU partially sorts each row: ~10 us a row at V = 1k and ~100-200 us at
V = 32k, as much as the rest of the compression. Here, per row:

1. the maxima of narrow blocks (V / 4k of them); the k-th largest of those bounds the row's
   k-th largest entry from below (k blocks hold an entry at least that large), and only the
   blocks whose maximum reaches the bound can hold a top-k entry: a few k candidates;
2. the exact k-th largest value among the candidates, by quickselect;
3. the candidates above it, and the ties at it by increasing id, in id order (no sort);
4. the two sorted lists and the action merged into the sorted support, duplicates kept, where
   the tensor version concatenates and sorts.

Measured: 2x torch at V = 1k, 2.5-3x at V = 32k. A bounded min-heap scan (one comparison per
entry, ~k log(V/k) heap updates) was no faster than torch: its sift-downs are mispredicted
branches, as a branching quickselect's partition is (see ``_kth_largest``).

Ranking: by value, ties by the lower token id (a total order, so the result is well defined where
``torch.topk`` leaves ties unspecified). Logits are finite or -inf (``compress_topk`` rejects NaN
and +inf before this runs).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from wprctl.ot.compiled import OPTS, chunk_bounds, launch


@njit(**OPTS)
def _kth_largest(v, n, k, work):
    """The k-th largest of v[:n] (1 <= k <= n), by quickselect on a copy in ``work``.

    The partition is branch-free (a Lomuto pass that always swaps and advances by the comparison):
    which side an entry goes to is a coin flip, which a branch would mispredict half the time.
    numba's np.partition is ~5x slower on a few hundred entries."""
    for i in range(n):
        work[i] = v[i]
    lo, hi, t = 0, n, k - 1  # the t-th largest of work[lo:hi]
    while hi - lo > 1:
        a, b, c = work[lo], work[(lo + hi) // 2], work[hi - 1]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        # [lo, big): > pivot; then [big, eq): == pivot; the rest < pivot
        big = lo
        for i in range(lo, hi):
            x = work[i]
            work[i] = work[big]
            work[big] = x
            big += x > pivot
        eq = big
        for i in range(big, hi):
            x = work[i]
            work[i] = work[eq]
            work[eq] = x
            eq += x == pivot
        if t < big:
            hi = big
        elif t < eq:
            return pivot
        else:
            lo = eq
    return work[lo]


@njit(**OPTS)
def _top_k(row, k, bm, cv, ci, work, out):
    """The ids of ``row``'s k best entries into ``out``, sorted by id; returns the best's id.
    ``bm``, ``cv``, ``ci``, ``work``: scratch of the row's length."""
    V = row.shape[0]
    # A lower bound on the k-th best: the k-th largest of the maxima of narrow blocks (k blocks
    # hold an entry at least that large). Only those blocks can hold candidates, a few k entries.
    # There are m >= min(V, 4k) > k blocks (k < V: compress_topk takes k >= V whole).
    width = max(1, V // (4 * k))
    m = -(-V // width)
    for b in range(m):
        top = row[b * width]
        for i in range(b * width + 1, min(V, (b + 1) * width)):
            top = max(top, row[i])
        bm[b] = top
    bound = _kth_largest(bm, m, k, work)
    n = 0
    for b in range(m):
        if bm[b] >= bound:
            for i in range(b * width, min(V, (b + 1) * width)):
                if row[i] >= bound:
                    cv[n], ci[n] = row[i], i
                    n += 1
    # the k-th best value; candidates above it all go in, equal ones by increasing id
    kth = _kth_largest(cv, n, k, work)
    above = 0
    for c in range(n):
        above += cv[c] > kth
    ties = k - above
    best, o = 0, 0
    for c in range(n):
        if cv[c] > kth or (cv[c] == kth and ties > 0):
            if cv[c] == kth:
                ties -= 1
            out[o] = ci[c]
            o += 1
        if cv[c] > cv[best]:
            best = c
    return ci[best]


@njit(**OPTS)
def _rows(x, z, y, k, ids, top, lo, hi):
    bm = np.empty(x.shape[1], dtype=x.dtype)
    work = np.empty(x.shape[1], dtype=x.dtype)
    cv = np.empty(x.shape[1], dtype=x.dtype)
    ci = np.empty(x.shape[1], dtype=np.int64)
    tx = np.empty(k, dtype=np.int64)
    tz = np.empty(k, dtype=np.int64)
    for r in range(lo, hi):
        top[r, 0] = _top_k(x[r], k, bm, cv, ci, work, tx)
        top[r, 1] = _top_k(z[r], k, bm, cv, ci, work, tz)
        # merge the two sorted lists and the action
        i = j = 0
        act = y[r]
        placed = False
        for o in range(2 * k + 1):
            nxt = tx[i] if i < k else np.iinfo(np.int64).max
            other = tz[j] if j < k else np.iinfo(np.int64).max
            if not placed and act <= nxt and act <= other:
                ids[r, o] = act
                placed = True
            elif nxt <= other:
                ids[r, o] = nxt
                i += 1
            else:
                ids[r, o] = other
                j += 1


@njit(parallel=True, **OPTS)
def _select_parallel(x, z, y, k, ids, top, chunks):
    for c in prange(chunks.shape[0] - 1):
        _rows(x, z, y, k, ids, top, chunks[c], chunks[c + 1])


@njit(**OPTS)
def _select_serial(x, z, y, k, ids, top, chunks):
    _rows(x, z, y, k, ids, top, 0, x.shape[0])


def select_support(
    x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: int, threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the (n, V) float32 CPU logits ``x`` (policy) and ``z`` (reference) with actions
    ``y`` (n,): the sorted ids of top-k(x), top-k(z) and y, duplicates kept, (n, 2k + 1) int64;
    and the argmax ids of x and z, (n, 2)."""
    n = x.shape[0]
    xn = np.ascontiguousarray(x.detach().numpy())
    zn = np.ascontiguousarray(z.detach().numpy())
    yn = np.ascontiguousarray(y.detach().numpy().astype(np.int64, copy=False))
    ids = np.empty((n, 2 * k + 1), dtype=np.int64)
    top = np.empty((n, 2), dtype=np.int64)
    chunks = chunk_bounds(n, threads, per_thread=4)
    launch(_select_parallel, _select_serial, threads, n, xn, zn, yn, k, ids, top, chunks)
    return torch.from_numpy(ids), torch.from_numpy(top)
