"""Stage views of the data: the 2,4,4 parts (disjoint, deterministic), and tokenized batches:
the response-only loss mask at token level, suffix-keeping truncation, padding sides, caching."""

from __future__ import annotations

from pathlib import Path

import pytest

from wprctl.data import load_stage_data, stage_examples, stage_partition
from wprctl.data.loading import clear_cache
from wprctl.data.tokenize import encode_prompt
from wprctl.errors import UserError
from wprctl.manifest import manifest_from_dict

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    clear_cache()


def manifest(tmp_path: Path, seed: int = 42, **data):
    data.setdefault("demo", {"n_train": 200, "n_validation": 20})
    raw = {"project": {"seed": seed, "output_dir": str(tmp_path / "runs")}, "data": data}
    raw["sft"] = {"max_seq_len": 1024}
    return manifest_from_dict(raw)


def test_partition_sizes_disjoint_and_deterministic() -> None:
    parts = stage_partition(1000, "2,4,4", seed=1)
    assert [len(parts[s]) for s in ("sft", "rm", "ppo")] == [200, 400, 400]
    allidx = sorted(i for p in parts.values() for i in p.tolist())
    assert allidx == list(range(1000))  # disjoint and covering
    again = stage_partition(1000, "2,4,4", seed=1)
    assert all((parts[s] == again[s]).all() for s in parts)
    other = stage_partition(1000, "2,4,4", seed=2)
    assert not (parts["sft"] == other["sft"]).all()
    odd = stage_partition(7, "1,1,1", seed=0)
    assert sum(len(p) for p in odd.values()) == 7 and {len(p) for p in odd.values()} <= {2, 3}


def test_stage_examples_follow_data_split(tmp_path: Path) -> None:
    m = manifest(tmp_path)
    ids = {s: [e.id for e in stage_examples(m, s, "train")] for s in ("sft", "rm", "ppo", "dar")}
    assert (len(ids["sft"]), len(ids["rm"]), len(ids["ppo"])) == (40, 80, 80)
    assert not set(ids["sft"]) & set(ids["rm"]) and not set(ids["rm"]) & set(ids["ppo"])
    assert ids["dar"] == ids["ppo"]
    clear_cache()
    assert [e.id for e in stage_examples(m, "sft", "train")] == ids["sft"]
    assert len(stage_examples(m, "ppo", "eval")) == 20
    # the demo rows are also written for inspection
    assert (tmp_path / "runs" / "data" / "demo-seed42-train-200.jsonl").exists()


def test_apps_stage_filters(tmp_path: Path) -> None:
    lines = (FIX / "apps.jsonl").read_text(encoding="utf-8").split("\n")
    folder = tmp_path / "apps"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    (folder / "test.jsonl").write_text(lines[2] + "\n" + lines[0] + "\n", encoding="utf-8")
    m = manifest(tmp_path, dataset="apps", path=str(folder))
    # problem 12 has no solutions: PPO and evaluation use it, SFT does not
    assert [e.id for e in stage_examples(m, "ppo", "eval")] == ["12", "10"]
    assert [e.id for e in stage_examples(m, "sft", "eval")] == ["10"]
    with pytest.raises(UserError, match="no train examples for the rm stage"):
        stage_examples(m, "rm", "train")


# --------------------------------------------------------------------------------------------
# tokenized batches


