"""`wprctl infer` end to end on the demo task with the tiny model: resume after a kill gives the
rows of an uninterrupted run, --reference scores the dataset's own responses, defaults come from
the lineage (variants included), the summary's figures, and bad input exits 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wprctl.cli import main
from wprctl.data.loading import clear_cache
from wprctl.errors import UserError
from wprctl.infer.run import run_infer
from wprctl.manifest import load_manifest


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    clear_cache()
    manifest = tmp_path / "wprctl.toml"
    manifest.write_text(
        f"""
[project]
output_dir = "runs"
[model]
base = "{tiny_model_dir}"
[data]
dataset = "demo"
max_prompt_len = 96
[data.demo]
n_train = 20
n_validation = 10
[infer]
max_new_tokens = 6
batch_size = 4
num_samples = 5
samples_per_prompt = 2

[[variants]]
name = "ppo-kl"
stage = "ppo"
set = {{ "ppo.regularizer.kind" = "kl" }}
"""
    )
    return manifest


def infer(project: Path, *sets: str, reference: bool = False):
    return run_infer(load_manifest(project, list(sets)), reference=reference)


def keys(path: Path) -> list[tuple[str, int]]:
    return [(r["id"], r["sample"]) for r in map(json.loads, path.read_text().splitlines())]


def test_killed_run_resumes_to_the_uninterrupted_rows(
    project: Path, tiny_model_dir: Path, rm_dir: Path
) -> None:
    args = ("--model", str(tiny_model_dir), "--reward-model", str(rm_dir))
    full = infer(project, f"infer.model={tiny_model_dir}", f"infer.reward_model={rm_dir}",
                 "infer.batch_size=1", "infer.max_new_tokens=12", "infer.out=full.jsonl")  # fmt: skip
    assert full.written == 10 and len(set(keys(full.out))) == 10

    # a real kill: SIGKILL once a few rows are on disk, then rerun
    out = project.parent / "killed.jsonl"
    cmd = [sys.executable, "-m", "wprctl", "infer", "-m", str(project), *args,
           "--set", "infer.batch_size=1", "--set", "infer.max_new_tokens=12", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    killed_rows = out.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 3 <= killed_rows < 10

    rerun = run_cli("infer", "-m", str(project), *args, "--set", "infer.batch_size=1",
                    "--set", "infer.max_new_tokens=12", "--out", str(out))  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"{killed_rows} of 10 rows already there" in " ".join(rerun.stdout.split())
    assert out.read_text() == full.out.read_text()  # same rows, same order, no duplicates


def test_partial_batch_and_torn_line_are_made_again(
    project: Path, tiny_model_dir: Path, rm_dir: Path
) -> None:
    sets = (f"infer.model={tiny_model_dir}", f"infer.reward_model={rm_dir}")
    first = infer(project, *sets)
    lines = first.out.read_text().splitlines(keepends=True)
    assert len(lines) == 10  # 5 prompts x 2 samples, in batches of 4
    # 5 whole rows (batch 1 half written) and a torn sixth
    first.out.write_text("".join(lines[:5]) + lines[5][:40])
    again = infer(project, *sets)
    assert (again.kept, again.written) == (5, 5)
    assert first.out.read_text() == "".join(lines)
    # nothing left to do: no model is needed and nothing is written
    third = infer(project, *sets)
    assert third.written == 0 and first.out.read_text() == "".join(lines)
    # another seed is another run
    other = infer(project, *sets, "infer.out=other.jsonl", "infer.seed=7")
    ours = [json.loads(x)["response"] for x in lines]
    assert [json.loads(x)["response"] for x in other.out.read_text().splitlines()] != ours
    # rows made with other settings are never mixed into one file
    with pytest.raises(UserError, match=r"other settings \(temperature: 0\.8 -> 0\.5\)"):
        infer(project, *sets, "infer.temperature=0.5")


def test_rows_and_summary(project: Path, tiny_model_dir: Path, rm_dir: Path) -> None:
    from rouge_score import rouge_scorer

    res = infer(project, f"infer.model={tiny_model_dir}", f"infer.reward_model={rm_dir}")
    rows = [json.loads(x) for x in res.out.read_text().splitlines()]
    label = tiny_model_dir.parent.name  # a path `<run>/model` is named for its run folder
    assert res.out == project.parent / "runs" / "infer" / f"{label}.jsonl"
    assert [r["sample"] for r in rows] == [0, 1] * 5
    row = rows[0]
    for key in ("id", "prompt", "response", "reward", "model", "length", "eos", "reference"):
        assert key in row
    assert row["subreddit"] and row["reference"] and row["model"] == label
    assert all(r["length"] <= 6 and (r["eos"] or r["length"] == 6) for r in rows)

    summary = json.loads(res.out.with_name(f"{label}.jsonl.summary.json").read_text())
    rewards = [r["reward"] for r in rows]
    assert summary["n"] == 10 and summary["n_prompts"] == 5
    assert summary["reward_mean"] == pytest.approx(sum(rewards) / 10)
    assert summary["length_mean"] == pytest.approx(sum(r["length"] for r in rows) / 10)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for kind in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(r["reference"], r["response"])[kind].fmeasure for r in rows) / 10
        assert summary[kind] == pytest.approx(want)

    # the reference reward equals what --reference mode reports for the same prompts
    ref = infer(project, f"infer.reward_model={rm_dir}", reference=True)
    ref_rows = [json.loads(x) for x in ref.out.read_text().splitlines()]
    assert ref.out.name == "reference.jsonl" and len(ref_rows) == 5
    assert all(r["response"] == r["reference"] and r["sample"] == 0 for r in ref_rows)
    assert [r["id"] for r in ref_rows] == [r["id"] for r in rows[::2]]
    assert summary["reference_reward_mean"] == pytest.approx(ref.summary["reward_mean"], abs=1e-6)
    assert ref.summary["rouge1"] is None


def test_reference_rewards_are_the_reward_models_scores(project: Path, rm_dir: Path) -> None:
    from wprctl.infer import score_texts
    from wprctl.models import load_reward_model, load_tokenizer

    res = infer(project, f"infer.reward_model={rm_dir}", reference=True)
    rows = [json.loads(x) for x in res.out.read_text().splitlines()]
    want = score_texts(
        load_reward_model(rm_dir, pad_token_id=0), load_tokenizer(rm_dir),
        [r["prompt"] for r in rows], [r["reference"] for r in rows], batch_size=1,
    )  # fmt: skip
    assert [r["reward"] for r in rows] == pytest.approx(want.tolist(), abs=1e-5)


def test_defaults_from_lineage_and_variants(
    project: Path, tiny_model_dir: Path, rm_dir: Path
) -> None:
    runs = project.parent / "runs"
    runs.mkdir()
    lineage = {
        "sft": {"kind": "sft", "outputs": {"model": str(tiny_model_dir)}, "finished": 1.0},
        "rm": {"kind": "rm", "outputs": {"model": str(rm_dir)}, "finished": 2.0},
        "ppo-kl": {"kind": "ppo", "outputs": {"model": str(tiny_model_dir)}, "finished": 3.0},
    }
    (runs / "lineage.json").write_text(json.dumps(lineage))
    res = infer(project, "infer.num_samples=2", "infer.samples_per_prompt=1")
    assert res.out == runs / "infer" / "ppo-kl.jsonl"
    assert {json.loads(x)["model"] for x in res.out.read_text().splitlines()} == {"ppo-kl"}
    sft = infer(project, "infer.num_samples=2", "infer.samples_per_prompt=1", "infer.model=sft")
    assert sft.out.name == "sft.jsonl"
    # the same weights under the same seed give the same rows whatever they are called
    strip = [{k: v for k, v in json.loads(x).items() if k != "model"}
             for x in sft.out.read_text().splitlines()]  # fmt: skip
    assert strip == [
        {k: v for k, v in json.loads(x).items() if k != "model"}
        for x in res.out.read_text().splitlines()
    ]


def exit_code(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code), " ".join(capsys.readouterr().err.split())


def test_bad_input_exits_2(project: Path, tiny_model_dir: Path, rm_dir: Path, capsys) -> None:
    m = ("-m", str(project))
    code, err = exit_code(
        capsys, "infer", *m, "--model", "no-such-model", "--reward-model", str(rm_dir)
    )
    # named as the user gave it: the flag, or the manifest key
    assert code == 2 and "--model: 'no-such-model' is neither a finished stage" in err
    code, err = exit_code(capsys, "infer", *m, "--set", "infer.model=no-such-model")
    assert code == 2 and "infer.model: 'no-such-model' is neither a finished stage" in err
    code, err = exit_code(capsys, "infer", *m, "--model", "ppo-kl", "--reward-model", str(rm_dir))
    assert code == 2 and "stage 'ppo-kl' has no finished output" in err
    code, err = exit_code(capsys, "infer", *m, "--model", str(tiny_model_dir), "--reward-model",
                          "no-such-rm")  # fmt: skip
    assert code == 2 and "--reward-model: 'no-such-rm' is neither a finished stage" in err
    code, err = exit_code(capsys, "infer", *m, "--num-samples", "0", "--temperature", "-1")
    assert code == 2 and "--num-samples 0" in err and "--temperature -1" in err
    code, err = exit_code(capsys, "infer", *m, "--model", str(tiny_model_dir), "--split", "test")
    assert code == 2 and "unknown split 'test'" in err
    code, err = exit_code(capsys, "infer", *m, "--model", str(tiny_model_dir))
    assert code == 2 and "infer.reward_model: stage 'rm' has no finished output" in err
    bad = project.parent / "bad.jsonl"
    bad.write_text('{"id": "x", "sample": 0}\n{oops\n{"id": "y", "sample": 0}\n')
    code, err = exit_code(capsys, "infer", *m, "--model", str(tiny_model_dir),
                          "--reward-model", str(rm_dir), "--out", str(bad))  # fmt: skip
    assert code == 2 and "bad.jsonl, line 2: not valid JSON" in err
    # the data file as --out would be appended to: refused before any row is made
    data = project.parent / "data.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": f"question {i}", "chosen": f"answer {i}"}) + "\n" for i in range(12)
    ))  # fmt: skip
    before = data.read_bytes()
    code, err = exit_code(capsys, "infer", *m, "--set", "data.dataset=\"jsonl\"",
                          "--set", f"data.path=\"{data}\"", "--model", str(tiny_model_dir),
                          "--reward-model", str(rm_dir), "--out", str(data))  # fmt: skip
    assert code == 2 and "input file" in err and data.read_bytes() == before
    # as a user sees it: a message, no traceback
    proc = run_cli("infer", *m, "--reward-model", str(rm_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no finished sft, ppo or dar run" in " ".join(proc.stderr.split())


def test_apps_rewards_come_from_executing_the_tests(tmp_path: Path, tiny_model_dir: Path) -> None:
    from wprctl.codeexec import ExecConfig, execution_reward, load_problems

    apps = Path(__file__).parent / "fixtures" / "apps" / "apps.jsonl"
    manifest = tmp_path / "wprctl.toml"
    manifest.write_text(
        f'[model]\nbase = "{tiny_model_dir}"\n[data]\ndataset = "apps"\npath = "{apps}"\n'
        '[infer]\nsplit = "train"\nnum_samples = 2\nmax_new_tokens = 4\nbatch_size = 2\n'
    )
    clear_cache()
    ref = infer(manifest, reference=True)
    rows = [json.loads(x) for x in ref.out.read_text().splitlines()]
    # the fixture's first reference solutions pass every test: -0.3 + 1.3 x 1.0
    assert [r["reward"] for r in rows] == [pytest.approx(1.0)] * 2
    assert all(r["id"] == str(r["problem_id"]) for r in rows)  # what apps-eval reads
    gen = infer(manifest, f"infer.model={tiny_model_dir}")
    rows = [json.loads(x) for x in gen.out.read_text().splitlines()]
    want = execution_reward(
        load_problems(apps), [(r["id"], r["response"]) for r in rows], ExecConfig()
    )
    assert [r["reward"] for r in rows] == pytest.approx(want)
    assert gen.summary["reference_reward_mean"] == pytest.approx(1.0)
    assert gen.summary["rouge1"] is None


def test_a_model_path_on_the_command_line_is_read_from_the_working_directory(
    project: Path, tiny_model_dir: Path, rm_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model policy` names ./policy, even when the manifest's folder has a `policy` too (a
    path written in the manifest would be read from there)."""
    import shutil

    decoy = project.parent / "policy"
    decoy.mkdir()
    (decoy / "config.json").write_text("not a config")
    here = project.parent / "elsewhere"
    shutil.copytree(tiny_model_dir, here / "policy")
    shutil.copytree(rm_dir, here / "rm-model")
    monkeypatch.chdir(here)
    try:
        main(["infer", "-m", str(project), "--model", "policy", "--reward-model", "rm-model",
              "--num-samples", "1", "--out", "rows.jsonl"])  # fmt: skip
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    rows = [json.loads(x) for x in (here / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["reward"], float) for r in rows)
