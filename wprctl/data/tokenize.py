"""Stage-ready tokenized datasets and their collators.

- sft: ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt and on padding),
  right-padded. Prompt <= data.max_prompt_len, answer (with eos) <= data.max_answer_len,
  total <= sft.max_seq_len.
- rm: ``chosen_input_ids``, ``chosen_attention_mask``, ``rejected_input_ids``,
  ``rejected_attention_mask``, right-padded to one common length (so a reward model can
  concatenate them); each sequence ends with eos. Total <= rm.max_seq_len.
- ppo, dar, infer: ``input_ids``, ``attention_mask`` of LEFT-padded prompts, and ``index``
  into ``StageData.examples`` (id, reference and meta of each prompt).

Prompts too long are cut from the left of their body; the instruction suffix ("TL;DR: ",
"### Response:\\n", "\\n\\nAssistant:") and the tokenizer's leading special tokens are kept.
Responses get the tokenizer's eos appended. Tokenization runs through `datasets.map` with a
cache file under ``<output_dir>/.cache/tokenized`` named by a fingerprint of the examples, the
tokenizer and the lengths, so a re-run loads it instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wprctl.data.base import Example
from wprctl.data.prompts import split_instruction
from wprctl.data.splits import PROMPT_STAGES, STAGES, stage_examples
from wprctl.errors import UserError

CACHE_VERSION = 1


@dataclass
class StageData:
    stage: str
    split: str
    examples: list[Example]
    dataset: Any  # a datasets.Dataset of python lists; index it, or feed it to a DataLoader
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    lengths: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)


# --------------------------------------------------------------------------------------------
# encoding


def check_tokenizer(tokenizer: Any) -> None:
    where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if tokenizer.eos_token_id is None:
        raise UserError(f"{where}: the tokenizer has no eos token; set one in its config")
    if tokenizer.pad_token_id is None:
        raise UserError(
            f"{where}: the tokenizer has no pad token; set pad_token in its "
            "tokenizer_config.json (e.g. to the eos or unk token)"
        )


def _ids(tokenizer: Any, text: str, specials: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str, max_len: int) -> list[int]:
    """Prompt ids, at most `max_len`; a long prompt loses the left of its body, never its
    instruction suffix or leading special tokens (e.g. bos)."""
    full = _ids(tokenizer, prompt, specials=True)
    if len(full) <= max_len:
        return full
    lead = _ids(tokenizer, "", specials=True)
    body, suffix = split_instruction(prompt)
    tail = _ids(tokenizer, suffix) if suffix else []
    room = max_len - len(lead) - len(tail)
    if room <= 0:  # the limit is below the suffix itself: keep its end
        return (lead + tail)[-max_len:]
    return lead + _ids(tokenizer, body)[-room:] + tail


def encode_response(tokenizer: Any, text: str, max_len: int) -> list[int]:
    """Response ids ending with eos, at most `max_len` (cut on the right, eos kept)."""
    ids = _ids(tokenizer, text)[: max(0, max_len - 1)]
    return [*ids, tokenizer.eos_token_id]


def encode_pair(
    tokenizer: Any, prompt: str, response: str, max_prompt: int, max_answer: int, max_total: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) within the three limits. When both do not fit in max_total,
    the response is cut first, but keeps at least half of max_total; the prompt (cut from
    the left of its body) gets the rest."""
    resp = encode_response(tokenizer, response, max_answer)
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt)
    if len(prompt_ids) + len(resp) > max_total:
        room = max(max_total - len(prompt_ids), max_total // 2)
        resp = encode_response(tokenizer, response, min(max_answer, room))
        prompt_ids = encode_prompt(tokenizer, prompt, min(max_prompt, max_total - len(resp)))
    return prompt_ids, resp


def stage_lengths(manifest: Any, stage: str) -> dict[str, int]:
    d = manifest.data
    if stage == "sft":
        return {
            "prompt": d.max_prompt_len,
            "answer": d.max_answer_len,
            "total": manifest.sft.max_seq_len,
        }
    if stage == "rm":
        return {
            "prompt": d.max_prompt_len,
            "answer": d.max_answer_len,
            "total": manifest.rm.max_seq_len,
        }
    section = {"ppo": manifest.ppo, "dar": manifest.dar}.get(stage)
    limit = (
        min(d.max_prompt_len, section.max_prompt_len) if section is not None else d.max_prompt_len
    )
    return {"prompt": limit}


def _encode_batch(tokenizer: Any, stage: str, lengths: dict[str, int]):
    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"index": list(batch["index"])}
        if stage in PROMPT_STAGES:
            out["input_ids"] = [
                encode_prompt(tokenizer, p, lengths["prompt"]) for p in batch["prompt"]
            ]
            return out
        lim = (lengths["prompt"], lengths["answer"], lengths["total"])
        if stage == "sft":
            ids, labels = [], []
            for p, c in zip(batch["prompt"], batch["chosen"], strict=True):
                pi, ri = encode_pair(tokenizer, p, c, *lim)
                ids.append(pi + ri)
                labels.append([-100] * len(pi) + ri)
            out["input_ids"], out["labels"] = ids, labels
            return out
        for key in ("chosen", "rejected"):
            seqs, plens = [], []
            for p, r in zip(batch["prompt"], batch[key], strict=True):
                pi, ri = encode_pair(tokenizer, p, r, *lim)
                seqs.append(pi + ri)
                plens.append(len(pi))
            out[f"{key}_input_ids"] = seqs
            out[f"{key}_prompt_len"] = plens  # where the response starts (for inspection)
        return out

    return fn


