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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wprctl.data.base import Example
from wprctl.errors import UserError
from wprctl.infer.output import append_rows, check_settings, read_rows, settings_file
from wprctl.infer.summary import SUMMARY_TASKS, print_summary, rouge_figures, row_figures
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
        local = Path(source).expanduser()
        if not local.is_absolute() and (manifest.root / local).exists():
            local = manifest.root / local
        return load_problems(local if local.exists() else source)
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
) -> tuple[Any, Any | None]:
    """(scorer, its tokenizer or None). APPS scores by execution unless a reward model is named."""
    from wprctl.infer.rewards import ExecutionScorer, RewardModelScorer, model_identity
    from wprctl.runs import resolve_model_ref

    if manifest.data.dataset == "apps" and cfg.reward_model is None:
        from wprctl.codeexec import ExecConfig, ExecPool

        exec_cfg = ExecConfig.from_apps(manifest.apps)
        problems = _apps_problems(manifest, examples)
        pool = stack.enter_context(ExecPool(exec_cfg))
        identity = "apps-exec:" + _digest([asdict(exec_cfg), manifest.apps.problems])
        problem_of = {ex.id: str(ex.meta.get("problem_id", ex.id)) for ex in examples}
        return ExecutionScorer(problems, pool, identity, problem_of), None

    from wprctl.engine import device, select_dtype
    from wprctl.models import load_reward_model, tokenizer_for

    path = resolve_model_ref(manifest, cfg.reward_model or "rm", what="infer.reward_model")
    tokenizer = tokenizer_for(manifest, path)

    def load() -> Any:
        model = load_reward_model(
            path,
            pad_token_id=tokenizer.pad_token_id,
            dtype=select_dtype(manifest.model.dtype),
            trust_remote_code=manifest.model.trust_remote_code,
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
    manifest: Manifest, cfg: InferConfig | None = None, *, reference: bool = False
) -> InferResult:
    """Generate (or take the references), score, append to the output, summarize."""
    from wprctl.console import console, err_console, make_progress

    cfg = cfg or manifest.infer
    _quiet_loading()
    split = check_split(cfg.split)
    dataset = manifest.data.dataset
    with contextlib.ExitStack() as stack:
        # examples first (cheap, and a data problem should surface before any model loads)
        from wprctl.data import stage_examples

        examples = stage_examples(manifest, "infer", split)
        if reference:
            label, policy_path = "reference", None
        else:
            from wprctl.runs import resolve_model_ref

            ref = cfg.model or default_policy(manifest)
            policy_path = resolve_model_ref(manifest, ref, what="infer.model")
            label = model_label(manifest, ref, policy_path)
        scorer, score_tokenizer = make_scorer(manifest, cfg, examples, stack)

        if reference:
            from wprctl.models import tokenizer_for

            tokenizer = score_tokenizer or tokenizer_for(manifest)
            data = None
        else:
            from wprctl.data import load_stage_data
            from wprctl.models import tokenizer_for

            tokenizer = tokenizer_for(manifest, policy_path)
            data = load_stage_data(manifest, "infer", split, tokenizer)
            examples = data.examples

        candidates = [i for i in usable(examples, scorer) if not reference or examples[i].chosen]
        dropped = len(examples) - len(candidates)
        if not candidates:
            raise UserError(
                f"{split} split of data.dataset = {dataset!r}: no prompts to run"
                + (" with a reference response" if reference else "")
            )
        picked = candidates[: cfg.num_samples]
        per_prompt = 1 if reference else cfg.samples_per_prompt
        units: list[Unit] = [(i, k) for i in picked for k in range(per_prompt)]
        batches = list(chunks(units, cfg.batch_size))

        out = Path(cfg.out) if cfg.out else default_out(manifest, label, split)
        if not out.is_absolute():
            out = manifest.root / out
        existing = read_rows(out)
        settings = {
            "model": label,
            "model_path": str(Path(policy_path).resolve()) if policy_path else None,
            "scorer": scorer.identity,
            "split": split,
            "data": _digest([manifest.data.model_dump(mode="json"), manifest.project.seed]),
            "reference": reference,
            "seed": cfg.seed,
            "samples_per_prompt": per_prompt,
            "batch_size": cfg.batch_size,
            **(
                {}
                if reference
                else {
                    "temperature": cfg.temperature,
                    "top_k": cfg.top_k,
                    "top_p": cfg.top_p,
                    "max_new_tokens": cfg.max_new_tokens,
                }
            ),
        }
        check_settings(out, settings, has_rows=bool(existing))
        done = {row_key(r) for r in existing}

        def unit_key(u: Unit) -> tuple[str, int]:
            return examples[u[0]].id, u[1]

        todo = [
            (b, batch)
            for b, batch in enumerate(batches)
            if any(unit_key(u) not in done for u in batch)
        ]
        n_missing = sum(unit_key(u) not in done for u in units)
        if dropped and dataset == "apps":
            err_console.print(f"[yellow]note:[/] {dropped} problem(s) without usable tests left out")
        if len(picked) < cfg.num_samples:
            err_console.print(
                f"[yellow]note:[/] the {split} split has {len(picked)} usable prompts "
                f"(num_samples = {cfg.num_samples}); using all of them"
            )
        if n_missing < len(units):
            console.print(
                f"{out}: {len(units) - n_missing} of {len(units)} rows already there; resuming"
            )

        model = None
        if todo and not reference:
            from wprctl.engine import device, select_dtype
            from wprctl.models import load_causal_lm

            model = load_causal_lm(
                policy_path,
                dtype=select_dtype(manifest.model.dtype),
                trust_remote_code=manifest.model.trust_remote_code,
            )
            model.to(device()).eval()

        written: list[dict[str, Any]] = []
        with make_progress() as progress:
            task = progress.add_task(
                f"infer {label}", total=len(units), completed=len(units) - n_missing, info=""
            )
            meter = _Meter()
            for b, batch in todo:
                rows = _run_batch(
                    b,
                    batch,
                    examples,
                    data,
                    model,
                    tokenizer,
                    scorer,
                    cfg,
                    done,
                    unit_key,
                    label=label,
                    dataset=dataset,
                    reference=reference,
                )
                append_rows(out, rows)
                written.extend(rows)
                meter.add(rows)
                progress.update(task, advance=len(rows), info=meter.info())

            rows_all = existing + written
            ref_mean = None
            if not reference:
                ref_examples = [examples[i] for i in picked if examples[i].chosen is not None]
                ref_task = progress.add_task("reference rewards", total=len(ref_examples), info="")
                ref = reference_rewards(
                    manifest,
                    split,
                    scorer,
                    ref_examples,
                    cfg.batch_size,
                    on_batch=lambda n: progress.advance(ref_task, n),
                )
                progress.update(ref_task, completed=len(ref_examples))
                ref_mean = sum(ref.values()) / len(ref) if ref else None

    rows_all = canonical_order(out, rows_all, [unit_key(u) for u in units])
    wanted = {unit_key(u) for u in units}
    rows = [r for r in rows_all if row_key(r) in wanted]
    summary: dict[str, Any] = {**row_figures(rows)}
    if dataset in SUMMARY_TASKS and not reference:
        summary.update(rouge_figures(rows))
    else:
        summary.update({"rouge1": None, "rouge2": None, "rougeL": None})
    summary["reference_reward_mean"] = summary["reward_mean"] if reference else ref_mean
    summary.update(
        model=label,
        scorer=scorer.identity.split(":")[0],
        split=split,
        out=str(out),
        settings=settings,
    )
    from wprctl.judge.io import write_json_atomic

    write_json_atomic(out.with_name(out.name + ".summary.json"), summary)
    print_summary(summary, title=f"infer {label}: {split} split, {len(rows)} rows")
    console.print(f"wrote {out} ({len(written)} new rows) and {out.name}.summary.json")
    return InferResult(out=out, summary=summary, written=len(written), kept=len(existing))


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


