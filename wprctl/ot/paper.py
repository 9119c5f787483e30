"""``paper``: a faithful, fast reproduction of the official ``sparse_sinkhorn_sequence_topk``.

What it reproduces (float32 throughout, like the official trainer):

* Support: the union over the whole batch of the top-k2 tokens of both distributions at the
  active positions, plus the actions (from ``start`` on when given, else at the active positions),
  with ``pad_id`` removed and ``eos_id`` added, sorted. One dust bin holds 1 - a(support)
  (clamped at 0) and maps only to itself (kernel 1).
* Kernel: float32 exp(-C/eps) on the symmetric kNN graph restricted to the support, 1 on the
  diagonal.
* Sinkhorn from u = v = 1: u = a / (K v + 1e-16), v = b / (K^T u + 1e-16), at most ``max_iter``
  iterations, a position stops once max |u_new - u_old| <= tol.
* Raw penalty eps * log(u + 1e-16) at the action (the dust bin if the action is outside the
  support); inactive positions keep u = 1, i.e. 0.

What differs from the official code is only how it is computed: the kernel is a CSR matrix
shared by all positions and the scalings are kept as (support, positions) so that each half
iteration is one sparse-dense matmul; kernel entries that underflow to exactly 0 are dropped
(adding 0 * finite is exact); converged positions are removed from the working set.

Known properties (the reason ``wellposed`` exists): the dust bin only talks to itself and mass
moves only along kNN edges, so the truncated problem is usually infeasible, and a fixed 10-20
iterations do not converge. ``infeasible`` is detected (a lower bound on infeasibility) as
tail_a != tail_b or a token whose mass exceeds the other side's mass in its closed neighbourhood.
"""

from __future__ import annotations

import warnings

import torch

from wprctl.ot.graph import CostGraph

_TINY = 1e-16  # the official code's guards in the denominators and the log


def support_kernel(graph: CostGraph, support: torch.Tensor, epsilon: float) -> torch.Tensor:
    """float32 CSR kernel (Ns+1, Ns+1) on the sorted ``support`` plus a self-only dust bin.

    The in-support edges are found from the support tokens' directed kNN lists (k1 per token)
    and symmetrized, which is the graph's definition: cheaper than walking the symmetric CSR rows,
    whose hub tokens have tens of thousands of entries. exp() is taken on the kept edges only.
    """
    device = support.device
    g = graph.on(device)
    Ns = support.numel()
    mapping = torch.full((graph.num_tokens,), -1, dtype=torch.long, device=device)
    mapping[support] = torch.arange(Ns, device=device)
    hit = mapping[g["knn"].index_select(0, support)]  # (Ns, k1) slot of each neighbour, or -1
    r, c = (hit >= 0).nonzero(as_tuple=True)
    j = hit[r, c]
    cost = g["knn_cost"].index_select(0, support)[r, c]
    # an edge found from both ends appears twice (same cost): keep one
    key = torch.cat([r * Ns + j, j * Ns + r])
    key, order = torch.sort(key)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    key, cost = key[first], torch.cat([cost, cost])[order[first]]
    vals = torch.exp(-(cost.to(torch.float32) / epsilon))
    keep = vals > 0  # exp underflowed to 0: adding 0 * v is exact, so the entry is dropped
    diag = torch.arange(Ns + 1, device=device)
    rows = torch.cat([key[keep] // Ns, diag])
    cols = torch.cat([key[keep] % Ns, diag])
    vals = torch.cat([vals[keep], torch.ones(Ns + 1, dtype=torch.float32, device=device)])
    order = torch.argsort(rows * (Ns + 1) + cols)
    crow = torch.zeros(Ns + 2, dtype=torch.long, device=device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=Ns + 1), 0)
    return _csr(crow, cols[order], vals[order], Ns + 1)


def _csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, cols, vals, size=(n, n), check_invariants=False)


def paper_support(
    top_ids: torch.Tensor, extra_ids: torch.Tensor, pad_id: int, eos_id: int
) -> torch.Tensor:
    """Sorted batch-wide support: unique(top ids, extra ids) - {pad} + {eos}."""
    ids = torch.cat([top_ids.reshape(-1), extra_ids.reshape(-1)])
    ids = ids[ids != pad_id]
    eos = torch.tensor([eos_id], dtype=ids.dtype, device=ids.device)
    return torch.unique(torch.cat([ids, eos]))


def paper_sinkhorn(
    K: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
) -> dict[str, torch.Tensor]:
    """Run the official iteration on columns of ``a``, ``b`` (Ns+1, P) (dust last).

    Returns f = eps*log(u+1e-16) and g (Ns+1, P), iterations, the L1 error of the a-marginal
    after the last update (the b-marginal is exact then), converged flags and an infeasibility
    flag (see the module docstring).
    """
    _n, P = a.shape
    u = torch.ones_like(a)
    v = torch.ones_like(b)
    iters = torch.zeros(P, dtype=torch.long, device=a.device)
    converged = torch.zeros(P, dtype=torch.bool, device=a.device)
    work = torch.arange(P, device=a.device)
    for _ in range(max_iter):
        if work.numel() == 0:
            break
        full = work.numel() == P
        a_w = a if full else a[:, work]
        b_w = b if full else b[:, work]
        u_old = u if full else u[:, work]
        v_w = v if full else v[:, work]
        u_new = a_w / (K @ v_w + _TINY)
        v_new = b_w / (K @ u_new + _TINY)  # K is symmetric: K^T u = K u
        delta = (u_new - u_old).abs().amax(dim=0)
        u[:, work] = u_new
        v[:, work] = v_new
        iters[work] += 1
        done = delta <= tol
        converged[work[done]] = True
        work = work[~done]
    row_err = (u * (K @ v) - a).abs().sum(0)
    pattern = _csr(K.crow_indices(), K.col_indices(), torch.ones_like(K.values()), K.shape[0])
    slack = 1e-6
    hall = ((a > pattern @ b + slack) | (b > pattern @ a + slack))[:-1].any(0)
    infeasible = hall | ((a[-1] - b[-1]).abs() > slack)
    return {
        "f": epsilon * torch.log(u + _TINY),
        "g": epsilon * torch.log(v + _TINY),
        "iterations": iters,
        "marginal_error": row_err,
        "converged": converged,
        "infeasible": infeasible,
    }
