"""`wprctl report` on run folders built directly in tmp.

The report only reads what stages write, so the projects here are synthetic but in the real
formats: `lineage.json`, `state.json`, `config.json` and `metrics.jsonl` the way `wprctl.runs`
writes them, and summaries made by the producers' own summary functions (infer's `row_figures`,
the judge's `stats.summarize`, apps-eval's `summarize`) so a format change there shows up here.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, wprctl_captured

PPO_VARIANTS = {  # name -> (regularizer settings written to config.json, final kl, final reward)
    "ppo-kl": ({"kind": "kl", "kl": {"estimator": "k1"}}, 0.30, 0.55),
    "ppo-wpr-paper": ({"kind": "wpr", "wpr": {"method": "paper", "gauge": "raw"}}, 0.45, 0.65),
    "ppo-wpr": ({"kind": "wpr", "wpr": {"method": "wellposed", "gauge": "centered"}}, 0.25, 0.70),
}
INFER = {"infer-sft": 0.0, "infer-ppo-kl": 0.5, "infer-ppo-wpr-paper": 0.6, "infer-ppo-wpr": 0.7}
JUDGE = {  # name -> (A, B, counts of winners A / tie / B / invalid)
    "judge-wpr-vs-kl": ("infer-ppo-wpr", "infer-ppo-kl", (30, 4, 14, 0)),
    "judge-wpr-paper-vs-kl": ("infer-ppo-wpr-paper", "infer-ppo-kl", (22, 6, 20, 0)),
    "judge-kl-vs-sft": ("infer-ppo-kl", "infer-sft", (35, 3, 10, 2)),
    "judge-wpr-paper-vs-sft": ("infer-ppo-wpr-paper", "infer-sft", (36, 2, 10, 0)),
    "judge-wpr-vs-sft": ("infer-ppo-wpr", "infer-sft", (38, 2, 8, 0)),
}
ALL_FIGURES = {
    "sft_loss.png",
    "rm_training.png",
    "policy_reward.png",
    "policy_gold.png",
    "policy_penalty.png",
    "policy_kl.png",
    "policy_length.png",
    "frontier.png",
    "judge_win_rates.png",
    "apps_passk.png",
}


# --------------------------------------------------------------------------------------------
# a fake project, in the formats the stages write


class FakeProject:
    def __init__(self, root: Path, *, stages: list[str] | None = None) -> None:
        self.root = root
        self.manifest = root / "wprctl.toml"
        text = (REPO / "pipelines" / "demo.toml").read_text(encoding="utf-8")
        if stages is not None:
            start, end = text.index("stages = ["), text.index("]", text.index("stages = ["))
            text = text[:start] + f"stages = {json.dumps(stages)}" + text[end + 1 :]
        self.manifest.write_text(text, encoding="utf-8")
        self.out = root / "runs"
        self.out.mkdir()
        self.rng = random.Random(0)
        self.t = 1_700_000_000.0

    def lineage(self) -> dict[str, Any]:
        path = self.out / "lineage.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def run(
        self,
        name: str,
        kind: str,
        rows: list[dict[str, Any]],
        *,
        status: str = "finished",
        outputs: dict[str, str] | None = None,
        regularizer: dict[str, Any] | None = None,
        torn_tail: str = "",
    ) -> Path:
        """One run folder; a finished one is also recorded in lineage.json (as finish_run does)."""
        root = self.out / name
        root.mkdir(parents=True, exist_ok=True)
        reg = {"kind": "kl", "kl_ctl": 0.05, "wpr": {}, "kl": {}, "fdiv": {}}
        reg.update(regularizer or {})
        config = {"stage": kind, "name": name, "manifest": {"ppo": {"regularizer": reg}}}
        (root / "config.json").write_text(json.dumps(config))
        with (root / "metrics.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
            fh.write(torn_tail)
        from wprctl.runs import portable

        if outputs is None:
            outputs = {"model": str(root / "model")}
        outputs = portable(outputs, self.out)  # as finish_run writes them
        final = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
        self.t += 60
        state: dict[str, Any] = {"status": status, "kind": kind, "started": self.t - 55}
        if status == "finished":
            state.update(finished=self.t, outputs=outputs, metrics=final)
            lineage = self.lineage()
            lineage[name] = {"kind": kind, "outputs": outputs, "metrics": final, "finished": self.t}
            (self.out / "lineage.json").write_text(json.dumps(lineage, indent=2))
        (root / "state.json").write_text(json.dumps(state))
        return root

    def noise(self, scale: float) -> float:
        return self.rng.gauss(0.0, scale)

    def sft(self, steps: int = 150, **kw: Any) -> None:
        rows: list[dict[str, Any]] = [{"step": 0, "eval/loss": 6.9, "eval/ppl": math.exp(6.9)}]
        for s in range(5, steps + 1, 5):
            loss = 2.0 + 4.8 * math.exp(-s / 40) + self.noise(0.05)
            rows.append(
                {
                    "step": s,
                    "train/loss": loss,
                    "train/lr": 2e-3,
                    "train/grad_norm": 1.0,
                    "train/tokens_per_s": 3000.0,
                }
            )
            if s % 50 == 0:
                ev = 2.02 + 4.8 * math.exp(-s / 40)
                rows.append({"step": s, "eval/loss": ev, "eval/ppl": math.exp(ev)})
        self.run("sft", "sft", rows, **kw)

    def rm(self, steps: int = 200) -> None:
        rows: list[dict[str, Any]] = []
        for s in range(0, steps + 1, 5):
            acc = 0.5 + 0.22 * (1 - math.exp(-s / 50))
            if s:
                rows.append(
                    {
                        "step": s,
                        "train/loss": 0.69 - 0.2 * acc + self.noise(0.03),
                        "train/accuracy": acc + self.noise(0.04),
                    }
                )
            if s % 50 == 0:
                rows.append(
                    {
                        "step": s,
                        "eval/accuracy": acc,
                        "eval/loss": 0.69 - 0.2 * (acc - 0.5),
                        "eval/chosen_score": acc,
                        "eval/rejected_score": 0.0,
                        "eval/margin": acc,
                        "eval/chosen_score_std": 0.1,
                    }
                )
        self.run("rm", "rm", rows)

    def policy_rows(self, steps: int, kl_end: float, reward_end: float, *, dar: bool = False):
        rows: list[dict[str, Any]] = [
            {
                "step": 0,
                "eval/reward": -0.25,
                "eval/gold": -1.9,
                "eval/kl_ref": 0.0,
                "eval/length": 13.4,
            }
        ]
        for s in range(1, steps + 1):
            f = s / steps
            row = {
                "step": s,
                "train/reward": -0.25 + (reward_end + 0.25) * f + self.noise(0.05),
                "train/kl_ref": kl_end * f,
                "train/length": 13 + f,
                "train/gold": -1.9 + 0.3 * f,
                "train/lr": 5e-4,
            }
            if dar:
                row.update({"train/weight_mean": 1.0, "train/ess": 0.8, "train/clip_fraction": 0.1})
            else:
                row.update(
                    {
                        "train/penalty": 0.05 * kl_end * f,
                        "train/divergence": kl_end * f,
                        "train/entropy": 4 - f,
                        "train/beta": 0.05,
                    }
                )
            rows.append(row)
            if s % 5 == 0:
                rows.append(
                    {
                        "step": s,
                        "eval/reward": -0.25 + (reward_end + 0.25) * f,
                        "eval/gold": -1.9 + 0.3 * f,
                        "eval/kl_ref": kl_end * f,
                        "eval/length": 13 + f,
                    }
                )
        return rows

    def ppo(self, name: str, steps: int = 20, **kw: Any) -> None:
        reg, kl_end, reward_end = PPO_VARIANTS[name]
        self.run(name, "ppo", self.policy_rows(steps, kl_end, reward_end), regularizer=reg, **kw)

    def dar(self, steps: int = 10) -> None:
        self.run("dar", "dar", self.policy_rows(steps, 0.2, 0.4, dar=True))

    def _eval_run(self, name: str, kind: str, file: str, summary: dict[str, Any]) -> Path:
        out = self.out / name / file
        summary_file = out.with_name(out.name + ".summary.json")
        self.run(name, kind, [], outputs={"jsonl": str(out), "summary": str(summary_file)})
        out.write_text("")
        summary_file.write_text(json.dumps(summary))
        return out

    def infer(self, name: str, reward: float) -> None:
        from wprctl.infer.summary import row_figures

        rows = [
            {
                "id": str(i // 2),
                "sample": i % 2,
                "reward": reward + self.noise(0.3),
                "length": 14,
                "eos": True,
                "oracle": reward - 1.5,
            }
            for i in range(40)
        ]
        summary = {
            **row_figures(rows),
            "rouge1": 0.3,
            "rouge2": 0.1,
            "rougeL": 0.25,
            "model": name.removeprefix("infer-"),
            "split": "eval",
        }
        summary["out"] = str(self.out / name / "samples.jsonl")
        self._eval_run(name, "infer", "samples.jsonl", summary)

    def judge(self, name: str) -> None:
        from wprctl.judge import stats

        a, b, (wins, ties, losses, invalid) = JUDGE[name]
        winners = ["A"] * wins + ["tie"] * ties + ["B"] * losses + ["invalid"] * invalid
        verdicts = [[w, w] for w in winners]
        summary = stats.summarize(winners, verdicts, n_boot=200, seed=0)
        summary.update(
            a=str(self.out / a / "samples.jsonl"),
            b=str(self.out / b / "samples.jsonl"),
            task="summarize",
            model="demo-oracle",
            requests=2 * len(winners),
            cost_usd=0.0,
        )
        self._eval_run(name, "judge", "judgements.jsonl", summary)

    def apps(self, name: str, weakened: bool) -> None:
        from wprctl.codeexec.executor import SampleResult
        from wprctl.codeexec.summary import summarize

        results = []
        for p, difficulty in enumerate(
            ["introductory"] * 3 + ["interview"] * 3 + ["competition"] * 2
        ):
            for sample in range(3):
                broken = weakened and (p + sample) % 3 == 0
                verdicts = ["pass", "fail" if broken else "pass", "pass"]
                results.append(SampleResult(str(p), sample, verdicts, difficulty=difficulty))
        self._eval_run(name, "apps-eval", "results.jsonl", summarize(results, [1, 2, 3]))

    def full_demo(self, *, with_dar: bool = True) -> None:
        self.sft()
        self.rm()
        for name in PPO_VARIANTS:
            self.ppo(name)
        if with_dar:
            self.dar()
        for name, reward in INFER.items():
            self.infer(name, reward)
        for name in JUDGE:
            self.judge(name)
        self.apps("apps-reference", weakened=False)
        self.apps("apps-weakened", weakened=True)


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`wprctl report ARGS` in this process (the figures dominate; a subprocess adds ~2 s each)."""
    return wprctl_captured(capsys, "report", *args)


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width = imread(path).shape[:2]
    assert width >= 400 and height >= 300, (path.name, width, height)


