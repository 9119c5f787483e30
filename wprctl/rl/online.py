"""What the online RL stages (PPO, DAR) share: prompt batches, the reward function named by the
manifest, the held-out evaluation whose figures `wprctl report` puts side by side, and the
training loop around their steps (logging, evaluation, checkpoints, the run's record)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wprctl import engine as eng
from wprctl.console import console, is_main_process, make_progress
from wprctl.errors import UserError
from wprctl.manifest import Manifest
from wprctl.models import tokenizer_for
from wprctl.rl.rollout import (
    ExecutionReward,
    ModelReward,
    RewardFn,
    SamplingConfig,
    decode,
    generate,
    join,
    response_logits,
)
from wprctl.runs import MetricsLogger, RunDir, finish_run, resolve_model_ref
from wprctl.scoring import token_logprobs
from wprctl.stages.supervised import epoch_order, rank_slice, to_device
from wprctl.stopping import GracefulStop, end_of_step


@dataclass
class OnlineStage:
    """What PPO and DAR both start from: the actor, its tokenizer and the prompt splits."""

    world: int
    actor_path: Path
    tokenizer: Any
    train_data: Any
    eval_data: Any
    batches_per_epoch: int  # prompt batches of `batch_size` per process in one pass

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id


def open_online_stage(
    manifest: Manifest, stage: str, actor: str | None, batch_size: int, min_batches: int, need: str
) -> OnlineStage:
    """Initialise the process group and the seed, resolve the actor and load the prompts.

    Raises UserError when one pass over the training prompts gives fewer than `min_batches`
    batches; `need` says what those batches are for (named in the message).
    """
    from wprctl.data import load_stage_data

    eng.init_distributed()
    eng.seed_everything(manifest.project.seed)
    world = eng.world_size()
    actor_path = resolve_model_ref(manifest, actor or "sft", what=f"{stage}.actor")
    tokenizer = tokenizer_for(manifest, actor_path)
    train_data = load_stage_data(manifest, stage, "train", tokenizer)
    eval_data = load_stage_data(manifest, stage, "eval", tokenizer)
    n = len(train_data.dataset)
    batches = n // (batch_size * world)
    if batches < min_batches:
        raise UserError(
            f"{stage}: {n} training prompts are fewer than one {need} needs "
            f"({stage}.batch_size {batch_size} x {min_batches} x {world} processes)"
        )
    return OnlineStage(world, actor_path, tokenizer, train_data, eval_data, batches)


def prompt_batch(
    data: Any, seed: int, index: int, batch_size: int, batches_per_epoch: int
) -> dict[str, torch.Tensor]:
    """This rank's prompts of global batch `index`: epoch e's order is a permutation drawn from
    (seed, e), so the batch is a function of its index alone (exact resume)."""
    epoch, within = divmod(index, batches_per_epoch)
    idx = rank_slice(epoch_order(len(data.dataset), seed, epoch), within, batch_size)
    return to_device(data.collate([data.dataset[i] for i in idx]))


def gold_reward_fn(manifest: Manifest) -> Any | None:
    """The demo task's gold oracle, when the data has one (for honest held-out figures)."""
    if manifest.data.dataset != "demo":
        return None
    from wprctl.data import oracle_score

    return oracle_score


def build_reward_fn(
    manifest: Manifest, ref: str | None, spec: eng.EngineSpec, *, stage: str, pad_id: int
) -> RewardFn:
    """The APPS executor on `apps`, else the reward model `ref` (default: the rm stage's output)."""
    m = manifest
    if m.data.dataset == "apps":
        from wprctl.codeexec import ExecConfig, load_problems
        from wprctl.codeexec.executor import hidden_in_project

        spec = m.apps.problems or m.data.path
        if not spec:
            raise UserError(
                f"{stage} on APPS needs apps.problems or data.path (the problems with their tests)"
            )
        # a policy rewarded by tests must not be able to read them (or the run's checkpoints)
        return ExecutionReward(
            load_problems(m.locate(spec)),
            ExecConfig.from_apps(m.apps),
            hide=hidden_in_project(m),
        )
    from wprctl.models import load_reward_model

    rm_path = resolve_model_ref(m, ref or "rm", what=f"{stage}.reward_model")
    model = load_reward_model(
        rm_path, pad_token_id=pad_id, trust_remote_code=m.model.trust_remote_code, trained_head=True
    )
    return ModelReward(eng.init_frozen(model, spec))


