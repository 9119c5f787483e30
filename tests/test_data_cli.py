"""`wprctl data show` and `wprctl data stats` through the real CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wprctl.cli import main
from wprctl.data.loading import clear_cache

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _fresh() -> None:
    clear_cache()


def write_manifest(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "wprctl.toml"
    path.write_text(
        f'[project]\noutput_dir = "runs"\nseed = 1\n\n[data]\n{data}\n', encoding="utf-8"
    )
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        sys.exit(0)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_stats_json_counts_rows_stages_and_skips(tmp_path: Path, capsys) -> None:
    m = write_manifest(
        tmp_path, f'dataset = "apps"\npath = "{FIX / "apps.jsonl"}"\nmax_bad_fraction = 0.6'
    )
    code, out, _ = run(
        ["data", "stats", "-m", str(m), "--json", "--set", "data.data_split=1,1,1"], capsys
    )
    assert code == 0
    report = json.loads(out)
    train = report["splits"]["train"]
    assert train["rows_read"] == 6
    assert train["skipped"] == {
        "broken input_output JSON": 1,
        "broken solutions JSON": 1,
        "empty field 'question'": 1,
    }
    assert train["first_bad"].endswith(
        "apps.jsonl line 4: broken input_output JSON (Expecting value: line 1 column 13 (char 12))"
    )
    assert report["splits"]["eval"]["examples"] + train["examples"] == 3
    assert report["stages"]["rm"] == {"train": None, "eval": None}  # APPS has no pairs


def test_stats_table_for_the_demo(tmp_path: Path, capsys) -> None:
    m = write_manifest(tmp_path, 'dataset = "demo"\n[data.demo]\nn_train = 100\nn_validation = 10')
    code, out, _ = run(["data", "stats", "-m", str(m)], capsys)
    assert code == 0
    line = next(row for row in out.splitlines() if "│ rm " in row)
    assert line.split("│")[2].strip() == "40" and line.split("│")[3].strip() == "10"


def test_show_json_marks_where_the_loss_applies(tmp_path: Path, capsys, tiny_tokenizer) -> None:
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    m = write_manifest(tmp_path, 'dataset = "demo"\n[data.demo]\nn_train = 50\nn_validation = 10')
    common = ["-m", str(m), "--set", f"model.tokenizer={tok_dir}", "--json", "--n", "2"]
    code, out, _ = run(["data", "show", *common], capsys)
    assert code == 0
    items = json.loads(out)
    assert len(items) == 2 and items[0]["stage"] == "sft"
    for it in items:
        assert it["prompt"].startswith("POST\nSubreddit: r/") and it["prompt"].endswith("TL;DR: ")
        assert it["response"].endswith("</s>") and it["tokens"]["loss"] == sum(
            x != -100 for x in it["labels"]
        )
        assert it["tokens"]["prompt"] + it["tokens"]["loss"] == len(it["input_ids"])
    code, out, _ = run(["data", "show", *common, "--stage", "rm", "--split", "eval"], capsys)
    pair = json.loads(out)[0]
    assert pair["chosen_prompt"] == pair["rejected_prompt"] and pair["chosen"] != pair["rejected"]
    code, out, _ = run(["data", "show", *common[:-3], "--stage", "ppo", "--n", "1"], capsys)
    assert code == 0 and "TL;DR:" in out and "loss" not in out.split("\n")[0]
    code, out, _ = run(["data", "show", *common[:-2], "-n", "3"], capsys)  # the short form
    assert code == 0 and len(json.loads(out)) == 3


def test_nothing_left_exits_2_naming_file_and_first_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": ""}\n{"chosen": "x"}\n', encoding="utf-8")
    m = write_manifest(tmp_path, f'dataset = "jsonl"\npath = "{bad}"')
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "wprctl", "data", "stats", "-m", str(m)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{bad}: no usable rows" in proc.stderr
    assert f"first bad row: {bad} line 1: empty field 'prompt'" in proc.stderr
    assert "Traceback" not in proc.stderr
