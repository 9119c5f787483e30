"""Metric means over ranks (`engine.all_reduce_mean`) when ranks report different metrics: two
gloo ranks, as under the launcher."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

from wprctl import engine as eng

# A PPO rank whose whole batch was dropped reports timers and training losses (from the reused
# experience) but no reward; the other rank reports everything. Keys are in different orders.
REPORTS = [
    {"reward": 1.0, "time/generation": 0.5, "policy_loss": 2.0, "penalty": -3.0},
    {"policy_loss": 4.0, "time/generation": 1.5, "gold": 7.0},
]


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result = eng.all_reduce_mean(REPORTS[rank])
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_each_metric_is_averaged_over_the_ranks_that_report_it(tmp_path: Path) -> None:
    out = str(tmp_path / "m")
    mp.spawn(_rank, args=(_port(), out), nprocs=2, join=True)
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert (
        results[0]
        == results[1]
        == {
            "gold": 7.0,  # rank 1 only
            "penalty": -3.0,  # rank 0 only
            "policy_loss": 3.0,
            "reward": 1.0,
            "time/generation": 1.0,
        }
    )


def test_one_process_returns_its_own_metrics() -> None:
    assert eng.all_reduce_mean(REPORTS[1]) == REPORTS[1]