def test_sft_mask_is_exactly_the_response_and_eos(tmp_path: Path, tiny_tokenizer) -> None:
    m = manifest(tmp_path)
    sd = load_stage_data(m, "sft", "train", tiny_tokenizer)
    tok = tiny_tokenizer
    batch = sd.collate([sd.dataset[i] for i in range(4)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    for row in range(4):
        ex = sd.examples[int(batch["index"][row])]
        prompt_ids = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        resp_ids = tok(ex.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt_ids) + len(resp_ids)
        assert batch["input_ids"][row, :n].tolist() == prompt_ids + resp_ids
        assert batch["labels"][row, :n].tolist() == [-100] * len(prompt_ids) + resp_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        assert (batch["labels"][row, n:] == -100).all()  # right padding is never learned
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert tok.decode(prompt_ids).endswith("TL;DR: ")


def test_truncation_keeps_the_suffix_and_drops_the_left_of_the_body(
    tmp_path: Path, tiny_tokenizer
) -> None:
    tok = tiny_tokenizer
    m = manifest(tmp_path)
    m.data.max_prompt_len = 30
    m.data.max_answer_len = 6
    m.sft.max_seq_len = 32
    sd = load_stage_data(m, "sft", "train", tok)
    tail = tok("TL;DR: ", add_special_tokens=False)["input_ids"]
    for i in range(5):
        feats = sd.dataset[i]
        ex = sd.examples[feats["index"]]
        labels = feats["labels"]
        n_prompt = sum(x == -100 for x in labels)
        resp = feats["input_ids"][n_prompt:]
        assert len(feats["input_ids"]) <= 32 and len(resp) <= 6 and n_prompt <= 30
        # the answer is cut on the right and still ends with eos; the loss is on exactly it
        full_resp = tok(ex.chosen, add_special_tokens=False)["input_ids"]
        assert resp == [*full_resp[: len(resp) - 1], tok.eos_token_id]
        assert labels[n_prompt:] == resp
        # the prompt ends with the instruction and is the END of the body
        prompt = feats["input_ids"][:n_prompt]
        assert prompt[-len(tail) :] == tail
        body = tok(ex.prompt[: -len("TL;DR: ")], add_special_tokens=False)["input_ids"]
        assert prompt[: -len(tail)] == body[-(n_prompt - len(tail)) :]


def test_encode_prompt_keeps_leading_bos_when_cutting() -> None:
    class Bos:  # a tokenizer that adds bos, like Llama's: ids are characters
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) for c in text]}

    ids = encode_prompt(Bos(), "abcdefgh\n\nAssistant:", 15)
    assert ids == [0] + [ord(c) for c in "gh\n\nAssistant:"]
    assert encode_prompt(Bos(), "ab\n\nAssistant:", 50) == [0] + [
        ord(c) for c in "ab\n\nAssistant:"
    ]


def test_rm_pairs_end_with_eos_and_share_one_width(tmp_path: Path, tiny_tokenizer) -> None:
    sd = load_stage_data(manifest(tmp_path), "rm", "train", tiny_tokenizer)
    b = sd.collate([sd.dataset[i] for i in range(3)])
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape
    for key in ("chosen", "rejected"):
        ids, mask = b[f"{key}_input_ids"], b[f"{key}_attention_mask"]
        for row in range(3):
            n = int(mask[row].sum())
            assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            assert int(ids[row, n - 1]) == tiny_tokenizer.eos_token_id
        ex = sd.examples[int(b["index"][0])]
        text = tiny_tokenizer.decode(ids[0, : int(mask[0].sum()) - 1])
        assert text == ex.prompt + getattr(ex, key)


