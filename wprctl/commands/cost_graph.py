"""`wprctl cost-graph`: nearest tokens and costs in the WPR cost graph of a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from wprctl.commands.options import DEFAULT_MANIFEST, JsonOpt, ManifestOpt
from wprctl.errors import UserError


def _defaults(manifest_path: Path, explicit: bool) -> tuple[Any, dict[str, Any]]:
    from wprctl.manifest import WPRConfig, load_manifest

    if manifest_path.exists():
        manifest = load_manifest(manifest_path)
        w = manifest.ppo.regularizer.wpr
        return manifest, {"k1": w.k1, "metric": w.metric, "epsilon": w.epsilon}
    if explicit:
        raise UserError(
            f"{manifest_path}: no manifest here (pass -m PATH to an existing wprctl.toml)"
        )
    w = WPRConfig()
    return None, {"k1": w.k1, "metric": w.metric, "epsilon": w.epsilon}


def _model_dir(manifest: Any, ref: str | None) -> Path:
    if ref is None:
        if manifest is None:
            raise UserError("cost-graph: pass --model PATH (no manifest to take a stage from)")
        ref = "sft"
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if manifest is not None:
        try:
            from wprctl.runs import resolve_model_ref
        except ImportError:  # pragma: no cover - runs is part of the package
            resolve_model_ref = None
        if resolve_model_ref is not None:
            return resolve_model_ref(manifest, ref, what="cost-graph --model")
    raise UserError(f"cost-graph --model: {ref!r} is not a model folder")


def _load(model_dir: Path) -> tuple[Any, Any]:
    from wprctl.console import quiet_library_warnings

    quiet_library_warnings()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wprctl.models import load_errors

    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except load_errors() as exc:
        raise UserError(f"{model_dir}: cannot load the model or tokenizer: {exc}") from None
    return tokenizer, model.get_input_embeddings().weight.detach().float()


def _token_id(tokenizer: Any, word: str, vocab: int) -> tuple[int, str | None]:
    """A word as it appears in running text, an exact token string, or a token id.

    Byte-level BPE (GPT-2, Llama 3, the demo's) spells a word inside a sentence with its leading
    space ("Ġcar"); tokenized alone, "car" is another, rarer token or several pieces. The word in
    running text is what a user means, so " word" is tried first when it is one token.
    """
    if not word.strip():  # " " alone is the bare space token: not what an empty word means
        raise UserError(
            f"cost-graph: {word!r} is no word; give the space token by its string or id"
        )
    spaced = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(spaced) == 1 and not word.isdigit():
        return int(spaced[0]), None
    known = tokenizer.get_vocab()
    if word in known:  # an exact token string, e.g. "Ġcar" or "</s>"
        return int(known[word]), None
    if word.isdigit():
        tid = int(word)
        if tid >= vocab:
            raise UserError(
                f"cost-graph: token id {tid} is outside the vocabulary [0, {vocab - 1}]"
            )
        return tid, None
    # several pieces in running text as well: its first, as in a sentence ("car car" -> "Ġcar")
    ids = spaced or tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"cost-graph: {word!r} tokenizes to nothing")
    note = None
    if len(ids) > 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        note = f"{word!r} is {len(ids)} tokens {pieces}; using the first"
    return int(ids[0]), note


def register(app: typer.Typer) -> None:
    @app.command("cost-graph")
    def cost_graph(
        tokens: Annotated[
            list[str],
            typer.Argument(
                metavar="TOKEN...",
                help="Words (as in running text, so 'car' is the token of ' car' where that is one "
                "token), exact token strings, or token ids (digits that are not a token).",
            ),
        ],
        manifest: ManifestOpt = DEFAULT_MANIFEST,
        model: Annotated[
            str | None,
            typer.Option(
                "--model", help="Model folder (Hugging Face) or a stage name (default sft)."
            ),
        ] = None,
        k: Annotated[
            int | None, typer.Option("--k", min=1, help="k1: graph neighbours per token.")
        ] = None,
        metric: Annotated[
            str | None, typer.Option("--metric", help="Cost: l2 or cos (default: manifest).")
        ] = None,
        epsilon: Annotated[
            float | None,
            typer.Option("--epsilon", help="Entropic epsilon for the underflow check."),
        ] = None,
        n: Annotated[
            int, typer.Option("--n", "-n", min=1, help="Neighbours to show per token.")
        ] = 10,
        as_json: JsonOpt = False,
    ) -> None:
        """Nearest tokens and costs in the WPR cost graph, and the kernel underflow at epsilon."""
        import torch

        from wprctl.console import console, err_console
        from wprctl.ot import CostGraph
        from wprctl.ot.graph import DEGENERATE_UNDERFLOW

        man, d = _defaults(manifest, explicit=manifest != DEFAULT_MANIFEST)
        metric_v = (metric or d["metric"]).lower()
        eps_v = d["epsilon"] if epsilon is None else epsilon
        model_dir = _model_dir(man, model)
        tokenizer, emb = _load(model_dir)
        V = emb.shape[0]
        k_v = k if k is not None else min(d["k1"], V - 1)
        cache = man.output_dir / "cache" if man is not None else None
        graph = CostGraph.from_embeddings(emb, k=k_v, metric=metric_v, cache_dir=cache)
        underflow = graph.underflow_fraction(eps_v, torch.float32)
        results, notes = [], []
        for word in tokens:
            tid, note = _token_id(tokenizer, word, V)
            if note:
                notes.append(note)
            ids, costs = graph.neighbors(tid, n)
            results.append(
                {
                    "input": word,
                    "token_id": tid,
                    "token": tokenizer.convert_ids_to_tokens(tid),
                    "neighbors": [
                        {
                            "token_id": int(i),
                            "token": tokenizer.convert_ids_to_tokens(int(i)),
                            "cost": float(c),
                        }
                        for i, c in zip(ids.tolist(), costs.tolist(), strict=True)
                    ],
                }
            )
        summary = {
            "model": str(model_dir),
            "vocab_size": V,
            "k1": k_v,
            "metric": metric_v,
            "epsilon": eps_v,
            "median_knn_cost": graph.median_knn_cost(),
            "underflow_fraction": underflow,
            "degenerate": underflow >= DEGENERATE_UNDERFLOW,
            "notes": notes,
            "tokens": results,
        }
        if as_json:
            typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
            return
        from rich.table import Table

        for note in notes:
            err_console.print(f"[yellow]note:[/] {note}")
        for r in results:
            table = Table(title=f"{r['input']!r} -> token {r['token_id']} {r['token']!r}")
            table.add_column("#", justify="right")
            table.add_column("token id", justify="right")
            table.add_column("token")
            table.add_column(f"cost ({metric_v})", justify="right")
            for rank, nb in enumerate(r["neighbors"], 1):
                table.add_row(
                    str(rank), str(nb["token_id"]), repr(nb["token"]), f"{nb['cost']:.4f}"
                )
            console.print(table)
        style = "bold red" if summary["degenerate"] else "green"
        console.print(
            f"graph: V={V}, k1={k_v}, metric={metric_v}, median kNN cost "
            f"{summary['median_knn_cost']:.4g}; kernel underflow at eps={eps_v:g} (float32): "
            f"[{style}]{underflow:.1%}[/] of kNN edges"
        )
        if summary["degenerate"]:
            console.print(
                "[bold red]WARNING:[/] the kernel is effectively the identity at this epsilon; "
                "WPR degenerates into a KL-like per-token log-ratio penalty."
            )
