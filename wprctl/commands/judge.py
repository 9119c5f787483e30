"""`wprctl judge A.jsonl B.jsonl`: pairwise LLM judging of two inference files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import typer

from wprctl.commands.options import DEFAULT_MANIFEST, ManifestOpt, SetOpt
from wprctl.errors import RunError, UserError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
LOCAL_DUMMY_KEY = "sk-local-no-key"


def judge_config(manifest: Path, overrides: list[str] | None, explicit: bool) -> Any:
    """`[judge]` from the manifest if there is one, else the defaults (with any --set applied)."""
    from wprctl.manifest import _assign, load_manifest, manifest_from_dict, parse_override

    if manifest.exists() or explicit:
        m = load_manifest(manifest, overrides)
        return m.with_located(m.judge, "template")  # a template file beside the manifest
    raw: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        _assign(raw, key, value, origin="--set")
    return manifest_from_dict(raw).judge


def is_local(base_url: str | None) -> bool:
    if not base_url:
        return False
    host = (urlsplit(base_url).hostname or "").lower()
    return host in LOCAL_HOSTS or host.endswith(".localhost")


def resolve_api_key(env_name: str, base_url: str | None) -> str:
    """The key from the environment only; a local server without one gets a dummy key."""
    key = os.environ.get(env_name, "").strip()
    if key:
        return key
    if is_local(base_url):
        return LOCAL_DUMMY_KEY
    target = public_url(base_url) or "the OpenAI API"
    raise UserError(
        f"environment variable {env_name} is not set: the judge's API key for {target} is read "
        f"from the environment only. Export {env_name}=..., or name another variable with "
        "judge.api_key_env (for a local server use --base-url http://127.0.0.1:PORT/v1)."
    )


def public_url(base_url: str | None) -> str | None:
    """The URL without any user:password part, for summaries and messages."""
    if not base_url:
        return None
    parts = urlsplit(base_url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def print_summary(summary: dict[str, Any], title: str) -> None:
    from rich.table import Table

    from wprctl.console import print_table

    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "pairs",
        "judged",
        "wins",
        "ties",
        "losses",
        "invalid",
        "failed",
        "pending",
        "win_rate",
        "win_rate_no_ties",
        "ci95",
        "ci95_no_ties",
        "flip_rate",
        "refusals",
        "requests",
        "retries",
        "cache_hits",
        "reused_pairs",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "total_cost_usd",
    ):
        table.add_row(key, _fmt(summary.get(key)))
    print_table(table)


def register(app: typer.Typer) -> None:
    @app.command("judge")
    def judge(
        file_a: Annotated[
            Path, typer.Argument(metavar="A.jsonl", help="Inference output of model A.")
        ],
        file_b: Annotated[
            Path, typer.Argument(metavar="B.jsonl", help="Inference output of model B.")
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out", help="Per-pair verdicts (JSONL); the summary goes to <out>.summary.json."
            ),
        ],
        task: Annotated[
            Literal["summarize", "hh-rlhf"] | None,
            typer.Option("--task", help="summarize or hh-rlhf (default: judge.task)."),
        ] = None,
        model: Annotated[
            str | None,
            typer.Option("--model", help="Judge model (default: judge.model, gpt-4o-2024-05-13)."),
        ] = None,
        base_url: Annotated[
            str | None,
            typer.Option(
                "--base-url", help="Any OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."
            ),
        ] = None,
        orders: Annotated[
            Literal["both", "random"] | None,
            typer.Option(
                "--orders", help="both: judge each pair in both orders; random: one seeded order."
            ),
        ] = None,
        concurrency: Annotated[
            int | None, typer.Option("--concurrency", min=1, help="Requests in flight at once.")
        ] = None,
        max_cost: Annotated[
            float | None,
            typer.Option(
                "--max-cost", help="Stop cleanly before spending more than this many USD (> 0)."
            ),
        ] = None,
        dry_run: Annotated[
            bool,
            typer.Option(
                "--dry-run", help="Print the estimated calls, tokens and cost; request nothing."
            ),
        ] = False,
        template: Annotated[
            str | None,
            typer.Option(
                "--template",
                help="Built-in template name (templates/judge) or path to a .toml template.",
            ),
        ] = None,
        seed: Annotated[
            int | None, typer.Option("--seed", help="Seed for --orders random and the bootstrap.")
        ] = None,
        cache: Annotated[
            Path | None,
            typer.Option(
                "--cache",
                help="Judgement cache (SQLite). Default: judge_cache.sqlite next to --out.",
            ),
        ] = None,
        manifest: ManifestOpt = DEFAULT_MANIFEST,
        overrides: SetOpt = None,
    ) -> None:
        """Pairwise LLM judging of two inference files (A's point of view), resumable and cached."""
        from wprctl.console import err_console
        from wprctl.jsonl import check_output_file
        from wprctl.judge.cost import price_for
        from wprctl.judge.io import load_responses, pair_responses
        from wprctl.judge.oracle import serve_builtin
        from wprctl.judge.run import RunSettings, estimate, plan
        from wprctl.judge.templates import template_for_task

        explicit_manifest = manifest != DEFAULT_MANIFEST
        cfg = judge_config(manifest, overrides, explicit_manifest)
        updates = {
            k: v
            for k, v in dict(
                model=model,
                base_url=base_url,
                task=task,
                orders=orders,
                concurrency=concurrency,
                max_cost=max_cost,
                template=template,
                seed=seed,
            ).items()
            if v is not None
        }
        cfg = _with_options(cfg, updates)
        tmpl = template_for_task(cfg.task, cfg.template)
        price = price_for(cfg.model, cfg.prices)
        if cfg.max_cost is not None and price is None:
            raise UserError(
                f"--max-cost needs a price for model {cfg.model!r}: add it to judge.prices "
                "(USD per million prompt and completion tokens), e.g. "
                f"--set 'judge.prices={{\"{cfg.model}\" = [5.0, 15.0]}}'"
            )
        cache_path = cache if cache is not None else out.parent / "judge_cache.sqlite"
        check_output_file(out, [file_a, file_b])
        check_output_file(cache_path, [file_a, file_b, out], option="--cache")
        pairs, notes = pair_responses(load_responses(file_a), load_responses(file_b))
        if file_a.resolve() == file_b.resolve():
            notes.insert(
                0,
                f"A and B are the same file ({file_a}): every pair compares a response with itself",
            )
        for note in notes:
            err_console.print(f"[yellow]note:[/] {note}")
        settings = RunSettings(
            endpoint=cfg.base_url or "",
            model=cfg.model,
            temperature=cfg.temperature,
            orders=cfg.orders,
            seed=cfg.seed,
            max_cost=cfg.max_cost,
            bootstrap=cfg.bootstrap,
            price=price,
        )
        plans = plan(pairs, tmpl, settings)

        if dry_run:
            est = estimate(plans, out, cache_path, tmpl, settings)
            _print_estimate(est, cfg.model)
            return

        with serve_builtin(cfg.base_url) as served_url:
            _judge(cfg, served_url, plans, tmpl, settings, out, cache_path, file_a, file_b, notes)


def _judge(
    cfg: Any,
    base_url: str | None,
    plans: Any,
    tmpl: Any,
    settings: Any,
    out: Path,
    cache_path: Path,
    file_a: Path,
    file_b: Path,
    notes: list[str],
) -> None:
    from wprctl.console import console, err_console, make_progress
    from wprctl.judge.client import ClientSettings
    from wprctl.judge.run import Runner, summary_path

    api_key = resolve_api_key(cfg.api_key_env, base_url)
    client_settings = ClientSettings(
        base_url=base_url,
        api_key=api_key,
        timeout=cfg.timeout,
        max_retries=cfg.max_retries,
        concurrency=cfg.concurrency,
        requests_per_minute=cfg.requests_per_minute,
        tokens_per_minute=cfg.tokens_per_minute,
        backoff_base=cfg.backoff_base,
        backoff_max=cfg.backoff_max,
    )
    runner = Runner(plans, tmpl, settings, client_settings, out, cache_path)
    total = sum(len(p.judgements) for p in plans)
    extra = {
        "a": str(file_a),
        "b": str(file_b),
        "task": cfg.task,
        "base_url": public_url(cfg.base_url),  # the URL asked for, not a local port
        "notes": notes,
    }
    with make_progress() as bar:
        task_id = bar.add_task("judging", total=total, info="")

        def progress(n: int, spend: Any) -> None:
            usd = spend.usd
            cost = f"${usd:.4f}" if usd is not None else "cost n/a"
            bar.update(task_id, advance=n, info=f"{spend.requests} new, {cost}")

        result = runner.run(progress, extra_summary=extra)
    print_summary(result.summary, f"judge: {file_a.name} (A) vs {file_b.name} (B), {cfg.model}")
    console.print(f"wrote {out} and {summary_path(out)}")
    if result.fatal and result.unreachable:
        raise UserError(
            f"cannot connect to the judge API at {public_url(cfg.base_url) or 'the OpenAI API'} "
            f"({result.fatal}); stopped without sending the rest. Check judge.base_url (or "
            f"--base-url) and that the server is running; finished pairs are in {out} and cached."
        )
    if result.fatal:
        raise RunError(
            f"the judge API rejected the requests: {result.fatal}. Finished pairs are in {out} "
            "and cached; fix the cause and rerun the same command to resume."
        )
    if result.failed:
        errors = Counter(
            str(r.get("error", "?")) for r in result.rows if r.get("status") == "failed"
        )
        cause, times = errors.most_common(1)[0]
        where = public_url(cfg.base_url) or "the OpenAI API"
        raise RunError(
            f"{result.failed} pair(s) failed after {cfg.max_retries} retries at {where}; "
            f'the error ({times} of them): {cause[:300]}. They are marked "failed" in {out} '
            f"and counted in {summary_path(out).name}. Rerun the same command to retry them: "
            "finished judgements are cached and will not be requested again."
        )
    if result.stopped == "max_cost":
        err_console.print(f"[yellow]warning:[/] {result.summary['stop_message']}")


def _with_options(cfg: Any, updates: dict[str, Any]) -> Any:
    """The config with command-line options applied, validated like the manifest itself."""
    from pydantic import ValidationError

    try:
        return type(cfg).model_validate({**cfg.model_dump(), **updates})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(problems) from None


def _print_estimate(est: Any, model: str) -> None:
    from rich.table import Table

    from wprctl.console import print_table

    table = Table(title=f"judge --dry-run ({model}): nothing was requested")
    table.add_column("item")
    table.add_column("value", justify="right")
    rows = [
        ("pairs", est.pairs),
        ("judgements (pairs x orders)", est.judgements),
        ("already in --out", est.reused),
        ("in the cache", est.cached),
        ("API calls needed", est.calls),
        ("est. prompt tokens", est.prompt_tokens),
        ("est. completion tokens", est.completion_tokens),
        (
            "est. cost (USD)",
            "unknown (no price)" if est.cost_usd is None else f"{est.cost_usd:.4f}",
        ),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    print_table(table)
