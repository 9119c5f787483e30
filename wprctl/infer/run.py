"""`wprctl infer` as a library call: sample responses (or take the references), score them,
append them to a resumable JSONL file, and summarize it.

Work is laid out before anything runs: units (prompt, sample) in dataset order, cut into
batches of `batch_size`; batch b is sampled under `batch_seed(seed, b)`. A rerun skips units
already in the file and regenerates any batch that is missing one, writing only the missing
rows; so whatever is killed, the finished file (rewritten in unit order at the end) is the one an
uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wprctl.data.base import Example
from wprctl.errors import UserError
from wprctl.infer.output import append_rows, check_settings, read_rows, settings_file
from wprctl.infer.summary import SUMMARY_TASKS, print_summary, rouge_figures, row_figures
from wprctl.jsonl import check_output_file
from wprctl.manifest import InferConfig, Manifest

POLICY_KINDS = ("ppo", "dar", "sft")
SPLITS = ("train", "eval")
Unit = tuple[int, int]  # (example index, sample index)


@dataclass
class InferResult:
    out: Path
    summary: dict[str, Any]
    written: int  # rows written by this call
    kept: int  # rows already in the file


# --------------------------------------------------------------------------------------------
# what to run


def default_policy(manifest: Manifest) -> str:
    """The most recently finished sft/ppo/dar run (or variant of one) of this project."""
    from wprctl.runs import read_lineage

    finished = [
        (float(entry.get("finished", 0)), name)
        for name, entry in read_lineage(manifest).items()
        if entry.get("kind") in POLICY_KINDS and entry.get("outputs", {}).get("model")
    ]
    if not finished:
        raise UserError(
            f"infer.model: no finished sft, ppo or dar run under {manifest.output_dir}; run one "
            "first, or pass --model PATH|STAGE"
        )
    return max(finished)[1]


def model_label(manifest: Manifest, ref: str, path: Path) -> str:
    """A stage or variant name as given; for a path, the folder's name (its run's, for
    `<run>/model`), made safe for a file name."""
    from wprctl.runs import read_lineage

    if ref in read_lineage(manifest) or manifest.variant(ref) is not None:
        name = ref
    else:
        p = path.resolve()
        name = p.parent.name if p.name == "model" and p.parent.name else p.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def default_out(manifest: Manifest, label: str, split: str) -> Path:
    suffix = "" if split == "eval" else f"-{split}"
    return manifest.output_dir / "infer" / f"{label}{suffix}.jsonl"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(
            f"--split / infer.split: unknown split {split!r}; expected one of {', '.join(SPLITS)} "
            "(eval is the dataset's held-out split)"
        )
    return split


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# scorers


def _apps_problems(manifest: Manifest, examples: Sequence[Example]) -> dict[str, Any]:
    from wprctl.codeexec import Problem, load_problems

    source = manifest.apps.problems
    if source:
        return load_problems(manifest.locate(source))
    problems: dict[str, Any] = {}
    for ex in examples:
        meta = ex.meta
        pid = str(meta.get("problem_id", ex.id))
        problems[pid] = Problem.from_row(
            {
                "problem_id": pid,
                "input_output": meta.get("input_output"),
                "starter_code": meta.get("starter_code") or "",
                "difficulty": meta.get("difficulty"),
                "url": meta.get("url"),
            }
        )
    return problems


def make_scorer(
    manifest: Manifest,
    cfg: InferConfig,
    examples: Sequence[Example],
    stack: contextlib.ExitStack,
    what: str = "infer.reward_model",
) -> tuple[Any, Any | None]:
    """(scorer, its tokenizer or None). APPS scores by execution unless a reward model is named.
    ``what``: the reward model's setting as the user gave it, for messages."""
    from wprctl.infer.rewards import ExecutionScorer, RewardModelScorer, model_identity
    from wprctl.runs import resolve_model_ref

    if manifest.data.dataset == "apps" and cfg.reward_model is None:
        from wprctl.codeexec import ExecConfig, ExecPool
        from wprctl.codeexec.executor import hidden_in_project

        exec_cfg = ExecConfig.from_apps(manifest.apps)
        problems = _apps_problems(manifest, examples)
        pool = stack.enter_context(ExecPool(exec_cfg, hidden_in_project(manifest)))
        identity = "apps-exec:" + _digest([asdict(exec_cfg), manifest.apps.problems])
        problem_of = {ex.id: str(ex.meta.get("problem_id", ex.id)) for ex in examples}
        return ExecutionScorer(problems, pool, identity, problem_of), None

    from wprctl.engine import device, select_dtype
    from wprctl.models import load_reward_model, tokenizer_for

    path = resolve_model_ref(manifest, cfg.reward_model or "rm", what=what)
    tokenizer = tokenizer_for(manifest, path)

    def load() -> Any:
        model = load_reward_model(
            path,
            pad_token_id=tokenizer.pad_token_id,
            dtype=select_dtype(manifest.model.dtype),
            trust_remote_code=manifest.model.trust_remote_code,
            trained_head=True,
        )
        return model.to(device()).eval()

    scorer = RewardModelScorer(load, tokenizer, f"rm:{model_identity(path)}", cfg.batch_size)
    return scorer, tokenizer


