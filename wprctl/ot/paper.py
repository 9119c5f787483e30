"""``paper``: a faithful, fast reproduction of the official ``sparse_sinkhorn_sequence_topk``.

What it reproduces (float32 throughout, like the official trainer):

* Support: the union over the whole batch of the top-k2 tokens of both distributions at the
  active positions, plus the actions (from ``start`` on when given, else at the active positions),
  with ``pad_id`` removed and ``eos_id`` added, sorted. One dust bin holds 1 - a(support)
  (clamped at 0) and maps only to itself (kernel 1).
* Kernel: float32 exp(-C/eps) on the symmetric kNN graph restricted to the support, 1 on the
  diagonal.
* Sinkhorn from u = v = 1: u = a / (K v + 1e-16), v = b / (K^T u + 1e-16), at most ``max_iter``
  iterations, a position stops once max |u_new - u_old| <= tol (exactly the official test: it
  keeps iterating while the change is > tol, so a NaN change stops it).
* Raw penalty eps * log(u + 1e-16) at the action (the dust bin if the action is outside the
  support); inactive positions keep u = 1, i.e. 0.

What differs from the official code is only how it is computed:

* the float32 kernel on the kNN lists is computed once per (graph, epsilon) and kept with the
  graph; restricting it to a batch's support is a gather over the support tokens' kNN lists
  (Ns * k1) and one sort of the kept edges, never a pass over the whole vocabulary's edges
  (the official code scans all V * k1 kernel entries on every call);
* the kernel is a CSR matrix shared by all positions, with int32 indices when they fit, split
  into column tiles (``SupportKernel``); entries that underflow to exactly 0 are dropped
  (adding 0 * finite is exact);
* the scalings are stored in column blocks (C, n, w): block c holds positions c*w .. c*w+w-1 as
  an (n, w) row-major matrix, so each half iteration is one CSR @ dense product per block and
  tile. A block row of 32 floats is two cache lines, and a tile's rows of a block fit in the
  core's L2: each kernel entry costs one short vector multiply-add on cached data, where one
  product on all positions at once streams a (support x positions) matrix through memory for
  every kernel row (3x slower at 32k tokens and 512 positions on the benchmark CPU);
* converged positions are removed from the working set (the blocks are repacked);
* with the top-k compressed input (``TopKPair``: a position has mass only on its own <= 2k + 1
  tokens) each position is solved on its own tokens (``local_problems``), which is the same
  iteration with the exact zeros of the batch-wide support left out (0.3 s instead of 60 s at
  32k tokens, k1 = 256, k2 = 128 and 512 positions).

Results agree with the official code's to float32 rounding. The dust mass 1 - a(support) is a
difference of nearly equal numbers, so the order of its float32 sum shows in the dust bin's
potential (the raw penalty of an action outside the support, and the centering) at a relative
1e-6..1e-5 after 10-50 iterations, more after hundreds (the truncated problems are infeasible
and the potentials drift); the sums here run over (positions, support) rows as in the
official code.

Known properties (the reason ``wellposed`` exists): the dust bin only talks to itself and mass
moves only along kNN edges, so the truncated problem is usually infeasible, and a fixed 10-20
iterations do not converge. ``infeasible`` is detected (a lower bound on infeasibility) as
tail_a != tail_b or a token whose mass exceeds the other side's mass in its closed neighbourhood.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from wprctl.ot.graph import CostGraph

_TINY = 1e-16  # the official code's guards in the denominators and the log
_SLACK = 1e-6  # mass tolerance of the infeasibility test
# Positions per column block (see the module docstring). Measured at 32k tokens, k1 = 256 and
# 512 positions on one core: 16 and 32 are equally fast, 4 and 8 clearly slower, one block of
# all 512 positions 1.7-2x slower.
_BLOCK = 32
# Bytes of a column block that one kernel tile reads (see SupportKernel): a quarter of this
# machine's 1 MiB per-core L2; 128-512 KiB measured within 10% of each other at 32 positions.
_TILE_BYTES = 2**18


# ------------------------------------------------------------------------------------ kernel


def paper_kernel_weights(graph: CostGraph, epsilon: float, device: torch.device) -> torch.Tensor:
    """exp(-C/eps) on the kNN lists, (V, k1) float32: ``exp(-(C_float32 / eps))`` is the official
    kernel's float32 formula. Cached on the graph: every call would otherwise convert the float64
    costs and take the exponential again."""
    return graph.derived(
        ("paper_kernel_weights", str(device), float(epsilon)),
        lambda: torch.exp(-(graph.on(device)["knn_cost"].to(torch.float32) / epsilon)),
    )


def paper_knn_kernel(
    graph: CostGraph, epsilon: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kNN lists (V, k1) as int32 when V fits (an index type of ``index_select``; cached once
    per device, whatever epsilon) and ``paper_kernel_weights``. The compiled solver reads
    ``CostGraph.knn_narrow`` instead and needs only the weights."""

    def ids() -> torch.Tensor:
        knn = graph.on(device)["knn"]
        return knn.to(torch.int32) if graph.num_tokens < 2**31 else knn

    knn = graph.derived(("paper_knn_ids", str(device)), ids)
    return knn, paper_kernel_weights(graph, epsilon, device)


