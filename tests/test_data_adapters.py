"""Each adapter on its hand-written fixture (every field and bad-row reason), on the real public
samples (prompt strings byte-exact), and from every local layout (jsonl, json, parquet, folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wprctl.data import load_examples
from wprctl.data.base import Example, RawRow
from wprctl.data.loading import clear_cache, parse_rows
from wprctl.data.sources import read_files
from wprctl.errors import UserError
from wprctl.manifest import DataConfig

FIX = Path(__file__).parent / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    clear_cache()


def parse_file(dataset: str, path: Path, **kw) -> tuple[list[Example], dict[str, int]]:
    """All rows of a file through the adapter, without the eval hold-out."""
    from wprctl.data.base import get_adapter

    cfg = DataConfig(dataset=dataset, path=str(path), **kw)
    out = parse_rows(read_files([path]), get_adapter(dataset), cfg, str(path))
    return out.examples, dict(out.skipped)


def raw_lines(path: Path) -> list[dict]:
    # split on "\n" only: real posts contain U+2028, which str.splitlines() would split on
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()
    ]


# --------------------------------------------------------------------------------------------
# TL;DR


def test_tldr_fixture_prompts_pairs_and_meta() -> None:
    exs, skipped = parse_file("tldr", FIX / "tldr_comparisons.jsonl")
    by_id = {e.id: e for e in exs}
    a1 = by_id["t3_a1"]
    assert a1.prompt == (
        "POST\nSubreddit: r/Pets\nMy (24F) cat — Mochi — knocks cups off tables.\n"
        "How do I stop it?\n\nTL;DR: "
    )
    assert (a1.chosen, a1.rejected) == ("Cat knocks cups over, how to stop?", "cat bad")
    assert a1.meta["subreddit"] == "Pets" and a1.meta["confidence"] == 7
    assert a1.meta["chosen_policy"] == "ref"
    a2 = by_id["t3_a2"]  # choice 1: the second summary is chosen, stripped of its spaces
    assert a2.chosen == "Lent a friend $200; he stopped answering. What now?"
    assert a2.rejected == "friend owes me" and a2.meta["chosen_policy"] == "sup4_6b_t0.7"
    assert by_id["cnn1"].prompt == (
        "ARTICLE\nSite: cnn\nA storm hit the coast on Monday.\n\nThousands lost power.\nTL;DR: "
    )
    assert by_id["dm2"].prompt == "ARTICLE\nA cat was elected mayor of a small town.\nTL;DR: "
    # a second comparison of the same post gets a unique id and keeps its group
    assert by_id["t3_a1-2"].meta["group"] == "t3_a1"
    assert by_id["t3_a1-2"].prompt == a1.prompt
    assert skipped == {
        "empty field 'info.post'": 1,
        "missing field 'info.post'": 1,
        "missing field 'info.subreddit'": 1,
        "invalid choice": 1,
        "summaries is not a pair": 1,
        "empty field 'text'": 1,
        "surrogate characters": 1,
        "invalid JSON": 1,
    }
    assert len(exs) == 5


def _expected_tldr_prompt(row: dict) -> str:
    info = row["info"]
    if info.get("post"):
        return f"POST\nSubreddit: r/{info['subreddit']}\n{info['post']}\nTL;DR: "
    site = f"Site: {info['site']}\n" if info.get("site") else ""
    return f"ARTICLE\n{site}{info['article']}\nTL;DR: "


def _check_tldr_rows(path: Path, min_kept: float) -> None:
    rows = raw_lines(path)
    exs, _ = parse_file("tldr", path)
    assert len(exs) >= min_kept * len(rows)
    by_id: dict[str, list[Example]] = {}
    for e in exs:
        by_id.setdefault(e.meta.get("group", e.id), []).append(e)
    for row in rows:
        matches = by_id.get(row["info"]["id"], [])
        texts = [s["text"] for s in row["summaries"]]
        if not all(t.strip() for t in texts):
            continue  # a real row with an empty summary: counted as bad
        ex = next(e for e in matches if e.chosen == texts[row["choice"]].strip()
                  and e.rejected == texts[1 - row["choice"]].strip())  # fmt: skip
        assert ex.prompt == _expected_tldr_prompt(row)


def test_tldr_real_rows_fixture() -> None:
    _check_tldr_rows(FIX / "real_tldr_cnndm.jsonl", 1.0)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not present")
@pytest.mark.parametrize("name", ["tldr_comparisons.jsonl", "cnndm_comparisons.jsonl"])
def test_tldr_shared_samples_byte_exact(name: str) -> None:
    _check_tldr_rows(SHARED / name, 0.95)


# --------------------------------------------------------------------------------------------
# HH-RLHF


def test_hh_fixture() -> None:
    exs, skipped = parse_file("hh-rlhf", FIX / "hh_rlhf.jsonl")
    assert [e.prompt for e in exs[:2]] == [
        "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:",
    ]
    assert (exs[0].chosen, exs[0].rejected) == (
        " Put it in boiling water for 9 minutes.",
        " Eggs are oval.",
    )
    assert (exs[2].chosen, exs[2].rejected) == (" Blue.", None)  # response stands in for chosen
    assert [e.id for e in exs] == ["hh-0", "hh-1", "hh-2"]
    assert skipped == {
        "empty field 'prompt'": 1,
        "missing field 'prompt'": 1,
        "empty field 'rejected'": 1,
        "surrogate characters": 1,
    }


def test_hh_anthropic_schema_is_split_at_last_assistant_turn() -> None:
    exs, skipped = parse_file("hh-rlhf", FIX / "anthropic_hh_rlhf.jsonl")
    assert len(exs) == 1
    assert (
        exs[0].prompt
        == "\n\nHuman: Best pet?\n\nAssistant: Depends.\n\nHuman: For a flat?\n\nAssistant:"
    )
    assert (exs[0].chosen, exs[0].rejected) == (" A cat.", " A horse.")
    assert skipped == {"chosen and rejected contexts differ": 1}


@pytest.mark.parametrize(
    "path",
    [FIX / "real_hh_rlhf.jsonl", SHARED / "hh_rlhf.jsonl"],
    ids=["fixture", "shared"],
)
def test_hh_real_rows_prompt_as_is(path: Path) -> None:
    if not path.exists():
        pytest.skip("../shared/data is not present")
    rows = raw_lines(path)
    exs, skipped = parse_file("hh-rlhf", path)
    kept = [r for r in rows if r["rejected"].strip()]
    assert len(exs) == len(kept) and sum(skipped.values()) == len(rows) - len(kept)
    for e, r in zip(exs, kept, strict=True):
        assert (e.prompt, e.chosen, e.rejected) == (r["prompt"], r["chosen"], r["rejected"])
        assert e.prompt.endswith("\n\nAssistant:")


# --------------------------------------------------------------------------------------------
# APPS


def test_apps_fixture() -> None:
    exs, skipped = parse_file("apps", FIX / "apps.jsonl")
    by_id = {e.id: e for e in exs}
    p10 = by_id["10"]
    assert p10.prompt == (
        "### Problem:\nRead two integers and print their sum.\n\n-----Input-----\nTwo integers."
        "\n\n### Response:\n"
    )
    assert p10.chosen == "a, b = map(int, input().split())\nprint(a + b)\n"
    assert p10.meta["input_output"] == {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
    assert p10.meta["difficulty"] == "introductory" and p10.meta["fn_name"] is None
    assert p10.meta["problem_id"] == 10 and p10.meta["n_solutions"] == 2
    p11 = by_id["11"]
    assert p11.meta["fn_name"] == "add"
    assert p11.meta["starter_code"].startswith("class Solution:")
    assert by_id["12"].chosen is None  # no solutions: kept, without a chosen response
    assert by_id["12"].rejected is None
    assert skipped == {
        "broken input_output JSON": 1,
        "broken solutions JSON": 1,
        "empty field 'question'": 1,
    }


@pytest.mark.parametrize(
    "path", [FIX / "real_apps.jsonl", SHARED / "apps.jsonl"], ids=["fixture", "shared"]
)
def test_apps_real_rows(path: Path) -> None:
    if not path.exists():
        pytest.skip("../shared/data is not present")
    rows = raw_lines(path)
    exs, skipped = parse_file("apps", path)
    assert skipped == {} and len(exs) == len(rows)
    for e, r in zip(exs, rows, strict=True):
        assert e.prompt == f"### Problem:\n{r['question']}\n\n### Response:\n"
        assert e.chosen == json.loads(r["solutions"])[0]
        assert e.meta["input_output"] == json.loads(r["input_output"])
        assert e.meta["starter_code"] == r["starter_code"]
        assert e.meta["difficulty"] == r["difficulty"]
    fn = {e.id: e.meta["fn_name"] for e in exs if e.meta["fn_name"]}
    assert fn == {"2404": "findKthPositive", "4184": "is_prime"}


# --------------------------------------------------------------------------------------------
# generic JSONL


def test_generic_fields_are_configurable() -> None:
    exs, skipped = parse_file(
        "jsonl",
        FIX / "generic.jsonl",
        prompt_field="question",
        chosen_field="good",
        rejected_field="bad",
    )
    assert [(e.id, e.prompt, e.chosen, e.rejected) for e in exs] == [
        ("g1", "What is 2+2?", "4", "5"),
        ("g2", "Capital of France?", "Paris", "Rome"),
        ("row2", "Prompt only, for PPO.", None, None),
    ]
    assert exs[0].meta == {"topic": "math"}
    assert skipped == {
        "empty field 'good'": 1,
        "missing field 'question'": 1,
        "not a JSON object": 1,
    }


# --------------------------------------------------------------------------------------------
# local layouts and splits of one-file sources


def _apps_rows() -> list[dict]:
    return raw_lines(FIX / "apps.jsonl")[:3]


def test_json_parquet_and_folder_layouts_give_the_same_examples(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = raw_lines(FIX / "hh_rlhf.jsonl")[:2]
    evals = raw_lines(FIX / "hh_rlhf.jsonl")[2:3]
    (tmp_path / "arr.json").write_text(json.dumps(rows))
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(evals), folder / "test-00000-of-00001.parquet")
    want = [(r["prompt"], r["chosen"]) for r in rows]
    from_json, _ = parse_file("hh-rlhf", tmp_path / "arr.json")
    assert [(e.prompt, e.chosen) for e in from_json] == want
    cfg = DataConfig(dataset="hh-rlhf", path=str(tmp_path / "hub"))
    train = load_examples(cfg, "train")
    evl = load_examples(cfg, "eval")
    assert [(e.prompt, e.chosen) for e in train.examples] == want
    assert [e.prompt for e in evl.examples] == [evals[0]["prompt"]]


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path: Path) -> None:
    from wprctl.jsonl import read_jsonl

    text = (FIX / "hh_rlhf.jsonl").read_text(encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(text, encoding="utf-8-sig")  # as some editors save it
    (tmp_path / "bom.json").write_text(json.dumps(raw_lines(FIX / "hh_rlhf.jsonl")), "utf-8-sig")
    want, skipped = parse_file("hh-rlhf", FIX / "hh_rlhf.jsonl")
    for name in ("bom.jsonl", "bom.json"):
        got, got_skipped = parse_file("hh-rlhf", tmp_path / name)
        assert [(e.prompt, e.chosen) for e in got] == [(e.prompt, e.chosen) for e in want]
        assert got_skipped == skipped
    assert read_jsonl(tmp_path / "bom.jsonl")[0] == read_jsonl(FIX / "hh_rlhf.jsonl")[0]


def test_a_cut_line_is_named_with_its_own_column(tmp_path: Path) -> None:
    from wprctl.errors import UserError
    from wprctl.jsonl import read_jsonl

    bad = tmp_path / "cut.jsonl"
    bad.write_text('{"id": "a"}\n{"id": "x", "prompt": \n')  # a file cut off mid-line
    with pytest.raises(UserError, match=r"cut.jsonl, line 2: not valid JSON \(.* at column 23\)"):
        read_jsonl(bad)


def test_gzip_jsonl_and_relative_path_from_manifest_root(tmp_path: Path) -> None:
    import gzip

    with gzip.open(tmp_path / "apps.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write((FIX / "apps.jsonl").read_text(encoding="utf-8"))
    cfg = DataConfig(dataset="apps", path="apps.jsonl.gz")
    both = (
        load_examples(cfg, "train", root=tmp_path).examples
        + load_examples(cfg, "eval", root=tmp_path).examples
    )
    assert sorted(e.id for e in both) == ["10", "11", "12"]


def test_single_file_holds_out_whole_posts_for_eval() -> None:
    cfg = DataConfig(dataset="tldr", path=str(FIX / "real_tldr_cnndm.jsonl"))
    train = load_examples(cfg, "train", report=False).examples
    evl = load_examples(cfg, "eval", report=False).examples
    assert evl and train
    assert not {e.prompt for e in train} & {e.prompt for e in evl}
    # independent of the seed: the eval set must not move between runs
    assert [e.id for e in load_examples(cfg, "eval", seed=7, report=False).examples] == [
        e.id for e in evl
    ]


def test_eval_split_may_name_a_file_and_max_eval_rows_caps_it() -> None:
    cfg = DataConfig(
        dataset="tldr", path=str(FIX / "real_tldr_cnndm.jsonl"),
        eval_split=str(FIX / "tldr_comparisons.jsonl"), max_eval_rows=2, max_bad_fraction=0.9,
    )  # fmt: skip
    evl = load_examples(cfg, "eval", report=False)
    assert [e.id for e in evl.examples] == ["t3_a1", "t3_a2"]


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_examples(DataConfig(dataset="apps", path=str(tmp_path / "nope.jsonl")), "train")
    with pytest.raises(UserError, match="needs a path"):
        load_examples(DataConfig(dataset="jsonl"), "train")


def test_too_many_bad_rows_names_the_file_and_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "mostly_bad.jsonl"
    good = [json.dumps(r) for r in _apps_rows()[:2]]
    path.write_text(
        "\n".join([good[0], '{"problem_id": 1, "question": ""}', "{not json", good[1]]) + "\n"
    )
    with pytest.raises(UserError) as err:
        load_examples(DataConfig(dataset="apps", path=str(path), max_bad_fraction=0.25), "train")
    msg = str(err.value)
    assert (
        str(path) in msg
        and "line 2: empty field 'question'" in msg
        and "2 of 4 rows are bad" in msg
    )
    # within the limit the same file loads, with the bad rows counted per reason
    ok = load_examples(
        DataConfig(dataset="apps", path=str(path), max_bad_fraction=0.5), "train", report=False
    )
    assert dict(ok.skipped) == {"empty field 'question'": 1, "invalid JSON": 1}
    assert ok.first_bad == f"{path} line 2: empty field 'question'"


def test_invalid_utf8_bytes_count_as_surrogates(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    good = b'{"prompt": "p", "chosen": "c"}\n{"prompt": "q", "chosen": "c"}\n'
    path.write_bytes(good + b'{"prompt": "caf\xe9", "chosen": "c"}\n')
    out = load_examples(DataConfig(dataset="jsonl", path=str(path)), "train", report=False)
    assert dict(out.skipped) == {"surrogate characters": 1}


def test_rawrow_index_continues_across_files(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"x": 1}\n{"x": 2}\n')
    rows: list[RawRow] = list(read_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"]))
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert [r.where for r in rows] == ["line 1", "line 2", "line 1", "line 2"]