def test_ppo_prompts_are_left_padded_with_index(tmp_path: Path, tiny_tokenizer) -> None:
    m = manifest(tmp_path)
    m.ppo.max_prompt_len = 40
    sd = load_stage_data(m, "ppo", "train", tiny_tokenizer)
    b = sd.collate([sd.dataset[i] for i in range(4)])
    assert set(b) == {"input_ids", "attention_mask", "index"}
    assert b["input_ids"].shape[1] <= 40
    for row in range(4):
        n = int(b["attention_mask"][row].sum())
        width = b["input_ids"].shape[1]
        assert b["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        assert (b["input_ids"][row, : width - n] == tiny_tokenizer.pad_token_id).all()
        assert tiny_tokenizer.decode(b["input_ids"][row, width - n :]).endswith("\nTL;DR: ")
    assert [sd.examples[int(i)].id for i in b["index"]] == [sd.examples[i].id for i in range(4)]


def test_tokenization_is_cached_on_disk(tmp_path: Path, tiny_tokenizer) -> None:
    m = manifest(tmp_path)
    first = load_stage_data(m, "rm", "eval", tiny_tokenizer)
    cache = list((tmp_path / "runs" / ".cache" / "tokenized").glob("rm-*.arrow"))
    assert len(cache) == 1
    second = load_stage_data(m, "rm", "eval", tiny_tokenizer)
    assert {f["filename"] for f in second.dataset.cache_files} == {str(cache[0])}
    assert second.dataset[:] == first.dataset[:]
    m.data.max_answer_len = 5  # other lengths: another cache entry
    load_stage_data(m, "rm", "eval", tiny_tokenizer)
    assert len(list(cache[0].parent.glob("rm-*.arrow"))) == 2


def test_tokenizer_without_pad_is_a_user_error(tmp_path: Path, tiny_tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.name_or_path = "some/model"
    with pytest.raises(UserError, match=r"some/model.*pad token"):
        load_stage_data(manifest(tmp_path), "sft", "eval", tok)


def test_demo_rows_are_kept_and_read_back_only_while_their_key_matches(tmp_path: Path) -> None:
    import hashlib
    import json

    from wprctl.data.demo import demo_file, demo_rows, kept_demo_rows

    folder = tmp_path / "data"
    rows = kept_demo_rows(folder, 42, "train", 30)
    assert rows == demo_rows(42, "train", 30)
    path = demo_file(folder, 42, "train", 30)
    key_path = path.with_name(f".{path.name}.key")
    original = path.read_bytes()

    def write_jsonl(rows: list[dict], path: Path) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def rekey(**change: str) -> None:
        key = json.loads(key_path.read_text())
        key.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), **change)
        key_path.write_text(json.dumps(key))

    # a file whose key matches is what the next run reads: shown with a file re-keyed on purpose
    write_jsonl(rows[:3], path)
    rekey()
    assert kept_demo_rows(folder, 42, "train", 30) == rows[:3]
    # an edited file (no longer the key's hash) is generated again and replaced
    path.write_text(path.read_text().replace("demo", "edited"))
    assert kept_demo_rows(folder, 42, "train", 30) == rows
    assert path.read_bytes() == original
    # a file of another generator (or Python), or a broken key: generated again
    for change in ({"generator": "0" * 64}, {"python": "2.7"}):
        write_jsonl(rows[:3], path)
        rekey(**change)
        assert kept_demo_rows(folder, 42, "train", 30) == rows
    write_jsonl(rows[:3], path)
    key_path.write_text("{not json")
    assert kept_demo_rows(folder, 42, "train", 30) == rows
    assert path.read_bytes() == original


def test_demo_rows_that_cannot_be_kept_are_used_and_the_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wprctl.data.demo import demo_file, demo_rows, kept_demo_rows

    want = demo_rows(42, "train", 30)
    # the folder is a file; the kept file (then its key) is a folder
    (tmp_path / "as_file").write_text("hi")
    assert kept_demo_rows(tmp_path / "as_file", 42, "train", 30) == want
    err = " ".join(capsys.readouterr().err.split())
    assert "could not keep the demo rows in" in err and "as_file" in err
    for folder_at in ("file", "key"):
        folder = tmp_path / folder_at
        path = demo_file(folder, 42, "train", 30)
        (path if folder_at == "file" else path.with_name(f".{path.name}.key")).mkdir(parents=True)
        assert kept_demo_rows(folder, 42, "train", 30) == want
        err = " ".join(capsys.readouterr().err.split())
        assert "could not keep the demo rows" in err, folder_at
        # nothing left beside them: no temporary file of the failed write
        key_name = f".{path.name}.key"
        left = sorted(p.name for p in folder.iterdir())
        assert left == sorted([path.name] + ([key_name] if folder_at == "key" else [])), left
    # an edited file is said to be regenerated
    folder = tmp_path / "edited"
    kept_demo_rows(folder, 42, "train", 30)
    path = demo_file(folder, 42, "train", 30)
    path.write_text(path.read_text()[:-10])
    capsys.readouterr()
    assert kept_demo_rows(folder, 42, "train", 30) == want
    assert "does not match its key" in " ".join(capsys.readouterr().err.split())
