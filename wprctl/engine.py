"""The engine layer: one place where stages meet DeepSpeed.

It turns the manifest's `[deepspeed]` section (and a stage's own ZeRO/offload choices) into a
DeepSpeed config, initialises trainable and frozen models, saves and restores full training state
(model, optimizer, scheduler, RNG and the stage's own position) and exports Hugging Face folders.

The same code runs single-process (we set up a one-rank process group ourselves, so every stage
always runs on a real DeepSpeed engine) and under DeepSpeed's launcher with N processes: gloo on
CPU, NCCL on GPU, several nodes through a hostfile (see `wprctl.launch`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wprctl.console import quiet_library_warnings
from wprctl.errors import UserError

quiet_library_warnings()


# --------------------------------------------------------------------------------------------
# process group and device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> None:
    """Join the launcher's process group, or create a one-rank group when run directly."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed prints a line about its shared-memory op on every CPU start; it says nothing a user
    # can act on, and N ranks would print it N times.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(), verbose=False
        )
    _unlink_shm_buffer()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer (66 MB in /dev/shm).

    DeepSpeed never unlinks it, so every CPU run used to leave one file per rank behind until
    /dev/shm (RAM) was full. Once every rank has mapped every peer's buffer (DeepSpeed's
    initialisation waits for that; the barrier makes sure all ranks are past it) the names are
    no longer needed: the mappings stay valid and the memory is freed when the processes exit,
    however they exit.
    """
    import torch.distributed as dist

    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), rank()
    )
    path = Path("/dev/shm") / name
    if not path.exists():  # GPU runs, other platforms, or the op is not built
        return
    if world_size() > 1:
        dist.barrier()
    path.unlink(missing_ok=True)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def select_dtype(name: str = "auto") -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (metrics), in float64 so sums of counts stay exact."""
    return _all_reduce(values, "sum")


def all_reduce_max(values: list[float]) -> list[float]:
    return _all_reduce(values, "max")


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each named metric, over the ranks that report it.

    Ranks may report different keys (a PPO rank whose whole batch was dropped has no reward that
    step): an all-reduce of the values alone would then pair unrelated metrics, or hang on tensors
    of different lengths. So the ranks first agree on the sorted union of the names, then one
    all-reduce sums each value with a count of its reporters. A key nobody reports is absent.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(values)
    names: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(names, sorted(values))
    keys = sorted(set().union(*names))
    t = torch.tensor(
        [values.get(k, 0.0) for k in keys] + [float(k in values) for k in keys],
        dtype=torch.float64,
        device=device(),
    )
    dist.all_reduce(t)
    sums, counts = t.view(2, len(keys)).tolist()
    return {k: s / c for k, s, c in zip(keys, sums, counts, strict=True) if c}


# --------------------------------------------------------------------------------------------
# DeepSpeed configs


@dataclass(frozen=True)
class EngineSpec:
    """How one model is run: ZeRO stage, offload, batch shape and precision."""

    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    dtype: torch.dtype = torch.float32

    @property
    def optimizer_offloaded(self) -> bool:
        """Whether the optimizer state lives in CPU memory (ZeRO-Offload; ZeRO stage 1 or more)."""
        return self.offload_optimizer and self.zero_stage >= 1


