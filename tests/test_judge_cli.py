"""`wprctl judge` end to end against a real local OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import wprctl_captured
from wprctl.judge.io import Pair
from wprctl.judge.run import RunSettings, plan, summary_path
from wprctl.judge.server import JudgeServer, Reply
from wprctl.judge.templates import load_template, match_builtin

MODEL = "local-judge"


@pytest.fixture
def server(judge_server: JudgeServer) -> JudgeServer:
    return judge_server


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray ./wprctl.toml
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def write_files(tmp_path: Path, n: int) -> tuple[Path, Path]:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with a.open("w") as fa, b.open("w") as fb:
        for i in range(n):
            prompt = f"Prompt number {i}: what happened in the story?"
            fa.write(
                json.dumps(
                    {"id": i, "prompt": prompt, "response": f"alpha answer {i}", "reward": 1.0}
                )
                + "\n"
            )
            fb.write(
                json.dumps(
                    {"id": i, "prompt": prompt, "response": f"beta answer {i}", "reward": 0.0}
                )
                + "\n"
            )
    return a, b


def policy(rules: dict[int, str]) -> Callable[[list, str], str | Reply]:
    """A judge that decides per prompt id; unlisted ids prefer model A's ("alpha") response."""

    def responder(messages: list, model: str) -> str | Reply:
        template, (prompt, first, _second) = match_builtin(messages[-1]["content"])
        i = int(re.search(r"number (\d+)", prompt).group(1))  # type: ignore[union-attr]
        alpha = "A" if first.startswith("alpha") else "B"
        beta = "B" if alpha == "A" else "A"
        rule = rules.get(i, "a_wins")
        if rule == "a_wins":
            return template.format_answer(alpha)
        if rule == "a_wins_verbose":  # a variant the parser must read
            return f"Both are short, but summary {alpha} is better.\n\nAnswer: **{alpha}**"
        if rule == "b_wins":
            return template.format_answer(beta)
        if rule == "first":  # pure position bias: flips with the order
            return template.format_answer("A")
        if rule == "tie":
            return template.format_answer("E")
        if rule == "garbage":
            return "Both have their merits; it is hard to say."
        if rule == "refuse":
            return Reply.refused()
        if rule == "error":
            return Reply.server_error(500)
        raise AssertionError(rule)

    return responder


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return wprctl_captured(capsys, *args)


def judge_args(a: Path, b: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        "judge",
        str(a),
        str(b),
        "--task",
        "summarize",
        "--model",
        MODEL,
        "--base-url",
        url,
        "--out",
        str(out),
        *extra,
    ]


def read_out(out: Path) -> dict[int, dict]:
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_counting_rules_end_to_end_and_rerun_is_free(tmp_path, server, capsys) -> None:
    a, b = write_files(tmp_path, 9)
    server.responder = policy(
        {
            1: "a_wins_verbose",
            3: "b_wins",
            4: "first",
            5: "tie",
            6: "garbage",
            7: "refuse",
            8: "b_wins",
        }
    )
    out = tmp_path / "res" / "judged.jsonl"
    code, text = run(judge_args(a, b, out, server.base_url), capsys)
    assert code == 0, text
    rows = read_out(out)
    assert list(rows) == list(range(9))  # input order
    winners = {i: r["winner"] for i, r in rows.items()}
    assert winners == {
        0: "A",
        1: "A",
        2: "A",
        3: "B",
        4: "tie",
        5: "tie",
        6: "invalid",
        7: "invalid",
        8: "B",
    }
    for r in rows.values():
        assert r["response_a"].startswith("alpha") and r["response_b"].startswith("beta")
        assert [v["order"] for v in r["verdicts"]] == ["AB", "BA"]
        assert all(isinstance(v["raw"], str) for v in r["verdicts"])
    assert rows[6]["verdicts"][0]["raw"] == "Both have their merits; it is hard to say."
    assert rows[7]["verdicts"][0]["refusal"] is True
    summary = json.loads(summary_path(out).read_text())
    assert (summary["wins"], summary["ties"], summary["losses"], summary["invalid"]) == (3, 2, 2, 2)
    assert summary["win_rate"] == pytest.approx((3 + 1) / 7)
    assert summary["win_rate_no_ties"] == pytest.approx(3 / 5)
    assert summary["flip_rate"] == pytest.approx(1 / 7)  # pair 4 of the 7 valid in both orders
    lo, hi = summary["ci95"]
    assert lo <= summary["win_rate"] <= hi
    assert summary["requests"] == 18 and summary["refusals"] == 2
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert summary["cost_usd"] is None  # no price for a local model name
    assert "win_rate" in text and "flip_rate" in text  # the rich table

    before = server.requests
    code, text = run(judge_args(a, b, out, server.base_url), capsys)
    assert code == 0, text
    assert server.requests == before
    again = json.loads(summary_path(out).read_text())
    assert again["requests"] == 0 and again["reused_pairs"] == 9
    assert again["win_rate"] == summary["win_rate"]
    # A new output file reuses the cache next to it: still no request.
    code, _ = run(judge_args(a, b, tmp_path / "res" / "other.jsonl", server.base_url), capsys)
    assert code == 0 and server.requests == before