def _run_batch(
    b: int,
    batch: Sequence[Unit],
    examples: Sequence[Example],
    data: Any,
    model: Any,
    tokenizer: Any,
    scorer: Any,
    cfg: InferConfig,
    done: set[tuple[str, int]],
    unit_key: Any,
    *,
    label: str,
    dataset: str,
    reference: bool,
) -> list[dict[str, Any]]:
    exs = [examples[i] for i, _ in batch]
    if reference:
        texts = [ex.chosen or "" for ex in exs]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        eos = [True] * len(texts)
    else:
        from wprctl.infer.generation import SamplingConfig, batch_seed, generate

        # the whole batch is sampled again even when only some of its rows are missing, so
        # that those rows come out exactly as in an uninterrupted run
        features = [data.dataset[i] for i, _ in batch]
        gen = generate(
            model,
            tokenizer,
            data.collate(features),
            SamplingConfig.from_section(cfg),
            seed=batch_seed(cfg.seed, b),
        )
        texts, lengths, eos = gen.texts, gen.lengths, gen.eos
    # scored whole too: batched scores differ from unbatched ones in the last bits
    rewards = scorer(exs, texts)
    return [
        make_row(
            exs[j],
            batch[j][1],
            texts[j],
            rewards[j],
            label=label,
            length=lengths[j],
            eos=eos[j],
            dataset=dataset,
        )
        for j, u in enumerate(batch)
        if unit_key(u) not in done
    ]


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
