"""wprctl.infer building blocks: seeded sampling, eos handling, reward scoring against plain
transformers, the offline ROUGE module, and reading a torn or damaged output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wprctl.errors import UserError
from wprctl.infer.generation import SamplingConfig, batch_seed, generate, split_responses
from wprctl.infer.output import read_rows
from wprctl.infer.rewards import score_texts

PROMPTS = [
    "POST\nSubreddit: r/cars\nmy roommate borrowed my car three weeks ago and i am angry.\nTL;DR: ",
    "short prompt\nTL;DR: ",
    "POST\nSubreddit: r/pets\nmy cat scratched the sofa yesterday. i feel sad. also my mom called.\nTL;DR: ",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    from wprctl.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path):
    from wprctl.models import load_causal_lm

    return load_causal_lm(tiny_model_dir).eval()


def left_padded(tok, prompts: list[str]) -> dict[str, torch.Tensor]:
    from wprctl.data.tokenize import make_collate

    feats = [{"index": i, "input_ids": tok(p)["input_ids"]} for i, p in enumerate(prompts)]
    return make_collate("infer", tok.pad_token_id)(feats)


def test_same_seed_same_samples_other_seed_other_samples(policy, tok) -> None:
    batch = left_padded(tok, PROMPTS)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a = generate(policy, tok, batch, cfg, seed=batch_seed(1234, 0))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    b = generate(policy, tok, batch, cfg, seed=batch_seed(1234, 0))
    c = generate(policy, tok, batch, cfg, seed=batch_seed(1234, 1))
    assert torch.equal(a.sequences, b.sequences) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)
    # the prompt is kept, left-padded, in front of the response
    assert torch.equal(a.sequences[:, : batch["input_ids"].size(1)], batch["input_ids"])
    assert a.response_ids.size(1) <= 12
    width = batch["input_ids"].size(1)
    assert torch.equal(a.attention_mask[:, :width], batch["attention_mask"])
    assert torch.equal(a.attention_mask[:, width:], a.response_mask)


def test_greedy_ignores_the_seed(policy, tok) -> None:
    batch = left_padded(tok, PROMPTS[:2])
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    a = generate(policy, tok, batch, cfg, seed=1)
    b = generate(policy, tok, batch, cfg, seed=2)
    assert torch.equal(a.sequences, b.sequences)


def test_batch_seed_is_stable_and_spread() -> None:
    assert batch_seed(1234, 0) == batch_seed(1234, 0)
    seeds = {batch_seed(s, i) for s in (1, 2) for i in range(100)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_split_responses_cuts_after_the_first_eos() -> None:
    eos, pad = 1, 0
    raw = torch.tensor([[5, 6, 1, 7, 1], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    ids, mask, lengths, ended = split_responses(raw, eos, pad)
    assert ids.tolist() == [[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert lengths == [2, 5, 0] and ended == [True, False, True]


def test_reward_equals_plain_transformers_score(rm_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from wprctl.models import load_reward_model

    responses = ["my roommate took my car and i am angry", "", "cat scratched sofa, sad"]
    ours = score_texts(
        load_reward_model(rm_dir, pad_token_id=0), AutoTokenizer.from_pretrained(rm_dir),
        PROMPTS, responses, batch_size=2,
    )  # fmt: skip
    plain = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    for i, (p, r) in enumerate(zip(PROMPTS, responses, strict=True)):
        ids = tok(p)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
        with torch.no_grad():
            want = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert ours[i].item() == pytest.approx(want, abs=1e-5)
    assert len(set(ours.tolist())) == 3  # the texts are really told apart


def test_rouge_module_offline_matches_hand_computed(tmp_path: Path) -> None:
    """pred 'the cat sat on the mat' vs ref 'the cat lay on the mat': unigram overlap 5 of 6
    (F 5/6), bigrams 3 of 5 (F 0.6), LCS 5 (F 5/6); a disjoint pair scores 0; the mean is taken."""
    code = (
        "import json; from wprctl.metrics import rouge; print(json.dumps(rouge("
        "['the cat sat on the mat', 'a b c'], ['the cat lay on the mat', 'x y z'])))"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # nothing cached from the hub
        "HTTP_PROXY": "http://127.0.0.1:9",  # any network attempt fails at once
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rouge1"] == pytest.approx((5 / 6 + 0) / 2)
    assert got["rouge2"] == pytest.approx((0.6 + 0) / 2)
    assert got["rougeL"] == pytest.approx((5 / 6 + 0) / 2)


def test_torn_last_line_is_dropped_bad_line_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    out.write_text('{"id": "a", "sample": 0}\n{"id": "b", "sample": 0}\n{"id": "c", "sa')
    assert [r["id"] for r in read_rows(out)] == ["a", "b"]
    assert out.read_text().endswith('"sample": 0}\n')  # the torn line is gone from the file
    out.write_text('{"id": "a"}\n{"id": "b"}')  # whole row, newline lost: kept
    assert [r["id"] for r in read_rows(out)] == ["a", "b"]
    out.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(UserError, match=r"rows\.jsonl, line 2"):
        read_rows(out)
    out.write_text('{"id": "a"}\n{"response": "x"}\n')
    with pytest.raises(UserError, match=r"line 2: expected a JSON object with 'id'"):
        read_rows(out)
