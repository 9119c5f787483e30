"""Tokens/s of SFT and RM on the demo config, with 1 and 2 processes (DeepSpeed, CPU or GPU).

    python -m benchmarks.train_throughput [--steps 40]

Tokens are non-pad input tokens processed by training forward+backward passes, summed over
processes; the figure is the one logged by the stage (train/tokens_per_s) at its last step.
"""

from __future__ import annotations

import argparse
import time

from benchmarks._project import demo_project, metrics, wprctl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    rows = []
    for nproc in (1, 2):
        manifest = demo_project()
        common = [
            "-m",
            str(manifest),
            "--num-processes",
            str(nproc),
            "--set",
            "deepspeed.zero_stage=2",
        ]
        for stage in ("sft", "rm"):
            # Same global batch (16) with 1 and 2 processes.
            extra = ["--set", f"{stage}.max_steps={args.steps}", "--set", f"{stage}.batch_size={16 // nproc}",
                     "--set", f"{stage}.eval_every=100000", "--set", f"{stage}.save_every=100000"]  # fmt: skip
            t0 = time.time()
            wprctl(stage, *common, *extra)
            wall = time.time() - t0
            last = [r for r in metrics(manifest, stage) if "train/tokens_per_s" in r][-1]
            rows.append((stage, nproc, last["train/tokens_per_s"], wall))
    print(f"{'stage':<6}{'processes':>10}{'tokens/s':>12}{'wall s':>9}")
    for stage, nproc, tps, wall in rows:
        print(f"{stage:<6}{nproc:>10}{tps:>12.0f}{wall:>9.1f}")
    print(
        "(2 processes on a 2-core CPU share the cores: the figure shows the launcher works, not a speed-up)"
    )


if __name__ == "__main__":
    main()