@dataclass
class SupportKernel:
    """The kernel on the support, (n, n) with n = Ns + 1, as CSR column tiles.

    Tile t holds columns ``lo:hi`` of the kernel as an (n, hi - lo) CSR matrix, so K x is the
    sum over tiles of tile @ x[lo:hi]: the rows of x one tile reads (hi - lo rows of a column
    block) stay in the core's cache while its kernel entries stream by. Measured at 32k tokens,
    k1 = 256, 512 positions: 16 tiles of about 2000 columns make the product 1.5x faster than one
    CSR matrix. Small supports are one tile.
    """

    n: int
    tiles: list[tuple[int, int, torch.Tensor]]

    def matmul(self, xb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """K @ each column block of ``xb`` (C, n, w) into ``out`` (same shape)."""
        for c in range(xb.shape[0]):
            x, o = xb[c], out[c]
            lo, hi, tile = self.tiles[0]
            torch.mm(tile, x[lo:hi], out=o)
            for lo, hi, tile in self.tiles[1:]:
                torch.addmm(o, tile, x[lo:hi], out=o)
        return out

    def pattern(self) -> SupportKernel:
        """The same sparsity pattern with every entry 1 (the infeasibility test's adjacency)."""
        tiles = [
            (lo, hi, _csr(t.crow_indices(), t.col_indices(), torch.ones_like(t.values()), t.shape))
            for lo, hi, t in self.tiles
        ]
        return SupportKernel(self.n, tiles)


def support_kernel(
    graph: CostGraph, support: torch.Tensor, epsilon: float, tile_cols: int | None = None
) -> SupportKernel:
    """float32 kernel on the sorted ``support`` plus a self-only dust bin, in column tiles of
    ``tile_cols`` columns (one tile when None).

    The in-support edges are found from the support tokens' directed kNN lists (k1 per token)
    and symmetrized, which is the graph's definition: cheaper than walking the symmetric CSR rows,
    whose hub tokens have tens of thousands of entries. One sort of the keys (tile, row, column)
    removes the edges found from both ends and orders every tile's CSR entries at once.
    """
    device = support.device
    n = support.numel() + 1
    tw = n if tile_cols is None else max(1, min(n, int(tile_cols)))
    T = -(-n // tw)
    # int32 keys sort about 1.5x faster than int64 ones
    itype = torch.int32 if T * tw * n < 2**31 else torch.int64
    knn, w = paper_knn_kernel(graph, epsilon, device)
    k1 = knn.shape[1]
    slot = torch.full((graph.num_tokens,), -1, dtype=itype, device=device)
    slot[support] = torch.arange(n - 1, dtype=itype, device=device)
    # index_select, not advanced indexing: several times faster for 1-D gathers on CPU
    hit = slot.index_select(0, knn.index_select(0, support).view(-1))  # (Ns * k1,) slot or -1
    flat = (hit >= 0).nonzero().squeeze(1)
    j = hit.index_select(0, flat)  # the directed edges r -> j inside the support
    r = flat // k1
    vals = w.view(-1).index_select(0, support.index_select(0, r) * k1 + (flat - r * k1))
    r = r.to(itype)
    live = vals > 0  # exp underflowed to 0: adding 0 * v is exact, so the entry is dropped
    if not bool(live.all()):
        r, j, vals = r[live], j[live], vals[live]
    diag = torch.arange(n, dtype=itype, device=device)
    rows, cols = torch.cat([r, j, diag]), torch.cat([j, r, diag])
    vals = torch.cat([vals, vals, torch.ones(n, dtype=torch.float32, device=device)])
    tile = cols // tw
    col = cols - tile * tw
    key = (tile * n + rows) * tw + col
    # an edge found from both ends appears twice (mutual kNN): keep the first, i.e. the value
    # from the row's own kNN list (stable sort, so the choice does not depend on the sort)
    order = _stable_order([col, rows] if T == 1 else [col, rows, tile], n)
    if order is None:
        key, order = torch.sort(key, stable=True)
    else:
        key = key.index_select(0, order)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    key, vals = key[first], vals.index_select(0, order[first])
    # row starts of every (tile, row), i.e. the concatenated crow arrays of all tiles
    bounds = torch.arange(T * n + 1, dtype=itype, device=device) * tw
    crow = torch.searchsorted(key, bounds, out_int32=itype == torch.int32)
    local = key % tw
    tiles = []
    for t in range(T):
        c = crow[t * n : (t + 1) * n + 1]
        a, b = int(c[0]), int(c[-1])
        lo, hi = t * tw, min(n, (t + 1) * tw)
        tiles.append((lo, hi, _csr(c - a, local[a:b], vals[a:b], (n, hi - lo))))
    return SupportKernel(n, tiles)


def _stable_order(keys: list[torch.Tensor], bound: int) -> torch.Tensor | None:
    """Stable order by ``keys`` (least significant first, all in [0, bound)) for small inputs
    on CPU, else None.

    NumPy's stable argsort of 16-bit integers is a radix sort: one pass per key takes 0.3 ms
    where torch.sort of the combined keys takes about 1 ms for 20k keys on the benchmark
    machine, whatever their dtype (a tenth of a small call). For millions of keys the passes'
    gathers cost more than torch.sort saves, so only up to 2**18 keys. Same order as the
    stable sort of the combined key.
    """
    if bound >= 2**15 or keys[0].numel() > 2**18 or keys[0].device.type != "cpu":
        return None
    order = None
    for k in keys:
        k16 = k.to(torch.int16).numpy()
        if order is not None:
            k16 = k16[order]
        step = np.argsort(k16, kind="stable")
        order = step if order is None else order[step]
    return torch.from_numpy(order)


def _csr(
    crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, cols, vals, size=size, check_invariants=False)


def paper_support(
    top_ids: torch.Tensor, extra_ids: torch.Tensor, pad_id: int, eos_id: int
) -> torch.Tensor:
    """Sorted batch-wide support: unique(top ids, extra ids) - {pad} + {eos}."""
    ids = torch.cat([top_ids.reshape(-1), extra_ids.reshape(-1)])
    ids = ids[ids != pad_id]
    eos = torch.tensor([eos_id], dtype=ids.dtype, device=ids.device)
    return torch.unique(torch.cat([ids, eos]))


# ------------------------------------------------------------------------------ column blocks


def _to_blocks(x: torch.Tensor, width: int) -> torch.Tensor:
    """(W, n) position-major rows -> (C, n, width) blocks; missing positions are zero columns."""
    W, n = x.shape
    C = -(-W // width)
    if C * width != W:
        x = torch.cat([x, x.new_zeros(C * width - W, n)])
    return x.view(C, width, n).transpose(1, 2).contiguous()


def _columns(xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Positions ``idx`` (packed order) of blocks ``xb`` as (len(idx), n) rows."""
    width = xb.shape[2]
    return xb[idx // width, :, idx % width]


def block_width(P: int) -> int:
    """Positions per column block for P positions."""
    return P if P <= _BLOCK else _BLOCK


def tile_columns(P: int) -> int:
    """Kernel tile width (``support_kernel``'s ``tile_cols``) for blocks of P positions."""
    return max(1, _TILE_BYTES // (4 * max(1, block_width(P))))


# ---------------------------------------------------------------------------------- sinkhorn


def paper_sinkhorn(
    K: SupportKernel,
    a: torch.Tensor,
    b: torch.Tensor,
    action_rows: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
    *,
    centered: bool = False,
    value: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the official iteration for P positions; ``a``, ``b``: (P, Ns+1) float32, dust last.

    Returns per position: ``f_action`` = eps*log(u+1e-16) at row ``action_rows``; ``f_mean`` =
    sum_i a_i f_i (float32; when ``centered``); ``value`` = <a,f> + <b,g> - eps(<a,log a> +
    <b,log b>) in float64 (when ``value``); the iterations run; the L1 error of the a-marginal
    after the last update (the b-marginal is exact then); converged flags and an infeasibility
    flag (see the module docstring).
    """
    P = a.shape[0]
    dev = a.device
    iters = torch.zeros(P, dtype=torch.long, device=dev)
    converged = torch.zeros(P, dtype=torch.bool, device=dev)
    out: dict[str, torch.Tensor] = {"iterations": iters, "converged": converged}
    if P == 0:
        empty = a.new_zeros(0)
        out.update(f_action=empty, marginal_error=empty, infeasible=converged.clone())
        if centered:
            out["f_mean"] = empty
        if value:
            out["value"] = empty.double()
        return out
    w0 = block_width(P)
    A, B = _to_blocks(a, w0), _to_blocks(b, w0)  # padding positions have a = b = 0
    # working set: positions gid (packed in that order) with their blocks
    gid = torch.arange(P, device=dev)
    Aw, Bw = A, B
    Uw, Vw = torch.ones_like(A), torch.ones_like(B)
    buf = torch.empty_like(A)
    U = V = None  # final scalings of all positions, filled when positions leave the working set
    ran = 0
    for _ in range(max_iter):
        torch.div(Aw, K.matmul(Vw, buf).add_(_TINY), out=buf)  # u_new
        # the old u is not needed after the change test: its storage takes the difference
        delta = torch.sub(buf, Uw, out=Uw).abs_().amax(dim=1).view(-1)[: gid.numel()]
        Uw, buf = buf, Uw
        torch.div(Bw, K.matmul(Uw, buf).add_(_TINY), out=Vw)  # K is symmetric: K^T u = K u
        ran += 1
        done = ~(delta > tol)
        if not bool(done.any()):
            continue
        finished = gid[done]
        converged[finished] = True
        iters[finished] = ran
        if U is None:
            U, V = torch.ones_like(A), torch.ones_like(B)
        U, V = _put(U, V, finished, Uw, Vw, done.nonzero().squeeze(1))
        rest = (~done).nonzero().squeeze(1)
        gid = gid[rest]
        if gid.numel() == 0:
            break
        width = block_width(gid.numel())
        Aw, Bw, Uw, Vw = (_to_blocks(_columns(x, rest), width) for x in (Aw, Bw, Uw, Vw))
        buf = torch.empty_like(Uw)
    iters[gid] = ran  # the positions still working ran every iteration
    if U is None:  # nobody stopped early: the working blocks are all positions, in order
        U, V = Uw, Vw
    elif gid.numel():
        U, V = _put(U, V, gid, Uw, Vw, torch.arange(gid.numel(), device=dev))
    del Aw, Bw, Uw, Vw
    if buf.shape != A.shape:  # the scratch block of a repacked working set
        buf = torch.empty_like(A)

    def per_position(x: torch.Tensor) -> torch.Tensor:  # (C, w) -> (P,)
        return x.reshape(-1)[:P]

    KV = K.matmul(V, buf)
    out["marginal_error"] = per_position((U * KV - A).abs_().sum(1))
    KV = None
    pos = torch.arange(P, device=dev)
    out["f_action"] = epsilon * torch.log(U[pos // w0, action_rows, pos % w0] + _TINY)
    if centered or value:
        f = torch.log(U.add_(_TINY)).mul_(epsilon)  # U is not needed any more
        if centered:
            out["f_mean"] = per_position((A * f).sum(1))
        if value:
            g = torch.log(V + _TINY).mul_(epsilon)
            a64, b64 = A.double(), B.double()
            out["value"] = per_position(
                (a64 * f.double()).sum(1)
                + (b64 * g.double()).sum(1)
                - epsilon
                * (torch.special.xlogy(a64, a64).sum(1) + torch.special.xlogy(b64, b64).sum(1))
            )
    pattern = K.pattern()
    over_a = pattern.matmul(B, buf).add_(_SLACK) < A  # a_i > b(closed neighbourhood) + slack
    over_b = pattern.matmul(A, buf).add_(_SLACK) < B
    hall = (over_a | over_b)[:, :-1].any(1)
    tails = (A[:, -1] - B[:, -1]).abs() > _SLACK
    out["infeasible"] = per_position(hall | tails)
    return out


def _put(
    U: torch.Tensor,
    V: torch.Tensor,
    dst: torch.Tensor,
    Uw: torch.Tensor,
    Vw: torch.Tensor,
    src: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the working positions ``src`` (packed order) into positions ``dst`` of U, V."""
    w0 = U.shape[2]
    U[dst // w0, :, dst % w0] = _columns(Uw, src)
    V[dst // w0, :, dst % w0] = _columns(Vw, src)
    return U, V


# ------------------------------------------------------------------ per-position problems


def _reverse_entries(knn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every kNN entry i -> j = knn[i, c]: whether j's list holds i (the edge is mutual), and
    the flat index j * k1 + c' of that reverse entry (meaningless where it is not mutual)."""
    V, k1 = knn.shape
    device = knn.device
    rows = torch.arange(V, device=device).unsqueeze(1)
    # keys i * V + j of the edges, sorted (sorting each row of ids sorts them all), looked up
    # among the sorted keys of the reversed edges: sorted queries keep the binary searches
    # cache-friendly (3x faster than querying in kNN order at 32k x 256)
    ids, order = knn.sort(dim=1)
    keys = (rows * V + ids).view(-1)
    reverse, where = torch.sort((knn * V + rows).view(-1))
    at = torch.searchsorted(reverse, keys).clamp_max(reverse.numel() - 1)
    found = (reverse.index_select(0, at) == keys).view(V, k1)
    back = where.index_select(0, at).view(V, k1)
    return (
        torch.empty_like(found).scatter_(1, order, found),
        torch.empty_like(back).scatter_(1, order, back),
    )


def paper_mutual(graph: CostGraph, device: torch.device) -> torch.Tensor:
    """(V, k1) bool: the kNN edge i -> knn[i, c] is mutual (i is also in knn[knn[i, c]]).

    Cached on the graph. With it, each undirected in-support edge can be counted once without
    sorting the edges (``local_problems``' row sums).
    """
    return graph.derived(
        ("paper_mutual", str(device)), lambda: _reverse_entries(graph.on(device)["knn"])[0]
    )


def paper_reverse_live(graph: CostGraph, epsilon: float, device: torch.device) -> torch.Tensor:
    """(V, k1) bool: the kNN edge i -> j = knn[i, c] is mutual AND j's own entry for it has a
    live (nonzero) float32 kernel value.

    Cached on the graph per epsilon. Row j of a position's kernel takes the value of edge (j, i)
    from j's own kNN list when that entry is live, else from i's list: so an entry i -> j adds
    itself to row j exactly when this flag is False, and every kernel entry is found once, with
    no duplicates to sort out (``paper_cpu``).
    """

    def build() -> torch.Tensor:
        w = paper_kernel_weights(graph, epsilon, device)
        mutual, back = _reverse_entries(graph.on(device)["knn"])
        return mutual & (w.reshape(-1).index_select(0, back.view(-1)).view_as(w) > 0)

    return graph.derived(("paper_reverse_live", str(device), float(epsilon)), build)


@dataclass
class LocalProblems:
    """P independent problems, one per position, each on the position's own tokens + a dust bin.

    Row p * m + s of the block-diagonal ``kernel`` is slot s of position p (m = S + 1 slots: the
    S token slots of the position, then its dust bin); slots that hold no token of the support
    (duplicate ids, the pad id) only have their diagonal 1 and get no mass.
    """

    kernel: torch.Tensor  # (P * m, P * m) float32 CSR
    slots: torch.Tensor  # (P, m) bool: slots of the official problem (own tokens, dust bin)
    first_rowsum: torch.Tensor  # (P, m) float32: (K 1) over the whole batch support (iteration 1)
    outside: torch.Tensor  # (P,) bool: the batch support has tokens outside this position's


def _support_neighbours(graph: CostGraph, support: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
    """(Ns, k1): the support slot of every kNN neighbour of the support tokens, Ns (a sentinel)
    when the neighbour is outside the support."""
    Ns = support.numel()
    slot = torch.full((graph.num_tokens,), Ns, dtype=torch.int32, device=support.device)
    slot[support] = torch.arange(Ns, dtype=torch.int32, device=support.device)
    return slot.index_select(0, knn.index_select(0, support).view(-1)).view(Ns, knn.shape[1])


def first_row_sums(
    graph: CostGraph, support: torch.Tensor, ids: torch.Tensor, own: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the per-position problems take from the batch support (``local_problems``): the
    first u-update's K 1 per slot (P, S + 1), and whether the batch support has tokens outside
    the position (P,)."""
    device = ids.device
    P, S = ids.shape
    knn, w = paper_knn_kernel(graph, epsilon, device)
    Ns = support.numel()
    nb = _support_neighbours(graph, support, knn)
    inside = nb < Ns
    # Row sums of the batch-support kernel: 1 (diagonal) + every in-support edge once. A mutual
    # edge is found from both ends and counted at its source only, with the value from the
    # source's own kNN list, as ``support_kernel`` keeps it. Dense masked sums over the
    # (Ns, k1) lists: no list of the (mostly present) edges is built.
    w_s = w.index_select(0, support)
    one_way = inside & ~paper_mutual(graph, device).index_select(0, support)
    rowsum = torch.ones(Ns + 1, dtype=torch.float32, device=device)
    rowsum[:Ns] += torch.where(inside, w_s, 0.0).sum(1)
    rowsum.index_add_(0, nb.view(-1), torch.where(one_way, w_s, 0.0).view(-1))
    bslot = torch.searchsorted(support, ids).clamp_max(max(Ns - 1, 0))  # valid where ``own``
    first_rowsum = torch.ones(P, S + 1, dtype=torch.float32, device=device)
    first_rowsum[:, :S] = torch.where(own, rowsum[bslot], first_rowsum[:, :S])
    return first_rowsum, own.sum(1) < Ns


def local_problems(
    graph: CostGraph,
    support: torch.Tensor,
    ids: torch.Tensor,
    own: torch.Tensor,
    epsilon: float,
) -> LocalProblems:
    """The per-position problems equivalent to the batch-support problem when masses are sparse.

    ``ids`` (P, S): each position's token ids, sorted; ``own`` (P, S): the slots holding a token
    of ``support`` (not a duplicate, not the pad id unless it is also eos), the only slots with
    mass.

    Why this is the same computation: where a = 0, u = a / (K v + 1e-16) is exactly 0, and where
    b = 0, v is exactly 0, from the first iteration on. So after the first u-update K u and K v
    only see the position's own tokens, and the products on the batch support add exact zeros.
    Only two things depend on the rest of the batch support: the first u-update divides by
    K 1 (v starts at 1 everywhere), taken here from the batch-support kernel's row sums; and
    the first change max |u_new - u_old| is 1 when a token of the batch support is not the
    position's own (u goes from 1 to 0 there).
    """
    device = ids.device
    P, S = ids.shape
    m = S + 1
    first_rowsum, outside = first_row_sums(graph, support, ids, own, epsilon)
    knn, w = paper_knn_kernel(graph, epsilon, device)
    k1 = knn.shape[1]
    Ns = support.numel()
    nb = _support_neighbours(graph, support, knn)
    bslot = torch.searchsorted(support, ids).clamp_max(max(Ns - 1, 0))  # valid where ``own``
    # Rows of ``nb`` (the slot of every kNN neighbour of the support tokens, Ns when outside)
    # for each slot: its token's neighbours, or all-sentinel for empty slots.
    nbx = torch.cat([nb, torch.full((1, k1), Ns, dtype=nb.dtype, device=device)])
    rows = torch.where(own, bslot, Ns)
    ltype = torch.int16 if S < 2**15 else torch.int32
    # Edges inside each position: the kNN neighbours of its own tokens that are its own tokens.
    # A chunk of positions gets a table of its slot of every batch-support token (-1: not its
    # own; column Ns: the sentinel), and all S * k1 neighbours are looked up at once: few are
    # inside, so one gather and one search of a sparse mask, no list of candidates.
    parts = []
    # positions per chunk: the lookups and the table stay a few 10 MB (and int32-indexable)
    step = max(1, min(2**22 // (S * k1), 2**24 // (Ns + 1)))
    for lo in range(0, P, step):
        hi = min(P, lo + step)
        c = hi - lo
        local = torch.full((c, Ns + 1), -1, dtype=ltype, device=device)
        mine = own[lo:hi]
        pos = torch.arange(c, device=device).unsqueeze(1).expand(c, S)
        slots = torch.arange(S, device=device, dtype=ltype).expand(c, S)
        local[pos[mine], bslot[lo:hi][mine]] = slots[mine]
        nbc = nbx.index_select(0, rows[lo:hi].reshape(-1)).view(c, S * k1)
        off = torch.arange(c, dtype=nbc.dtype, device=device).unsqueeze(1) * (Ns + 1)
        t = local.view(-1).index_select(0, (nbc + off).view(-1))
        flat = (t >= 0).nonzero().squeeze(1)  # into the chunk's (positions, S, k1)
        ps = flat // k1 + lo * S  # position * S + slot
        vals = w.view(-1).index_select(0, ids.reshape(-1).index_select(0, ps) * k1 + flat % k1)
        live = vals > 0  # underflowed entries are dropped, as in ``support_kernel``
        parts.append((ps[live], t.index_select(0, flat[live]).long(), vals[live]))
    ps, t, vals = (torch.cat(x) for x in zip(*parts, strict=True))
    p, s = ps // S, ps % S
    diag = torch.arange(P * m, device=device)
    rows = torch.cat([p * m + s, p * m + t, diag])
    cols = torch.cat([t, s, diag % m])  # slot within the position
    vals = torch.cat([vals, vals, torch.ones(P * m, dtype=torch.float32, device=device)])
    # Sorted keys (row, slot) order the CSR; a mutual edge found from both ends is kept once,
    # with the row's own kNN value (stable sort), as in ``support_kernel``.
    itype = torch.int32 if P * m * m < 2**31 else torch.int64
    key, order = torch.sort((rows * m + cols).to(itype), stable=True)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    key, vals = key[first], vals.index_select(0, order[first])
    crow = torch.searchsorted(
        key, torch.arange(P * m + 1, dtype=itype, device=device) * m, out_int32=itype == torch.int32
    )
    row = key // m
    cols = row - row % m + key % m  # the slot's column in the block of its position
    kernel = _csr(crow, cols, vals, (P * m, P * m))
    slots = torch.ones(P, m, dtype=torch.bool, device=device)
    slots[:, :S] = own
    return LocalProblems(kernel, slots, first_rowsum, outside)


def paper_sinkhorn_local(
    lp: LocalProblems,
    a: torch.Tensor,
    b: torch.Tensor,
    action_rows: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
    *,
    centered: bool = False,
    value: bool = False,
) -> dict[str, torch.Tensor]:
    """``paper_sinkhorn`` on ``local_problems``: ``a``, ``b`` (P, m), 0 off the own slots, with
    the dust bin last.

    ``action_rows`` (P,): the action's slot, or -1 for a batch-support token that is not one of
    the position's own (u is 0 there from the first iteration on). Same outputs. Converged
    positions are frozen rather than removed: the kernel is block-diagonal, so the others'
    updates do not see them, and one product on all blocks costs little.
    """
    P, m = a.shape
    dev = a.device
    K = lp.kernel

    def matvec(x: torch.Tensor) -> torch.Tensor:
        return torch.mm(K, x.reshape(-1, 1)).view(P, m)

    iters = torch.zeros(P, dtype=torch.long, device=dev)
    converged = torch.zeros(P, dtype=torch.bool, device=dev)
    out: dict[str, torch.Tensor] = {"iterations": iters, "converged": converged}
    # u = v = 1 on the official problem's tokens (own slots and the dust bin); the empty slots
    # are 0 and stay 0 (no mass, no edges), so they never change the maximum change
    u = lp.slots.to(torch.float32)
    v = u.clone()
    active = torch.ones(P, dtype=torch.bool, device=dev)
    for it in range(max_iter):
        den = lp.first_rowsum if it == 0 else matvec(v)
        u_new = a / (den + _TINY)
        delta = (u_new - u).abs().amax(dim=1)
        if it == 0:  # the batch-support tokens outside the position: u goes from 1 to 0
            delta = torch.where(lp.outside, delta.clamp_min(1.0), delta)
        v_new = b / (matvec(u_new) + _TINY)
        if bool(active.all()):
            u, v = u_new, v_new
        else:
            u = torch.where(active.unsqueeze(1), u_new, u)
            v = torch.where(active.unsqueeze(1), v_new, v)
        iters += active.long()
        done = active & ~(delta > tol)
        converged |= done
        active &= ~done
        if not bool(active.any()):
            break
    out["marginal_error"] = (u * matvec(v) - a).abs().sum(1)
    at = u.gather(1, action_rows.clamp_min(0).unsqueeze(1)).squeeze(1)
    at = torch.where(action_rows >= 0, at, torch.zeros_like(at))
    out["f_action"] = epsilon * torch.log(at + _TINY)
    if centered or value:
        f = torch.log(u + _TINY).mul_(epsilon)
        if centered:
            out["f_mean"] = (a * f).sum(1)
        if value:
            g = torch.log(v + _TINY).mul_(epsilon)
            a64, b64 = a.double(), b.double()
            out["value"] = (
                (a64 * f.double()).sum(1)
                + (b64 * g.double()).sum(1)
                - epsilon
                * (torch.special.xlogy(a64, a64).sum(1) + torch.special.xlogy(b64, b64).sum(1))
            )
    pattern = _csr(K.crow_indices(), K.col_indices(), torch.ones_like(K.values()), K.shape)

    def adjacent_mass(x: torch.Tensor) -> torch.Tensor:
        return torch.mm(pattern, x.reshape(-1, 1)).view(P, m)

    over_a = adjacent_mass(b).add_(_SLACK) < a
    over_b = adjacent_mass(a).add_(_SLACK) < b
    hall = (over_a | over_b)[:, :-1].any(1)
    out["infeasible"] = hall | ((a[:, -1] - b[:, -1]).abs() > _SLACK)
    return out
