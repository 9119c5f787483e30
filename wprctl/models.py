"""Models and tokenizers: the offline tiny Llama, and loaders for any Hugging Face checkpoint.

`model.base = "tiny"` builds a small Llama-style causal LM from `[model.tiny]` with a byte-level
BPE tokenizer trained by the `tokenizers` library on the demo task's text. Both are saved as a
normal Hugging Face folder (safetensors) that `AutoModelForCausalLM` / `AutoTokenizer` load with no
wprctl code. Special tokens follow Gemma's ids (pad 0, eos 1, bos 2), the model the paper uses.
Any other `model.base` is a hub id or a local path, loaded with transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wprctl.errors import UserError
from wprctl.manifest import Manifest, TinyModelConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PAD, EOS, BOS = "<pad>", "</s>", "<s>"
TINY_DIRNAME = "base-tiny"


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE (any byte sequence encodes) with pad=0, eos=1, bos=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, padding_side="right"
    )
    fast.model_max_length = 1 << 20
    return fast


def _tiny_corpus(seed: int) -> Iterable[str]:
    from wprctl.data import demo_tokenizer_corpus

    yield from demo_tokenizer_corpus(seed)


def tiny_fingerprint(cfg: TinyModelConfig, seed: int) -> str:
    blob = json.dumps({"tiny": cfg.model_dump(), "seed": seed, "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tiny_model(cfg: TinyModelConfig, seed: int, out_dir: Path) -> Path:
    """Train the tokenizer, initialise the model from `seed`, save both to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(_tiny_corpus(seed), cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "wprctl_tiny.json").write_text(
        json.dumps(
            {"fingerprint": tiny_fingerprint(cfg, seed), "tiny": cfg.model_dump(), "seed": seed}
        )
    )
    return out_dir


def resolve_base_model(manifest: Manifest) -> str:
    """The path or hub id of `model.base`, building the tiny model on first use."""
    base = manifest.model.base
    if base != "tiny":
        return manifest.locate(base)
    out = manifest.output_dir / TINY_DIRNAME
    stamp = out / "wprctl_tiny.json"
    want = tiny_fingerprint(manifest.model.tiny, manifest.project.seed)
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("fingerprint") == want:
                return str(out)
        except (OSError, json.JSONDecodeError):
            pass
    from wprctl.console import console, is_main_process

    if is_main_process():
        console.print(f"building the tiny model in {out} ...")
        build_tiny_model(manifest.model.tiny, manifest.project.seed, out)
    _barrier()
    return str(out)


def _barrier() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except ImportError:  # pragma: no cover
        pass