def row(index: str, section: str, run: str) -> str:
    """The markdown table row of `run` in the index section headed `## <section>`."""
    body = index.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return next(x for x in body.splitlines() if x.startswith(f"| {run} |"))


def pngs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


# --------------------------------------------------------------------------------------------


def test_full_demo_every_figure_table_and_link(tmp_path: Path, capsys) -> None:
    project = FakeProject(tmp_path)
    project.full_demo()
    code, output = report(capsys, "-m", str(project.manifest))
    assert code == 0, output
    out = project.out / "report"
    assert pngs(out) == ALL_FIGURES
    index = (out / "index.md").read_text()
    for name in ALL_FIGURES:
        assert_png(out / name)
        assert f"]({name})" in index, name
    # every run appears in the tables, the stages table says all finished
    for name in [*PPO_VARIANTS, "dar", *INFER, *JUDGE, "apps-reference", "apps-weakened"]:
        assert f"| {name} |" in index, name
    assert "Every stage listed in the manifest has finished." in index
    # the judge table names A and B by the policies their inference runs sampled, and shows the
    # bootstrap interval
    line = row(index, "Judge", "judge-wpr-vs-kl")
    assert "| ppo-wpr vs ppo-kl | 30/4/14 |" in line
    assert "| 0.667 | 0.5" in line  # (30 + 2) / 48, then the interval's lower end
    line = row(index, "Judge", "judge-kl-vs-sft")
    assert "| 35/3/10 +2 invalid | 0.76 |" in line  # invalid verdicts are not counted
    # the policy table reads the regularizer from config.json and the last eval from metrics
    line = row(index, "Policy optimisation (PPO variants and DAR)", "ppo-wpr")
    assert "wpr (wellposed, centered)" in line and "-0.25 → 0.7" in line
    # APPS: per-difficulty rows; the reference solutions solve everything
    assert "| apps-reference | all | 8 | 24 | 1 | 1 | 1 | 1 | 1 |" in index
    # terminal tables
    assert "Policy optimisation" in output and "judge-wpr-vs-sft" in output