def ds_config(spec: EngineSpec, *, train: bool = True) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    on_gpu = torch.cuda.is_available()
    if spec.optimizer_offloaded and train:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.offload_param and spec.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.zero_stage == 3:
        # Small models (tests, the demo) would otherwise keep every parameter persistent and
        # never exercise partitioning.
        zero["stage3_param_persistence_threshold"] = 0
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch * spec.grad_accum * world_size(),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # (read under optimizer offload only) make_optimizer gives DeepSpeed's CPU Adam where it
        # can be built, PyTorch's AdamW where not, which DeepSpeed would refuse
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": spec.dtype == torch.bfloat16},
        "fp16": {"enabled": spec.dtype == torch.float16},
    }
    if train and spec.grad_clip > 0:
        cfg["gradient_clipping"] = spec.grad_clip
    return cfg


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, *, offloaded: bool = False
) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm weights (DeepSpeed-Chat's grouping).

    ``offloaded``: DeepSpeed's CPU Adam (the same AdamW update, vectorized over the offloaded fp32
    master weights), as DeepSpeed-Chat and OpenRLHF use with ZeRO-Offload; DeepSpeed refuses a
    client PyTorch optimizer there by default. The op is compiled on first use (a minute or two)
    and cached (``~/.cache/torch_extensions``). Where it cannot be built (no C++ compiler),
    PyTorch's AdamW takes its place with a warning: slower on a large model, the same result.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith("bias") else decay
        ).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if offloaded and (cpu_adam := _cpu_adam(groups, lr)) is not None:
        return cpu_adam
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _cpu_adam(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer | None:
    """DeepSpeed's CPU Adam, or None (with a warning) where its op cannot be built."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from wprctl.console import console, err_console

    if not _cpu_adam_built():  # else a minute or two without a word
        console.print("[dim]compiling DeepSpeed's CPU Adam for the offloaded optimizer (once)[/]")
    try:
        return DeepSpeedCPUAdam(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, adamw_mode=True)
    except Exception as exc:  # the op's compiler, headers or ninja are missing: any error type
        last = (str(exc).strip().splitlines() or [""])[-1]
        err_console.print(
            f"[yellow]warning:[/] DeepSpeed's CPU Adam could not be built here ({last}); the"
            " offloaded optimizer runs PyTorch's AdamW, which is slower on a large model."
            " `ds_report` shows what is missing (a C++ compiler, ninja).",
            soft_wrap=True,
        )
        return None


def _cpu_adam_built() -> bool:
    """Whether DeepSpeed's CPU Adam op is installed or in PyTorch's JIT cache (unknown: True)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        if installed_ops.get("cpu_adam"):
            return True
        return any(Path(_get_build_directory("cpu_adam", verbose=False)).glob("cpu_adam*.so"))
    except Exception:  # a private helper of PyTorch's: if it moved, say nothing
        return True


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(total_steps, 1)
    warm = min(warmup_steps, total)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = (step - warm) / max(total - warm, 1)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def init_trainable(
    model: nn.Module,
    spec: EngineSpec,
    *,
    lr: float,
    weight_decay: float,
    scheduler: str,
    warmup_steps: int,
    total_steps: int,
) -> Any:
    """A DeepSpeed engine with AdamW and the lr schedule; the engine owns both for checkpoints."""
    import deepspeed

    init_distributed()
    model = model.to(dtype=spec.dtype)
    optimizer = make_optimizer(model, lr, weight_decay, offloaded=spec.optimizer_offloaded)
    sched = make_scheduler(optimizer, scheduler, warmup_steps, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=sched, config=ds_config(spec, train=True)
    )
    return engine


def init_frozen(model: nn.Module, spec: EngineSpec) -> nn.Module:
    """An inference-only model: ZeRO-3 partitions it across ranks; below that it is replicated."""
    model.eval()
    model.requires_grad_(False)
    if spec.zero_stage < 3:
        return model.to(device=device(), dtype=spec.dtype)
    import deepspeed

    init_distributed()
    engine, *_ = deepspeed.initialize(
        model=model.to(dtype=spec.dtype), config=ds_config(spec, train=False)
    )
    engine.eval()
    return engine


def unwrap(model: Any) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def zero3(model: Any) -> bool:
    return getattr(model, "zero_optimization_stage", lambda: 0)() == 3


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for the duration, to read whole weights.

    Not for running the model: see ``generation_ready``.
    """
    if not zero3(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(unwrap(model).parameters()), modifier_rank=None):
        yield


@contextlib.contextmanager
def generation_ready(model: Any) -> Iterator[None]:
    """Whole weights on every rank, and ZeRO-3's per-module hooks off, for the duration.

    Gathering alone is not enough: the hooks still run at every forward pass and talk to the
    other ranks, and ranks sample a different number of tokens (each stops at its own eos), so
    one rank's extra steps meet no partner: gloo reports a collective mismatch, or the job hangs.
    As TRL and OpenRLHF do, the hooks come off while generating and go back on after, so
    generation is local (and no longer all-gathers every layer at every token).
    """
    if not zero3(model):
        yield
        return
    offload = getattr(model.optimizer, "parameter_offload", None) or model.optimizer
    with gathered(model):
        if not hasattr(offload, "forward_hooks"):  # no hooks to take off: gathering is enough
            yield
            return
        for param in unwrap(model).parameters():
            param.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


# --------------------------------------------------------------------------------------------
# RNG and checkpoints


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def save_checkpoint(
    engines: dict[str, Any], ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int
) -> None:
    """Save every engine under `ckpt_dir/<name>/step<N>` with the stage's client state.

    `ckpt_dir/latest` is written last, by rank 0, so a kill during saving leaves the previous
    checkpoint as the one `--resume` uses.
    """
    tag = f"step{step}"
    state = {**client_state, "rng": rng_state(), "step": step}
    for name, engine in engines.items():
        engine.save_checkpoint(str(ckpt_dir / name), tag=tag, client_state=state, save_latest=True)
    barrier()
    if rank() == 0:
        (ckpt_dir / "latest.tmp").write_text(tag)
        os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
        tags = sorted(
            {p.name for name in engines for p in (ckpt_dir / name).glob("step*") if p.is_dir()},
            key=lambda t: int(t[4:]) if t[4:].isdigit() else -1,
        )
        for old in tags[:-keep_last]:
            for name in engines:
                shutil.rmtree(ckpt_dir / name / old, ignore_errors=True)
    barrier()


def load_checkpoint(engines: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """Restore every engine from the latest checkpoint; a broken one is a UserError naming it."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        raise UserError(f"{ckpt_dir}: no checkpoint to resume from (no 'latest' file)")
    tag = latest.read_text().strip()
    client: dict[str, Any] | None = None
    for name, engine in engines.items():
        where = ckpt_dir / name / tag
        if not where.is_dir():
            raise UserError(
                f"{where}: checkpoint {tag!r} of {name!r} is missing; use --force to start over"
            )
        try:
            path, state = engine.load_checkpoint(
                str(ckpt_dir / name),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        except Exception as exc:  # DeepSpeed raises many kinds for truncated or foreign files
            raise UserError(
                f"{where}: cannot load the checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                "use --force to start over"
            ) from None
        if path is None or state is None:
            raise UserError(f"{where}: the checkpoint is incomplete; use --force to start over")
        client = state
    assert client is not None
    if "rng" in client:
        set_rng_state(client["rng"])
    return client


# --------------------------------------------------------------------------------------------
# export


def export_hf(model: Any, out_dir: Path, tokenizer: Any | None = None) -> Path:
    """Save a Hugging Face folder (safetensors) loadable by transformers alone, from any ZeRO stage."""
    module = unwrap(model)
    # Under ZeRO-3 no rank holds whole weights; this gathers them (all ranks must call it).
    state = model._zero3_consolidated_16bit_state_dict() if zero3(model) else None
    if rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if state is not None:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        else:
            module.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()
    return out_dir
