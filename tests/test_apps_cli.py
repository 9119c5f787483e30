"""`wprctl apps-eval` end to end, bad input, problem loading, and the `evaluate` module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import wprctl_captured, wprctl_in_process
from wprctl.codeexec import load_problems
from wprctl.errors import UserError

APPS = Path(__file__).parent / "fixtures" / "apps" / "apps.jsonl"
IDS = ["1", "2", "4184", "2404"]


cli = wprctl_in_process


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in APPS.read_text().splitlines()]
    return write_jsonl(
        tmp_path / "problems.jsonl", [r for r in rows if str(r["problem_id"]) in IDS]
    )


def test_apps_eval_end_to_end(
    tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    problems = load_problems(small)
    gens = []
    for pid in IDS:
        sol = problems[pid].solutions[0]
        gens.append({"id": pid, "sample": 0, "response": f"```python\n{sol}\n```", "prompt": "p"})
        gens.append({"id": pid, "sample": 1, "response": "print('nope')"})
    gens.append({"id": "1", "responses": ["```python\nprint(1/0)\n```", "def broken(:"]})
    gen_file = write_jsonl(tmp_path / "gens.jsonl", gens)
    out = tmp_path / "res" / "out.jsonl"
    code = cli(
        "apps-eval",
        str(gen_file),
        "--problems",
        str(small),
        "--k",
        "1,2,5,10",
        "--timeout",
        "5",
        "--workers",
        "2",
        "--mode",
        "compat",
        "--out",
        str(out),
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10
    assert [r["id"] for r in rows[:2]] == ["1", "1"] and rows[0]["prompt"] == "p"
    by = {(r["id"], r["sample"]): r for r in rows}
    assert by[("4184", 0)]["results"] == [1] * 8 and by[("4184", 0)]["all_passed"]
    assert len(by[("4184", 0)]["times"]) == 8
    # print('nope') becomes the body of the starter code's method, which then returns None
    assert by[("2404", 1)]["verdicts"] == ["fail"]
    assert by[("1", 2)]["verdicts"] == ["runtime_error"] and by[("1", 2)]["reward"] == -0.6
    assert by[("1", 3)]["verdicts"] == ["compile_error"] and by[("1", 3)]["reward"] == -1.0
    summary = json.loads((tmp_path / "res" / "out.jsonl.summary.json").read_text())
    assert summary["n_problems"] == 4 and summary["n_samples"] == 10
    # problem 1 has 4 samples with 1 correct, the others 2 samples with 1 correct
    assert summary["pass@k"]["1"] == pytest.approx((0.25 + 0.5 * 3) / 4)
    assert summary["pass@k"]["2"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert summary["pass@k"]["5"] is None and "pass@5 over 0/4" in summary["pass@k_note"]
    assert summary["strict_accuracy"] == pytest.approx(summary["pass@k"]["1"])
    assert set(summary["by_difficulty"]) == {"introductory", "interview"}
    assert summary["by_difficulty"]["introductory"]["n_problems"] == 2
    assert summary["mode"] == "compat"
    # captured, as in a log: the table keeps its whole cells (80 columns cut them to "pass…")
    table = capsys.readouterr().out
    assert "pass@10" in table and "strict" in table and "…" not in table


def test_unknown_problem_ids_exit_2(tmp_path: Path, small: Path, capsys) -> None:
    gens = write_jsonl(
        tmp_path / "g.jsonl", [{"id": "1", "response": "x"}, {"id": "31337", "response": "x"}]
    )
    code = cli("apps-eval", str(gens), "--problems", str(small), "--out", str(tmp_path / "o.jsonl"))
    assert code == 2
    err = capsys.readouterr()
    assert "31337" in err.err + err.out and "Traceback" not in err.err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        json.dumps({"inputs": ["1\n"], "outputs": []}),
        json.dumps({"inputs": "1", "outputs": "2"}),
        json.dumps({"fn_name": "f", "inputs": [1], "outputs": [2]}),
        "",
    ],
)
def test_malformed_input_output_exit_2(tmp_path: Path, small: Path, capsys, bad: str) -> None:
    rows = [json.loads(line) for line in small.read_text().splitlines()]
    for r in rows:
        if str(r["problem_id"]) == "2":
            r["input_output"] = bad
    probs = write_jsonl(tmp_path / "p.jsonl", rows)
    gens = write_jsonl(
        tmp_path / "g.jsonl", [{"id": 1, "response": "print(1)"}, {"id": 2, "response": "print(1)"}]
    )
    code = cli("apps-eval", str(gens), "--problems", str(probs), "--out", str(tmp_path / "o.jsonl"))
    assert code == 2
    err = capsys.readouterr().err
    assert "problem 2" in err and "input_output" in err and "Traceback" not in err
    # a broken problem nobody asked about does not stop the others
    gens1 = write_jsonl(tmp_path / "g1.jsonl", [{"id": 1, "response": "print(1)"}])
    assert (
        cli("apps-eval", str(gens1), "--problems", str(probs), "--out", str(tmp_path / "o.jsonl"))
        == 0
    )


def test_bad_generations_exit_2(tmp_path: Path, small: Path, capsys) -> None:
    gens = tmp_path / "g.jsonl"
    gens.write_text('{"id": "1", "response": "x"}\n{"response": "no id"}\n')
    assert cli("apps-eval", str(gens), "--problems", str(small), "--out", str(tmp_path / "o")) == 2
    assert "line 2" in capsys.readouterr().err
    gens.write_text(
        '{"id": "1", "response": "a", "sample": 0}\n{"id": "1", "response": "b", "sample": 0}\n'
    )
    assert cli("apps-eval", str(gens), "--problems", str(small), "--out", str(tmp_path / "o")) == 2
    assert "line 2: problem 1 sample 0 is also on line 1" in " ".join(
        capsys.readouterr().err.split()
    )
    assert cli("apps-eval", str(gens), "--problems", str(small), "--k", "0,x", "--out", "o") == 2
    assert (
        cli("apps-eval", str(tmp_path / "missing.jsonl"), "--problems", str(small), "--out", "o")
        == 2
    )
    assert (
        cli("apps-eval", str(gens), "--problems", str(tmp_path / "nope.jsonl"), "--out", "o") == 2
    )
    capsys.readouterr()
    good = write_jsonl(tmp_path / "ok.jsonl", [{"id": "1", "response": "print(1)"}])
    assert cli("apps-eval", str(good), "--problems", "builtin:apps-sample", "--out", "o") == 2
    assert (
        "unknown built-in problem set; available: builtin:apps-samples" in capsys.readouterr().err
    )
    for timeout in ("nan", "inf", "0"):  # nan and inf reached select() as a traceback
        args = ["--problems", str(small), "--out", str(tmp_path / "o2"), "--timeout", timeout]
        assert cli("apps-eval", str(good), *args) == 2
        assert "timeout must be a positive, finite number" in capsys.readouterr().err
    # --out = the generations or the problems file would overwrite them; a folder is no file
    for target in (good, small):
        before = target.read_bytes()
        assert cli("apps-eval", str(good), "--problems", str(small), "--out", str(target)) == 2
        assert "input file" in capsys.readouterr().err and target.read_bytes() == before
    assert cli("apps-eval", str(good), "--problems", str(small), "--out", str(tmp_path)) == 2
    assert "is a folder" in capsys.readouterr().err


def test_load_problems_formats(tmp_path: Path, small: Path) -> None:
    rows = [json.loads(line) for line in small.read_text().splitlines()]
    (tmp_path / "arr.json").write_text(json.dumps(rows))
    assert set(load_problems(tmp_path / "arr.json")) == set(IDS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "a.parquet")
    shutil.copy(small, folder / "b.jsonl")
    probs = load_problems(folder)
    assert set(probs) == set(IDS)
    assert probs["4184"].fn_name == "is_prime" and probs["4184"].outputs[0] == [False]
    with pytest.raises(UserError, match="no such problems file"):
        load_problems(tmp_path / "missing.jsonl")


def test_evaluate_module_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import evaluate

    from wprctl.codeexec.metric import METRIC_PATH

    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(METRIC_PATH, cache_dir=str(tmp_path))
    refs = [
        json.dumps(
            {"input_output": json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]})}
        ),
        json.dumps({"inputs": [[2], [3]], "outputs": [4, 9], "fn_name": "sq"}),
    ]
    preds = [
        ["a, b = map(int, input().split())\nprint(a + b)", "print(3)"],
        ["def sq(x):\n    return x * x", "def sq(x):\n    return x + x"],
    ]
    out = metric.compute(predictions=preds, references=refs, k=[1, 2], timeout=3)
    assert out["pass@1"] == pytest.approx(0.5) and out["pass@2"] == pytest.approx(1.0)
    assert out["test_case_average"] == pytest.approx(((1 + 0.5) / 2 + (1 + 0.5) / 2) / 2)
    assert out["results"][1] == ["pass", "fail"]


def test_a_killed_apps_eval_resumes_without_running_finished_samples_again(
    tmp_path: Path, small: Path, capsys
) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import clean_env

    problems = load_problems(small)
    slow = "import time\ntime.sleep(0.4)\nprint('x')"
    gens = [
        {"id": pid, "sample": s, "response": problems[pid].solutions[0] if s == 0 else slow}
        for pid in ("1", "2")
        for s in range(4)
    ]
    gen_file = write_jsonl(tmp_path / "gens.jsonl", gens)
    common = ["apps-eval", str(gen_file), "--problems", str(small), "--workers", "1"]
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wprctl", *common, "--out", str(out)],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (partial.exists() and partial.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    finished = partial.read_text().count("\n")
    assert 3 <= finished < len(gens)
    saved = partial.read_text()

    code, text = wprctl_captured(capsys, *common, "--out", str(out))
    assert code == 0, text
    assert f"{finished} of {len(gens)} samples already evaluated" in " ".join(text.split())
    assert not partial.exists()
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["reused_samples"] == finished

    # the same verdicts as a run that was never interrupted
    straight = tmp_path / "straight.jsonl"
    assert wprctl_captured(capsys, *common, "--out", str(straight))[0] == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    again = [json.loads(x) for x in straight.read_text().splitlines()]
    key = ("id", "sample", "verdicts", "reward")
    assert [[r[k] for k in key] for r in rows] == [[r[k] for k in key] for r in again]
    assert sum(r["all_passed"] for r in rows) == 2

    # a changed setting is a different evaluation: nothing is reused
    partial.write_text(saved + '{"key": "torn by a ki')
    code, text = wprctl_captured(capsys, *common, "--timeout", "3", "--out", str(out))
    assert code == 0 and "already evaluated" not in text
    # with the settings of the killed run its results count again; the torn line does not
    partial.write_text(saved + '{"key": "torn by a ki')
    code, text = wprctl_captured(capsys, *common, "--out", str(out))
    assert code == 0 and f"{finished} of {len(gens)} samples already" in " ".join(text.split())


def test_an_unreadable_partial_file_is_bad_input_and_a_torn_character_only_loses_its_line(
    tmp_path: Path, small: Path, capsys
) -> None:
    from wprctl.codeexec.executor import SampleResult
    from wprctl.codeexec.partial import PartialResults

    out = tmp_path / "out.jsonl"
    store = PartialResults(out)
    res = SampleResult("1", 0, ["pass"], [0.1], [""], "interview", 1.0)
    store.append("k1", res)
    with store.path.open("ab") as fh:
        fh.write(b'{"key": "k2", "result": {"id": "\xe2\x82')  # killed inside a UTF-8 character
    assert store.load() == {"k1": res}

    store.path.unlink()
    store.path.mkdir()  # e.g. a path clash; permissions are not testable as root
    gens = write_jsonl(tmp_path / "gens.jsonl", [{"id": "1", "sample": 0, "response": "print(1)"}])
    code, text = wprctl_captured(
        capsys, "apps-eval", str(gens), "--problems", str(small), "--out", str(out)
    )
    flat = " ".join(text.split())
    assert code == 2 and str(store.path) in flat and "delete it" in flat, text
    assert "Traceback" not in text and not out.exists()
