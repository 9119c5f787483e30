"""Rewards of (prompt, response) texts: the reward model's end score, or APPS execution.

The reward model reads prompt + response + eos tokenized the way the RM stage trained on it
(`wprctl.data.tokenize.encode_pair`: the prompt with the tokenizer's special tokens, then the
response, then eos), right-padded so every real token keeps its position. The score at the last
non-pad token is then exactly what plain `AutoModelForSequenceClassification` gives for those ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from wprctl.data.base import Example
from wprctl.data.tokenize import encode_pair
from wprctl.scoring import sequence_scores

_NO_LIMIT = 1 << 30


def encode_for_reward(
    tokenizer: Any, prompt: str, response: str, max_len: int | None = None
) -> list[int]:
    """Ids of prompt + response + eos; only past `max_len` is anything cut (response first, to
    half of it, then the prompt from the left of its body, as in RM training)."""
    limit = max_len or _NO_LIMIT
    prompt_ids, response_ids = encode_pair(tokenizer, prompt, response, limit, limit, limit)
    return prompt_ids + response_ids


def _position_limit(model: Any) -> int | None:
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def score_ids(
    reward_model: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16
) -> torch.Tensor:
    """End scores of token sequences (float32, on CPU, in input order).

    Sequences are scored in batches of similar length, right-padded with `pad_id`."""
    module = getattr(reward_model, "module", reward_model)
    device = next(module.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(seqs[i])] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
            mask[row, : len(seqs[i])] = 1
        scores = sequence_scores(reward_model, ids.to(device), mask.to(device))
        out[torch.as_tensor(chunk)] = scores.float().cpu()
    return out


def score_texts(
    reward_model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reward-model end scores of prompt + response + eos (float32, CPU, one per pair)."""
    limit = max_len or _position_limit(reward_model)
    seqs = [
        encode_for_reward(tokenizer, p, r, limit) for p, r in zip(prompts, responses, strict=True)
    ]
    return score_ids(reward_model, seqs, tokenizer.pad_token_id, batch_size)


# --------------------------------------------------------------------------------------------
# scorers: what `wprctl infer` calls per batch


class Scorer(Protocol):
    """Rewards for responses to examples; `identity` names what scores (for caching)."""

    identity: str

    def __call__(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]: ...


class RewardModelScorer:
    """Reward-model end scores; the model is loaded on first use (a finished rerun needs none)."""

    def __init__(
        self, load: Callable[[], Any], tokenizer: Any, identity: str, batch_size: int = 16
    ) -> None:
        self._load = load
        self._model: Any = None
        self.tokenizer = tokenizer
        self.identity = identity
        self.batch_size = batch_size

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model

    def __call__(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        scores = score_texts(
            self.model,
            self.tokenizer,
            [ex.prompt for ex in examples],
            list(responses),
            batch_size=self.batch_size,
        )
        return scores.tolist()


@dataclass
class ExecutionScorer:
    """APPS: the executor's reward of each response against its problem's tests."""

    problems: dict[str, Any]
    pool: Any
    identity: str
    problem_of: dict[str, str] = field(default_factory=dict)  # example id -> problem id

    def __call__(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        from wprctl.codeexec import execution_reward

        samples = [
            (self.problem_of.get(ex.id, ex.id), r)
            for ex, r in zip(examples, responses, strict=True)
        ]
        return execution_reward(self.problems, samples, pool=self.pool)


def model_identity(path: str | Path) -> str:
    """A stable name of a model folder's weights: its path, and the size and mtime of each file."""
    p = Path(path)
    parts: list[Any] = [str(p.resolve())]
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
                st = f.stat()
                parts.append([f.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