def test_dialogue_json_verdicts_random_order_and_user_template(tmp_path, server, capsys) -> None:
    a, b = write_files(tmp_path, 12)
    server.responder = policy({0: "b_wins"})
    out = tmp_path / "hh.jsonl"
    args = judge_args(a, b, out, server.base_url, "--orders", "random", "--seed", "3")
    args[args.index("summarize")] = "hh-rlhf"
    code, text = run(args, capsys)
    assert code == 0, text
    rows = read_out(out)
    assert all(len(r["verdicts"]) == 1 for r in rows.values())
    assert {r["verdicts"][0]["order"] for r in rows.values()} == {"AB", "BA"}
    assert json.loads(rows[1]["verdicts"][0]["raw"])["choice"] in ("A", "B")
    assert [r["winner"] for r in rows.values()] == ["B"] + ["A"] * 11
    summary = json.loads(summary_path(out).read_text())
    assert summary["requests"] == 12 and summary["flip_rate"] is None
    assert summary["win_rate"] == pytest.approx(11 / 12)

    custom = tmp_path / "terse.toml"
    custom.write_text(
        'answer = "letter"\nuser = """Q: {{prompt}}\n1) {{response_a}}\n2) {{response_b}}\nA, B or E?"""\n'
    )
    server.responder = lambda messages, model: (
        "B" if messages[-1]["content"].split("1) ")[1].startswith("alpha") else "A"
    )
    code, text = run(
        judge_args(a, b, tmp_path / "custom.jsonl", server.base_url, "--template", str(custom)),
        capsys,
    )
    assert code == 0, text
    assert {r["winner"] for r in read_out(tmp_path / "custom.jsonl").values()} == {"B"}


def test_failed_pairs_are_not_cached_and_rerun_retries_only_them(tmp_path, server, capsys) -> None:
    a, b = write_files(tmp_path, 6)
    server.responder = policy({2: "error"})
    out = tmp_path / "out.jsonl"
    fast = ["--set", "judge.max_retries=1", "--set", "judge.backoff_base=0.01"]
    code, text = run(judge_args(a, b, out, server.base_url, *fast), capsys)
    assert code == 1
    assert "rerun" in text.lower() and "1 pair(s) failed" in text
    # the message names where and why, not only how many
    flat = " ".join(text.split())
    assert f"at {server.base_url}" in flat and "the error (1 of them)" in flat and "500" in flat
    rows = read_out(out)
    assert rows[2]["status"] == "failed" and rows[2]["winner"] is None and "500" in rows[2]["error"]
    assert all(rows[i]["status"] == "ok" for i in (0, 1, 3, 4, 5))
    summary = json.loads(summary_path(out).read_text())
    assert summary["failed"] == 1 and summary["wins"] == 5 and summary["complete"] is False
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == 10  # 5 ok pairs x 2

    server.responder = policy({})
    server.reset_counts()
    code, text = run(judge_args(a, b, out, server.base_url, *fast), capsys)
    assert code == 0, text
    assert server.requests == 2  # pair 2 in both orders, nothing else
    assert read_out(out)[2]["winner"] == "A"
    assert json.loads(summary_path(out).read_text())["complete"] is True


