"""``compress_topk`` compiled for the CPU: one pass per row for the support top-k(a) U top-k(b) U
{y}, the log-probabilities there, the tail masses and the tail sums of p log p.

Support selection.

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
``torch.topk`` leaves ties unspecified). A row with NaN or +inf is reported, not ranked.

Softmax sums. Per row and side one pass for the max, one for s = sum exp(x - max) and
d = sum exp(x - max) (x - max) in float64 (lse = max + log s; sum p log p = d / s - log s, exact
where the tensor path's float32 p . x is off by up to ~3e-4 at V = 3000), with a vectorized
float32 exp (``_exp_shifted``). Measured on the demo's batch (207 positions, V = 967): the
whole compression 3.6 ms against 5.1-5.4 ms for this selection + the tensor ops, on one thread.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from wprctl.ot.compiled import OPTS, SUM_OPTS, VEC_OPTS, chunk_bounds, launch
from wprctl.ot.vecmath import f32_from_bits


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
def _gt(v, t):
    """max for NaN-free rows (what the rows ranked here are): a compare and a select, which
    vectorizes where numba's max with its NaN rules does not."""
    return v if v > t else t


@njit(**OPTS)
def _block_maxima(row, width, bm):
    """The maxima of ``row``'s blocks of ``width`` entries (the last may be short) into ``bm``.
    For a width that is a multiple of 8, eight running maxima side by side: one AVX register
    (a plain loop over a block of runtime width does not vectorize; 1.8x faster at V = 32k)."""
    V = row.shape[0]
    if width % 8:
        for b in range(-(-V // width)):
            top = row[b * width]
            for i in range(b * width + 1, min(V, (b + 1) * width)):
                top = _gt(row[i], top)
            bm[b] = top
        return
    full = V // width
    for b in range(full):
        lo = b * width
        t0, t1, t2, t3 = row[lo], row[lo + 1], row[lo + 2], row[lo + 3]
        t4, t5, t6, t7 = row[lo + 4], row[lo + 5], row[lo + 6], row[lo + 7]
        for i in range(lo + 8, lo + width, 8):
            t0, t1 = _gt(row[i], t0), _gt(row[i + 1], t1)
            t2, t3 = _gt(row[i + 2], t2), _gt(row[i + 3], t3)
            t4, t5 = _gt(row[i + 4], t4), _gt(row[i + 5], t5)
            t6, t7 = _gt(row[i + 6], t6), _gt(row[i + 7], t7)
        bm[b] = _gt(_gt(_gt(t0, t1), _gt(t2, t3)), _gt(_gt(t4, t5), _gt(t6, t7)))
    if full * width < V:
        top = row[full * width]
        for i in range(full * width + 1, V):
            top = _gt(row[i], top)
        bm[full] = top


@njit(**OPTS)
def _top_k(row, k, bm, cv, ci, work, out):
    """The ids of ``row``'s k best entries into ``out``, sorted by id. ``bm``, ``cv``, ``ci``,
    ``work``: scratch of the row's length. ``row`` is free of NaN."""
    V = row.shape[0]
    # A lower bound on the k-th best: the k-th largest of the maxima of narrow blocks (k blocks
    # hold an entry at least that large). Only those blocks can hold candidates, a few k entries.
    # There are m >= min(V, 4k) > k blocks (k < V: compress_topk takes k >= V whole).
    width = V // (4 * k)
    width = width // 8 * 8 if width >= 8 else max(1, width)
    m = -(-V // width)
    _block_maxima(row, width, bm)
    bound = _kth_largest(bm, m, k, work)
    n = 0
    for b in range(m):
        if bm[b] >= bound:
            for i in range(b * width, min(V, (b + 1) * width)):
                # branch-free: which entries pass is a coin flip in a block that reaches the bound
                v = row[i]
                cv[n], ci[n] = v, i
                n += v >= bound
    # the k-th best value; candidates above it all go in, equal ones by increasing id
    kth = _kth_largest(cv, n, k, work)
    above = 0
    for c in range(n):
        above += cv[c] > kth
    ties = k - above
    o = 0
    for c in range(n):
        if cv[c] > kth or (cv[c] == kth and ties > 0):
            if cv[c] == kth:
                ties -= 1
            out[o] = ci[c]
            o += 1


@njit(**OPTS)
def _select_row(xr, zr, act, k, bm, cv, ci, work, tx, tz, ids):
    """top-k(xr) U top-k(zr) U {act}, sorted with duplicates kept, into ``ids`` (2k + 1)."""
    _top_k(xr, k, bm, cv, ci, work, tx)
    _top_k(zr, k, bm, cv, ci, work, tz)
    # merge the two sorted lists and the action
    i = j = 0
    placed = False
    for o in range(2 * k + 1):
        nxt = tx[i] if i < k else np.iinfo(np.int64).max
        other = tz[j] if j < k else np.iinfo(np.int64).max
        if not placed and act <= nxt and act <= other:
            ids[o] = act
            placed = True
        elif nxt <= other:
            ids[o] = nxt
            i += 1
        else:
            ids[o] = other
            j += 1


# ------------------------------------------------------------------------------------ compress

_EXP_MIN = np.float32(-87.0)  # exp below this is under float32's normal range: taken as 0


@njit(**VEC_OPTS)
def _exp_shifted(row, m, e):
    """e = exp(row - m) in float32 (0 below _EXP_MIN), for a finite m >= every entry. numba has
    no vectorized exp without Intel's SVML, and the scalar libm call is 5x slower than this:
    Cephes' expf (2^k p(r) with t = k ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial; within
    1.5 ulp of exp(t)), free of calls, so it vectorizes. All in float32: with a float64 m the
    arithmetic would be float64 at half the vector width (2x slower, measured)."""
    m32 = np.float32(m)
    for i in range(row.shape[0]):
        ti = max(row[i] - m32, _EXP_MIN)
        k = np.floor(ti * np.float32(1.44269504) + np.float32(0.5))
        r = ti - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * (r * r) + r + np.float32(1.0)
        # k in [-125, 0] here, so 2^k is a normal float32 and so is the product
        two_k = f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
        e[i] = p * two_k if ti > _EXP_MIN else np.float32(0.0)  # -inf logits too


@njit(**SUM_OPTS)  # sums of finite terms only (t is clamped)
def _sum_and_dot(row, m, e):
    """sum e and sum e t in float64, t = row - m clamped at _EXP_MIN as in ``_exp_shifted`` (so
    e t is finite): recomputed, cheaper than storing it there."""
    m32 = np.float32(m)
    s = 0.0
    d = 0.0
    for i in range(row.shape[0]):
        s += e[i]
        d += e[i] * max(row[i] - m32, _EXP_MIN)
    return s, d


# float32 bit patterns as int32 keys that order like the floats (negative ones with their
# magnitude bits flipped): NaN lands above +inf (sign clear) or below -inf (sign set)
_KEY_PINF = np.int32(0x7F800000)
_KEY_NINF = np.int32(-0x7F800001)  # the key of the bits 0xFF800000


@njit(**OPTS)
def _row_max(row):
    """(max, usable): usable when the row is free of NaN and +inf and not all -inf.

    On integer keys: a max and a min of int32 vectorize where the float max with its NaN rules
    does not (4x faster on a 32k row, as fast as the sum of the row)."""
    bits = row.view(np.int32)
    hi = np.int32(-(2**31))
    lo = np.int32(2**31 - 1)
    for i in range(bits.shape[0]):
        b = bits[i]
        key = b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))
        hi = max(hi, key)
        lo = min(lo, key)
    usable = hi < _KEY_PINF and lo >= _KEY_NINF and hi > _KEY_NINF
    top = np.empty(1, dtype=np.int32)
    top[0] = hi ^ ((hi >> np.int32(31)) & np.int32(0x7FFFFFFF))
    return float(top.view(np.float32)[0]), usable


@njit(**OPTS)
def _gather_side(row, m, ids, lp, valid, e):
    """log-probabilities of the slots ``ids`` into ``lp``, for the row's max ``m``; returns the
    tail mass and the tail sum of p log p in float64 (the latter still to be checked by the
    caller). ``e``: scratch of the row's length."""
    _exp_shifted(row, m, e)
    s, d = _sum_and_dot(row, m, e)  # sum exp(x - m), sum exp(x - m) (x - m)
    lse = np.float32(m + np.log(s))
    total = d / s - np.log(s)  # sum over the vocabulary of p log p
    mass = 0.0
    plogp = 0.0
    for j in range(ids.shape[0]):
        lp[j] = row[ids[j]] - lse
        if valid[j]:
            q = np.exp(float(lp[j]))
            mass += q
            plogp += q * float(lp[j]) if q > 0 else 0.0
    return max(0.0, 1.0 - mass), total - plogp


@njit(**OPTS)
def _xlogx(t):
    return t * np.log(t) if t > 0 else 0.0


@njit(**OPTS)
def _compress_rows(x, z, y, k, support, full, ids, lp, lq, valid, slot, tails, bad, lo, hi):
    V = x.shape[1]
    bm = np.empty(V, dtype=x.dtype)
    work = np.empty(V, dtype=x.dtype)
    cv = np.empty(V, dtype=x.dtype)
    ci = np.empty(V, dtype=np.int64)
    tx = np.empty(max(k, 1), dtype=np.int64)
    tz = np.empty(max(k, 1), dtype=np.int64)
    e = np.empty(V, np.float32)
    S = ids.shape[1]
    for r in range(lo, hi):
        # a row without a softmax is reported before anything ranks it
        mx, ok_x = _row_max(x[r])
        mz, ok_z = _row_max(z[r])
        bad[r] = 0 if ok_x and ok_z else (1 if not ok_x else 2)
        if bad[r]:
            continue
        if support.shape[0]:
            ids[r] = support
        else:
            _select_row(x[r], z[r], y[r], k, bm, cv, ci, work, tx, tz, ids[r])
        valid[r, 0] = True
        for j in range(1, S):
            valid[r, j] = ids[r, j] != ids[r, j - 1]
        # the action's first slot (ids are sorted)
        at = 0
        while ids[r, at] != y[r]:
            at += 1
        slot[r] = at
        tp, sp = _gather_side(x[r], mx, ids[r], lp[r], valid[r], e)
        tq, sq = _gather_side(z[r], mz, ids[r], lq[r], valid[r], e)
        tails[r, 0], tails[r, 1] = tp, tq
        # a tail sum of x log x is <= 0 (masses <= 1): rounding can leave a tiny positive rest.
        # (Always finite here: -inf logits add 0, where the tensor path's float32 dot product
        # needs a fallback.) Without a tail, the lumped (tail mass) log (tail mass) of the
        # rounding rest, as the tensor path.
        tails[r, 2] = _xlogx(tp) if full else min(sp, 0.0)
        tails[r, 3] = _xlogx(tq) if full else min(sq, 0.0)


@njit(parallel=True, **OPTS)
def _compress_parallel(x, z, y, k, support, full, ids, lp, lq, valid, slot, tails, bad, chunks):
    for c in prange(chunks.shape[0] - 1):
        _compress_rows(x, z, y, k, support, full, ids, lp, lq, valid, slot, tails, bad, chunks[c],
                       chunks[c + 1])  # fmt: skip


@njit(**OPTS)
def _compress_serial(x, z, y, k, support, full, ids, lp, lq, valid, slot, tails, bad, chunks):
    _compress_rows(x, z, y, k, support, full, ids, lp, lq, valid, slot, tails, bad, 0, x.shape[0])


def compress_rows(
    x: torch.Tensor,
    z: torch.Tensor,
    y: torch.Tensor,
    k: int,
    support: torch.Tensor | None,
    full: bool,
    threads: int,
) -> dict[str, torch.Tensor]:
    """``compress_topk`` of the (n, V) float32 CPU logit rows ``x`` (policy) and ``z``
    (reference) with actions ``y`` (n,), in one pass per row: the slots (``support`` for every
    row, else the row's own top-k(x) U top-k(z) U {y}), both log-probabilities there, the valid
    flags, the action's slot, ``tails`` (n, 4) float64 = tail masses of a and b and tail sums of
    a log a and b log b, and ``bad`` (n,) int8: 1 or 2 where the policy or the reference row
    holds NaN or +inf or only -inf (its other outputs are then undefined)."""
    n = x.shape[0]
    xn = np.ascontiguousarray(x.detach().numpy())
    zn = np.ascontiguousarray(z.detach().numpy())
    yn = np.ascontiguousarray(y.detach().numpy().astype(np.int64, copy=False))
    sup = (
        np.empty(0, dtype=np.int64)
        if support is None
        else np.ascontiguousarray(support.numpy().astype(np.int64, copy=False))
    )
    S = 2 * k + 1 if support is None else sup.shape[0]
    out = {
        "ids": np.empty((n, S), dtype=np.int64),
        "logp": np.empty((n, S), dtype=np.float32),
        "logq": np.empty((n, S), dtype=np.float32),
        "valid": np.empty((n, S), dtype=np.bool_),
        "slot": np.empty(n, dtype=np.int64),
        "tails": np.empty((n, 4), dtype=np.float64),
        "bad": np.empty(n, dtype=np.int8),
    }
    chunks = chunk_bounds(n, threads, per_thread=4)
    launch(_compress_parallel, _compress_serial, threads, n, xn, zn, yn, k, sup, full,
           *out.values(), chunks)  # fmt: skip
    return {name: torch.from_numpy(v) for name, v in out.items()}
