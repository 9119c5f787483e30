"""The supervised training loop SFT and RM share: epochs over a fixed dataset on one DeepSpeed
engine, with evaluation, checkpoints, exact resume and an HF export at the end.

Exact resume: the sample order of epoch e is a permutation drawn from (seed, e), so the position
in the data is a function of the optimizer step alone; the checkpoint stores the step, the RNG
states, and DeepSpeed's model, optimizer and scheduler states. A run killed after a checkpoint and
resumed therefore reproduces the uninterrupted run's weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from wprctl import engine as eng
from wprctl.console import console, is_main_process, make_progress
from wprctl.manifest import Manifest, OptimConfig
from wprctl.runs import MetricsLogger, RunDir, check_resume_step
from wprctl.stopping import GracefulStop, end_of_step

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Batch], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[Any, Iterator[Batch]], dict[str, float]]


@dataclass
class SupervisedTask:
    """What a stage plugs into the loop."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    train_data: Any  # wprctl.data.StageData
    eval_data: Any | None
    loss: LossFn  # (engine, batch) -> (loss to back-propagate, metrics to log)
    evaluate: EvalFn  # (model, batches) -> metrics, summed over this rank's shard then reduced
    headline: str  # the metric shown in the progress bar, e.g. "loss"
    extra_outputs: dict[str, str] = field(default_factory=dict)


def _batches(data: Any, indices: list[int], micro: int) -> Iterator[Batch]:
    for i in range(0, len(indices), micro):
        chunk = indices[i : i + micro]
        if chunk:
            yield data.collate([data.dataset[j] for j in chunk])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_slice(order: list[int], step_in_epoch: int, micro: int) -> list[int]:
    """This rank's micro-batch of global micro-step `step_in_epoch` (global batch = micro * world)."""
    world, rank = eng.world_size(), eng.rank()
    start = step_in_epoch * micro * world + rank * micro
    return order[start : start + micro]


def to_device(batch: Batch) -> Batch:
    dev = eng.device()
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eval_shard(data: Any, micro: int) -> Iterator[Batch]:
    """This rank's share of the evaluation data, in order (metrics are summed, then reduced)."""
    n = len(data.dataset)
    idx = list(range(eng.rank(), n, eng.world_size()))
    for batch in _batches(data, idx, micro):
        yield to_device(batch)


def run_supervised(
    manifest: Manifest, run: RunDir, task: SupervisedTask, cfg: OptimConfig, resuming: bool
) -> dict[str, float]:
    seed = manifest.project.seed
    eng.seed_everything(seed)
    eng.init_distributed()
    world = eng.world_size()
    n = len(task.train_data.dataset)
    micro, accum = cfg.batch_size, cfg.grad_accum
    micro_steps_per_epoch = n // (micro * world)
    if micro_steps_per_epoch < accum:
        from wprctl.errors import UserError

        raise UserError(
            f"{task.name}: {n} training rows are fewer than one optimizer step needs "
            f"(batch_size {micro} x grad_accum {accum} x {world} processes)"
        )
    steps_per_epoch = micro_steps_per_epoch // accum
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    spec = eng.EngineSpec(
        zero_stage=manifest.deepspeed.zero_stage,
        offload_optimizer=manifest.deepspeed.offload_optimizer,
        offload_param=manifest.deepspeed.offload_param,
        micro_batch=micro,
        grad_accum=accum,
        grad_clip=cfg.grad_clip,
        dtype=eng.select_dtype(manifest.model.dtype),
    )
    if manifest.model.gradient_checkpointing:
        task.model.gradient_checkpointing_enable()
    engine = eng.init_trainable(
        task.model,
        spec,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        scheduler=cfg.scheduler,
        warmup_steps=int(cfg.warmup_ratio * total),
        total_steps=total,
    )
    step = 0
    if resuming and run.has_checkpoint():
        client = eng.load_checkpoint({"model": engine}, run.checkpoint_dir)
        step = int(client["step"])
        check_resume_step(run, step, total, f"{run.kind}.max_steps, {run.kind}.epochs")
        console.print(f"{task.name}: resumed from step {step} ({run.checkpoint_dir})")
    logger = MetricsLogger(run, resume_from_step=step if resuming else None)

    def evaluate() -> dict[str, float]:
        if task.eval_data is None:
            return {}
        engine.eval()
        with torch.no_grad():
            metrics = task.evaluate(engine, eval_shard(task.eval_data, cfg.eval_batch_size))
        engine.train()
        return metrics

    def save(step: int) -> None:
        eng.save_checkpoint(
            {"model": engine}, run.checkpoint_dir, step, {"task": task.name}, cfg.keep_last
        )

    with GracefulStop(announce=is_main_process()) as stop:
        if step == 0:
            first = evaluate()
            logger.log(0, first, prefix="eval/")
            if first and is_main_process():
                console.print(f"{task.name}: before training " + _fmt(first))
        engine.train()
        tokens = 0
        t0 = time.time()
        window: dict[str, list[float]] = {}
        with make_progress() as progress:
            bar = progress.add_task(task.name, total=total, completed=step, info="")
            while step < total:
                for _ in range(accum):
                    micro_index = step * accum + _
                    epoch, in_epoch = divmod(micro_index, micro_steps_per_epoch)
                    order = epoch_order(n, seed, epoch)
                    idx = rank_slice(order, in_epoch, micro)
                    batch = to_device(
                        task.train_data.collate([task.train_data.dataset[j] for j in idx])
                    )
                    loss, metrics = task.loss(engine, batch)
                    engine.backward(loss)
                    engine.step()
                    tokens += sum(
                        int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask")
                    )
                    for k, v in metrics.items():
                        window.setdefault(k, []).append(v)
                step += 1
                if step % cfg.log_every == 0 or step == total:
                    row = {k: sum(v) / len(v) for k, v in window.items()}
                    row = eng.all_reduce_mean(row)
                    row["lr"] = engine.get_lr()[0]
                    grad_norm = engine.get_global_grad_norm()
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    elapsed = max(time.time() - t0, 1e-9)
                    row["tokens_per_s"] = eng.all_reduce_sum([tokens])[0] / elapsed
                    logger.log(step, row, prefix="train/")
                    window.clear()
                    progress.update(
                        bar, info=f"{task.headline} {row.get(task.headline, float('nan')):.4f}"
                    )
                progress.update(bar, completed=step)
                end_of_step(
                    step,
                    total,
                    cfg,
                    lambda s: logger.log(s, evaluate(), prefix="eval/"),
                    save,
                    stop,
                )
    last_eval = evaluate()
    logger.log(step, last_eval, prefix="eval/")
    logger.close()
    eng.export_hf(engine, run.model_dir, task.tokenizer)
    if is_main_process():
        console.print(
            f"{task.name}: done after {step} steps; "
            + _fmt(last_eval)
            + f"\n  model: {run.model_dir}"
        )
    from wprctl.runs import finish_run

    final = {f"eval/{k}": v for k, v in last_eval.items()}
    final["steps"] = float(step)
    finish_run(manifest, run, {"model": str(run.model_dir), **task.extra_outputs}, final)
    return final


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