# --------------------------------------------------------------------------------------------
# collators


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> Any:
    import torch

    width = max(len(s) for s in seqs)
    rows = [
        ([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs
    ]
    return torch.tensor(rows, dtype=torch.long)


def _mask(seqs: list[list[int]], width: int, left: bool = False) -> Any:
    import torch

    rows = [
        ([0] * (width - len(s)) + [1] * len(s)) if left else ([1] * len(s) + [0] * (width - len(s)))
        for s in seqs
    ]
    return torch.tensor(rows, dtype=torch.long)


def make_collate(stage: str, pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    import torch

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        index = torch.tensor([f["index"] for f in features], dtype=torch.long)
        if stage in PROMPT_STAGES:
            seqs = [list(f["input_ids"]) for f in features]
            width = max(len(s) for s in seqs)
            return {
                "input_ids": _pad(seqs, pad_id, left=True),
                "attention_mask": _mask(seqs, width, left=True),
                "index": index,
            }
        if stage == "sft":
            seqs = [list(f["input_ids"]) for f in features]
            width = max(len(s) for s in seqs)
            return {
                "input_ids": _pad(seqs, pad_id),
                "attention_mask": _mask(seqs, width),
                "labels": _pad([list(f["labels"]) for f in features], -100),
                "index": index,
            }
        chosen = [list(f["chosen_input_ids"]) for f in features]
        rejected = [list(f["rejected_input_ids"]) for f in features]
        width = max(len(s) for s in chosen + rejected)
        padded = [s + [pad_id] * (width - len(s)) for s in chosen + rejected]
        ids = torch.tensor(padded, dtype=torch.long)
        mask = _mask(chosen + rejected, width)
        n = len(features)
        return {
            "chosen_input_ids": ids[:n],
            "chosen_attention_mask": mask[:n],
            "rejected_input_ids": ids[n:],
            "rejected_attention_mask": mask[n:],
            "index": index,
        }

    return collate


# --------------------------------------------------------------------------------------------
# the stage API


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps(
            [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
        ).encode()
    )
    h.update(repr(_ids(tokenizer, "", specials=True)).encode())
    return h.hexdigest()


def _examples_fingerprint(
    examples: list[Example], stage: str, lengths: dict[str, int], tok_fp: str
) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, stage, lengths, tok_fp]).encode())
    for ex in examples:
        for text in (ex.prompt, ex.chosen, ex.rejected):
            h.update(b"\x00" if text is None else text.encode("utf-8", "surrogatepass") + b"\x01")
    return h.hexdigest()[:24]


def tokenize_examples(
    examples: list[Example],
    stage: str,
    tokenizer: Any,
    lengths: dict[str, int],
    cache_dir: Path | None = None,
) -> Any:
    """A datasets.Dataset of the stage's features, cached in `cache_dir` when given."""
    import datasets

    check_tokenizer(tokenizer)
    fp = _examples_fingerprint(examples, stage, lengths, tokenizer_fingerprint(tokenizer))
    columns = {
        "index": list(range(len(examples))),
        "prompt": [ex.prompt for ex in examples],
        "chosen": [ex.chosen or "" for ex in examples],
        "rejected": [ex.rejected or "" for ex in examples],
    }
    cache_file = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"{stage}-{fp}.arrow"
        if cache_file.exists():
            try:
                return datasets.Dataset.from_file(str(cache_file))
            except Exception:  # a torn file from an interrupted run: tokenize again
                cache_file.unlink(missing_ok=True)
    raw = datasets.Dataset.from_dict(columns)
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        return raw.map(
            _encode_batch(tokenizer, stage, lengths),
            batched=True,
            batch_size=256,
            remove_columns=["prompt", "chosen", "rejected"],
            new_fingerprint=fp,
            cache_file_name=str(cache_file) if cache_file else None,
            load_from_cache_file=cache_file is not None,
            keep_in_memory=cache_file is None,
        )
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def load_stage_data(
    manifest: Any, stage: str, split: str, tokenizer: Any, *, cache: bool = True
) -> StageData:
    """Tokenized examples of `stage` on `split` ("train" or "eval") with their collator."""
    if stage not in STAGES:
        raise UserError(f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    check_tokenizer(tokenizer)
    examples = stage_examples(manifest, stage, split)
    lengths = stage_lengths(manifest, stage)
    cache_dir = manifest.output_dir / ".cache" / "tokenized" if cache else None
    dataset = tokenize_examples(examples, stage, tokenizer, lengths, cache_dir)
    return StageData(
        stage=stage,
        split=split,
        examples=examples,
        dataset=dataset,
        collate=make_collate(stage, tokenizer.pad_token_id),
        lengths=lengths,
    )