def test_a_moved_project_still_names_the_judged_policies(tmp_path: Path, capsys) -> None:
    """Judge summaries name their inference files at the place they were judged."""
    (tmp_path / "a").mkdir()
    FakeProject(tmp_path / "a").full_demo()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    code, output = report(capsys, "-m", str(tmp_path / "b" / "wprctl.toml"))
    assert code == 0, output
    index = (tmp_path / "b" / "runs" / "report" / "index.md").read_text()
    assert "| ppo-wpr vs ppo-kl | 30/4/14 |" in row(index, "Judge", "judge-wpr-vs-kl")


def test_partial_run_sft_finished_ppo_running_with_torn_line(tmp_path: Path, capsys) -> None:
    project = FakeProject(tmp_path)
    project.sft()
    torn = '{"step": 9, "train/reward": 0.3, "train/kl_ref'  # a kill mid-write
    project.ppo("ppo-kl", steps=8, status="running", torn_tail=torn)
    # its process was killed: the pid it recorded is gone
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    state_file = project.out / "ppo-kl" / "state.json"
    state = json.loads(state_file.read_text())
    state.update(pid=dead, pid_started=time.time() - 5, host=socket.gethostname())
    state_file.write_text(json.dumps(state))
    # a failed stage that logged nothing, and a judge whose summary is half written
    (project.out / "rm").mkdir()
    (project.out / "rm" / "state.json").write_text(
        '{"status": "failed", "kind": "rm", "error": "out of memory"}'
    )
    (project.out / "judge-wpr-vs-kl").mkdir()
    (project.out / "judge-wpr-vs-kl" / "judgements.jsonl.summary.json").write_text('{"wins": 3')
    code, output = report(capsys, "-m", str(project.manifest))
    assert code == 0, output
    out = project.out / "report"
    expected = {
        "sft_loss.png",
        "policy_reward.png",
        "policy_gold.png",
        "policy_penalty.png",
        "policy_kl.png",
        "policy_length.png",
        "frontier.png",
    }
    assert pngs(out) == expected
    for name in expected:
        assert_png(out / name)
    index = (out / "index.md").read_text()
    assert "ppo-kl (interrupted)" in index
    assert "| ppo-kl (interrupted) | kl (k1) | 0.05 | 8 |" in index  # the torn step 9 is skipped
    assert (
        "- `ppo-kl` (ppo): interrupted (its process is gone; `--resume` continues it); shown from "
        "what it logged so far" in index
    )
    assert "- `rm` (rm): failed: out of memory; nothing logged yet" in index
    assert "- `ppo-wpr` (ppo): not started" in index
    assert "- `judge-wpr-vs-kl` (judge)" in index
    assert "## Judge" not in index and "## Reward model" not in index


