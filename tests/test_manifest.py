"""The project manifest: defaults, validation errors that name the key, and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from wprctl.errors import UserError
from wprctl.manifest import Manifest, load_manifest, parse_override
from wprctl.project import TEMPLATES, init_project


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "wprctl.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers_settings() -> None:
    m = Manifest()
    assert (m.sft.lr, m.sft.epochs, m.sft.scheduler, m.sft.warmup_ratio, m.sft.weight_decay) == (
        5e-5,
        3,
        "cosine",
        0.1,
        0.01,
    )
    assert (m.rm.lr, m.rm.weight_decay, m.rm.epochs) == (1e-5, 0.1, 1)
    assert (m.ppo.actor_lr, m.ppo.critic_lr, m.ppo.temperature, m.ppo.gamma, m.ppo.lam) == (
        1.5e-5,
        1.5e-5,
        0.8,
        1.0,
        0.95,
    )
    assert (m.ppo.max_answer_len, m.ppo.max_prompt_len, m.ppo.regularizer.kl_ctl) == (
        256,
        512,
        0.05,
    )
    w = m.ppo.regularizer.wpr
    assert (w.iterations, w.k1, w.k2, w.epsilon, w.metric, w.method) == (
        10,
        512,
        128,
        0.01,
        "l2",
        "paper",
    )
    assert (m.ppo.actor_zero_stage, m.ppo.critic_zero_stage) == (2, 3)
    assert (m.dar.alpha, m.dar.beta, m.dar.w_clip) == (0.1, 0.05, 20.0)


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_validates(tmp_path: Path, template: str) -> None:
    path = init_project(tmp_path / template, template, force=False)
    m = load_manifest(path)
    assert m.project.name == template
    with pytest.raises(UserError, match="already exists"):
        init_project(tmp_path / template, template, force=False)


def test_unknown_key_has_did_you_mean_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "[sft]\nlr = 1e-4\nepoch = 3\n")
    with pytest.raises(UserError) as err:
        load_manifest(p)
    msg = str(err.value)
    assert (
        str(p) in msg and "sft.epoch" in msg and "did you mean 'epochs'" in msg and "line 3" in msg
    )


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown key 'ppoo'.*did you mean 'ppo'"):
        load_manifest(_write(tmp_path, "[ppoo]\nactor_lr = 1.0\n"))


def test_wrong_type_names_key_value_and_expectation(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_manifest(_write(tmp_path, '[sft]\nlr = "fast"\n'))
    assert "sft.lr" in str(err.value) and "'fast'" in str(err.value) and "number" in str(err.value)


def test_bad_enum_lists_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_manifest(_write(tmp_path, '[ppo.regularizer]\nkind = "l2"\n'))
    msg = str(err.value)
    assert "ppo.regularizer.kind" in msg and "'wpr'" in msg and "'kl'" in msg and "'l2'" in msg


def test_out_of_range_and_cross_field_checks(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="deepspeed.zero_stage"):
        load_manifest(_write(tmp_path, "[deepspeed]\nzero_stage = 4\n"))
    with pytest.raises(UserError, match="divisible"):
        load_manifest(_write(tmp_path, "[model.tiny]\nhidden_size = 30\nnum_heads = 4\n"))
    with pytest.raises(UserError, match="unknown stage 'sfft'.*did you mean 'sft'"):
        load_manifest(_write(tmp_path, 'stages = ["sfft"]\n'))


def test_did_you_mean_knows_other_tools_names_and_nested_tables(tmp_path: Path) -> None:
    """TRL's names for our settings, a key one table too high, in the file and in --set."""
    p = _write(tmp_path, "[dar]\nmax_steps = 3\n[data]\nn_train = 5\n")
    with pytest.raises(UserError) as err:
        load_manifest(p)
    msg = str(err.value)
    assert "dar.max_steps" in msg and "did you mean 'iterations'" in msg
    assert "data.n_train" in msg and "did you mean 'data.demo.n_train'" in msg
    p = _write(tmp_path, "")
    with pytest.raises(UserError, match="unknown key 'learning_rate' in sft; did you mean 'lr'"):
        load_manifest(p, ["sft.learning_rate=1e-4"])
    with pytest.raises(UserError, match="did you mean 'ppo.regularizer.kind'"):
        load_manifest(p, ["ppo.kind=kl"])
    # PPO has two learning rates: both are offered, for our name and for TRL's
    for word in ("lr", "learning_rate"):
        with pytest.raises(
            UserError, match=f"'{word}' in ppo; did you mean 'actor_lr' or 'critic_lr'"
        ):
            load_manifest(p, [f"ppo.{word}=1e-6"])
    # a close spelling still wins over a nested table's key
    with pytest.raises(UserError, match="did you mean 'lr'"):
        load_manifest(p, ["sft.lrr=1"])
    with pytest.raises(UserError, match=r"not one entry of a list: --set 'stages=\[...\]'"):
        load_manifest(p, ["stages.0=sft"])


