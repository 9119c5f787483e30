"""`wprctl infer`: sample responses from a model over a split's prompts and score them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from wprctl.commands.options import DEFAULT_MANIFEST, ManifestOpt, SetOpt

if TYPE_CHECKING:
    from wprctl.manifest import Manifest


def _from_here(m: Manifest, ref: str | None) -> str | None:
    """A model given on the command line as a path is read from the working directory, like
    --out; in the manifest it would be read from the manifest's folder first, and a same-named
    folder there would win. A stage or variant name stays a name."""
    from wprctl.runs import names_a_run

    if ref is None or names_a_run(m, ref):
        return ref
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def register(app: typer.Typer) -> None:
    @app.command("infer")
    def infer(
        manifest: ManifestOpt = DEFAULT_MANIFEST,
        set_: SetOpt = None,
        model: Annotated[
            str | None,
            typer.Option(
                "--model",
                metavar="PATH|STAGE",
                help="Policy: a finished stage or variant (e.g. ppo-kl) or a model folder "
                "(default: the last finished of ppo/dar/sft).",
            ),
        ] = None,
        reward_model: Annotated[
            str | None,
            typer.Option(
                "--reward-model",
                metavar="PATH|STAGE",
                help="Reward model: a stage or a folder (default: rm; APPS: test execution).",
            ),
        ] = None,
        split: Annotated[
            str | None, typer.Option("--split", help="train or eval (default: infer.split).")
        ] = None,
        num_samples: Annotated[
            int | None,
            typer.Option("--num-samples", help="Prompts to run (default: infer.num_samples)."),
        ] = None,
        samples_per_prompt: Annotated[
            int | None,
            typer.Option("--samples-per-prompt", help="Responses per prompt."),
        ] = None,
        temperature: Annotated[
            float | None,
            typer.Option("--temperature", help="Sampling temperature (0: greedy)."),
        ] = None,
        reference: Annotated[
            bool,
            typer.Option(
                "--reference",
                help="Score the dataset's own chosen responses instead of generating.",
            ),
        ] = False,
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                metavar="FILE.jsonl",
                help="Output rows (default: <output_dir>/infer/<model>.jsonl); rows already "
                "there are kept and skipped.",
            ),
        ] = None,
    ) -> None:
        """Batch generation with reward scores, resumable; ROUGE and reference rewards in a summary.

        One JSONL row per response (id, prompt, response, reward, ...), and <out>.summary.json.
        A rerun continues where a killed run stopped."""
        from pydantic import ValidationError

        from wprctl.console import quiet_library_warnings
        from wprctl.errors import UserError
        from wprctl.infer.run import run_infer
        from wprctl.manifest import InferConfig, load_manifest

        quiet_library_warnings()
        m = load_manifest(manifest, set_)
        flags = {
            "model": _from_here(m, model),
            "reward_model": _from_here(m, reward_model),
            "split": split,
            "num_samples": num_samples,
            "samples_per_prompt": samples_per_prompt,
            "temperature": temperature,
            # a command-line path is relative to where the user is, not to the manifest
            "out": str(out.resolve()) if out is not None else None,
        }
        given = {k: v for k, v in flags.items() if v is not None}
        try:
            cfg = InferConfig.model_validate({**m.infer.model_dump(), **given})
        except ValidationError as exc:
            problems = "; ".join(
                f"--{str(e['loc'][0]).replace('_', '-')} {e['input']!r}: {e['msg']}"
                for e in exc.errors()
            )
            raise UserError(f"wprctl infer: {problems}") from None
        named = {k: "--" + k.replace("_", "-") for k in ("model", "reward_model") if k in given}
        run_infer(m, cfg, reference=reference, named=named)
