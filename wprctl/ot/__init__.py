"""Optimal transport for WPR: the token cost graph and the per-token Sinkhorn penalty.

Public API::

    graph = CostGraph.from_embeddings(emb, k=k1, metric="l2", cache_dir=None)
    res = wpr_potentials(policy_logits, ref_logits, actions, graph, epsilon=..., top_k=k2,
                         max_iter=..., tol=..., method="wellposed" | "paper")
    pair = compress_topk(policy_logits, ref_logits, actions, k2)   # once, at rollout
    res = wpr_potentials_topk(pair, graph, epsilon=..., max_iter=..., tol=...)
"""

from wprctl.ot.graph import CostGraph, KernelUnderflowWarning
from wprctl.ot.sinkhorn import WPRResult, wpr_potentials, wpr_potentials_topk
from wprctl.ot.topk import TopKPair, compress_topk

__all__ = [
    "CostGraph",
    "KernelUnderflowWarning",
    "TopKPair",
    "WPRResult",
    "compress_topk",
    "wpr_potentials",
    "wpr_potentials_topk",
]