def test_true_or_false_for_a_number_is_refused_as_written(tmp_path: Path) -> None:
    """pydantic would read true as 1: epochs = true would run one epoch."""
    p = _write(tmp_path, "[sft]\nepochs = true\n")
    with pytest.raises(UserError, match=r"sft.epochs.*not true or false \(got true\)"):
        load_manifest(p)
    with pytest.raises(UserError, match=r"data.demo.n_train \(from --set\).*\(got false\)"):
        load_manifest(_write(tmp_path, ""), ["data.demo.n_train=false"])
    assert load_manifest(_write(tmp_path, ""), ["model.gradient_checkpointing=true"])


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not valid TOML.*line 2"):
        load_manifest(_write(tmp_path, "[sft]\nlr = = 1\n"))


def test_set_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    p = _write(tmp_path, "[ppo.regularizer]\nkind = 'wpr'\n")
    m = load_manifest(
        p,
        [
            "ppo.regularizer.kind=kl",
            "ppo.regularizer.kl.estimator=k3",
            "sft.lr=3e-4",
            "sft.max_steps=7",
            "model.gradient_checkpointing=true",
            "apps.k=[1, 2]",
            "project.name=hello world",
        ],
    )
    assert m.ppo.regularizer.kind == "kl" and m.ppo.regularizer.kl.estimator == "k3"
    assert m.sft.lr == 3e-4 and isinstance(m.sft.max_steps, int) and m.sft.max_steps == 7
    assert m.model.gradient_checkpointing is True and m.apps.k == [1, 2]
    assert m.project.name == "hello world"
    with pytest.raises(UserError, match=r"sft.lr \(from --set\)"):
        load_manifest(p, ["sft.lr=fast"])
    with pytest.raises(UserError, match="did you mean 'regularizer'"):
        load_manifest(p, ["ppo.regulariser.kind=kl"])
    with pytest.raises(UserError, match=r"\[ppo\] is a table of settings, not a single value"):
        load_manifest(p, ["ppo=3"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("ppo.regularizer.kind")


def test_variants_apply_their_overrides(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        'stages = ["sft", "ppo-kl"]\n[[variants]]\nname = "ppo-kl"\nstage = "ppo"\n'
        'set = { "ppo.regularizer.kind" = "kl", "ppo.regularizer.kl_ctl" = 0.1 }\n',
    )
    m = load_manifest(p)
    v = m.for_variant("ppo-kl")
    assert v.ppo.regularizer.kind == "kl" and v.ppo.regularizer.kl_ctl == 0.1
    assert m.ppo.regularizer.kind == "wpr"  # the base manifest is untouched
    # the command line wins over the variant on the keys it sets, and only on those
    cli = load_manifest(p, ["ppo.regularizer.kl_ctl=0.3", "ppo.max_steps=7"])
    v = cli.for_variant("ppo-kl")
    assert (v.ppo.regularizer.kind, v.ppo.regularizer.kl_ctl, v.ppo.max_steps) == ("kl", 0.3, 7)
    assert v.for_variant("ppo-kl").ppo.regularizer.kl_ctl == 0.3
    bad = _write(
        tmp_path,
        '[[variants]]\nname = "x"\nstage = "ppo"\nset = { "ppo.regularizer.kind" = "nope" }\n',
    )
    with pytest.raises(
        UserError, match=r"(?s)variant 'x'.*ppo.regularizer.kind \(variants\[x\].set, line 4\)"
    ):
        load_manifest(bad)  # at load, not when the variant's stage comes to run


def test_variant_and_cross_key_errors_name_their_own_lines(tmp_path: Path) -> None:
    block = '[[variants]]\nname = "{}"\nstage = "{}"\nset = {{ "ppo.{}" = 1 }}\n'
    p = _write(
        tmp_path, block.format("a", "ppo", "max_steps") + block.format("b", "ppo", "max_stepz")
    )
    with pytest.raises(UserError, match=r"line 8\): variants\[b\].set ppo.max_stepz: unknown key"):
        load_manifest(p)
    p = _write(
        tmp_path, block.format("a", "ppp", "max_steps") + block.format("b", "pp", "max_steps")
    )
    with pytest.raises(UserError) as err:
        load_manifest(p)
    assert "variants.0.stage (line 3)" in str(err.value)
    assert "variants.1.stage (line 7)" in str(err.value)
    p = _write(tmp_path, 'stages = ["sft",\n  "c"]\n' + block.format("a", "ppo", "max_steps") * 2)
    with pytest.raises(UserError) as err:
        load_manifest(p)
    assert "variants (line 3): names must be unique; more than one is named 'a'" in str(err.value)
    assert "(got " not in str(err.value)
    p = _write(tmp_path, '\nstages = ["sft", "c"]\n')
    with pytest.raises(UserError, match=r"stages \(line 2\): unknown stage 'c'"):
        load_manifest(p)
    p = _write(tmp_path, '[[variants]]\nname = "../x"\nstage = "ppo"\n')
    with pytest.raises(UserError) as err:
        load_manifest(p)
    assert str(err.value).count("'../x'") == 1  # said once, not "got '../x' (got '../x')"
    p = _write(tmp_path, '[data]\ndata_split = "1,2"\n')
    with pytest.raises(UserError) as err:
        load_manifest(p)
    assert "data.data_split (line 2)" in str(err.value) and str(err.value).count("'1,2'") == 1


def test_a_variant_run_by_the_wrong_stage_command_is_told_the_right_one(tmp_path: Path) -> None:
    from wprctl.stages import resolve_variant

    block = '[[variants]]\nname = "{}"\nstage = "{}"\n'
    m = load_manifest(
        _write(tmp_path, block.format("ppo-kl", "ppo") + block.format("gens", "infer"))
    )
    with pytest.raises(
        UserError, match=r"of stage ppo, not dar; run `wprctl ppo --variant ppo-kl`"
    ):
        resolve_variant(m, "dar", "ppo-kl")
    # an evaluation stage has no command with --variant: `run` is the way to it
    with pytest.raises(
        UserError, match=r"of stage infer, not ppo; run `wprctl run --from gens --to gens`"
    ):
        resolve_variant(m, "ppo", "gens")


def test_cli_exit_codes_for_broken_manifests(tmp_path: Path) -> None:
    p = _write(tmp_path, "[sft]\nepoch = 3\n")
    res = run_cli("status", "-m", str(p))
    assert res.returncode == 2
    assert "did you mean 'epochs'" in res.stderr and "Traceback" not in res.stderr + res.stdout
    res = run_cli("status", "-m", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "wprctl init" in res.stderr
    res = run_cli("sft", "-m", str(p))
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_paths_in_the_manifest_are_read_from_its_folder_whatever_the_working_directory(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wprctl -m proj/wprctl.toml` from elsewhere: a base model, a stage's model input and a
    judge's inference file written relative to the manifest are found there (as data.path and
    project.output_dir always were); a hub id or a path from the working directory still is."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import clean_env
    from wprctl.pipeline import _jsonl_of
    from wprctl.runs import resolve_model_ref

    proj = tmp_path / "proj"
    shutil.copytree(tiny_model_dir, proj / "models" / "base")
    (proj / "gens.jsonl").write_text("{}\n")
    (proj / "wprctl.toml").write_text(
        '[project]\noutput_dir = "runs"\n[model]\nbase = "models/base"\n'
        '[data]\ndataset = "demo"\n[data.demo]\nn_train = 50\nn_validation = 10\n'
    )
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "mine").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    m = load_manifest(proj / "wprctl.toml")
    assert resolve_model_ref(m, "models/base") == proj / "models" / "base"
    assert _jsonl_of(m, "gens.jsonl", "judge.a") == str(proj / "gens.jsonl")
    assert resolve_model_ref(m, "mine") == Path("mine")  # the working directory's, not there
    assert m.locate("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    # the data command loads the base model's tokenizer from the manifest's folder
    res = subprocess.run(
        [sys.executable, "-m", "wprctl", "data", "stats", "-m", str(proj / "wprctl.toml")],
        cwd=elsewhere, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
