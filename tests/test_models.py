"""The offline tiny model: built deterministically, loadable and usable with plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wprctl.errors import UserError
from wprctl.manifest import TinyModelConfig
from wprctl.models import build_tiny_model, load_tokenizer


def test_tiny_model_loads_with_plain_transformers_and_generates(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert model.config.pad_token_id == 0 and model.config.eos_token_id == 1
    text = "POST\nSubreddit: r/relationships\nmy roommate borrowed my car\nTL;DR: "
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == text  # byte-level: lossless round trip
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_tiny_model_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = TinyModelConfig(
        vocab_size=400, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    a = build_tiny_model(cfg, 3, tmp_path / "a")
    b = build_tiny_model(cfg, 3, tmp_path / "b")
    c = build_tiny_model(cfg, 4, tmp_path / "c")
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tokenizer_without_pad_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no pad token"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="cannot load the tokenizer: no such folder"):
        load_tokenizer(tmp_path / "nothing-here")


def test_a_truncated_or_empty_model_folder_is_a_user_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from wprctl.models import load_causal_lm, load_reward_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a cut-off copy
    with pytest.raises(UserError, match=f"{broken}: cannot load the model"):
        load_causal_lm(broken)
    with pytest.raises(UserError, match=f"{broken}: cannot load the model"):
        load_reward_model(broken, pad_token_id=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="the folder is empty"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(UserError, match="the folder is empty"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(UserError, match="no such folder"):
        load_tokenizer(tmp_path / "missing")


def test_a_causal_lm_is_not_accepted_as_a_reward_model(tiny_model_dir: Path) -> None:
    from wprctl.models import load_reward_model

    # as a backbone (`wprctl rm`, PPO's critic) its fresh head is expected
    backbone = load_reward_model(tiny_model_dir, pad_token_id=0)
    assert backbone.score.weight.shape[0] == 1
    with pytest.raises(UserError, match="not a reward model: it has no trained score head"):
        load_reward_model(tiny_model_dir, pad_token_id=0, trained_head=True)


def test_a_reward_model_or_a_run_folder_is_not_taken_for_a_policy(
    tiny_model_dir: Path, rm_dir: Path, tmp_path: Path
) -> None:
    """A reward model's folder loads as a causal LM without complaint (its embeddings are tied):
    refused by name. A run folder (its model is in model/) is not a model folder."""
    import shutil

    from wprctl.models import load_causal_lm

    with pytest.raises(UserError, match="a sequence-classification model .*not a causal language"):
        load_causal_lm(rm_dir)
    run = tmp_path / "runs" / "sft"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "state.json").write_text("{}")
    with pytest.raises(UserError, match=f"no config.json .*its model is in {run / 'model'}"):
        load_causal_lm(run)
    with pytest.raises(UserError, match="cannot load the tokenizer: no tokenizer_config.json"):
        load_tokenizer(run)
    assert load_causal_lm(run / "model").config.architectures == ["LlamaForCausalLM"]