def load_tokenizer(
    source: str | Path, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _check_folder(source, "tokenizer")
    _hub_id_offline_unless_reachable(source)
    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except load_errors() as exc:
        raise UserError(f"{source}: cannot load a tokenizer ({_first_line(exc)})") from None
    if tok.pad_token_id is None:
        raise UserError(
            f"{source}: the tokenizer has no pad token. Set one (e.g. tokenizer.pad_token = "
            "tokenizer.eos_token, then save_pretrained) so padding and reward pooling are defined."
        )
    if tok.eos_token_id is None:
        raise UserError(f"{source}: the tokenizer has no eos token; responses cannot be terminated")
    return tok


def tokenizer_for(
    manifest: Manifest, model_source: str | Path | None = None
) -> PreTrainedTokenizerBase:
    named = manifest.model.tokenizer
    source = manifest.locate(named) if named else model_source or resolve_base_model(manifest)
    return load_tokenizer(source, trust_remote_code=manifest.model.trust_remote_code)


def load_causal_lm(
    source: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    _check_not_a_classifier(source)
    return _load(AutoModelForCausalLM, source, dtype=dtype, trust_remote_code=trust_remote_code)


def _check_not_a_classifier(source: str | Path) -> None:
    # A reward model's folder loads as a causal LM without complaint when its embeddings are tied
    # (the LM head is the embedding matrix): the "policy" would then be the reward model's
    # backbone with no trained head.
    config = Path(source).expanduser() / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # a hub id, or a config that _load reports on
    if architectures and all(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"{source}: a sequence-classification model ({architectures[0]}, e.g. a reward "
            "model), not a causal language model to generate with"
        )


def load_reward_model(
    source: str | Path,
    *,
    pad_token_id: int,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    trained_head: bool = False,
) -> PreTrainedModel:
    """An `AutoModelForSequenceClassification` with one label, scoring the last non-pad token.

    ``trained_head``: the checkpoint must hold the score head (a reward model used for scoring,
    not a backbone for `wprctl rm` or PPO's critic, whose head starts fresh): a causal LM loads
    without complaint, with a random head, and PPO would then optimize noise.
    """
    from transformers import AutoModelForSequenceClassification

    model, info = _load(
        AutoModelForSequenceClassification,
        source,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        num_labels=1,
        pad_token_id=pad_token_id,
        output_loading_info=True,
    )
    fresh = [k for k in info.get("missing_keys", []) if k.split(".")[0] in ("score", "classifier")]
    if trained_head and fresh:
        raise UserError(
            f"{source}: not a reward model: it has no trained score head ({', '.join(fresh)} "
            "would start random). Use a `wprctl rm` output or a sequence-classification checkpoint."
        )
    model.config.pad_token_id = pad_token_id
    return model


def _load(
    auto_cls: Any, source: str | Path, *, dtype: Any, trust_remote_code: bool, **kw: Any
) -> Any:
    import logging

    # A reward head initialised from a causal LM is the expected case; transformers' notice about
    # newly initialised weights is not actionable here.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    _check_folder(source, "model")
    _hub_id_offline_unless_reachable(source)
    try:
        return auto_cls.from_pretrained(
            str(source), dtype=dtype, trust_remote_code=trust_remote_code, **kw
        )
    except load_errors() as exc:
        raise UserError(f"{source}: cannot load the model ({_first_line(exc)})") from None


def load_errors() -> tuple[type[Exception], ...]:
    """What a broken model folder raises from ``from_pretrained``: a truncated or overwritten
    safetensors file raises safetensors' own error, which is none of the built-in kinds."""
    from safetensors import SafetensorError

    return (OSError, ValueError, json.JSONDecodeError, RuntimeError, SafetensorError)


# what a local folder needs, at least one of, to hold a model or a tokenizer
_FOLDER_FILES = {
    "model": ("config.json", "adapter_config.json"),  # a PEFT adapter names its base model
    # older hub folders have only their vocabulary files, with the model's config.json
    "tokenizer": (
        "tokenizer_config.json",
        "tokenizer.json",
        "tokenizer.model",
        "spiece.model",
        "vocab.json",
        "vocab.txt",
        "config.json",
    ),
}


def _check_folder(source: str | Path, what: str) -> None:
    path = Path(source).expanduser()
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(f"{source}: cannot load the {what}: the folder is empty")
    text = str(source)
    # a hub id is "name" or "owner/name"; anything else that does not exist is a missing folder
    # (transformers would call it an invalid repo id)
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local and not path.exists():
        raise UserError(f"{source}: cannot load the {what}: no such folder")
    needs = _FOLDER_FILES[what]
    if path.is_dir() and not any((path / name).exists() for name in needs):
        inner = path / "model"  # a run folder given for its model
        hint = f"; its model is in {inner}" if (inner / needs[0]).exists() else ""
        named = " or ".join(needs[:2]) + (" (or the like)" if len(needs) > 2 else "")
        raise UserError(f"{source}: cannot load the {what}: no {named} in the folder{hint}")


def _hub_id_offline_unless_reachable(source: str | Path) -> None:
    if not Path(source).expanduser().exists():  # a hub id (_check_folder ruled out the rest)
        from wprctl.hub import offline_unless_reachable

        offline_unless_reachable()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
