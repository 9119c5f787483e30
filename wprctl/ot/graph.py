"""The token cost graph of WPR: each token's k1 nearest other tokens, symmetrized, plus a self-loop.

Cost C_ij = ||E_i - E_j||_2 (``l2``) or 1 - cos(E_i, E_j) (``cos``) on an edge, C_ii = 0, +inf
elsewhere. Edge (i, j) exists if j is among the k1 nearest tokens of i OR i among those of j.

Storage is O(V * k1): the directed kNN lists (``knn``, ``knn_cost``, nearest first) and the
symmetric graph in CSR form (``indptr``, ``indices``, ``costs``; self-loops implicit). Neighbours
are selected in float32 blocks (one matmul + top-k per block, never a V x V matrix) and the chosen
costs are then recomputed exactly in float64, so the costs do not carry the cancellation error of
the ||x||^2 + ||y||^2 - 2 x.y expansion.

The on-disk cache is keyed by a hash of the embedding bytes, k1 and the metric, and the key is
stored inside the file and checked on load: a different model can never reuse a stale graph.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from wprctl.errors import UserError

Metric = Literal["l2", "cos"]
_FORMAT_VERSION = 1
# Fraction of kNN edges whose float kernel is 0 above which WPR is (nearly) a per-token KL.
DEGENERATE_UNDERFLOW = 0.5


class KernelUnderflowWarning(UserWarning):
    """exp(-C/eps) underflows on most kNN edges: the WPR penalty degenerates into a KL-like one."""


def _normalize_metric(metric: str) -> Metric:
    m = str(metric).lower()
    if m not in ("l2", "cos"):
        raise UserError(f"cost graph metric: expected 'l2' or 'cos', got {metric!r}")
    return m  # type: ignore[return-value]


def embedding_key(emb: torch.Tensor, k: int, metric: str) -> str:
    """Content hash of the embeddings plus the graph parameters (the cache key)."""
    data = emb.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{_FORMAT_VERSION}|{tuple(data.shape)}|k={k}|metric={metric}|".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def _knn_blocks(emb: torch.Tensor, k: int, metric: Metric) -> torch.Tensor:
    """Indices (V, k) of each row's k nearest other rows, nearest first, computed in row blocks."""
    V = emb.shape[0]
    x = emb.to(torch.float32)
    if metric == "cos":
        x = torch.nn.functional.normalize(x, dim=1)
    sq = (x * x).sum(1)
    # Block rows so a block's (rows x V) score matrix stays around 64 MB.
    block = max(1, min(V, (16 * 2**20) // max(V, 1)))
    out = torch.empty(V, k, dtype=torch.long, device=emb.device)
    for lo in range(0, V, block):
        hi = min(V, lo + block)
        # Larger score = nearer: -(squared distance) without the row's own constant ||x_i||^2,
        # or the cosine similarity.
        score = x[lo:hi] @ x.T
        if metric == "l2":
            score = score.mul_(2).sub_(sq)
        rows = torch.arange(hi - lo, device=emb.device)
        score[rows, rows + lo] = -math.inf
        # unsorted top-k, then sort the k winners (nearest first): cheaper than a sorted top-k
        val, idx = torch.topk(score, k, dim=1, sorted=False)
        out[lo:hi] = idx.gather(1, torch.argsort(val, dim=1, descending=True, stable=True))
    return out


def _knn_costs(emb: torch.Tensor, knn: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Exact float64 costs (V, k) of each row to its kNN list, computed in small row blocks.

    Each block gathers its rows' neighbour embeddings (rows x k x d, about 4 MB) and takes the
    differences directly: no ||x||^2 + ||y||^2 - 2 x.y cancellation, and the temporaries stay in
    cache (one big gather of all V * k pairs was the slowest part of the build, by far).
    """
    e = emb.to(torch.float64)
    if metric == "cos":
        e = torch.nn.functional.normalize(e, dim=1)
    V, k = knn.shape
    d = max(e.shape[1], 1)
    out = torch.empty(V, k, dtype=torch.float64, device=emb.device)
    block = max(1, (4 * 2**20) // (8 * k * d))
    for lo in range(0, V, block):
        hi = min(V, lo + block)
        nb = e[knn[lo:hi]]  # (rows, k, d)
        if metric == "l2":
            out[lo:hi] = (nb - e[lo:hi].unsqueeze(1)).norm(dim=2)
        else:
            dots = torch.bmm(nb, e[lo:hi].unsqueeze(2)).squeeze(2)
            out[lo:hi] = (1.0 - dots).clamp_min(0.0)
    return out


@dataclass
class CostGraph:
    """Sparse symmetric kNN cost graph over a vocabulary (see the module docstring)."""

    num_tokens: int
    k: int
    metric: Metric
    knn: torch.Tensor  # (V, k) int64, nearest first, self excluded
    knn_cost: torch.Tensor  # (V, k) float64
    indptr: torch.Tensor  # (V + 1,) int64, symmetric graph without self-loops
    indices: torch.Tensor  # (nnz,) int64, sorted within each row
    costs: torch.Tensor  # (nnz,) float64
    key: str = ""
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _warned: set = field(default_factory=set, repr=False, compare=False)
    # underflow fractions already computed, by (epsilon, dtype): every solver call checks it,
    # and recomputing exp over all V * k1 edges cost more than a whole small solve
    _underflow: dict = field(default_factory=dict, repr=False, compare=False)
    # solver-specific tensors derived from the graph (e.g. a per-epsilon float32 kernel), see
    # ``derived``; bounded so that sweeping epsilon does not accumulate copies
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_embeddings(
        cls,
        emb: torch.Tensor,
        k: int,
        metric: str = "l2",
        cache_dir: str | Path | None = None,
    ) -> CostGraph:
        """Build (or load from ``cache_dir``) the graph of the rows of ``emb`` (V, d)."""
        metric_n = _normalize_metric(metric)
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise UserError(f"cost graph: embeddings must be a (V, d) tensor, got {shape}")
        V = emb.shape[0]
        if not isinstance(k, int) or k < 1 or k >= V:
            raise UserError(
                f"cost graph: k1 (neighbours per token) must be an integer in [1, V-1] = "
                f"[1, {V - 1}] for a vocabulary of {V} tokens, got {k!r}"
            )
        if not torch.isfinite(emb).all():
            raise UserError("cost graph: the embedding matrix contains NaN or inf")
        key = embedding_key(emb, k, metric_n)
        path = Path(cache_dir) / f"cost_graph_{key[:24]}.pt" if cache_dir is not None else None
        if path is not None and path.exists():
            graph = cls._load(path, key)
            if graph is not None:
                return graph
        graph = cls._build(emb.detach(), k, metric_n, key)
        if path is not None:
            graph._save(path)
        return graph

    @classmethod
    def _build(cls, emb: torch.Tensor, k: int, metric: Metric, key: str) -> CostGraph:
        V = emb.shape[0]
        knn = _knn_blocks(emb, k, metric)
        rows = torch.arange(V, device=emb.device).unsqueeze(1).expand(V, k)
        knn_cost = _knn_costs(emb, knn, metric)
        # Symmetrize: directed edges plus their reverses, deduplicated by the key i * V + j.
        src = torch.cat([rows.reshape(-1), knn.reshape(-1)])
        dst = torch.cat([knn.reshape(-1), rows.reshape(-1)])
        cost = torch.cat([knn_cost.reshape(-1), knn_cost.reshape(-1)])
        edge_key, order = torch.sort(src * V + dst)
        first = torch.ones_like(edge_key, dtype=torch.bool)
        first[1:] = edge_key[1:] != edge_key[:-1]
        edge_key, cost = edge_key[first], cost[order[first]]
        src, dst = edge_key // V, edge_key % V
        indptr = torch.zeros(V + 1, dtype=torch.long, device=emb.device)
        indptr[1:] = torch.cumsum(torch.bincount(src, minlength=V), 0)
        return cls(
            V, k, metric, knn.cpu(), knn_cost.cpu(), indptr.cpu(), dst.cpu(), cost.cpu(), key
        )

    def _save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several ranks may build the same graph at once: each writes its own file and the
        # atomic replace makes the last one win with a complete file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(
            {
                "format_version": _FORMAT_VERSION,
                "key": self.key,
                "num_tokens": self.num_tokens,
                "k": self.k,
                "metric": self.metric,
                "knn": self.knn,
                "knn_cost": self.knn_cost,
                "indptr": self.indptr,
                "indices": self.indices,
                "costs": self.costs,
            },
            tmp,
        )
        tmp.replace(path)

    @classmethod
    def _load(cls, path: Path, key: str) -> CostGraph | None:
        try:
            d = torch.load(path, weights_only=True, map_location="cpu")
        except Exception:  # a truncated or foreign file is rebuilt, never trusted
            return None
        if not isinstance(d, dict) or d.get("key") != key:
            return None
        if d.get("format_version") != _FORMAT_VERSION:
            return None
        return cls(
            d["num_tokens"], d["k"], d["metric"], d["knn"], d["knn_cost"],
            d["indptr"], d["indices"], d["costs"], key,
        )  # fmt: skip

    # ------------------------------------------------------------------ queries

    @property
    def num_edges(self) -> int:
        """Directed off-diagonal edges of the symmetric graph (each undirected edge counted twice)."""
        return int(self.indices.numel())

    @property
    def max_degree(self) -> int:
        return int((self.indptr[1:] - self.indptr[:-1]).max().item()) if self.num_tokens else 0

    def median_knn_cost(self) -> float:
        return float(self.knn_cost.median().item())

    def underflow_fraction(self, epsilon: float, dtype: torch.dtype = torch.float32) -> float:
        """Fraction of kNN edges whose kernel exp(-C/epsilon), computed in ``dtype``, is exactly 0."""
        check_epsilon(epsilon)
        key = (float(epsilon), dtype)
        if key not in self._underflow:
            kern = torch.exp(-(self.costs.to(dtype) / epsilon))
            frac = float((kern == 0).to(torch.float64).mean().item()) if kern.numel() else 0.0
            self._underflow[key] = frac
        return self._underflow[key]

    def check_underflow(
        self,
        epsilon: float,
        dtype: torch.dtype = torch.float32,
        threshold: float = DEGENERATE_UNDERFLOW,
    ) -> float:
        """``underflow_fraction``, warning (once per epsilon and dtype) when WPR degenerates."""
        frac = self.underflow_fraction(epsilon, dtype)
        if frac >= threshold and (epsilon, dtype) not in self._warned:
            self._warned.add((epsilon, dtype))
            warnings.warn(
                f"WPR kernel underflow: exp(-C/eps) is 0 in {str(dtype).replace('torch.', '')} on "
                f"{frac:.1%} of the kNN edges at eps={epsilon:g} (median kNN cost "
                f"{self.median_knn_cost():.3g}). The kernel is effectively the identity and the "
                f"WPR penalty degenerates into a KL-like per-token log-ratio; raise epsilon "
                f"(about the median kNN cost / 20 keeps the kernel alive).",
                KernelUnderflowWarning,
                stacklevel=3,
            )
        return frac

    def neighbors(self, token_id: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` nearest graph neighbours of ``token_id`` (self excluded) and their costs."""
        if not 0 <= int(token_id) < self.num_tokens:
            raise UserError(
                f"token id {token_id} is outside the vocabulary [0, {self.num_tokens - 1}]"
            )
        lo, hi = int(self.indptr[token_id]), int(self.indptr[token_id + 1])
        ids, costs = self.indices[lo:hi], self.costs[lo:hi]
        order = torch.argsort(costs, stable=True)
        if n is not None:
            order = order[: max(0, int(n))]
        return ids[order], costs[order]

    def on(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The graph tensors on ``device`` (cached), for the solvers."""
        dev = torch.device(device)
        key = str(dev)
        if key not in self._device_cache:
            self._device_cache[key] = {
                "knn": self.knn.to(dev),
                "knn_cost": self.knn_cost.to(dev),
                "indptr": self.indptr.to(dev),
                "indices": self.indices.to(dev),
                "costs": self.costs.to(dev),
            }
        return self._device_cache[key]

    def knn_narrow(self) -> torch.Tensor:
        """The kNN lists on the CPU in the narrowest integer type that holds the vocabulary
        (uint16 up to 65536 tokens, else int32). Compiled solvers stream the (V, k1) rows of
        every support token, and that traffic is much of their time: with uint16 rows the edge
        builder takes 0.83x and the paper solver 0.84-0.91x the time of int32 ones at V = 32k,
        k1 = 256."""

        def build() -> torch.Tensor:
            narrow = torch.uint16 if self.num_tokens <= 2**16 else torch.int32
            return self.knn.to("cpu", narrow).contiguous()

        return self.derived(("knn_narrow",), build)

    def derived(self, key: tuple, build: Callable[[], Any], keep: int = 8) -> Any:
        """``build()`` computed once per ``key`` and kept with the graph (the last ``keep`` keys).

        For tensors a solver would otherwise recompute from the graph on every call, such as the
        float32 kernel exp(-C/eps) of one epsilon on one device.
        """
        if key not in self._derived:
            while len(self._derived) >= keep:
                self._derived.pop(next(iter(self._derived)))
            self._derived[key] = build()
        return self._derived[key]


def check_epsilon(epsilon: float) -> None:
    if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise UserError(f"WPR epsilon must be a finite number > 0, got {epsilon!r}")