def usable(examples: Sequence[Example], scorer: Any) -> list[int]:
    """Indices of the examples the scorer can score (APPS: problems with readable tests)."""
    problems = getattr(scorer, "problems", None)
    if problems is None:
        return list(range(len(examples)))
    keep = []
    for i, ex in enumerate(examples):
        p = problems.get(scorer.problem_of.get(ex.id, ex.id))
        if p is not None and p.error is None:
            keep.append(i)
    return keep


# --------------------------------------------------------------------------------------------
# rows


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def make_row(
    ex: Example,
    sample: int,
    response: str,
    reward: float,
    *,
    label: str,
    length: int,
    eos: bool,
    dataset: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": ex.id,
        "prompt": ex.prompt,
        "response": response,
        "reward": float(reward),
        "sample": sample,
        "model": label,
        "length": int(length),
        "eos": bool(eos),
        "reference": ex.chosen,
    }
    if dataset == "demo":
        from wprctl.data import oracle_score

        row["oracle"] = float(oracle_score(ex.prompt, response))
    for key, value in ex.meta.items():  # scalars only: APPS tests would bloat every row
        if key not in row and _scalar(value):
            row[key] = value
    return row


def row_key(row: dict[str, Any]) -> tuple[str, int]:
    sample = row.get("sample", 0)
    return str(row["id"]), int(sample) if isinstance(sample, int) else 0


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------
# reference rewards


def reference_rewards(
    manifest: Manifest,
    split: str,
    scorer: Any,
    examples: Sequence[Example],
    batch_size: int,
    on_batch: Any = None,
) -> dict[str, float]:
    """Rewards of the examples' chosen responses, cached per (scorer, split, data) on disk."""
    key = _digest(
        [scorer.identity, split, manifest.data.model_dump(mode="json"), manifest.project.seed]
    )
    path = manifest.output_dir / "infer" / ".cache" / f"reference-{key}.jsonl"
    cached = {str(r["id"]): float(r["reward"]) for r in read_rows(path, required=("id", "reward"))}
    todo = [ex for ex in examples if ex.chosen is not None and ex.id not in cached]
    for chunk in chunks(todo, batch_size):
        rewards = scorer(chunk, [ex.chosen for ex in chunk])
        append_rows(
            path, [{"id": ex.id, "reward": r} for ex, r in zip(chunk, rewards, strict=True)]
        )
        cached.update({ex.id: float(r) for ex, r in zip(chunk, rewards, strict=True)})
        if on_batch is not None:
            on_batch(len(chunk))
    return {ex.id: cached[ex.id] for ex in examples if ex.id in cached}


# --------------------------------------------------------------------------------------------
# the run


def run_infer(
    manifest: Manifest,
    cfg: InferConfig | None = None,
    *,
    reference: bool = False,
    named: Mapping[str, str] | None = None,
) -> InferResult:
    """Generate (or take the references), score, append to the output, summarize.

    ``named``: how the user gave a setting, for messages (``{"model": "--model"}``); by default
    the manifest key, ``infer.model``."""
    cfg = cfg or manifest.infer
    _quiet_loading()
    with contextlib.ExitStack() as stack:
        plan = _plan(manifest, cfg, reference, stack, dict(named or {}))
        existing = read_rows(plan.out)
        check_settings(plan.out, plan.settings, has_rows=bool(existing))
        written, ref_mean = _execute(manifest, cfg, plan, {row_key(r) for r in existing})
    rows = canonical_order(plan.out, existing + written, plan.keys)
    wanted = set(plan.keys)
    summary = _summarize(manifest, plan, [r for r in rows if row_key(r) in wanted], ref_mean)
    from wprctl.console import console
    from wprctl.judge.io import write_json_atomic

    write_json_atomic(plan.out.with_name(plan.out.name + ".summary.json"), summary)
    print_summary(summary, title=f"infer {plan.label}: {plan.split} split, {summary['n']} rows")
    console.print(f"wrote {plan.out} ({len(written)} new rows) and {plan.out.name}.summary.json")
    return InferResult(out=plan.out, summary=summary, written=len(written), kept=len(existing))


