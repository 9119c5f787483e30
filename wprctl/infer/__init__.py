"""Batch inference: sampling, reward scoring and the resumable `wprctl infer` run.

    from wprctl.infer import SamplingConfig, generate, score_texts
    gen = generate(model, tokenizer, batch, SamplingConfig(temperature=0.8), seed=1234)
    rewards = score_texts(reward_model, tokenizer, prompts, gen.texts)

`generate` and `score_texts` are what PPO, DAR and the quickstart call for rollouts and rewards;
`run_infer(manifest)` is the whole command. Torch is imported on first use of a submodule.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Generation": "wprctl.infer.generation",
    "SamplingConfig": "wprctl.infer.generation",
    "batch_seed": "wprctl.infer.generation",
    "generate": "wprctl.infer.generation",
    "seeded": "wprctl.infer.generation",
    "split_responses": "wprctl.infer.generation",
    "encode_for_reward": "wprctl.infer.rewards",
    "score_ids": "wprctl.infer.rewards",
    "score_texts": "wprctl.infer.rewards",
    "RewardModelScorer": "wprctl.infer.rewards",
    "ExecutionScorer": "wprctl.infer.rewards",
    "InferResult": "wprctl.infer.run",
    "run_infer": "wprctl.infer.run",
    "default_policy": "wprctl.infer.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wprctl.infer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