def close_reward_fn(reward_fn: Any) -> None:
    """Stop the executor's worker pool, if the reward function has one."""
    pool = getattr(reward_fn, "pool", None)
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.close()


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    ref: Any,
    reward_fn: RewardFn,
    data: Any,
    tokenizer: Any,
    sampling: SamplingConfig,
    *,
    n_prompts: int,
    batch_size: int,
    seed: int,
    gold: Any | None = None,
) -> dict[str, float]:
    """Mean reward, KL to `ref` (k1 summed per answer), length and the fraction of answers without
    eos (and the gold oracle's mean, on the demo) of sampled answers to the first `n_prompts`
    held-out prompts. Sampling uses its own seed, so evaluating never moves the training RNG."""
    n = min(n_prompts, len(data.dataset))
    idx = list(range(eng.rank(), n, eng.world_size()))
    eos_id = tokenizer.eos_token_id
    totals = [0.0] * 6  # count, reward, gold, length, kl, no-eos
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        for i in range(0, len(idx), batch_size):
            batch = to_device(data.collate([data.dataset[j] for j in idx[i : i + batch_size]]))
            responses, mask = generate(
                policy, batch["input_ids"], batch["attention_mask"], sampling, tokenizer
            )
            seq, attn = join(batch["input_ids"], batch["attention_mask"], responses, mask)
            P = batch["input_ids"].size(1)
            examples = [data.examples[int(k)] for k in batch["index"]]
            prompts = decode(tokenizer, batch["input_ids"], batch["attention_mask"])
            texts = decode(tokenizer, responses, mask)
            score = reward_fn(seq, attn, prompts, texts, examples)
            logp = token_logprobs(response_logits(policy, seq, attn, P), responses)
            ref_logp = token_logprobs(response_logits(ref, seq, attn, P), responses)
            totals[0] += len(texts)
            totals[1] += float(score.sum())
            if gold is not None:
                totals[2] += sum(gold(p, r) for p, r in zip(prompts, texts, strict=True))
            totals[3] += float(mask.sum())
            totals[4] += float(((logp - ref_logp) * mask).sum())
            totals[5] += float((~(responses == eos_id).any(1)).sum())
    count, reward, gold_sum, length, kl, no_eos = eng.all_reduce_sum(totals)
    count = max(count, 1.0)
    out = {
        "reward": reward / count,
        "length": length / count,
        "kl_ref": kl / count,
        "no_eos_fraction": no_eos / count,
    }
    if gold is not None:
        out["gold"] = gold_sum / count
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0, in rank order (shapes must match across ranks)."""
    import torch.distributed as dist

    if eng.world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(eng.world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@dataclass
class LoopSchedule:
    """When the training loop logs, evaluates on held-out prompts and checkpoints (in steps)."""

    total: int
    log_every: int
    eval_every: int
    save_every: int


# Figures the progress line shows when a step reports them, after reward and KL.
_PROGRESS_EXTRAS = {"ess": ".2f", "gold": "+.3f"}


def run_online_loop(
    run: RunDir,
    label: str,
    step: int,
    resuming: bool,
    schedule: LoopSchedule,
    one_step: Callable[[int], dict[str, float]],
    evaluate: Callable[[], dict[str, float]],
    save: Callable[[int], None],
) -> tuple[dict[str, float], dict[str, float]]:
    """The loop PPO and DAR share, from ``step`` to ``schedule.total``.

    ``one_step(s)`` runs step s (0-based) and returns its metrics row; ``save(n)`` checkpoints
    the run after n steps. Held-out evaluation before the first step (a resumed run keeps its
    own, and its line in metrics.jsonl), every ``eval_every`` steps and after the last. Returns
    the held-out metrics before and after.
    """
    logger = MetricsLogger(run, resume_from_step=step if resuming else None)
    total = schedule.total
    with GracefulStop(announce=is_main_process()) as stop:
        start_eval = run.state().get("start_eval") if resuming else None
        if start_eval is None:
            start_eval = evaluate()
            logger.log(step, start_eval, prefix="eval/")
            run.update_state(start_eval=start_eval)
            if is_main_process():
                console.print(f"{run.name}: held-out before {label}: " + format_metrics(start_eval))
        with make_progress() as progress:
            bar = progress.add_task(run.name, total=total, completed=step, info="")
            while step < total:
                row = one_step(step)
                step += 1
                if step % schedule.log_every == 0 or step == total:
                    logger.log(step, row, prefix="train/")
                info = f"reward {row.get('reward', math.nan):+.3f} kl {row.get('kl_ref', math.nan):.3f}"
                info += "".join(
                    f" {k} {row[k]:{f}}" for k, f in _PROGRESS_EXTRAS.items() if k in row
                )
                progress.update(bar, completed=step, info=info)
                end_of_step(
                    step,
                    total,
                    schedule,
                    lambda s: logger.log(s, evaluate(), prefix="eval/"),
                    save,
                    stop,
                )
    final = evaluate()
    logger.log(step, final, prefix="eval/")
    logger.close()
    return start_eval, final


def finish_online_run(
    manifest: Manifest,
    run: RunDir,
    label: str,
    start_eval: dict[str, float],
    final: dict[str, float],
    counted: tuple[str, int],
    artifacts: dict[str, str],
) -> dict[str, float]:
    """Print the before/after figures and record the run; ``counted`` is (name, steps done)."""
    if is_main_process():
        console.print(
            f"{run.name}: held-out after {label}: {format_metrics(final)}  "
            f"(before: {format_metrics(start_eval)})\n  model: {run.model_dir}"
        )
    metrics = {f"eval/{k}": v for k, v in final.items()}
    metrics.update({f"eval/{k}_start": v for k, v in start_eval.items()})
    metrics[counted[0]] = float(counted[1])
    finish_run(manifest, run, artifacts, metrics)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