@dataclass
class _Plan:
    """Everything decided before the first batch runs."""

    split: str
    reference: bool
    label: str
    policy_path: Path | None
    examples: list[Example]
    data: Any  # StageData of tokenized prompts (None for --reference)
    tokenizer: Any
    scorer: Any
    picked: list[int]  # example indices, in order
    units: list[Unit]
    out: Path
    settings: dict[str, Any]

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [self.key(u) for u in self.units]

    def key(self, unit: Unit) -> tuple[str, int]:
        return self.examples[unit[0]].id, unit[1]


def _plan(
    manifest: Manifest,
    cfg: InferConfig,
    reference: bool,
    stack: contextlib.ExitStack,
    named: dict[str, str],
) -> _Plan:
    from wprctl.console import err_console
    from wprctl.data import load_stage_data, stage_examples
    from wprctl.models import tokenizer_for
    from wprctl.runs import resolve_model_ref

    split = check_split(cfg.split)
    dataset = manifest.data.dataset
    # a mistyped model name first (a lookup, nothing loads), then the data, so that a data
    # problem surfaces before any model loads
    policy_path: Path | None = None
    label = "reference"
    if not reference:
        ref = cfg.model or default_policy(manifest)
        policy_path = resolve_model_ref(manifest, ref, what=named.get("model", "infer.model"))
        label = model_label(manifest, ref, policy_path)
    examples = stage_examples(manifest, "infer", split)
    what = named.get("reward_model", "infer.reward_model")
    scorer, score_tokenizer = make_scorer(manifest, cfg, examples, stack, what)
    data = None
    if reference:
        tokenizer = score_tokenizer or tokenizer_for(manifest)
    else:
        tokenizer = tokenizer_for(manifest, policy_path)
        data = load_stage_data(manifest, "infer", split, tokenizer)
        examples = data.examples

    candidates = [i for i in usable(examples, scorer) if not reference or examples[i].chosen]
    if not candidates:
        raise UserError(
            f"the {split} split of data.dataset = {dataset!r} has no prompts to run"
            + (" with a reference response" if reference else "")
        )
    if dataset == "apps" and len(candidates) < len(examples):
        n = len(examples) - len(candidates)
        err_console.print(f"[yellow]note:[/] {n} problem(s) without usable tests left out")
    picked = candidates[: cfg.num_samples]
    if len(picked) < cfg.num_samples:
        err_console.print(
            f"[yellow]note:[/] the {split} split has {len(picked)} usable prompts "
            f"(num_samples = {cfg.num_samples}); using all of them"
        )
    per_prompt = 1 if reference else cfg.samples_per_prompt
    out = Path(cfg.out) if cfg.out else default_out(manifest, label, split)
    if not out.is_absolute():
        out = manifest.root / out
    check_output_file(out, [manifest.locate(manifest.data.path)] if manifest.data.path else [])
    settings = {
        "model": label,
        "model_path": str(policy_path.resolve()) if policy_path else None,
        "scorer": scorer.identity,
        "split": split,
        "data": _digest([manifest.data.model_dump(mode="json"), manifest.project.seed]),
        "reference": reference,
        "seed": cfg.seed,
        "samples_per_prompt": per_prompt,
        "batch_size": cfg.batch_size,
    }
    if not reference:
        settings.update(
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
        )
    return _Plan(
        split=split,
        reference=reference,
        label=label,
        policy_path=policy_path,
        examples=examples,
        data=data,
        tokenizer=tokenizer,
        scorer=scorer,
        picked=picked,
        units=[(i, k) for i in picked for k in range(per_prompt)],
        out=out,
        settings=settings,
    )


