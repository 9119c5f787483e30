"""Batched sampling from a causal LM with left-padded prompts, reproducible per batch.

Each batch is sampled under its own seed, derived from (run seed, batch index), inside a forked
RNG state: a batch's output does not depend on which batches ran before it, so a resumed run
regenerates exactly the rows an uninterrupted run would have written, and callers' global RNG
(a training loop's) is left untouched.

Used by `wprctl infer`, and by PPO, DAR and the quickstart for their rollouts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are drawn. temperature 0 means greedy decoding; top_k 0 means no top-k."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @classmethod
    def from_section(cls, section: Any, **overrides: Any) -> SamplingConfig:
        """From `[infer]` (or any section with these attributes; PPO's has max_answer_len)."""
        values = {
            "temperature": section.temperature,
            "top_k": getattr(section, "top_k", 0),
            "top_p": getattr(section, "top_p", 1.0),
            "max_new_tokens": getattr(section, "max_new_tokens", None)
            or getattr(section, "max_answer_len", 256),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Generation:
    """One batch of responses. Row i of every field belongs to prompt row i of the batch.

    `sequences` is prompt + response as generated (left-padded prompt, pad after the response)
    and `attention_mask` its real tokens; `response_ids` is the response part, and
    `response_mask` marks its tokens up to and including the first eos. `lengths` counts response tokens without that eos; `eos` says whether the
    response ended with eos (False: cut at max_new_tokens).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    lengths: list[int]
    eos: list[bool]
    texts: list[str]

    @property
    def prompt_width(self) -> int:
        return self.sequences.size(1) - self.response_ids.size(1)


def batch_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for batch `index` of a run seeded with `seed`."""
    digest = hashlib.sha256(f"wprctl-batch:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under `seed` on CPU and the current GPU, restoring the RNG state after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generation_config(cfg: SamplingConfig, tokenizer: Any) -> Any:
    """A complete GenerationConfig, so a checkpoint's own generation defaults cannot leak in."""
    from transformers import GenerationConfig

    sampling: dict[str, Any] = (
        {"do_sample": False}
        if cfg.greedy
        else {
            "do_sample": True,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
        }
    )
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        # A sampled pad token would be indistinguishable from padding for masks and reward pooling.
        sampling["suppress_tokens"] = [tokenizer.pad_token_id]
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )


def split_responses(
    response_ids: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
    """(ids with pad after the first eos, mask up to and including it, lengths, ended-with-eos)."""
    is_eos = response_ids == eos_id
    has_eos = is_eos.any(dim=1)
    width = response_ids.size(1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, width, dtype=torch.long)
    )
    positions = torch.arange(width, device=response_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)) & (positions < width)
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask.long(), first.tolist(), has_eos.tolist()


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    batch: dict[str, torch.Tensor],
    cfg: SamplingConfig,
    *,
    seed: int | None = None,
) -> Generation:
    """Sample one response per row of a left-padded prompt batch (`input_ids`, `attention_mask`).

    With `seed`, sampling runs under that seed in a forked RNG (see `batch_seed`); without it,
    under the caller's global RNG. A DeepSpeed engine is unwrapped; under ZeRO-3 call this
    inside `wprctl.engine.generation_ready(model)`.
    """
    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    gen_cfg = generation_config(cfg, tokenizer)
    was_training = module.training
    module.eval()
    try:
        if seed is None:
            out = module.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg
            )
        else:
            with seeded(seed):
                out = module.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg
                )
    finally:
        module.train(was_training)
    raw = out[:, input_ids.size(1) :]
    ids, mask, lengths, eos = split_responses(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = [
        tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
        for row, n in zip(ids, lengths, strict=True)
    ]
    sequences = torch.cat([input_ids, ids], dim=1)
    full_mask = torch.cat([attention_mask.long(), mask], dim=1)
    return Generation(sequences, full_mask, ids, mask, lengths, eos, texts)
