"""Sampling responses and scoring them: what PPO, DAR and inference share.

Sequences are `prompt (left-padded) + response (right-padded)`. Position ids are computed from
the attention mask in every forward pass, exactly as `generate` does, so the log-probabilities
used for learning are those of the distribution that sampled the tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from wprctl.engine import generation_ready, unwrap
from wprctl.infer.generation import SamplingConfig
from wprctl.infer.generation import generate as sample_batch
from wprctl.scoring import sequence_scores, token_logprobs


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def generate(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    tokenizer: Any,
    *,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt (under ZeRO-3 with whole weights, see ``generation_ready``).

    Returns (responses (B, R) padded with pad after the first eos, mask (B, R) float, 1.0 on the
    tokens up to and including that eos). Without `seed`, sampling draws from the global RNG,
    which training checkpoints save and restore.
    """
    with generation_ready(model):
        g = sample_batch(
            model,
            tokenizer,
            {"input_ids": prompt_ids, "attention_mask": prompt_mask},
            sampling,
            seed=seed,
        )
    return g.response_ids, g.response_mask.float()


def join(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([prompt_ids, responses], 1), torch.cat(
        [prompt_mask, mask.to(prompt_mask.dtype)], 1
    )


def response_logits(
    model: Any, seq: torch.Tensor, attn: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """Next-token logits at the response positions (B, R, V): logits[t] predicts response token t."""
    logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).logits
    return logits[:, prompt_len - 1 : -1]


def response_logprobs(
    model: Any, seq: torch.Tensor, attn: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    return token_logprobs(response_logits(model, seq, attn, prompt_len), seq[:, prompt_len:])


def token_values(
    critic: Any, seq: torch.Tensor, attn: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """Per-token values (B, R) of a sequence-classification critic: its score head on every position.

    V[t] is the value of the state before response token t (the same positions as the logits).
    """
    module = unwrap(critic)
    head = getattr(module, "score", None)
    if head is None:
        raise TypeError(
            f"{type(module).__name__} has no `score` head to read per-token values from"
        )
    hidden = module.base_model(
        input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)
    ).last_hidden_state
    values = head(hidden).squeeze(-1)
    return values[:, prompt_len - 1 : -1].float()


# --------------------------------------------------------------------------------------------
# rewards: a reward model's end score, or the APPS execution reward

RewardFn = Callable[[torch.Tensor, torch.Tensor, list[str], list[str], list[Any]], torch.Tensor]


class ModelReward:
    """The reward model's score at the last non-pad token of prompt + response."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(
        self,
        seq: torch.Tensor,
        attn: torch.Tensor,
        prompts: list[str],
        responses: list[str],
        examples: list[Any],
    ) -> torch.Tensor:
        return sequence_scores(self.model, seq, attn).float()


class ExecutionReward:
    """The APPS executor's reward of each decoded response (paper formula; see wprctl.codeexec)."""

    def __init__(self, problems: dict[str, Any], config: Any, hide: Sequence[str] = ()) -> None:
        from wprctl.codeexec import ExecPool

        self.problems = problems
        self.config = config
        self.pool = ExecPool(config, hide)

    def __call__(
        self,
        seq: torch.Tensor,
        attn: torch.Tensor,
        prompts: list[str],
        responses: list[str],
        examples: list[Any],
    ) -> torch.Tensor:
        from wprctl.codeexec import execution_reward

        samples = [
            (str(ex.meta.get("problem_id", ex.id)), text)
            for ex, text in zip(examples, responses, strict=True)
        ]
        rewards = execution_reward(self.problems, samples, self.config, pool=self.pool)
        return torch.tensor(rewards, dtype=torch.float32, device=seq.device)


def decode(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
    rows: Sequence[torch.Tensor] = (
        ids if mask is None else [r[m.bool()] for r, m in zip(ids, mask, strict=True)]
    )
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