def test_cache_is_per_endpoint(tmp_path, server, capsys) -> None:
    """Two servers can answer to the same model name: a cached verdict of one is not the other's."""
    a, b = write_files(tmp_path, 3)
    server.responder = policy({})
    code, text = run(judge_args(a, b, tmp_path / "one.jsonl", server.base_url), capsys)
    assert code == 0, text
    assert server.requests == 6
    with JudgeServer(policy({i: "b_wins" for i in range(3)})) as other:
        code, text = run(judge_args(a, b, tmp_path / "two.jsonl", other), capsys)
        assert code == 0, text
    # the second endpoint was asked for everything, and its answers (B) are the ones reported
    assert all(r["winner"] == "B" for r in read_out(tmp_path / "two.jsonl").values())
    server.reset_counts()
    code, text = run(judge_args(a, b, tmp_path / "three.jsonl", server.base_url), capsys)
    assert code == 0, text
    assert server.requests == 0  # the first endpoint's replies are still cached
    assert all(r["winner"] == "A" for r in read_out(tmp_path / "three.jsonl").values())


def test_killed_run_then_rerun_repeats_no_finished_judgement(tmp_path) -> None:
    n = 16
    a, b = write_files(tmp_path, n)
    srv = JudgeServer(policy({}), latency=0.1)
    out = tmp_path / "out.jsonl"
    with srv as url:
        env = {
            k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")
        }
        cmd = [sys.executable, "-m", "wprctl", *judge_args(a, b, out, url, "--concurrency", "2")]
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while sum(srv.served.values()) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL

        template = load_template("summarize")
        settings = RunSettings(
            endpoint=url,
            model=MODEL,
            temperature=0.0,
            orders="both",
            seed=0,
            max_cost=None,
            bootstrap=100,
            price=None,
        )
        pairs = [
            Pair(r["id"], r["prompt"], r["response"], json.loads(lb)["response"])
            for r, lb in zip(
                map(json.loads, a.read_text().splitlines()), b.read_text().splitlines(), strict=True
            )
        ]
        judgements = [j for p in plan(pairs, template, settings) for j in p.judgements]
        with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:
            cached = {k for (k,) in db.execute("SELECT key FROM replies")}
        finished = [j for j in judgements if j.key in cached]
        assert 0 < len(finished) < len(judgements)  # killed mid-run

        srv.reset_counts()
        done = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        for j in finished:
            assert srv.count(j.messages) == 0
        assert srv.requests == len(judgements) - len(finished)
    rows = read_out(out)
    assert len(rows) == n and all(r["winner"] == "A" for r in rows.values())


def test_api_key_is_never_written(tmp_path, server, capsys, monkeypatch) -> None:
    secret = "sk-test-SECRET-9f8e7d6c5b4a"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    a, b = write_files(tmp_path, 4)
    rules = policy({})

    def leaky(messages: list, model: str) -> str | Reply:
        if "number 1:" in messages[-1]["content"]:  # a server that echoes the key in an error
            body = {"error": {"message": f"Invalid request for key {secret}", "type": "invalid"}}
            return Reply(status=400, body=json.dumps(body).encode())
        return rules(messages, model)

    server.responder = leaky
    run_dir = tmp_path / "run"
    code, text = run(judge_args(a, b, run_dir / "out.jsonl", server.base_url), capsys)
    assert code == 1
    assert server.api_keys_seen == {secret}  # the key really was used
    assert secret not in text
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"out.jsonl", "out.jsonl.summary.json", "judge_cache.sqlite"}
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    assert "***" in read_out(run_dir / "out.jsonl")[1]["error"]


