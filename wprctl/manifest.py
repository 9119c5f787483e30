"""The project manifest (`wprctl.toml`): typed, validated config objects shared by every stage.

Defaults are the paper's settings (the WPR seed commands: DeepSpeed-Chat step 1-3 scripts).
Unknown keys are errors with a did-you-mean; a wrong type or value names the key, what was given
and what is allowed. `--set a.b.c=VALUE` overrides one key, with VALUE read as a TOML value
(falling back to a string), before validation, so overrides are checked exactly like the file.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from wprctl.errors import UserError

_Section = TypeVar("_Section", bound=BaseModel)

STAGE_KINDS = ("sft", "rm", "ppo", "dar", "infer", "judge", "apps-eval", "report")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for a number field: `n_train = true` would then fail as
        # "greater than or equal to 10", or pass as epochs = 1
        if isinstance(value, bool) and info.field_name is not None:
            leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in leaves and leaves & {int, float}:
                raise ValueError("Input should be a number, not true or false")
        return value


def _leaf_types(annotation: Any) -> set[Any]:
    """The types a (possibly Optional or union) annotation is made of."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


# --------------------------------------------------------------------------------------------
# project, model, data, deepspeed


class ProjectConfig(Section):
    name: str = "wprctl-project"
    seed: int = 42
    output_dir: str = "runs"


class TinyModelConfig(Section):
    """A small Llama-style model built from a config, with a BPE tokenizer trained on shipped text."""

    vocab_size: int = Field(1024, ge=300, le=65536)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = Field(512, ge=32)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.tiny.num_heads ({self.num_heads})"
            )
        return self


class ModelConfig(Section):
    base: str = Field("tiny", description='"tiny", a hub id (e.g. google/gemma-2b) or a local path')
    tokenizer: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class DemoDataConfig(Section):
    n_train: int = Field(4000, ge=10)
    n_validation: int = Field(400, ge=10)


class DataConfig(Section):
    dataset: Literal["tldr", "hh-rlhf", "apps", "jsonl", "demo"] = "demo"
    path: str | None = Field(None, description="hub id, or a local file/folder in the hub's schema")
    config_name: str | None = None
    data_split: str = Field("2,4,4", description="SFT,RM,PPO fractions of the training data")
    train_split: str = "train"
    eval_split: str | None = Field(None, description="held-out split (default: validation/test)")
    max_prompt_len: int = Field(512, ge=8)
    max_answer_len: int = Field(256, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0)
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig)

    @field_validator("data_split")
    @classmethod
    def _split(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",")]
        if len(parts) != 3 or not all(re.fullmatch(r"\d+(\.\d+)?", p) for p in parts):
            raise ValueError(f"expected three comma-separated weights like '2,4,4', got {v!r}")
        if sum(float(p) for p in parts) <= 0:
            raise ValueError(f"the weights must not all be zero, got {v!r}")
        return v


class DeepSpeedConfig(Section):
    num_processes: int = Field(1, ge=1)
    zero_stage: int = Field(0, ge=0, le=3)
    offload_optimizer: bool = False
    offload_param: bool = False
    hostfile: str | None = None
    master_port: int | None = Field(None, ge=1024, le=65535)


# --------------------------------------------------------------------------------------------
# training stages


