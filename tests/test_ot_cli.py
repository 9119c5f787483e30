"""`wprctl cost-graph` on a tiny Llama with a BPE tokenizer built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

WORDS = ["cat", "kitten", "table", "chair", "dog", "puppy", "the", "a"] * 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator([" ".join(WORDS)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_cost_graph_json_and_table(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from wprctl.ot import CostGraph

    res = run_cli(
        "cost-graph", "--model", str(tiny_model), "--k", "5", "--n", "3", "--epsilon", "0.0001",
        "--json", "cat", "xyzzy", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["k1"] == 5 and data["metric"] == "l2" and data["epsilon"] == 0.0001
    assert data["underflow_fraction"] > 0.99 and data["degenerate"] is True
    cat, _odd = data["tokens"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert cat["token_id"] == tok("cat", add_special_tokens=False)["input_ids"][0]
    assert len(cat["neighbors"]) == 3
    costs = [nb["cost"] for nb in cat["neighbors"]]
    assert costs == sorted(costs)
    # the same numbers as the library on the model's input embeddings
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(tiny_model).get_input_embeddings().weight.detach()
    ids, lib_costs = CostGraph.from_embeddings(emb, k=5).neighbors(cat["token_id"], 3)
    assert [nb["token_id"] for nb in cat["neighbors"]] == ids.tolist()
    assert costs == pytest.approx(lib_costs.tolist())
    assert any("xyzzy" in note and "first" in note for note in data["notes"])

    table = run_cli(
        "cost-graph",
        "--model",
        str(tiny_model),
        "--k",
        "5",
        "--epsilon",
        "0.0001",
        "cat",
        cwd=tmp_path,
    )
    assert table.returncode == 0, table.stderr
    assert "kernel underflow" in table.stdout and "WARNING" in table.stdout
    assert str(cat["neighbors"][0]["token_id"]) in table.stdout


def test_cost_graph_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    bad_k = run_cli("cost-graph", "--model", str(tiny_model), "--k", "999", "cat", cwd=tmp_path)
    assert bad_k.returncode == 2 and "k1" in bad_k.stderr and "Traceback" not in bad_k.stderr
    missing = run_cli("cost-graph", "--model", str(tmp_path / "nope"), "cat", cwd=tmp_path)
    assert missing.returncode == 2 and "nope" in missing.stderr
    bad_eps = run_cli(
        "cost-graph", "--model", str(tiny_model), "--k", "5", "--epsilon", "0", "cat", cwd=tmp_path
    )
    assert bad_eps.returncode == 2 and "epsilon" in bad_eps.stderr


def test_cost_graph_uses_manifest_defaults(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "wprctl.toml").write_text(
        '[ppo.regularizer.wpr]\nk1 = 4\nmetric = "cos"\nepsilon = 0.5\n'
    )
    res = run_cli("cost-graph", "--model", str(tiny_model), "--json", "dog", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert (data["k1"], data["metric"], data["epsilon"]) == (4, "cos", 0.5)
    assert list((tmp_path / "runs" / "cache").glob("cost_graph_*.pt"))


def test_cost_graph_reads_words_as_in_running_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Byte-level BPE spells "car" inside a sentence as one token with its space ("Ġcar");
    alone, "car" is other pieces. A word means the former; exact token strings and ids work."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # a word that is one token after a space and something else alone: the case this is about
    word = next(
        w[1:]
        for w in sorted(tok.get_vocab())
        if w.startswith("Ġ") and len(w) > 3 and len(ids(" " + w[1:])) == 1
        and ids(w[1:]) != ids(" " + w[1:])
    )  # fmt: skip
    spaced = ids(" " + word)
    piece = tok.convert_ids_to_tokens(spaced[0])
    digits = next(str(i) for i in range(len(tok)) if str(i) not in tok.get_vocab())
    res = run_cli(
        "cost-graph", "--model", str(tiny_model_dir), "--k", "5", "--json",
        word, piece, digits, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = [t["token_id"] for t in json.loads(res.stdout)["tokens"]]
    assert got == [spaced[0], spaced[0], int(digits)]
    # two words: the first as in a sentence too; an empty word is no token
    res = run_cli("cost-graph", "--model", str(tiny_model_dir), "--k", "5", "--json",
                  f"{word} {word}", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"][0]["token_id"] == spaced[0]
    res = run_cli("cost-graph", "--model", str(tiny_model_dir), "--k", "5", "", cwd=tmp_path)
    assert res.returncode == 2 and "is no word" in res.stderr
