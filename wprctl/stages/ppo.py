"""Stage 3, PPO with a pluggable policy regularizer (the paper's step 3, DeepSpeed-Chat's loop).

Four models, each on its own DeepSpeed engine with its own ZeRO stage and offload:
the actor (from SFT, trained), the reference (the SFT weights, frozen), the critic (from the RM,
trained; per-token values from its score head) and the reward model (the RM, frozen). On APPS
there is no reward model: the reward is the sandboxed executor's (-1 compile error, -0.6 runtime
error, else -0.3 + 1.3 x the fraction of tests passed).

One step:
1. generation: `generation_batches` batches of `batch_size` prompts per process, sampled at
   `temperature` (parameters gathered under ZeRO-3); answers shorter than `min_answer_tokens` are
   dropped, and if a whole batch is dropped the previous step's experience is reused;
2. experience: log-probs of the actor and the reference at the sampled tokens, values, the
   reward model's end score clipped to +-reward_clip and added at the last response token, and the
   regularizer's per-token term (top-k compressed distributions only, never (B, T, V) logits);
3. learning: GAE, the clipped policy loss (+ the regularizer's loss term) and the clipped value
   loss, for `ppo_epochs` passes over mini-batches.

The regularizer is a plug-in (`wprctl.regularizers`); this file does not know which one runs.

Overlap. The regularizer's term (top-k compression, `reward_penalty`, `divergence`) needs only the
actor's and the reference's logits and log-probs; the critic's values and the reward model's score
do not depend on it. So each experience batch hands the regularizer to a single worker thread owned
by the stage (`_RegularizerWorker`) and computes values and score on the main thread meanwhile,
then joins. The result is bit-identical to running them one after the other:

* the worker runs with one intra-op thread. compress_topk and the solvers give the same bits with
  one thread as with several (checked on the demo's sizes and larger ones; on CPU the solvers drop
  to one thread themselves, `wprctl.ot.threads`), and under PyTorch's OpenMP backend
  `torch.set_num_threads` sets the calling thread's OpenMP and MKL counts only (plus the default of
  threads started later, which `_RegularizerWorker` puts back), so the main thread keeps its count
  and its results (`tests/test_ppo_overlap.py`). One thread is a speed decision: a second thread
  that runs a multi-threaded OpenMP region gets its own libgomp thread pool, and once pool threads
  outnumber the cores libgomp cuts its spin-waiting short, so every one of the main thread's many
  small parallel ops (generation, forward, training) sleeps and wakes its threads: measured 1.6-2x
  slower on 2 cores. On a many-core CPU the regularizer thus gives up its intra-op parallelism,
  except in its compiled code (the top-k compression and the OT solvers: numba's own pool, whose
  threads sleep when idle), which takes the main thread's count (`set_compiled_threads`) and
  gives the same bits with any;
* while the worker solves an OT problem (a regularizer on top-k distributions), the main thread
  computes the values with one intra-op thread fewer (on the CPU,
  `_RegularizerWorker.sharing_cores`), so that its parallel ops do not wait at every barrier for
  a thread that the worker displaced, and the worker's short compiled launches (compression,
  ``paper``) take the one core left (`wprctl.ot.compiled.launch`; the long ``wellposed`` solve
  takes every core from the start: numba splits its positions over the threads when it
  starts). The score follows the join, on every thread: the worker's ``paper`` term (11-13 ms on
  the demo's batch, 2 cores) takes about as long as the values on one thread (12-13 ms), and the
  score no longer runs on one thread beside a core that has nothing left to do. Measured in one
  process, interleaved (values + score, on a slow day: 16.9 ms on 2 threads, 25.2 on one): the
  regularizer added 10.5 ms when the score ran beside it too and 6.9 ms now. A regularizer that
  takes far longer than the values (`Regularizer.long_running`: ``wellposed``, ~65 ms) has the
  score computed beside it too. For the per-token regularizers (kl, fdiv) the worker's share is
  a few small ops and the main thread keeps every thread. The main thread's counts are fixed per
  phase and regularizer, not handed back when the worker finishes: MKL's results are not
  bit-identical on 1 and 2 threads for every shape, and a count that depends on timing would
  make runs irreproducible (the compiled code's count may follow timing: its bits do not depend
  on it). The worker's 10 ms of CPU took 17 ms in PPO as long as libgomp kept the main thread's
  idle team thread spinning for its default 300000 turns after the forward passes
  (`wprctl.cli.OPENMP_DEFAULTS` lowers that);
* grad mode is per thread: the worker runs under `torch.no_grad()` like `experience`;
* on CUDA the worker first selects this process's device; both threads issue to the device's
  default stream, so the worker's kernels are ordered after the forward passes that produced its
  inputs, and the main thread's use of its outputs after them: the same overlap is correct there;
* an exception raised by the regularizer is re-raised by the main thread at the join (a
  `UserError` still ends the command with exit status 2); one raised by the main thread's work
  first waits for the worker, so no regularizer call outlives the batch.

A regularizer therefore must not use collective communication or the global RNG in
`reward_penalty`/`divergence` (none does): those run concurrently with the main thread's.

Timers (logged as `train/time/...`, seconds per step, summed over generation batches):
`generation`, `forward` (actor + reference log-probs), `reward` (values and score; the values,
or both, overlapped with the regularizer), `regularizer` (how long the main thread waits for the
regularizer at the join: its cost to the step beyond the overlapped work), `regularizer_solve`
(the regularizer's own wall time on the worker; it overlaps `reward`, so it is not part of the
step) and `training`. The step's wall time is the sum of all but `regularizer_solve`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from wprctl import engine as eng
from wprctl.console import console
from wprctl.manifest import Manifest
from wprctl.models import load_causal_lm, load_reward_model
from wprctl.ot.threads import intra_op_threads, set_compiled_threads
from wprctl.regularizers import BetaController, RegBatch, Regularizer, build_regularizer
from wprctl.rl.online import (
    LoopSchedule,
    build_reward_fn,
    close_reward_fn,
    evaluate_policy,
    finish_online_run,
    gold_reward_fn,
    open_online_stage,
    prompt_batch,
    run_online_loop,
)
from wprctl.rl.ppo_math import (
    entropy_from_logits,
    gae,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from wprctl.rl.rollout import (
    SamplingConfig,
    decode,
    generate,
    join,
    response_logits,
    token_values,
)
from wprctl.runs import RunDir, check_resume_step, resolve_model_ref
from wprctl.scoring import token_logprobs


@dataclass
class Experience:
    seq: torch.Tensor
    attn: torch.Tensor
    prompt_len: int
    responses: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, idx: torch.Tensor) -> Experience:
        return Experience(
            self.seq[idx], self.attn[idx], self.prompt_len, self.responses[idx], self.mask[idx],
            self.old_logprobs[idx], self.ref_logprobs[idx], self.values[idx],
            self.advantages[idx], self.returns[idx],
        )  # fmt: skip

    def reg_batch(self) -> RegBatch:
        return RegBatch(self.responses, self.mask, self.old_logprobs, self.ref_logprobs)


@dataclass
class RegOutput:
    """What the regularizer contributes to one experience batch, and its wall time on the worker."""

    penalty: torch.Tensor | None  # (B, T) per-token penalty, or None
    divergence: torch.Tensor  # (B,)
    seconds: float


class _RegularizerWorker:
    """The thread that runs the regularizer of each experience batch (see the module docstring).

    ``submit`` takes the (B, T, V) logits in a list that the worker empties as soon as it has taken
    them, so that they are freed after the top-k compression as in a sequential run, not when the
    whole job ends.
    """

    def __init__(self, reg: Regularizer, device: torch.device) -> None:
        self.reg = reg
        threads = torch.get_num_threads()  # (also initializes this thread's count, see below)
        # set while the main thread computes beside the worker (see ``sharing_cores``)
        self._sharing = threading.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="wprctl-regularizer",
            initializer=_init_worker_thread,
            initargs=(device, threads, self._sharing.is_set),
        )
        self._pool.submit(lambda: None).result()  # start the thread: run the initializer now
        # torch.set_num_threads(1) on the worker also set the process-wide default that threads
        # started later begin with; put the main thread's count back there.
        torch.set_num_threads(threads)

    def submit(self, logits: list[torch.Tensor], batch: RegBatch) -> Future[RegOutput]:
        """``batch`` without ``topk``: the worker compresses ``logits`` into it when asked."""
        return self._pool.submit(self._run, logits, batch)

    @torch.no_grad()
    def _run(self, logits: list[torch.Tensor], batch: RegBatch) -> RegOutput:
        t0 = time.time()
        actor_logits, ref_logits = logits
        logits.clear()
        if self.reg.topk:
            from wprctl.ot import compress_topk

            topk = compress_topk(
                actor_logits, ref_logits, batch.actions, self.reg.topk, mask=batch.mask.bool()
            )
            batch = replace(batch, topk=topk)
        del actor_logits, ref_logits  # only the compressed form outlives this point
        penalty = self.reg.reward_penalty(batch)
        divergence = self.reg.divergence(batch)
        return RegOutput(penalty, divergence, time.time() - t0)

    @contextmanager
    def sharing_cores(self, enabled: bool = True) -> Iterator[None]:
        """The main thread computes beside the worker in this block, on one intra-op thread fewer
        (when ``enabled``): the worker's compiled launches then take the one core left, and every
        core again once the main thread only waits for it."""
        if not enabled:
            yield
            return
        self._sharing.set()
        try:
            with intra_op_threads(torch.get_num_threads() - 1):
                yield
        finally:
            self._sharing.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _init_worker_thread(device: torch.device, threads: int, shared: Callable[[], bool]) -> None:
    # One intra-op thread, so the worker never leads an OpenMP team of its own (module docstring).
    # get_num_threads first: a thread's first query initializes its count from the process-wide
    # value, which would undo a set_num_threads made before it.
    torch.get_num_threads()
    torch.set_num_threads(1)
    # The compiled solvers (numba's pool, not OpenMP) take the main thread's count, but one core
    # while the main thread computes beside them (``sharing_cores``): once values and score are
    # done the main thread only waits, and the solve has every core.
    set_compiled_threads(threads, shared)
    if device.type == "cuda":
        torch.cuda.set_device(device)


class PPORecipe:
    def __init__(self, manifest: Manifest, run: RunDir, resuming: bool) -> None:
        self.m = manifest
        self.cfg = manifest.ppo
        self.run = run
        self.resuming = resuming

    # ----------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        m, cfg = self.m, self.cfg
        self.apps = m.data.dataset == "apps"
        st = open_online_stage(
            m, "ppo", cfg.actor, cfg.batch_size, cfg.generation_batches, "step (generation_batches)"
        )
        self.world, self.tokenizer, actor_path = st.world, st.tokenizer, st.actor_path
        self.pad_id, self.eos_id = st.pad_id, st.eos_id
        self.train_data, self.eval_data = st.train_data, st.eval_data
        self.batches_per_epoch = st.batches_per_epoch
        self.total = math.ceil(cfg.epochs * self.batches_per_epoch / cfg.generation_batches)
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        self.mini = cfg.mini_batch_size or cfg.batch_size
        self.n_minibatches = math.ceil(cfg.batch_size * cfg.generation_batches / self.mini)
        opt_steps = max(1, self.total * cfg.ppo_epochs * self.n_minibatches // cfg.grad_accum)
        dtype = eng.select_dtype(m.model.dtype)

        def spec(zero: int, offload: bool) -> eng.EngineSpec:
            return eng.EngineSpec(
                zero_stage=zero, offload_optimizer=offload, offload_param=offload and zero == 3,
                micro_batch=self.mini, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, dtype=dtype,
            )  # fmt: skip

        trust = m.model.trust_remote_code
        self.actor = eng.init_trainable(
            load_causal_lm(actor_path, trust_remote_code=trust),
            spec(cfg.actor_zero_stage, cfg.actor_offload),
            lr=cfg.actor_lr, weight_decay=cfg.actor_weight_decay, scheduler=cfg.scheduler,
            warmup_steps=cfg.warmup_steps, total_steps=opt_steps,
        )  # fmt: skip
        self.ref = eng.init_frozen(
            load_causal_lm(actor_path, trust_remote_code=trust), spec(cfg.ref_zero_stage, False)
        )
        critic_path = resolve_model_ref(
            m, cfg.critic or ("sft" if self.apps else "rm"), what="ppo.critic"
        )
        self.critic = eng.init_trainable(
            load_reward_model(critic_path, pad_token_id=self.pad_id, trust_remote_code=trust),
            spec(cfg.critic_zero_stage, cfg.critic_offload),
            lr=cfg.critic_lr, weight_decay=cfg.critic_weight_decay, scheduler=cfg.scheduler,
            warmup_steps=cfg.warmup_steps, total_steps=opt_steps,
        )  # fmt: skip
        self.reward_fn: Any = build_reward_fn(
            m, cfg.reward_model, spec(cfg.reward_zero_stage, False), stage="ppo", pad_id=self.pad_id
        )
        self.gold = gold_reward_fn(m)
        self.reg = build_regularizer(cfg.regularizer, clip_range=cfg.clip_range)
        with eng.gathered(self.ref):
            emb = eng.unwrap(self.ref).get_input_embeddings().weight.detach().float().clone()
        self.reg.setup(
            ref_embeddings=emb,
            cache_dir=m.output_dir / ".cache" / "wpr",
            pad_id=self.pad_id,
            eos_id=self.eos_id,
        )
        self.reg_worker = _RegularizerWorker(self.reg, eng.device())
        self.beta = BetaController(cfg.regularizer)
        self.sampling = SamplingConfig.from_section(cfg)
        self.step = 0
        self.last_experience: Experience | None = None
        if self.resuming and self.run.has_checkpoint():
            client = eng.load_checkpoint(
                {"actor": self.actor, "critic": self.critic}, self.run.checkpoint_dir
            )
            self.step = int(client["step"])
            check_resume_step(self.run, self.step, self.total, "ppo.max_steps, ppo.epochs")
            self.beta.load_state_dict(client["beta"])
            console.print(f"{self.run.name}: resumed from step {self.step}")

    # ----------------------------------------------------------------------------------------
    # rollout and experience

    def prompt_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        for g in range(self.cfg.generation_batches):
            yield prompt_batch(
                self.train_data,
                self.m.project.seed,
                step * self.cfg.generation_batches + g,
                self.cfg.batch_size,
                self.batches_per_epoch,
            )

    @torch.no_grad()
    def experience(
        self,
        batch: dict[str, torch.Tensor],
        timers: dict[str, float],
        stats: dict[str, list[float]],
    ) -> Experience | None:
        t0 = time.time()
        responses, mask = generate(
            self.actor, batch["input_ids"], batch["attention_mask"], self.sampling, self.tokenizer
        )
        timers["time/generation"] += time.time() - t0
        keep = mask.sum(1) >= self.cfg.min_answer_tokens
        # a fraction, so the mean over batches and ranks is the global one (a count was averaged)
        stats["dropped_fraction"].append(float((~keep).float().mean()))
        if not keep.any():
            return None
        prompt_ids, prompt_mask, responses, mask = (
            x[keep] for x in (batch["input_ids"], batch["attention_mask"], responses, mask)
        )
        examples = [
            self.train_data.examples[int(i)] for i in batch["index"][keep.to(batch["index"].device)]
        ]
        seq, attn = join(prompt_ids, prompt_mask, responses, mask)
        P = prompt_ids.size(1)

        t0 = time.time()
        actor_logits = response_logits(self.actor, seq, attn, P)
        old_logprobs = token_logprobs(actor_logits, responses)
        entropy = masked_mean(entropy_from_logits(actor_logits), mask)
        ref_logits = response_logits(self.ref, seq, attn, P)
        ref_logprobs = token_logprobs(ref_logits, responses)
        timers["time/forward"] += time.time() - t0
        # The regularizer runs on the worker while this thread computes values and the score,
        # which do not depend on it (module docstring, "Overlap").
        job = self.reg_worker.submit(
            [actor_logits, ref_logits], RegBatch(responses, mask, old_logprobs, ref_logprobs)
        )
        del actor_logits, ref_logits  # the worker drops them after the top-k compression
        try:
            t0 = time.time()
            # an OT solve holds a core: on the CPU this thread takes the others, so that its
            # parallel ops do not wait at every barrier for a thread the worker displaced; the
            # score then waits for the join, to run on every core (module docstring, "Overlap")
            solving = seq.device.type == "cpu" and bool(self.reg.topk)
            score_after = solving and not self.reg.long_running
            with self.reg_worker.sharing_cores(solving):
                values = token_values(self.critic, seq, attn, P) * mask
                prompts_text = decode(self.tokenizer, prompt_ids, prompt_mask)
                responses_text = decode(self.tokenizer, responses, mask)
                if not score_after:
                    score = self.reward_fn(seq, attn, prompts_text, responses_text, examples)
            timers["time/reward"] += time.time() - t0
        except BaseException:
            wait_futures([job])  # the regularizer's own outcome is moot now
            raise
        t0 = time.time()
        reg_out = job.result()  # re-raises the regularizer's exception, if any
        timers["time/regularizer"] += time.time() - t0
        t0 = time.time()
        if score_after:
            score = self.reward_fn(seq, attn, prompts_text, responses_text, examples)
        score = score.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        timers["time/reward"] += time.time() - t0
        timers["time/regularizer_solve"] += reg_out.seconds
        penalty, divergence = reg_out.penalty, reg_out.divergence

        rewards = torch.zeros_like(old_logprobs)
        if penalty is not None:
            rewards = rewards - self.beta.value * penalty * mask
        last = (mask.sum(1) - 1).long()
        rows = torch.arange(rewards.size(0), device=rewards.device)
        rewards[rows, last] += score
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        lengths = mask.sum(1)
        stats["reward"].append(float(score.mean()))
        stats["penalty"].append(float(masked_mean(penalty, mask)) if penalty is not None else 0.0)
        stats["divergence"].append(float(divergence.mean()))
        stats["kl_ref"].append(float(((old_logprobs - ref_logprobs) * mask).sum(1).mean()))
        stats["length"].append(float(lengths.mean()))
        stats["entropy"].append(float(entropy))
        stats["eos_fraction"].append(float((responses == self.eos_id).any(1).float().mean()))
        if self.gold is not None:
            stats["gold"].append(
                sum(self.gold(p, r) for p, r in zip(prompts_text, responses_text, strict=True))
                / len(prompts_text)
            )
        for key, value in self.reg.metrics().items():
            stats[f"reg/{key}"].append(value)
        return Experience(
            seq, attn, P, responses, mask, old_logprobs, ref_logprobs, values, advantages, returns
        )

    # ----------------------------------------------------------------------------------------
    # learning

    def learn(self, exp: Experience, stats: dict[str, list[float]]) -> None:
        n = exp.seq.size(0)
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(n)
            for chunk in torch.tensor_split(order, self.n_minibatches):
                # A chunk can be empty when answers were dropped; the engines still step so that
                # gradient-accumulation boundaries stay aligned across steps and processes.
                mb = (
                    exp.rows(chunk.to(exp.seq.device))
                    if len(chunk)
                    else exp.rows(order[:1].to(exp.seq.device))
                )
                weight = 1.0 if len(chunk) else 0.0
                logits = response_logits(self.actor, mb.seq, mb.attn, mb.prompt_len)
                logprobs = token_logprobs(logits, mb.responses)
                del logits
                pg_loss, pg_clip = policy_loss(
                    logprobs, mb.old_logprobs, mb.advantages, mb.mask, self.cfg.clip_range
                )
                loss = pg_loss
                reg_loss = self.reg.loss_penalty(mb.reg_batch(), logprobs)
                if reg_loss is not None:
                    loss = loss + self.beta.value * reg_loss
                self.actor.backward(loss * weight)
                self.actor.step()
                values = token_values(self.critic, mb.seq, mb.attn, mb.prompt_len)
                v_loss, v_clip = value_loss(
                    values, mb.values, mb.returns, mb.mask, self.cfg.value_clip
                )
                self.critic.backward(v_loss * weight)
                self.critic.step()
                if weight:
                    stats["policy_loss"].append(float(pg_loss.detach()))
                    stats["value_loss"].append(float(v_loss.detach()))
                    stats["policy_clipfrac"].append(float(pg_clip))
                    stats["value_clipfrac"].append(float(v_clip))
                    if reg_loss is not None:
                        stats["reg_loss"].append(float(reg_loss.detach()))

    # ----------------------------------------------------------------------------------------
    # held-out evaluation

    def evaluate(self) -> dict[str, float]:
        """Mean reward (and the gold oracle's, on the demo) of sampled answers to held-out prompts."""
        return evaluate_policy(
            self.actor, self.ref, self.reward_fn, self.eval_data, self.tokenizer, self.sampling,
            n_prompts=self.cfg.eval_prompts, batch_size=self.cfg.batch_size, seed=self.m.project.seed, gold=self.gold,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------
    # the loop

    def ppo_step(self, step: int) -> dict[str, float]:
        """Experience from this step's prompt batches, then learning on it; returns the metrics."""
        cfg = self.cfg
        timers = dict.fromkeys(
            ("time/generation", "time/forward", "time/regularizer", "time/regularizer_solve",
             "time/reward", "time/training"),
            0.0,
        )  # fmt: skip
        stats: dict[str, list[float]] = defaultdict(list)
        experiences = [
            e for b in self.prompt_batches(step) if (e := self.experience(b, timers, stats)) is not None
        ]  # fmt: skip
        exp = _concat(experiences, self.pad_id) if experiences else self.last_experience
        t0 = time.time()
        if exp is not None:
            self.learn(exp, stats)
            self.last_experience = exp
        timers["time/training"] += time.time() - t0
        # A rank whose batches were all dropped reports no fresh experience statistics; the means
        # are over the ranks that have them. beta adapts to the global divergence, so every rank
        # keeps the same beta (and a step without fresh experience leaves it alone).
        row = eng.all_reduce_mean({k: _mean(v) for k, v in stats.items() if v} | timers)
        if "divergence" in row:
            self.beta.update(
                row["divergence"], cfg.batch_size * cfg.generation_batches * self.world
            )
        row["beta"] = self.beta.value
        row["lr"] = self.actor.get_lr()[0]
        return row

    def save(self, step: int) -> None:
        eng.save_checkpoint(
            {"actor": self.actor, "critic": self.critic}, self.run.checkpoint_dir, step,
            {"beta": self.beta.state_dict()}, self.cfg.keep_last,
        )  # fmt: skip

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        schedule = LoopSchedule(self.total, cfg.log_every, cfg.eval_every, cfg.save_every)
        start_eval, final = run_online_loop(
            self.run, "PPO", self.step, self.resuming, schedule, self.ppo_step, self.evaluate,
            self.save,
        )  # fmt: skip
        self.step = self.total
        eng.export_hf(self.actor, self.run.model_dir, self.tokenizer)
        eng.export_hf(self.critic, self.run.root / "critic", self.tokenizer)
        return finish_online_run(
            self.m, self.run, "PPO", start_eval, final, ("steps", self.step),
            {"model": str(self.run.model_dir), "critic": str(self.run.root / "critic")},
        )  # fmt: skip

    def close(self) -> None:
        worker = getattr(self, "reg_worker", None)
        if worker is not None:
            worker.close()
        close_reward_fn(getattr(self, "reward_fn", None))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _concat(exps: list[Experience], pad_id: int) -> Experience:
    if len(exps) == 1:
        return exps[0]
    import torch.nn.functional as F

    width_p = max(e.prompt_len for e in exps)
    width_r = max(e.responses.size(1) for e in exps)

    def pad_seq(e: Experience, x: torch.Tensor, value: float) -> torch.Tensor:
        # prompts are left-padded, responses right-padded
        left = width_p - e.prompt_len
        right = width_r - e.responses.size(1)
        return F.pad(x, (left, right), value=value)

    def pad_resp(e: Experience, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.pad(x, (0, width_r - x.size(1)), value=pad_id if name == "responses" else 0)

    return Experience(
        torch.cat([pad_seq(e, e.seq, pad_id) for e in exps]),
        torch.cat([pad_seq(e, e.attn, 0) for e in exps]),
        width_p,
        *(torch.cat([pad_resp(e, getattr(e, name), name) for e in exps]) for name in
          ("responses", "mask", "old_logprobs", "ref_logprobs", "values", "advantages", "returns")),
    )  # fmt: skip


def run(manifest: Manifest, run: RunDir, resuming: bool) -> dict[str, float]:
    recipe = PPORecipe(manifest, run, resuming)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.close()
