"""Under N processes DAR's advantages, weights and weight statistics are those of the global batch:
two gloo ranks holding halves of a batch get exactly the single-process result's halves."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from tests.conftest import run_gloo_ranks
from wprctl.rl.dar_math import global_weights

K = 4
PAPER = {"alpha": 0.1, "beta": 0.05, "w_clip": 20.0}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(6, K, generator=g)
    rewards[:3] *= 5.0  # the halves differ in scale: per-rank normalization would show
    ref = -20 + 5 * torch.randn(6, K, generator=g)
    old = -20 + 5 * torch.randn(6, K, generator=g)
    return rewards, ref, old


def _rank(out: str, rank: int) -> None:
    import torch.distributed as dist

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    rewards, ref, old = _batch()
    mine = slice(3 * rank, 3 * rank + 3)
    results = [
        global_weights(
            rewards[mine],
            ref[mine],
            old[mine],
            **PAPER,
            self_normalize=sn,
            gather=gather,
            rank=rank,
        )
        for sn in (False, True)
    ]
    torch.save(results, f"{out}.{rank}")


def test_two_ranks_compute_the_global_batch(tmp_path: Path) -> None:
    rewards, ref, old = _batch()
    out = str(tmp_path / "w")
    run_gloo_ranks(partial(_rank, out))
    parts = [torch.load(f"{out}.{r}") for r in (0, 1)]
    for i, sn in enumerate((False, True)):
        whole, stats = global_weights(rewards, ref, old, **PAPER, self_normalize=sn)
        assert torch.equal(torch.cat([p[i][0] for p in parts]), whole)
        for p in parts:
            assert p[i][1] == stats
        assert 0 < stats["clip_fraction"] < 1  # the case exercises the clip
    # Per-rank normalization would differ: the halves' reward scales differ by 5x.
    local, _ = global_weights(rewards[:3], ref[:3], old[:3], **PAPER)
    assert not torch.equal(local, parts[0][0][0])