def test_api_key_comes_from_the_environment_only(tmp_path, server, capsys, monkeypatch) -> None:
    a, b = write_files(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    code, text = run(["judge", str(a), str(b), "--task", "summarize", "--out", str(out)], capsys)
    assert code == 2 and "OPENAI_API_KEY" in text and "Traceback" not in text
    code, text = run(
        [
            "judge",
            str(a),
            str(b),
            "--out",
            str(out),
            "--base-url",
            "https://judge.example.com/v1",
            "--set",
            "judge.api_key_env=MY_JUDGE_KEY",
        ],
        capsys,
    )
    assert code == 2 and "MY_JUDGE_KEY" in text
    assert not out.exists()
    # a password in the URL is not shown either
    url = "https://user:hunter2@judge.example.com/v1"
    code, text = run(["judge", str(a), str(b), "--out", str(out), "--base-url", url], capsys)
    assert code == 2 and "judge.example.com" in text and "hunter2" not in text
    # A local server needs no key: a dummy one is sent.
    server.responder = policy({})
    code, text = run(judge_args(a, b, out, server.base_url), capsys)
    assert code == 0, text
    assert server.api_keys_seen == {"sk-local-no-key"}


def test_max_cost_stops_cleanly_and_a_rerun_finishes(tmp_path, server, capsys) -> None:
    a, b = write_files(tmp_path, 10)
    server.responder = policy({})
    out = tmp_path / "out.jsonl"
    price = ["--set", f'judge.prices={{"{MODEL}" = [1000.0, 1000.0]}}', "--concurrency", "1"]
    # One judgement here is ~190 prompt tokens: ~$0.19 at $1000 per million.
    code, text = run(judge_args(a, b, out, server.base_url, "--max-cost", "1.0", *price), capsys)
    assert code == 0, text
    summary = json.loads(summary_path(out).read_text())
    assert summary["stopped"] == "max_cost" and summary["complete"] is False
    assert 0 < summary["judged"] < 10 and summary["pending"] == 10 - summary["judged"]
    assert summary["cost_usd"] <= 1.0
    assert "max-cost" in text
    first = server.requests
    code, text = run(judge_args(a, b, out, server.base_url, "--max-cost", "100", *price), capsys)
    assert code == 0, text
    assert server.requests == 20  # every judgement exactly once over both runs
    assert first < 20 and json.loads(summary_path(out).read_text())["complete"] is True


def test_dry_run_requests_and_writes_nothing(tmp_path, server, capsys) -> None:
    a, b = write_files(tmp_path, 5)
    out = tmp_path / "dry" / "out.jsonl"
    code, text = run(
        ["judge", str(a), str(b), "--task", "summarize", "--out", str(out), "--dry-run"], capsys
    )
    assert code == 0, text  # no key needed to estimate
    assert "API calls needed" in text and re.search(r"API calls needed\s*│\s*10\b", text)
    assert "est. cost" in text and not out.parent.exists()
    server.responder = policy({})
    run(judge_args(a, b, out, server.base_url), capsys)
    code, text = run(judge_args(a, b, out, server.base_url, "--dry-run"), capsys)
    assert code == 0 and re.search(r"API calls needed\s*│\s*0\b", text)
    # a file judged against itself is allowed (a sanity check), but said
    code, text = run(["judge", str(a), str(a), "--out", str(out), "--dry-run"], capsys)
    assert code == 0 and "A and B are the same file" in " ".join(text.split())


def test_bad_inputs_exit_2_naming_the_problem(tmp_path, capsys) -> None:
    a, b = write_files(tmp_path, 3)
    rows = b.read_text().splitlines()
    changed = json.loads(rows[1])
    changed["prompt"] = "a different prompt"
    b.write_text("\n".join([rows[0], json.dumps(changed), rows[2]]) + "\n")
    out = tmp_path / "out.jsonl"
    code, text = run(["judge", str(a), str(b), "--out", str(out), "--dry-run"], capsys)
    assert code == 2 and "id 1" in text and "prompts differ" in text
    # an id used for two prompts in one file is named as such, not as a mismatch with A
    b.write_text("\n".join([rows[0], rows[1], json.dumps(changed)]) + "\n")
    code, text = run(["judge", str(a), str(b), "--out", str(out), "--dry-run"], capsys)
    flat = " ".join(text.split())
    assert code == 2 and "line 3: id 1 is also on line 2, with another prompt" in flat
    b.write_text(rows[0] + "\n{not json\n")
    code, text = run(["judge", str(a), str(b), "--out", str(out), "--dry-run"], capsys)
    assert code == 2 and "line 2" in text and str(b) in text
    b.write_text(json.dumps({"id": 0, "prompt": "x"}) + "\n")
    code, text = run(["judge", str(a), str(b), "--out", str(out), "--dry-run"], capsys)
    assert code == 2 and "'response'" in text
    code, text = run(["judge", str(a), str(tmp_path / "nope.jsonl"), "--out", str(out)], capsys)
    assert code == 2 and "nope.jsonl" in text
    code, text = run(["judge", str(a), str(a), "--out", str(out), "--template", "nope"], capsys)
    assert code == 2 and "nope" in text
    # --out (or --cache) may not be an input, which the run would overwrite; nor a folder
    b.write_text(a.read_text())
    before = a.read_bytes()
    for args in (["--out", str(a)], ["--out", str(out), "--cache", str(b)]):
        code, text = run(["judge", str(a), str(b), *args, "--dry-run"], capsys)
        assert code == 2 and "input file" in text and "Traceback" not in text
    assert a.read_bytes() == before
    code, text = run(["judge", str(a), str(b), "--out", str(tmp_path), "--dry-run"], capsys)
    assert code == 2 and "is a folder" in text


def test_manifest_defaults_and_first_sample_per_id(tmp_path, server, capsys) -> None:
    a, b = write_files(tmp_path, 3)
    # Model A's file holds two samples per id, sample 1 first: sample 0 must be judged.
    rows = [json.loads(x) for x in a.read_text().splitlines()]
    with a.open("w") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "response": "beta-like loser", "sample": 1}) + "\n")
            fh.write(json.dumps({**r, "sample": 0}) + "\n")
    (tmp_path / "wprctl.toml").write_text(
        f'[judge]\nmodel = "from-manifest"\nbase_url = "{server.base_url}"\norders = "random"\n'
    )
    seen_models: set[str] = set()
    rules = policy({})

    def responder(messages: list, model: str) -> str | Reply:
        seen_models.add(model)
        return rules(messages, model)

    server.responder = responder
    out = tmp_path / "out.jsonl"
    code, text = run(["judge", str(a), str(b), "--out", str(out)], capsys)
    assert code == 0, text
    assert seen_models == {"from-manifest"} and server.requests == 3  # random: one order each
    assert "sample 0" in text
    assert all(
        r["response_a"].startswith("alpha") and r["winner"] == "A" for r in read_out(out).values()
    )


