"""Per-step time of PPO with `kl` and with `wpr` (both methods) on the demo config.

    python -m benchmarks.ppo_step [--steps 8] [--project DIR]

Trains SFT and RM briefly (or reuses --project's), then runs PPO with each regularizer and
prints the mean per-step time of each phase (excluding the first step) and the WPR/KL ratio of
the whole step. Target: <= 1.05x (the paper reports +2.5% on a GPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._project import demo_project, wprctl

PHASES = ("generation", "forward", "regularizer", "reward", "training")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--project", type=Path, default=None)
    args = p.parse_args()
    manifest = demo_project(args.project)
    runs = manifest.parent / "runs"
    if not (runs / "rm" / "model").exists():
        wprctl("sft", "-m", str(manifest), "--set", "sft.max_steps=30")
        wprctl("rm", "-m", str(manifest), "--set", "rm.max_steps=20")
    variants = {
        "kl": ["--set", "ppo.regularizer.kind=kl"],
        "wpr-paper": ["--set", "ppo.regularizer.kind=wpr", "--set", "ppo.regularizer.wpr.method=paper"],
        "wpr-wellposed": ["--set", "ppo.regularizer.kind=wpr", "--set", "ppo.regularizer.wpr.method=wellposed",
                          "--set", "ppo.regularizer.wpr.max_iter=50", "--set", "ppo.regularizer.wpr.gauge=centered"],
    }  # fmt: skip
    table = {}
    for name, sets in variants.items():
        out = manifest.parent / f"bench-{name}"
        wprctl(
            "ppo", "-m", str(manifest), "--force", "--set", f"project.output_dir={out}",
            "--set", f"ppo.actor={runs / 'sft' / 'model'}", "--set", f"ppo.critic={runs / 'rm' / 'model'}",
            "--set", f"ppo.reward_model={runs / 'rm' / 'model'}", "--set", f"ppo.max_steps={args.steps}",
            "--set", "ppo.eval_prompts=8", *sets,
        )  # fmt: skip
        rows = [r for r in _rows(out) if "train/time/training" in r][1:]
        table[name] = {ph: sum(r[f"train/time/{ph}"] for r in rows) / len(rows) for ph in PHASES}
    print(f"{'regularizer':<15}" + "".join(f"{ph:>13}" for ph in PHASES) + f"{'step':>10}")
    for name, t in table.items():
        print(
            f"{name:<15}"
            + "".join(f"{t[ph]:>13.3f}" for ph in PHASES)
            + f"{sum(t.values()):>10.3f}"
        )
    base = sum(table["kl"].values())
    for name in ("wpr-paper", "wpr-wellposed"):
        print(f"{name}/kl step-time ratio: {sum(table[name].values()) / base:.3f}")


def _rows(out: Path) -> list[dict]:
    import json

    path = out / "ppo" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


if __name__ == "__main__":
    main()
