"""Which examples each stage uses: the `data_split` weights (the paper's "2,4,4") cut the
training examples into disjoint, seed-deterministic parts for SFT, RM and PPO (DAR uses PPO's
part); evaluation uses the held-out split whole.

Per stage, examples that cannot serve it are left out: SFT needs a chosen response, RM a pair;
prompt-only stages (ppo, dar, infer) see each distinct prompt once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wprctl.data.base import Example
from wprctl.data.loading import load_examples
from wprctl.errors import UserError

TRAIN_STAGES = ("sft", "rm", "ppo")
STAGES = ("sft", "rm", "ppo", "dar", "infer")
PROMPT_STAGES = ("ppo", "dar", "infer")
_PART_OF = {"sft": "sft", "rm": "rm", "ppo": "ppo", "dar": "ppo", "infer": "ppo"}


def split_weights(data_split: str) -> tuple[float, float, float]:
    a, b, c = (float(p) for p in data_split.split(","))
    return a, b, c


def stage_partition(n: int, data_split: str, seed: int) -> dict[str, np.ndarray]:
    """Disjoint index sets for sft/rm/ppo covering range(n), sized by the weights."""
    w = np.asarray(split_weights(data_split), dtype=float)
    bounds = np.rint(np.cumsum(w) / w.sum() * n).astype(int)
    perm = np.random.default_rng(seed).permutation(n)
    starts = np.concatenate([[0], bounds[:-1]])
    return {
        stage: np.sort(perm[s:e]) for stage, s, e in zip(TRAIN_STAGES, starts, bounds, strict=True)
    }


def stage_examples(manifest: Any, stage: str, split: str = "train") -> list[Example]:
    """The examples `stage` sees on `split`, in a fixed order."""
    if stage not in STAGES:
        raise UserError(f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    seed = manifest.project.seed
    ex_set = load_examples(
        manifest.data, split, seed, root=manifest.root, write_dir=manifest.output_dir / "data"
    )
    examples = ex_set.examples
    if split == "train":
        part = stage_partition(len(examples), manifest.data.data_split, seed)[_PART_OF[stage]]
        examples = [examples[i] for i in part]
    if stage == "sft":
        usable = [ex for ex in examples if ex.chosen is not None]
        need = "a chosen response"
    elif stage == "rm":
        usable = [ex for ex in examples if ex.chosen is not None and ex.rejected is not None]
        need = "a chosen and a rejected response"
    else:
        seen: set[str] = set()
        usable = []
        for ex in examples:
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                usable.append(ex)
        need = "a prompt"
    if not usable:
        weights = manifest.data.data_split
        raise UserError(
            f"{ex_set.source}: no {split} examples for the {stage} stage "
            f"({len(examples)} in its part of data.data_split = {weights!r}, none with {need})"
        )
    return usable
