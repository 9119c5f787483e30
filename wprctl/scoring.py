"""Reading scores off models: reward-model end scores and per-token log-probabilities."""

from __future__ import annotations

from typing import Any

import torch


def sequence_scores(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Reward-model score at the last non-pad token, by transformers' own pooling (config.pad_token_id)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], computed without materialising a second (B, T, V) tensor."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
