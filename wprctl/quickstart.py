"""`wprctl quickstart`: the embedded demo, end to end, offline, on a CPU.

It writes the demo manifest (`pipelines/demo.toml`) into DIR and runs its stages: SFT, the reward
model, PPO with `kl`, with `wpr` (the paper's method) and with `wpr` (the well-posed method),
inference of each policy on held-out prompts, the gold oracle judging WPR against KL and every
policy against SFT through a local OpenAI-compatible server, `apps-eval` of the shipped APPS
problems' reference solutions and of a deliberately weakened variant, and the report.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.panel import Panel

from wprctl.console import console
from wprctl.pipeline import run_pipeline
from wprctl.project import init_project

# `--small`: the same pipeline on less data and fewer steps (CI); the default is what the README
# promises and what `python -m benchmarks.quickstart` measures.
SMALL = [
    "data.demo.n_train=1000",
    "data.demo.n_validation=100",
    "sft.max_steps=40",
    "rm.max_steps=30",
    "ppo.max_steps=4",
    "ppo.eval_prompts=16",
    "infer.num_samples=24",
]


def run_quickstart(
    directory: Path, *, small: bool = False, overrides: list[str] | None = None
) -> None:
    manifest = directory / "wprctl.toml"
    if not manifest.exists():
        init_project(directory, "demo", force=False)
        console.print(f"wrote {manifest} (the demo template)")
    else:
        console.print(f"using {manifest}; finished stages are skipped")
    t0 = time.time()
    run_pipeline(manifest, [*(SMALL if small else []), *(overrides or [])])
    report = directory / "runs" / "report" / "index.md"
    console.print(
        Panel.fit(
            f"Demo finished in {time.time() - t0:.0f} s.\n\n"
            f"Report: {report}  (plots in {report.parent})\n"
            f"Stages: wprctl status -m {manifest}\n\n"
            "What to try next:\n"
            f"  wprctl cost-graph -m {manifest} --model sft car angry three\n"
            f"  wprctl ppo -m {manifest} --variant ppo-wpr --force --set ppo.regularizer.wpr.epsilon=0.05\n"
            f"  wprctl dar -m {manifest}      (DAR beside the PPO variants, then `wprctl report`)\n"
            f"  wprctl data show -m {manifest} --stage rm\n"
            "  wprctl init mytldr --template tldr   (the paper's settings, for GPUs and the hub)",
            title="wprctl quickstart",
        )
    )
