"""Per-step time of PPO with `kl` and with `wpr` (both methods) on the demo config.

    python -m benchmarks.ppo_step [--steps 24] [--repeats 3] [--kl-ctl 0] [--project DIR] [--brief]
                                  [--variants kl,wpr-paper,wpr-wellposed]

Trains SFT and RM as the demo does (about 5 minutes; or reuses --project's, e.g. the `wprctl-demo`
folder `wprctl quickstart` leaves), then runs PPO with each regularizer, `--repeats` times, the
variants interleaved (in a rotated order each round). For each run it takes the median per-step
time of each phase (the first step excluded) and of the whole step (the sum of the
phases); a variant's figures are those of its fastest run, and the WPR/KL ratio compares those.
The fastest run, because on a shared machine other processes only ever add time, and they add it
in spells that can slow a whole run many times over (2 intra-op threads spin-waiting on 2 busy
cores): the step time of every run is printed, to show the spread. Target: <= 1.05x (the paper
reports +2.5% on a GPU).

Trained models, because the solver's cost depends on the distributions: after the demo's SFT the
next-token distributions are peaked and the `wellposed` solve takes 10-11 mean Newton steps per
position (0.66 s per step); after a 30-step SFT (`--brief`, the old default) they are nearly
uniform, it takes 3-4 (0.15 s), and the WPR/KL ratio looks 3x better than it is.

Same work. Every variant runs with beta (`ppo.regularizer.kl_ctl`) = `--kl-ctl`, 0 by default:
the regularizer is computed in full but does not steer the policy, so all variants sample the same
answers and the ratio is the regularizer's own cost. With the demo's beta (0.05) the variants
train different policies: `wpr` `paper` (raw gauge) potentials are negative, a per-token bonus
that lengthens the answers (mean 13 tokens against KL's 8, some answer at the 24-token cap in
every step), which makes generation, forward and training slower for reasons that are not the
regularizer's cost. The mean answer length of each variant is printed.

`regularizer` is the time the step waits for the regularizer beyond the work overlapped with it
(the values, and beside `wellposed` the reward score too, in `reward`); `solve` is the
regularizer's own wall time on its worker thread, which is not part of the step (see
`wprctl/stages/ppo.py`).

Two ratios. The whole-step ratio compares the sums of all phases; but with beta 0 generation,
forward and training do the same work in every variant (the same answers), so their differences
are noise alone, and on this machine that noise is as large as the regularizer's cost (the ratio
has come out below 1). The attributable ratio adds to KL's step only what the regularizer
changes, the `regularizer` + `reward` phases against KL's `reward` (each variant's fastest run):
(kl step + that difference) / kl step. It is the figure to quote.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks._project import demo_project, wprctl

PHASES = ("generation", "forward", "regularizer", "reward", "training")
VARIANTS = {
    "kl": ["--set", "ppo.regularizer.kind=kl"],
    "wpr-paper": ["--set", "ppo.regularizer.kind=wpr", "--set", "ppo.regularizer.wpr.method=paper"],
    "wpr-wellposed": ["--set", "ppo.regularizer.kind=wpr", "--set", "ppo.regularizer.wpr.method=wellposed",
                      "--set", "ppo.regularizer.wpr.max_iter=50", "--set", "ppo.regularizer.wpr.gauge=centered"],
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=24, help="PPO steps per run (the first is dropped)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    p.add_argument("--kl-ctl", type=float, default=0.0, help="beta of every variant (see above)")
    p.add_argument("--project", type=Path, default=None)
    p.add_argument("--brief", action="store_true", help="SFT 30 steps, RM 20 (see above)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, kl first")
    args = p.parse_args()
    if args.steps < 2 or args.repeats < 1:
        p.error("--steps must be >= 2 and --repeats >= 1")
    names = args.variants.split(",")
    if names[0] != "kl" or not set(names) <= set(VARIANTS):
        p.error(f"--variants: kl first, then any of {', '.join(list(VARIANTS)[1:])}")
    manifest = demo_project(args.project)
    runs = manifest.parent / "runs"
    if not (runs / "rm" / "model").exists():
        brief = {"sft": ["--set", "sft.max_steps=30"], "rm": ["--set", "rm.max_steps=20"]}
        for stage in ("sft", "rm"):
            wprctl(stage, "-m", str(manifest), *(brief[stage] if args.brief else []))
    runs_of: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = manifest.parent / f"bench-{name}"
            wprctl(
                "ppo", "-m", str(manifest), "--force", "--set", f"project.output_dir={out}",
                "--set", f"ppo.actor={runs / 'sft' / 'model'}", "--set", f"ppo.critic={runs / 'rm' / 'model'}",
                "--set", f"ppo.reward_model={runs / 'rm' / 'model'}", "--set", f"ppo.max_steps={args.steps}",
                "--set", "ppo.eval_prompts=8", "--set", "ppo.eval_every=1000000",
                "--set", "ppo.save_every=1000000", "--set", f"ppo.regularizer.kl_ctl={args.kl_ctl}",
                *VARIANTS[name],
            )  # fmt: skip
            steps = [_phases(row) for row in _rows(out) if "train/time/training" in row][1:]
            run = {key: statistics.median(t[key] for t in steps) for key in steps[0]}
            runs_of[name].append(run)

    print(
        f"{'regularizer':<15}"
        + "".join(f"{ph:>13}" for ph in PHASES)
        + f"{'step':>10}{'solve':>10}{'length':>8}   step of each run"
    )
    best = {name: min(runs_of[name], key=lambda run: run["step"]) for name in names}
    for name in names:
        print(
            f"{name:<15}"
            + "".join(f"{best[name][ph]:>13.3f}" for ph in PHASES)
            + f"{best[name]['step']:>10.3f}{best[name]['solve']:>10.3f}{best[name]['length']:>8.2f}   "
            + " ".join(f"{run['step']:.3f}" for run in runs_of[name])
        )
    print(
        f"(medians over {args.steps - 1} steps of each variant's fastest of {args.repeats} runs; "
        f"beta {args.kl_ctl:g}; length: mean answer tokens)"
    )
    touched = {
        name: min(run["regularizer"] + run["reward"] for run in runs_of[name]) for name in names
    }
    for name in names[1:]:
        extra = touched[name] - touched["kl"]
        print(
            f"{name}/kl step-time ratio: {best[name]['step'] / best['kl']['step']:.3f} whole steps, "
            f"{(best['kl']['step'] + extra) / best['kl']['step']:.3f} attributable "
            f"(regularizer + reward {touched[name]:.3f} s against kl's {touched['kl']:.3f} s)"
        )


def _phases(row: dict) -> dict[str, float]:
    t = {ph: row[f"train/time/{ph}"] for ph in PHASES}
    t["step"] = sum(t.values())
    t["solve"] = row.get("train/time/regularizer_solve", float("nan"))
    t["length"] = row["train/length"]
    return t


def _rows(out: Path) -> list[dict]:
    import json

    path = out / "ppo" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


if __name__ == "__main__":
    main()
