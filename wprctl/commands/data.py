"""`wprctl data show | stats`: the data exactly as a stage sees it, and how much of it there is."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from wprctl.commands.options import DEFAULT_MANIFEST, JsonOpt, ManifestOpt, SetOpt

data_app = typer.Typer(
    name="data",
    help="Inspect the manifest's data: formatted examples per stage, and row counts.",
    no_args_is_help=True,
)

StageOpt = Annotated[
    str, typer.Option("--stage", help="The stage whose view to show: sft, rm, ppo, dar or infer.")
]
SplitOpt = Annotated[str, typer.Option("--split", help="train (the stage's part) or eval.")]
NOpt = Annotated[int, typer.Option("--n", "-n", min=1, help="How many examples to show.")]


@data_app.command("show")
def show(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    set_: SetOpt = None,
    stage: StageOpt = "sft",
    split: SplitOpt = "train",
    n: NOpt = 3,
    as_json: JsonOpt = False,
) -> None:
    """Print the first N examples as the stage gets them: the decoded token ids, with the
    prompt dimmed and the tokens the loss applies to highlighted (rm: chosen and rejected)."""
    from wprctl.console import console, quiet_library_warnings
    from wprctl.data import load_stage_data
    from wprctl.manifest import load_manifest
    from wprctl.models import tokenizer_for

    quiet_library_warnings()
    m = load_manifest(manifest, set_)
    tokenizer = tokenizer_for(m)
    sd = load_stage_data(m, stage, split, tokenizer)
    items = [_view(sd, i, tokenizer) for i in range(min(n, len(sd)))]
    if as_json:
        typer.echo(json.dumps(items, ensure_ascii=False))
        return
    console.print(
        f"[bold]{stage}[/] on [bold]{split}[/]: {len(sd)} examples; showing {len(items)} "
        f"(limits {sd.lengths}). [dim]dim = prompt (no loss)[/], "
        "[bold green]green = response (loss)[/], [bold red]red = rejected[/]"
    )
    for item in items:
        _print_item(console, item)


def _view(sd: Any, i: int, tokenizer: Any) -> dict[str, Any]:
    feats = sd.dataset[i]
    ex = sd.examples[feats["index"]]
    out: dict[str, Any] = {"id": ex.id, "stage": sd.stage, "split": sd.split}

    def part(ids: list[int], start: int, name: str) -> None:
        out[f"{name}_prompt"] = tokenizer.decode(ids[:start])
        out[name] = tokenizer.decode(ids[start:])
        out[f"{name}_tokens"] = {"prompt": start, "response": len(ids) - start}
        out[f"{name}_input_ids"] = list(ids)

    if sd.stage == "sft":
        labels = feats["labels"]
        start = next((j for j, x in enumerate(labels) if x != -100), len(labels))
        out["prompt"] = tokenizer.decode(feats["input_ids"][:start])
        out["response"] = tokenizer.decode(feats["input_ids"][start:])
        out["tokens"] = {"prompt": start, "loss": sum(x != -100 for x in labels)}
        out["input_ids"] = list(feats["input_ids"])
        out["labels"] = list(labels)
    elif sd.stage == "rm":
        part(feats["chosen_input_ids"], feats["chosen_prompt_len"], "chosen")
        part(feats["rejected_input_ids"], feats["rejected_prompt_len"], "rejected")
    else:
        out["prompt"] = tokenizer.decode(feats["input_ids"])
        out["tokens"] = {"prompt": len(feats["input_ids"])}
        out["input_ids"] = list(feats["input_ids"])
        if ex.chosen is not None:
            out["reference"] = ex.chosen
    return out


def _print_item(console: Any, item: dict[str, Any]) -> None:
    from rich.panel import Panel
    from rich.text import Text

    text = Text()
    if item["stage"] == "sft":
        text.append(item["prompt"], style="dim")
        text.append(item["response"], style="bold green")
        sub = f"prompt {item['tokens']['prompt']} tokens, loss on {item['tokens']['loss']}"
    elif item["stage"] == "rm":
        for name, style in (("chosen", "bold green"), ("rejected", "bold red")):
            text.append(f"[{name}]\n", style="bold")
            text.append(item[f"{name}_prompt"], style="dim")
            text.append(item[name] + "\n", style=style)
        tc, tr = item["chosen_tokens"], item["rejected_tokens"]
        sub = f"chosen {tc['prompt']}+{tc['response']} tokens, rejected {tr['prompt']}+{tr['response']}"
    else:
        text.append(item["prompt"])
        text.append("<generation starts here>", style="bold cyan")
        sub = f"prompt {item['tokens']['prompt']} tokens (left-padded in batches)"
    console.print(Panel(text, title=item["id"], subtitle=sub, title_align="left"))


@data_app.command("stats")
def stats(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rows per split and per stage, and skipped rows by reason."""
    from wprctl.console import console
    from wprctl.data import load_examples, stage_examples
    from wprctl.errors import UserError
    from wprctl.manifest import load_manifest

    m = load_manifest(manifest, set_)
    report: dict[str, Any] = {"dataset": m.data.dataset, "splits": {}, "stages": {}}
    for split in ("train", "eval"):
        # the tables below show the skipped rows; no separate report while loading
        es = load_examples(
            m.data, split, m.project.seed, root=m.root, write_dir=m.output_dir / "data",
            report=False,
        )  # fmt: skip
        report["source"] = report.get("source") or es.source
        report["splits"][split] = {
            "source": es.source,
            "rows_read": es.n_rows,
            "examples": len(es.examples),
            "skipped": dict(es.skipped.most_common()),
            "first_bad": es.first_bad,
        }
    for stage in ("sft", "rm", "ppo"):
        report["stages"][stage] = {}
        for split in ("train", "eval"):
            try:
                count: int | None = len(stage_examples(m, stage, split))
            except UserError:
                count = None  # e.g. rm on a dataset without rejected responses
            report["stages"][stage][split] = count
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False, indent=1))
        return
    _print_stats(console, report, m.data.data_split)


def _print_stats(console: Any, report: dict[str, Any], data_split: str) -> None:
    from rich.table import Table

    splits = Table(title=f"{report['dataset']} data", title_justify="left")
    for col in ("split", "source", "rows read", "examples", "skipped"):
        splits.add_column(
            col, justify="right" if col in ("rows read", "examples", "skipped") else "left"
        )
    for name, s in report["splits"].items():
        splits.add_row(name, s["source"], str(s["rows_read"]), str(s["examples"]),
                       str(sum(s["skipped"].values())))  # fmt: skip
    console.print(splits)
    stages = Table(title=f"examples per stage (data_split {data_split})", title_justify="left")
    stages.add_column("stage")
    stages.add_column("train", justify="right")
    stages.add_column("eval", justify="right")
    for stage, counts in report["stages"].items():
        stages.add_row(
            stage, *("-" if counts[s] is None else str(counts[s]) for s in ("train", "eval"))
        )
    console.print(stages)
    reasons: dict[str, dict[str, int]] = {}
    for split, s in report["splits"].items():
        for reason, k in s["skipped"].items():
            reasons.setdefault(reason, {})[split] = k
    if reasons:
        bad = Table(title="skipped rows by reason", title_justify="left")
        bad.add_column("reason")
        bad.add_column("train", justify="right")
        bad.add_column("eval", justify="right")
        for reason, per in reasons.items():
            bad.add_row(reason, str(per.get("train", 0)), str(per.get("eval", 0)))
        console.print(bad)
        for split, s in report["splits"].items():
            if s["first_bad"]:
                console.print(f"first bad row ({split}): {s['first_bad']}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