class OptimConfig(Section):
    """What SFT and RM share: optimizer, schedule, batching, evaluation and checkpoints."""

    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(8, ge=1, description="micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    eval_every: int = Field(100, ge=1)
    save_every: int = Field(200, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_batch_size: int = Field(16, ge=1)


class SFTConfig(OptimConfig):
    max_seq_len: int = Field(1024, ge=8)


class RMConfig(OptimConfig):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    epochs: float = Field(1, gt=0)
    max_seq_len: int = Field(1024, ge=8)
    model: str | None = Field(None, description="backbone: a stage name or path (default: sft)")


# A default of 10 for both would stop the well-posed solve early: it takes ~16 Newton steps on
# average at V = 32k and up to ~40 on infeasible positions.
PAPER_MAX_ITER = 10
WELLPOSED_MAX_ITER = 100


class WPRConfig(Section):
    method: Literal["paper", "wellposed"] = "paper"
    epsilon: float = Field(0.01, gt=0)
    k1: int = Field(512, ge=1, description="kNN graph degree")
    k2: int = Field(128, ge=1, description="top-k support per distribution")
    max_iter: int | None = Field(
        None,
        ge=1,
        description="paper: Sinkhorn iterations (default 10, the official's); wellposed: a budget "
        "of Newton steps (default 100) that a converged solve stops well before",
    )
    tol: float = Field(1e-6, gt=0)
    metric: Literal["l2", "cos"] = "l2"
    gauge: Literal["raw", "centered"] = "raw"

    @property
    def iterations(self) -> int:
        """``max_iter``, or the method's default: the two methods count different things."""
        if self.max_iter is not None:
            return self.max_iter
        return PAPER_MAX_ITER if self.method == "paper" else WELLPOSED_MAX_ITER


class KLConfig(Section):
    estimator: Literal["k1", "k2", "k3"] = "k1"
    placement: Literal["reward", "loss"] = "reward"
    is_correction: bool = True


class FDivConfig(Section):
    divergence: Literal["rkl", "fkl", "js", "alpha", "tv", "chi2"] = "rkl"
    alpha: float = Field(0.5, description="for divergence = alpha; not 0 or 1")


class RegularizerConfig(Section):
    kind: Literal["wpr", "kl", "fdiv", "none"] = "wpr"
    kl_ctl: float = Field(0.05, ge=0, description="beta, the penalty coefficient")
    adaptive: bool = False
    target: float = Field(6.0, gt=0, description="adaptive beta: target divergence")
    horizon: int = Field(10000, ge=1, description="adaptive beta: horizon in samples")
    penalty_clip: float | None = Field(None, gt=0, description="clip the per-token penalty")
    wpr: WPRConfig = Field(default_factory=WPRConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    fdiv: FDivConfig = Field(default_factory=FDivConfig)


class PPOConfig(Section):
    actor: str | None = Field(None, description="stage name or path (default: sft)")
    critic: str | None = Field(None, description="stage name or path (default: rm)")
    reward_model: str | None = Field(None, description="stage name or path (default: rm)")
    actor_lr: float = Field(1.5e-5, gt=0)
    critic_lr: float = Field(1.5e-5, gt=0)
    actor_weight_decay: float = Field(0.0, ge=0)
    critic_weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1, description="prompts per generation batch per process")
    mini_batch_size: int | None = Field(None, ge=1, description="default: batch_size")
    generation_batches: int = Field(1, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    max_prompt_len: int = Field(512, ge=8)
    max_answer_len: int = Field(256, ge=2)
    temperature: float = Field(0.8, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    reward_clip: float = Field(2.5, gt=0)
    min_answer_tokens: int = Field(2, ge=1, description="answers shorter than this are dropped")
    whiten_advantages: bool = True
    actor_zero_stage: int = Field(2, ge=0, le=3)
    critic_zero_stage: int = Field(3, ge=0, le=3)
    ref_zero_stage: int = Field(3, ge=0, le=3)
    reward_zero_stage: int = Field(3, ge=0, le=3)
    actor_offload: bool = False
    critic_offload: bool = True
    log_every: int = Field(1, ge=1)
    save_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(50, ge=1, description="held-out evaluation every N steps")
    eval_prompts: int = Field(64, ge=1, description="held-out prompts per evaluation")
    regularizer: RegularizerConfig = Field(default_factory=RegularizerConfig)


class DARConfig(Section):
    actor: str | None = None
    reward_model: str | None = None
    alpha: float = Field(0.1, ge=0, le=1)
    beta: float = Field(0.05, gt=0)
    w_clip: float = Field(20.0, gt=0)
    samples_per_prompt: int = Field(4, ge=2)
    batch_size: int = Field(4, ge=1, description="prompts per iteration per process")
    steps_per_iteration: int = Field(1, ge=1)
    iterations: int | None = Field(None, ge=1, description="default: one pass over PPO prompts")
    self_normalize: bool = False
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "constant"
    grad_clip: float = Field(1.0, ge=0)
    temperature: float = Field(
        1.0, gt=0, description="1 = sample from pi_t itself, as DAR's weights assume"
    )
    max_answer_len: int = Field(256, ge=2)
    max_prompt_len: int = Field(512, ge=8)
    save_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    micro_batch_size: int | None = Field(
        None, ge=1, description="answers per forward/backward (default: the iteration's all)"
    )
    eval_every: int = Field(50, ge=1, description="held-out evaluation every N iterations")
    eval_prompts: int = Field(64, ge=1, description="held-out prompts per evaluation")


# --------------------------------------------------------------------------------------------
# evaluation


class InferConfig(Section):
    model: str | None = Field(
        None, description="stage name or path (default: the last of ppo/dar/sft)"
    )
    reward_model: str | None = Field(None, description="stage name or path (default: rm)")
    split: str = "eval"
    num_samples: int = Field(2000, ge=1)
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 1234
    out: str | None = None


class JudgeConfig(Section):
    a: str | None = Field(
        None, description="`wprctl run`: model A's inference (stage name or file)"
    )
    b: str | None = Field(
        None, description="`wprctl run`: model B's inference (stage name or file)"
    )
    model: str = "gpt-4o-2024-05-13"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    task: Literal["summarize", "hh-rlhf"] = "summarize"
    template: str | None = Field(None, description="template name in templates/judge or a path")
    orders: Literal["both", "random"] = "both"
    concurrency: int = Field(8, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_retries: int = Field(6, ge=0)
    backoff_base: float = Field(1.0, gt=0, description="seconds; doubles per retry, with jitter")
    backoff_max: float = Field(60.0, gt=0, description="longest wait between retries, seconds")
    timeout: float = Field(60.0, gt=0)
    max_cost: float | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    bootstrap: int = Field(10000, ge=100)
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            "gpt-4o-2024-05-13": (5.0, 15.0),
            "gpt-4o": (2.5, 10.0),
            "gpt-4o-mini": (0.15, 0.6),
            "gpt-4-turbo": (10.0, 30.0),
            "gpt-4": (30.0, 60.0),
        },
        description="USD per million (prompt, completion) tokens",
    )


class AppsConfig(Section):
    problems: str | None = Field(None, description="APPS problems: hub id or local file/folder")
    generations: str | None = Field(
        None,
        description="`wprctl run`: an inference stage name or file, or 'reference' / 'weakened' "
        "(the problems' own solutions, intact or deliberately broken, for the demo)",
    )
    k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    timeout: float = Field(
        4.0, gt=0, allow_inf_nan=False, description="wall-clock seconds per test"
    )
    problem_budget: float = Field(
        60.0, gt=0, allow_inf_nan=False, description="wall-clock seconds per sample"
    )
    workers: int | None = Field(None, ge=1, description="default: number of cores")
    mode: Literal["strict", "compat"] = "strict"
    memory_mb: int = Field(1024, ge=64)
    sandbox: Literal["auto", "namespaces", "rlimits"] = "auto"


class VariantConfig(Section):
    """A named run of one stage with overrides, e.g. PPO with `kl` next to PPO with `wpr`."""

    name: str
    stage: Literal["sft", "rm", "ppo", "dar", "infer", "judge", "apps-eval"]
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("variant names are letters, digits, '-', '_' or '.'")
        return v


class Manifest(Section):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dar: DARConfig = Field(default_factory=DARConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    apps: AppsConfig = Field(default_factory=AppsConfig)
    variants: list[VariantConfig] = Field(default_factory=list)
    stages: list[str] = Field(default_factory=lambda: ["sft", "rm", "ppo"])

    # Where the manifest was read from; output_dir is relative to it. Not part of the file.
    source: Path | None = Field(None, exclude=True)
    # The command line's --set overrides, in order: they win over a variant's `set` as well as
    # over the file, so `--variant ppo-kl --set ppo.regularizer.kl_ctl=0.1` runs with 0.1.
    _overrides: list[tuple[str, Any]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _stages_known(self) -> Manifest:
        names = {v.name for v in self.variants}
        if len(names) != len(self.variants):
            counts = Counter(v.name for v in self.variants)
            twice = sorted(n for n, c in counts.items() if c > 1)
            raise ValueError(
                f"variants: names must be unique; more than one is named {', '.join(map(repr, twice))}"
            )
        clash = names & set(STAGE_KINDS)
        if clash:
            raise ValueError(f"variant names must differ from stage names: {sorted(clash)}")
        for s in self.stages:
            if s not in STAGE_KINDS and s not in names:
                hint = _did_you_mean(s, [*STAGE_KINDS, *names])
                raise ValueError(
                    f"stages: unknown stage {s!r}{hint}; allowed: {', '.join(STAGE_KINDS)} "
                    "or a variant name"
                )
        return self

    @property
    def root(self) -> Path:
        return self.source.parent if self.source is not None else Path.cwd()

    @property
    def output_dir(self) -> Path:
        out = Path(self.project.output_dir)
        return out if out.is_absolute() else self.root / out

    def locate(self, spec: str) -> str:
        """A path written in the manifest (a model, a data file, a template): relative to the
        manifest's folder when it exists there, else as written (a path from the working
        directory, or a hub id). Like project.output_dir, so `-m proj/wprctl.toml` works from
        anywhere."""
        path = Path(os.path.expanduser(spec))
        if not path.is_absolute() and (self.root / path).exists():
            return str(self.root / path)
        return spec

    def with_located(self, section: _Section, *fields: str) -> _Section:
        """``section`` with each of its path ``fields`` that is set read as ``locate`` reads it."""
        update = {f: self.locate(value) for f in fields if (value := getattr(section, f))}
        return section.model_copy(update=update)

    def variant(self, name: str) -> VariantConfig | None:
        return next((v for v in self.variants if v.name == name), None)

    def for_variant(self, name: str) -> Manifest:
        """This manifest with a variant's overrides applied (validated like the file)."""
        variant = self.variant(name)
        if variant is None:
            return self
        raw = self.model_dump(mode="json", exclude={"source"})
        index = self.variants.index(variant)
        line = (
            _line_of(self.source, ["variants", str(index), "set"])
            or _line_of(self.source, ["variants", str(index), "name"])
            if self.source is not None
            else None
        )
        where = f"{self.source or 'manifest'}" + (f" (line {line})" if line else "")
        origin = f"{where}: variants[{name}].set"
        for key, value in variant.set.items():
            _assign(raw, key, value, origin=origin)
        for key, value in self._overrides:
            _assign(raw, key, value, origin="--set")
        labels = {key: f" (variants[{name}].set, line {line})" for key in variant.set}
        labels.update({key: " (from --set)" for key, _ in self._overrides})
        out = _validate(raw, self.source, origin=f"variant {name!r}", labels=labels)
        out._overrides = list(self._overrides)
        return out


# --------------------------------------------------------------------------------------------
# loading


def load_manifest(path: str | Path | None = None, overrides: list[str] | None = None) -> Manifest:
    """Read, override and validate a manifest; every problem is a UserError naming file and key."""
    p = Path(path) if path is not None else Path("wprctl.toml")
    if not p.exists():
        raise UserError(
            f"{p}: no manifest here. Create one with `wprctl init` "
            f"(or pass -m PATH to an existing wprctl.toml)."
        )
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p.resolve()}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p.resolve()}: cannot read the manifest: {exc}") from None
    parsed = [parse_override(item) for item in overrides or []]
    for key, value in parsed:
        _assign(raw, key, value, origin="--set")
    manifest = _validate(raw, p.resolve(), labels={key: " (from --set)" for key, _ in parsed})
    manifest._overrides = parsed
    for variant in manifest.variants:
        # a typo in a variant's `set` would otherwise surface only when its stage runs, after
        # every stage before it in `wprctl run`
        manifest.for_variant(variant.name)
    return manifest


def manifest_from_dict(raw: dict[str, Any], source: Path | None = None) -> Manifest:
    return _validate(raw, source)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=VALUE` -> ("a.b", value), with VALUE read as TOML (number, bool, list...) or a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ppo.regularizer.kind=kl")
    key, text = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*\.[0-9]+", key):
            head = key.rsplit(".", 1)[0]
            raise UserError(
                f"--set {item!r}: --set replaces a whole value, not one entry of a list: "
                f"--set '{head}=[...]'"
            )
        raise UserError(f"--set {item!r}: {key!r} is not a dotted manifest key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def _assign(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    node = raw
    parts = key.split(".")
    schema: type[BaseModel] | None = Manifest
    for i, part in enumerate(parts):
        fields = schema.model_fields if schema is not None else {}
        if schema is not None and part not in fields:
            where = ".".join(parts[:i])
            hint = _key_hint(part, schema, where)
            raise UserError(
                f"{origin} {key}: unknown key {part!r} in {where or 'the manifest'}{hint}"
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{origin} {key}: {'.'.join(parts[: i + 1])} is not a table")
        node = child
        annotation = fields[part].annotation if schema is not None else None
        schema = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )


def _validate(
    raw: dict[str, Any],
    source: Path | None,
    origin: str | None = None,
    labels: dict[str, str] | None = None,
) -> Manifest:
    """``labels``: where a key's value came from when not from the file (--set, a variant)."""
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_errors(exc, source, origin, labels or {})) from None
    manifest.source = source
    return manifest


def _format_errors(
    exc: ValidationError, source: Path | None, origin: str | None, labels: dict[str, str]
) -> str:
    where = str(source) if source is not None else "manifest"
    if origin:
        where = f"{where} ({origin})"
    lines = [f"{where}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "model_type":  # pydantic names our class: a [section] is a table
            msg = f"[{'.'.join(loc)}] is a table of settings, not a single value"
        if not loc:  # a check across keys (Manifest._stages_known) names its key first
            first = msg.split(":", 1)[0]
            loc = [first] if first in Manifest.model_fields else []
        key = ".".join(loc) or "(top level)"
        if key in labels:
            at = labels[key]
        else:
            line = _line_of(source, loc) if source is not None else None
            at = f" (line {line})" if line else ""
        if err["type"] == "extra_forbidden":
            parent = _schema_at(loc[:-1])
            hint = _key_hint(loc[-1], parent, ".".join(loc[:-1])) if parent is not None else ""
            section = ".".join(loc[:-1]) or "the top level"
            lines.append(f"  - {key}{at}: unknown key {loc[-1]!r} in [{section}]{hint}")
        else:
            given = err.get("input")
            # the value as TOML writes it (true, not Python's True)
            shown = str(given).lower() if isinstance(given, bool) else repr(given)
            # a validator's own message may quote the value already
            quoted = isinstance(given, dict) or f"got {shown}" in msg
            got = "" if quoted else f" (got {shown})"
            if msg.startswith(f"{key}: "):
                msg = msg[len(key) + 2 :]
            lines.append(f"  - {key}{at}: {msg}{got}")
    return "\n".join(lines)


def _schema_at(loc: list[str]) -> type[BaseModel] | None:
    schema: type[BaseModel] = Manifest
    for part in loc:
        if part.isdigit():
            continue
        field = schema.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        nxt = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nxt is None:
            return None
        schema = nxt
    return schema


def _line_of(source: Path, loc: list[str]) -> int | None:
    """Best-effort line number of a key in the TOML file, for error messages."""
    try:
        text = source.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    keys = [p for p in loc if not p.isdigit()]
    if not keys:
        return None
    # [[variants]] blocks: loc ("variants", "2", "stage") is the third block's key
    after = loc[len(keys) - 1] if len(loc) > len(keys) - 1 else ""
    index = int(after) if after.isdigit() else None
    section, leaf = ".".join(keys[:-1]), keys[-1]
    current, seen = "", -1
    for n, line in enumerate(text, 1):
        s = line.strip()
        m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", s)
        if m:
            current = m.group(1)
            if current == section and s.startswith("[["):
                seen += 1
            if current == ".".join(keys):
                return n
            continue
        if index is not None and current == section and seen != index:
            continue
        if re.match(rf"^{re.escape(leaf)}\s*=", s) and current == section:
            return n
        if not section and current == "" and re.match(rf"^{re.escape(leaf)}\s*=", s):
            return n
    return None


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# what users of TRL, DeepSpeed-Chat or OpenRLHF type for a setting that has another name here
_ALIASES = {
    "learning_rate": "lr",
    "max_steps": "iterations",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "max_grad_norm": "grad_clip",
    "lr_scheduler_type": "scheduler",
}


def _key_hint(word: str, schema: type[BaseModel], where: str) -> str:
    """A did-you-mean for an unknown key ``word`` of the section ``schema`` (at ``where``, a
    dotted path or ""): the same setting under its name here, a close spelling, or the key in
    one of the section's own tables (``data.n_train`` for ``data.demo.n_train``), or the keys
    that qualify it (``ppo.lr``: ``actor_lr`` or ``critic_lr``)."""
    fields = schema.model_fields
    if _ALIASES.get(word) in fields:
        return f"; did you mean {_ALIASES[word]!r}?"
    close = _did_you_mean(word, list(fields))
    if close:
        return close
    qualified = [name for name in fields if name.endswith("_" + _ALIASES.get(word, word))]
    if qualified:
        return f"; did you mean {' or '.join(repr(name) for name in qualified)}?"
    for name, field in fields.items():
        table = field.annotation
        if isinstance(table, type) and issubclass(table, BaseModel) and word in table.model_fields:
            return f"; did you mean {'.'.join(p for p in (where, name, word) if p)!r}?"
    return ""


def dump_resolved(manifest: Manifest) -> dict[str, Any]:
    """The resolved manifest as plain JSON-able data (written as each run's config.json)."""
    return manifest.model_dump(mode="json", exclude={"source"})
