"""Stage 1, supervised fine-tuning: causal-LM loss on the response tokens of prompt + chosen.

Evaluation reports the held-out token-level loss and perplexity, before training, every
`sft.eval_every` steps and at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from wprctl import engine as eng
from wprctl.data import load_stage_data
from wprctl.manifest import Manifest
from wprctl.models import load_causal_lm, resolve_base_model, tokenizer_for
from wprctl.runs import RunDir
from wprctl.stages.supervised import Batch, SupervisedTask, run_supervised


def response_nll(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over response tokens (labels != -100), and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(labels)
    return (nll * mask).sum(), mask.sum()


def sft_loss(engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    total, count = response_nll(engine, batch)
    loss = total / count.clamp_min(1)
    return loss, {"loss": float(loss.detach())}


def sft_evaluate(model: Any, batches: Iterator[Batch]) -> dict[str, float]:
    total, count = 0.0, 0.0
    for batch in batches:
        t, c = response_nll(model, batch)
        total += float(t)
        count += float(c)
    total, count = eng.all_reduce_sum([total, count])
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def run(manifest: Manifest, run: RunDir, resuming: bool) -> dict[str, float]:
    eng.init_distributed()
    base = resolve_base_model(manifest)
    tokenizer = tokenizer_for(manifest, base)
    model = load_causal_lm(base, trust_remote_code=manifest.model.trust_remote_code)
    task = SupervisedTask(
        name=run.name,
        model=model,
        tokenizer=tokenizer,
        train_data=load_stage_data(manifest, "sft", "train", tokenizer),
        eval_data=load_stage_data(manifest, "sft", "eval", tokenizer),
        loss=sft_loss,
        evaluate=sft_evaluate,
        headline="loss",
    )
    return run_supervised(manifest, run, task, manifest.sft, resuming)
