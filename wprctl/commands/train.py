"""`wprctl sft | rm | ppo | dar`: the training stages, all with the same options."""

from __future__ import annotations

from typing import Annotated

import typer

from wprctl.commands.options import (
    DEFAULT_MANIFEST,
    ForceOpt,
    ManifestOpt,
    NumProcOpt,
    ResumeOpt,
    SetOpt,
)

VariantOpt = Annotated[
    str | None,
    typer.Option(
        "--variant", help="Run a named \\[\\[variants]] entry of this stage (own output folder)."
    ),
]

HELP = {
    "sft": "Stage 1: supervised fine-tuning on prompt + chosen response, loss on the response only.",
    "rm": "Stage 2: a Bradley-Terry reward model (sequence classification, 1 label) on chosen/rejected pairs.",
    "ppo": "Stage 3: PPO with a pluggable policy regularizer (wpr, kl, fdiv), chosen by ppo.regularizer.kind.",
    "dar": "Dual-regularized Advantage Regression: online weighted SFT toward pi_0^a pi_t^(1-a) exp(A/beta).",
}


def _make(kind: str):
    def command(
        manifest: ManifestOpt = DEFAULT_MANIFEST,
        set_: SetOpt = None,
        resume: ResumeOpt = False,
        force: ForceOpt = False,
        num_processes: NumProcOpt = None,
        variant: VariantOpt = None,
    ) -> None:
        from wprctl.launch import CURRENT_ARGV
        from wprctl.stages import execute_stage

        execute_stage(
            kind,
            manifest,
            set_,
            variant=variant,
            resume=resume,
            force=force,
            num_processes=num_processes,
            argv=CURRENT_ARGV,
        )

    command.__doc__ = HELP[kind]
    command.__name__ = kind
    return command


def register(app: typer.Typer) -> None:
    for kind in ("sft", "rm", "ppo", "dar"):
        app.command(kind, help=HELP[kind])(_make(kind))