def _execute(
    manifest: Manifest, cfg: InferConfig, plan: _Plan, done: set[tuple[str, int]]
) -> tuple[list[dict[str, Any]], float | None]:
    """Run the batches that miss a row; then the reference rewards. (new rows, ref mean)"""
    from wprctl.console import console, make_progress

    batches = list(chunks(plan.units, cfg.batch_size))
    todo = [(b, bt) for b, bt in enumerate(batches) if any(plan.key(u) not in done for u in bt)]
    n_missing = sum(plan.key(u) not in done for u in plan.units)
    if n_missing < len(plan.units):
        console.print(
            f"{plan.out}: {len(plan.units) - n_missing} of {len(plan.units)} rows already "
            "there; resuming"
        )
    model = None
    if todo and not plan.reference:
        from wprctl.engine import device, select_dtype
        from wprctl.models import load_causal_lm

        model = load_causal_lm(
            plan.policy_path,
            dtype=select_dtype(manifest.model.dtype),
            trust_remote_code=manifest.model.trust_remote_code,
        )
        model.to(device()).eval()

    written: list[dict[str, Any]] = []
    ref_mean = None
    total = len(plan.units)
    with make_progress() as progress:
        task = progress.add_task(
            f"infer {plan.label}", total=total, completed=total - n_missing, info=""
        )
        meter = _Meter()
        for b, batch in todo:
            rows = _run_batch(manifest, cfg, plan, model, b, batch, done)
            append_rows(plan.out, rows)
            written.extend(rows)
            meter.add(rows)
            progress.update(task, advance=len(rows), info=meter.info())
        if not plan.reference:
            refs = [plan.examples[i] for i in plan.picked if plan.examples[i].chosen is not None]
            ref_task = progress.add_task("reference rewards", total=len(refs), info="")
            scores = reference_rewards(
                manifest,
                plan.split,
                plan.scorer,
                refs,
                cfg.batch_size,
                on_batch=lambda n: progress.advance(ref_task, n),
            )
            progress.update(ref_task, completed=len(refs))
            ref_mean = sum(scores.values()) / len(scores) if scores else None
    return written, ref_mean


def _run_batch(
    manifest: Manifest,
    cfg: InferConfig,
    plan: _Plan,
    model: Any,
    b: int,
    batch: Sequence[Unit],
    done: set[tuple[str, int]],
) -> list[dict[str, Any]]:
    """The rows of batch `b` that are not in `done`."""
    exs = [plan.examples[i] for i, _ in batch]
    if plan.reference:
        texts = [ex.chosen or "" for ex in exs]
        lengths = [len(plan.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        eos = [True] * len(texts)
    else:
        from wprctl.infer.generation import SamplingConfig, batch_seed, generate

        # the whole batch is sampled again even when only some of its rows are missing, so
        # that those rows come out exactly as in an uninterrupted run
        gen = generate(
            model,
            plan.tokenizer,
            plan.data.collate([plan.data.dataset[i] for i, _ in batch]),
            SamplingConfig.from_section(cfg),
            seed=batch_seed(cfg.seed, b),
        )
        texts, lengths, eos = gen.texts, gen.lengths, gen.eos
    # scored whole too: batched scores differ from unbatched ones in the last bits
    rewards = plan.scorer(exs, texts)
    return [
        make_row(
            exs[j],
            unit[1],
            texts[j],
            rewards[j],
            label=plan.label,
            length=lengths[j],
            eos=eos[j],
            dataset=manifest.data.dataset,
        )
        for j, unit in enumerate(batch)
        if plan.key(unit) not in done
    ]


def _summarize(
    manifest: Manifest, plan: _Plan, rows: list[dict[str, Any]], ref_mean: float | None
) -> dict[str, Any]:
    summary: dict[str, Any] = row_figures(rows)
    if manifest.data.dataset in SUMMARY_TASKS and not plan.reference:
        summary.update(rouge_figures(rows))
    else:
        summary.update({"rouge1": None, "rouge2": None, "rougeL": None})
    summary["reference_reward_mean"] = summary["reward_mean"] if plan.reference else ref_mean
    summary.update(
        model=plan.label,
        scorer=plan.scorer.identity.split(":")[0],
        split=plan.split,
        out=str(plan.out),
        settings=plan.settings,
    )
    return summary


def _quiet_loading() -> None:
    # transformers draws a weight-loading bar per model; ours is the one that says something
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def canonical_order(
    out: Path, rows: list[dict[str, Any]], order: list[tuple[str, int]]
) -> list[dict[str, Any]]:
    """Rows in unit order (rows of other units after, as they were); rewrites the file if needed."""
    from wprctl.judge.io import write_jsonl_atomic

    position = {key: i for i, key in enumerate(order)}
    ranked = sorted(range(len(rows)), key=lambda j: (position.get(row_key(rows[j]), len(order)), j))
    if ranked != list(range(len(rows))):
        rows = [rows[j] for j in ranked]
        write_jsonl_atomic(out, rows)
    return rows


class _Meter:
    """Throughput and running reward for the progress bar."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.rows = 0
        self.tokens = 0
        self.reward = 0.0

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows += len(rows)
        self.tokens += sum(int(r["length"]) for r in rows)
        self.reward += sum(float(r["reward"]) for r in rows)

    def info(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        mean = self.reward / self.rows if self.rows else 0.0
        return f"{self.rows / dt:.2f} rows/s  {self.tokens / dt:.0f} tok/s  reward {mean:+.3f}"


__all__ = [
    "InferResult",
    "canonical_order",
    "default_out",
    "default_policy",
    "model_label",
    "reference_rewards",
    "run_infer",
    "settings_file",
]
