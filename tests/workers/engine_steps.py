"""Train the tiny model a few steps on the engine layer and print losses as JSON.

Run directly (one process) or under DeepSpeed's launcher (N processes); the global batch is the
same either way, so the losses must agree. With --save-at K it checkpoints after step K and stops;
with --resume it continues from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from wprctl import engine as eng
from wprctl.cli import leave_process_group
from wprctl.models import load_causal_lm

GLOBAL_BATCH = 4


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer (and params)")
    p.add_argument(
        "--no-cpu-adam",
        action="store_true",
        help="DeepSpeed's CPU Adam op fails to load, as where it cannot be built (no compiler on "
        "a GPU machine; on a CPU one DeepSpeed then already fails building its shared-memory op)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()

    if args.no_cpu_adam:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        def fail(self: object, verbose: bool = True) -> None:
            raise RuntimeError("Unable to JIT load the cpu_adam op: no C++ compiler")

        CPUAdamBuilder.load = fail  # type: ignore[method-assign]
    eng.init_distributed()
    eng.seed_everything(0)
    world, rank = eng.world_size(), eng.rank()
    model = load_causal_lm(args.model)
    spec = eng.EngineSpec(
        zero_stage=args.zero,
        offload_optimizer=args.offload,
        offload_param=args.offload,
        micro_batch=GLOBAL_BATCH // world,
        grad_clip=1.0,
    )
    engine = eng.init_trainable(
        model,
        spec,
        lr=3e-3,
        weight_decay=0.01,
        scheduler="cosine",
        warmup_steps=1,
        total_steps=args.steps,
    )
    g = torch.Generator().manual_seed(1)
    data = torch.randint(3, model.config.vocab_size, (args.steps, GLOBAL_BATCH, 24), generator=g)
    start = 0
    if args.resume:
        start = int(eng.load_checkpoint({"model": engine}, Path(args.ckpt))["step"])
    losses = []
    for step in range(start, args.steps):
        shard = data[step, rank * spec.micro_batch : (rank + 1) * spec.micro_batch]
        out = engine(input_ids=shard, labels=shard)
        engine.backward(out.loss)
        engine.step()
        losses.append(eng.all_reduce_sum([float(out.loss)])[0] / world)
        if args.save_at is not None and step + 1 == args.save_at:
            eng.save_checkpoint({"model": engine}, Path(args.ckpt), step + 1, {}, keep_last=2)
            break
    # The loss of the next (unseen) batch measures the resulting weights.
    with torch.no_grad():
        probe = data[0, rank * spec.micro_batch : (rank + 1) * spec.micro_batch]
        probe_loss = (
            eng.all_reduce_sum([float(engine(input_ids=probe, labels=probe).loss)])[0] / world
        )
    export = Path(args.out).with_suffix(".model")
    eng.export_hf(engine, export)
    if rank == 0:
        Path(args.out).write_text(
            json.dumps({"losses": losses, "probe": probe_loss, "world": world})
        )
    leave_process_group()


if __name__ == "__main__":
    main()