def test_rejected_key_stops_the_run_with_exit_1(tmp_path, server, capsys) -> None:
    a, b = write_files(tmp_path, 20)
    server.responder = lambda messages, model: Reply(
        status=401, body=b'{"error": {"message": "Incorrect API key provided"}}'
    )
    out = tmp_path / "out.jsonl"
    code, text = run(judge_args(a, b, out, server.base_url, "--concurrency", "2"), capsys)
    assert code == 1 and "rejected" in text and "rerun" in text
    assert server.requests < 40  # stopped instead of failing every judgement in turn
    summary = json.loads(summary_path(out).read_text())
    assert summary["stopped"] == "fatal" and summary["judged"] == 0 and summary["pending"] == 20


def test_an_endpoint_nobody_listens_on_is_exit_2_at_once(tmp_path, capsys) -> None:
    from wprctl.judge.server import JudgeServer

    gone = JudgeServer()
    gone.start()
    url = gone.base_url
    gone.stop()
    a, b = write_files(tmp_path, 20)
    out = tmp_path / "out.jsonl"
    code, text = run(judge_args(a, b, out, url, "--concurrency", "2"), capsys)
    flat = " ".join(text.split())
    assert code == 2 and f"cannot connect to the judge API at {url}" in flat, flat[-2000:]
    summary = json.loads(summary_path(out).read_text())
    assert summary["stopped"] == "fatal" and summary["pending"] == 20
    assert "cannot connect" in summary["stop_message"]