def test_rerun_drops_figures_of_stages_that_are_gone(tmp_path: Path, capsys) -> None:
    project = FakeProject(tmp_path, stages=["sft", "rm", "apps-reference", "report"])
    project.sft(steps=50)
    project.rm(steps=50)
    project.apps("apps-reference", weakened=False)
    out = tmp_path / "elsewhere"
    code, output = report(capsys, "-m", str(project.manifest), "--out", str(out))
    assert code == 0, output
    assert pngs(out) == {"sft_loss.png", "rm_training.png", "apps_passk.png"}
    (out / "notes.png").write_bytes(b"not ours")
    shutil.rmtree(project.out / "apps-reference")
    lineage = project.lineage()
    del lineage["apps-reference"]
    (project.out / "lineage.json").write_text(json.dumps(lineage))
    code, output = report(capsys, "-m", str(project.manifest), "--out", str(out))
    assert code == 0, output
    assert pngs(out) == {"sft_loss.png", "rm_training.png", "notes.png"}
    assert "apps_passk.png" not in (out / "index.md").read_text()
    assert not (project.out / "report").exists()  # --out was honoured


def test_nothing_finished_says_so_and_exits_0(tmp_path: Path, capsys) -> None:
    project = FakeProject(tmp_path)
    (project.out / "sft").mkdir()
    (project.out / "sft" / "state.json").write_text('{"status": "running", "kind": "sft"}')
    code, output = report(capsys, "-m", str(project.manifest))
    assert code == 0, output
    assert "Nothing to report yet" in output
    index = (project.out / "report" / "index.md").read_text()
    assert "Nothing to report yet" in index
    assert "- `sft` (sft): running or interrupted; nothing logged yet" in index
    assert pngs(project.out / "report") == set()


def test_missing_output_dir_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    project = FakeProject(tmp_path)
    project.out.rmdir()
    code, output = report(capsys, "-m", str(project.manifest))
    assert code == 2
    assert str(project.out) in output.replace("\n", "") and "project.output_dir" in output
    assert "Traceback" not in output
    project.out.mkdir()
    taken = tmp_path / "a-file"
    taken.write_text("x")
    code, output = report(capsys, "-m", str(project.manifest), "--out", str(taken))
    assert code == 2 and "a-file" in output and "Traceback" not in output


def test_missing_manifest_exits_2(tmp_path: Path, capsys) -> None:
    code, output = report(capsys, "-m", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "nope.toml" in output.replace("\n", "")
