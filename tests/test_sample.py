"""`wprctl sample`: the paper's evaluation subset (seeded, stratified, topped up)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import wprctl_captured
from wprctl.judge.subset import choose_ids, sample_file

FIXTURE = Path(__file__).parent / "fixtures" / "judge" / "tldr_a.jsonl"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return wprctl_captured(capsys, *args)


def stratum(row: dict) -> str:
    return (row.get("meta") or {}).get("subreddit") or "ARTICLE"


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stratified_real_rows_at_most_five_per_subreddit(tmp_path, capsys) -> None:
    source = [json.loads(x) for x in FIXTURE.read_text().splitlines()]
    sizes = Counter(stratum(r) for r in source)
    assert sizes["relationships"] > 5 and sizes["ARTICLE"] > 5  # the cap has work to do
    n = 20
    assert sum(min(5, s) for s in sizes.values()) >= n  # enough strata: no top-up needed
    out = tmp_path / "subset.jsonl"
    code, text = run(
        [
            "sample",
            str(FIXTURE),
            "--n",
            str(n),
            "--seed",
            "42",
            "--stratify",
            "subreddit",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert max(Counter(stratum(r) for r in rows).values()) <= 5
    # Rows keep their order in the source file.
    position = {r["id"]: i for i, r in enumerate(source)}
    assert [position[r["id"]] for r in rows] == sorted(position[r["id"]] for r in rows)


def test_top_up_when_strata_run_dry_and_empty_field_is_article(tmp_path) -> None:
    rows = (
        [{"id": f"x{i}", "subreddit": "x"} for i in range(10)]
        + [{"id": f"y{i}", "meta": {"subreddit": "y"}} for i in range(10)]
        + [
            {"id": "n1", "subreddit": None},
            {"id": "n2", "meta": {"subreddit": ""}},
            {"id": "n3"},
        ]  # null, empty and absent: the ARTICLE stratum
    )
    path = write(tmp_path / "rows.jsonl", rows)
    subset = sample_file(path, n=15, seed=1, stratify="subreddit")
    # First pass: 5 x, 5 y, 3 ARTICLE = 13; two more from the random top-up.
    assert subset.topped_up == 2 and len(subset.ids) == 15
    assert subset.strata["ARTICLE"] == 3
    assert subset.strata["x"] + subset.strata["y"] == 12
    assert min(subset.strata["x"], subset.strata["y"]) >= 5
    assert {"n1", "n2", "n3"} <= set(subset.ids)


def test_deterministic_under_a_seed(tmp_path, capsys) -> None:
    outs = []
    for i, seed in enumerate(["42", "42", "7"]):
        out = tmp_path / f"s{i}.jsonl"
        code, _ = run(
            ["sample", str(FIXTURE), "--n", "10", "--seed", seed, "--out", str(out)], capsys
        )
        assert code == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert len(outs[0].splitlines()) == 10


def test_unstratified_is_a_seeded_shuffle_prefix() -> None:
    ids = [str(i) for i in range(100)]
    chosen, topped = choose_ids(ids, None, 10, seed=3, per_stratum=5)
    assert topped == 0 and len(set(chosen)) == 10
    assert chosen == choose_ids(ids, None, 10, seed=3, per_stratum=5)[0]
    assert chosen != ids[:10]


def test_several_samples_per_id_stay_together(tmp_path) -> None:
    rows = [{"id": i // 2, "sample": i % 2, "response": str(i)} for i in range(40)]
    subset = sample_file(write(tmp_path / "multi.jsonl", rows), n=5, seed=0)
    assert len(subset.ids) == 5 and len(subset.rows) == 10
    assert Counter(r["id"] for r in subset.rows) == Counter({int(i): 2 for i in subset.ids})


def test_bad_input_exits_2(tmp_path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    code, text = run(["sample", str(tmp_path / "missing.jsonl"), "--out", str(out)], capsys)
    assert code == 2 and "missing.jsonl" in text and "Traceback" not in text
    code, text = run(["sample", str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and "a folder (expected a JSONL file" in " ".join(text.split())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n\n{"id": 2\n')
    code, text = run(["sample", str(bad), "--out", str(out)], capsys)
    assert code == 2 and "line 3" in text
    good = write(tmp_path / "good.jsonl", [{"id": 1, "meta": {"subreddit": "a"}}])
    code, text = run(["sample", str(good), "--stratify", "subredit", "--out", str(out)], capsys)
    assert code == 2 and "subredit" in text and "meta.subreddit" in text
    noid = write(tmp_path / "noid.jsonl", [{"prompt": "p"}])
    code, text = run(["sample", str(noid), "--out", str(out)], capsys)
    assert code == 2 and "'id'" in text and "line 1" in text
    assert not out.exists()
    # the input itself, or a folder, as --out: refused before anything is written
    before = good.read_bytes()
    code, text = run(["sample", str(good), "--out", str(good)], capsys)
    assert code == 2 and "input file" in text and good.read_bytes() == before
    code, text = run(["sample", str(good), "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in text and "Traceback" not in text
