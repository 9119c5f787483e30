"""Stage 2, the reward model: `AutoModelForSequenceClassification` (one label) on the SFT backbone,
trained with the pairwise Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)).

The score is read at the last non-pad token of prompt + response (the paper's "end score"); the
pad id is written into the model config, so transformers' own pooling computes the same number
and the exported folder scores identically with plain transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from wprctl import engine as eng
from wprctl.data import load_stage_data
from wprctl.manifest import Manifest
from wprctl.models import load_reward_model, tokenizer_for
from wprctl.runs import RunDir, resolve_model_ref
from wprctl.scoring import sequence_scores
from wprctl.stages.supervised import Batch, SupervisedTask, run_supervised


def pair_scores(model: Any, batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected, in one forward pass over both."""
    c, r = batch["chosen_input_ids"], batch["rejected_input_ids"]
    width = max(c.size(1), r.size(1))
    ids = torch.cat(
        [
            F.pad(c, (0, width - c.size(1)), value=pad_id),
            F.pad(r, (0, width - r.size(1)), value=pad_id),
        ]
    )
    mask = torch.cat(
        [
            F.pad(batch["chosen_attention_mask"], (0, width - c.size(1))),
            F.pad(batch["rejected_attention_mask"], (0, width - r.size(1))),
        ]
    )
    scores = sequence_scores(model, ids, mask)
    return scores[: c.size(0)], scores[c.size(0) :]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def run(manifest: Manifest, run: RunDir, resuming: bool) -> dict[str, float]:
    eng.init_distributed()
    # before loading: the score head is new, drawn from the global RNG (without the seed here two
    # runs of the same manifest trained different reward models)
    eng.seed_everything(manifest.project.seed)
    backbone = resolve_model_ref(manifest, manifest.rm.model or "sft", what="rm.model")
    tokenizer = tokenizer_for(manifest, backbone)
    pad_id = tokenizer.pad_token_id
    model = load_reward_model(
        backbone, pad_token_id=pad_id, trust_remote_code=manifest.model.trust_remote_code
    )

    def loss(engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_scores(engine, batch, pad_id)
        value = bradley_terry_loss(chosen, rejected)
        acc = (chosen > rejected).float().mean()
        return value, {"loss": float(value.detach()), "accuracy": float(acc)}

    def evaluate(model: Any, batches: Iterator[Batch]) -> dict[str, float]:
        n = correct = sum_c = sum_r = sum_loss = 0.0
        for batch in batches:
            chosen, rejected = pair_scores(model, batch, pad_id)
            n += chosen.numel()
            correct += float((chosen > rejected).sum())
            sum_c += float(chosen.sum())
            sum_r += float(rejected.sum())
            sum_loss += float(-F.logsigmoid(chosen - rejected).sum())
        n, correct, sum_c, sum_r, sum_loss = eng.all_reduce_sum(
            [n, correct, sum_c, sum_r, sum_loss]
        )
        n = max(n, 1.0)
        return {
            "accuracy": correct / n,
            "chosen_score": sum_c / n,
            "rejected_score": sum_r / n,
            "margin": (sum_c - sum_r) / n,
            "loss": sum_loss / n,
        }

    task = SupervisedTask(
        name=run.name,
        model=model,
        tokenizer=tokenizer,
        train_data=load_stage_data(manifest, "rm", "train", tokenizer),
        eval_data=load_stage_data(manifest, "rm", "eval", tokenizer),
        loss=loss,
        evaluate=evaluate,
        headline="accuracy",
    )
    return run_supervised(manifest, run, task, manifest.rm, resuming)
