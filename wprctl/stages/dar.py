"""DAR: Dual-regularized Advantage Regression, online, iteration by iteration.

DAR replaces PPO's two regularizers (KL to pi_0, ratio clipping to pi_t) by one objective,

    max E[A] - beta * ( alpha * KL(pi || pi_0) + (1 - alpha) * KL(pi || pi_t) ),

whose closed-form target pi* ∝ pi_0^alpha pi_t^(1-alpha) exp(A/beta) is fitted by weighted
maximum likelihood on answers sampled from pi_t (math in `wprctl.rl.dar_math`). Two models: the
policy (from SFT, trained) and pi_0 (the same SFT weights, frozen), plus the reward model (frozen)
or, on APPS, the sandboxed executor's reward.

One iteration t:
1. `batch_size` prompts per process, `samples_per_prompt` (K) answers each, sampled from the
   current policy pi_t at `temperature`;
2. rewards from the reward model (or the executor);
3. Monte-Carlo advantages: reward minus its prompt's mean over the K answers, divided by the
   standard deviation of the whole batch (all processes);
4. sequence log-probs log pi_0(y|x) and log pi_t(y|x), with no grad, before any update;
5. weights w = min((pi_0/pi_t)^alpha * exp(A/beta), w_clip), in log space;
6. `steps_per_iteration` optimizer steps on -mean(w * log pi_theta(y|x));
7. pi_{t+1} = pi_theta (the policy simply keeps training; the next iteration samples from it).

Choices where the paper's text is not available here (defaults in `[dar]`):

- Sequence-level log-probs. The closed form is a distribution over whole answers, so the weight
  uses log pi(y|x) = the sum of the answer's token log-probs, and the loss is the sequence
  log-likelihood (a sum over tokens, not a per-token mean): the expected loss under pi_t is then
  Z(x) * CE(pi*, pi_theta), minimized exactly at pi*. Per-token weights would tilt each token by
  its own ratio, a different target; length-normalizing the log-likelihood would favour short
  answers. The sequence log-ratio grows with length, but alpha (0.1) scales it down, and log space
  plus the clip keep the weight finite.
- No self-normalization by default (`dar.self_normalize = false`): the loss is the issue's
  clipped weight as is, and the clip already bounds the variance. With unit-scale advantages and
  beta = 0.05, exp(A/beta) reaches w_clip = 20 at A = beta * ln 20 ≈ 0.15, so the weights are
  effectively "about 0 for worse-than-average answers, up to 20 for better ones". Setting it to
  true divides each prompt's K clipped weights by their mean: the self-normalized
  importance-sampling estimate, in which the per-prompt normalizer Z(x) of pi* cancels, so every
  prompt pulls equally hard whatever the spread of its rewards. (Adam makes the global scale of
  the weights nearly irrelevant; what normalization changes is how prompts weigh against each
  other.)
- One gradient step per iteration by default (`dar.steps_per_iteration = 1`), each step one
  optimizer step over all of the iteration's K x batch_size answers (accumulated over
  `micro_batch_size` chunks when set). At the first step theta = pi_t, where the weighted
  likelihood gradient is an unbiased (up to the clip) estimate of the gradient toward pi*. Further
  steps re-use the same few answers and fit their empirical reweighting; unlike PPO there is no
  ratio clip to stop that (DAR's pull toward pi_t is in the weights, not a constraint on theta),
  so they overfit the batch. More steps trade that for sample efficiency when sampling dominates.
- Sampling at temperature 1 (`dar.temperature = 1.0`, where PPO uses 0.8). The weights are
  importance weights for y ~ pi_t, and pi_t, pi_0 and the trained pi_theta are the models' own
  (temperature-1) distributions. Unlike PPO's zero-mean advantages, DAR's weights are all positive
  (about 9 on average at the paper's settings), so answers drawn from a sharpened pi_t^(1/T) add a
  large bias of their own: every iteration fits pi_theta to the sharper samples, compounding into
  repetitive answers without eos. Measured on the demo (100 iterations, lr 5e-4): at T = 0.8 the
  held-out KL to pi_0 reached 53-88 nats with 90% of answers cut without eos, at T = 1 it stayed
  at 19 with none cut, and the reward-model score rose from -0.54 to 1.45. A lower temperature
  can still be set; the weights do not correct for it.
- No answer is dropped (PPO drops very short ones): the per-prompt baseline needs all K. An
  answer cut at `max_answer_len` without eos is trained on as is; `train/no_eos_fraction` shows
  how often that happens (the paper reports 8% at alpha = 0).

Metrics per iteration (`metrics.jsonl`, TensorBoard): train/reward, train/kl_ref (k1 per answer:
sum of log pi_t - log pi_0 over its tokens), train/weight_mean, train/weight_max,
train/clip_fraction, train/ess ((sum w)^2 / sum w^2 / n, 1 = uniform), train/length,
train/no_eos_fraction, train/loss, train/lr (train/gold on the demo); held-out eval/reward,
eval/kl_ref, eval/length, eval/no_eos_fraction (eval/gold on the demo) at the start, every
`eval_every` iterations and at the end.

Runs: the checkpoint holds the policy engine (weights, optimizer, schedule), the iteration and
the RNG; iteration t's prompts are a function of t and held-out sampling uses its own seed, so a
run killed after a checkpoint and resumed ends with the uninterrupted run's weights (on CPU).
Under N processes each samples for its own prompts; rewards and log-probs are gathered so that
the advantage normalization and the weight statistics are those of the global batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from wprctl import engine as eng
from wprctl.console import console
from wprctl.manifest import Manifest
from wprctl.models import load_causal_lm
from wprctl.rl.dar_math import global_weights, sequence_logprobs, weighted_nll
from wprctl.rl.online import (
    LoopSchedule,
    all_gather_rows,
    build_reward_fn,
    close_reward_fn,
    evaluate_policy,
    finish_online_run,
    gold_reward_fn,
    open_online_stage,
    prompt_batch,
    run_online_loop,
)
from wprctl.rl.rollout import SamplingConfig, decode, generate, join, response_logits
from wprctl.runs import RunDir, check_resume_step
from wprctl.scoring import token_logprobs


class DARRecipe:
    def __init__(self, manifest: Manifest, run: RunDir, resuming: bool) -> None:
        self.m = manifest
        self.cfg = manifest.dar
        self.run = run
        self.resuming = resuming

    def setup(self) -> None:
        m, cfg = self.m, self.cfg
        st = open_online_stage(m, "dar", cfg.actor, cfg.batch_size, 1, "iteration")
        self.world, self.tokenizer, actor_path = st.world, st.tokenizer, st.actor_path
        self.pad_id, self.eos_id = st.pad_id, st.eos_id
        self.train_data, self.eval_data = st.train_data, st.eval_data
        self.batches_per_epoch = st.batches_per_epoch
        self.total = cfg.iterations or self.batches_per_epoch
        rows = cfg.batch_size * cfg.samples_per_prompt
        micro = min(cfg.micro_batch_size or rows, rows)
        self.n_micro = math.ceil(rows / micro)
        spec = eng.EngineSpec(
            zero_stage=m.deepspeed.zero_stage,
            offload_optimizer=m.deepspeed.offload_optimizer,
            offload_param=m.deepspeed.offload_param,
            micro_batch=micro,
            grad_accum=self.n_micro,
            grad_clip=cfg.grad_clip,
            dtype=eng.select_dtype(m.model.dtype),
        )
        trust = m.model.trust_remote_code
        policy = load_causal_lm(actor_path, trust_remote_code=trust)
        if m.model.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        self.actor = eng.init_trainable(
            policy,
            spec,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scheduler=cfg.scheduler,
            warmup_steps=cfg.warmup_steps,
            total_steps=self.total * cfg.steps_per_iteration,
        )
        self.ref = eng.init_frozen(load_causal_lm(actor_path, trust_remote_code=trust), spec)
        self.reward_fn: Any = build_reward_fn(
            m, cfg.reward_model, spec, stage="dar", pad_id=self.pad_id
        )
        self.gold = gold_reward_fn(m)
        self.sampling = SamplingConfig.from_section(cfg)
        self.iteration = 0
        if self.resuming and self.run.has_checkpoint():
            client = eng.load_checkpoint({"actor": self.actor}, self.run.checkpoint_dir)
            self.iteration = int(client["step"])
            check_resume_step(self.run, self.iteration, self.total, "dar.iterations")
            console.print(f"{self.run.name}: resumed from iteration {self.iteration}")

    # ----------------------------------------------------------------------------------------

    def sequence_logprobs(
        self,
        model: Any,
        seq: torch.Tensor,
        attn: torch.Tensor,
        P: int,
        responses: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        return sequence_logprobs(
            token_logprobs(response_logits(model, seq, attn, P), responses), mask
        )

    def iterate(self, iteration: int) -> dict[str, float]:
        """One DAR iteration on this process's prompts; returns its metrics (global where noted)."""
        cfg, K = self.cfg, self.cfg.samples_per_prompt
        timers = dict.fromkeys(
            ("time/generation", "time/reward", "time/forward", "time/training"), 0.0
        )
        batch = prompt_batch(
            self.train_data,
            self.m.project.seed,
            iteration,
            cfg.batch_size,
            self.batches_per_epoch,
        )
        prompt_ids = batch["input_ids"].repeat_interleave(K, 0)
        prompt_mask = batch["attention_mask"].repeat_interleave(K, 0)
        examples = [self.train_data.examples[int(i)] for i in batch["index"] for _ in range(K)]

        t0 = time.time()
        responses, mask = generate(
            self.actor, prompt_ids, prompt_mask, self.sampling, self.tokenizer
        )
        timers["time/generation"] += time.time() - t0
        seq, attn = join(prompt_ids, prompt_mask, responses, mask)
        P = prompt_ids.size(1)

        t0 = time.time()
        prompts_text = decode(self.tokenizer, prompt_ids, prompt_mask)
        responses_text = decode(self.tokenizer, responses, mask)
        rewards = self.reward_fn(seq, attn, prompts_text, responses_text, examples).float()
        timers["time/reward"] += time.time() - t0

        t0 = time.time()
        with torch.no_grad():
            # pi_t is the policy that sampled: its weights before this iteration's first step.
            old = self.sequence_logprobs(self.actor, seq, attn, P, responses, mask)
            ref = self.sequence_logprobs(self.ref, seq, attn, P, responses, mask)
        timers["time/forward"] += time.time() - t0

        # Over the global batch (every process's prompts): nothing depends on the world size.
        weights, stats = global_weights(
            rewards.view(-1, K), ref.view(-1, K), old.view(-1, K),
            alpha=cfg.alpha, beta=cfg.beta, w_clip=cfg.w_clip, self_normalize=cfg.self_normalize,
            gather=all_gather_rows, rank=eng.rank(),
        )  # fmt: skip
        weights = weights.reshape(-1).to(seq.device)

        t0 = time.time()
        n = seq.size(0)
        chunks = torch.arange(n, device=seq.device).tensor_split(self.n_micro)
        losses = []
        for _ in range(cfg.steps_per_iteration):
            step_loss = 0.0
            for c in chunks:
                logp = self.sequence_logprobs(self.actor, seq[c], attn[c], P, responses[c], mask[c])
                # DeepSpeed divides each micro-batch's loss by grad_accum: the chunks add up to
                # the whole batch's mean.
                loss = weighted_nll(logp, weights[c], denominator=n / self.n_micro)
                self.actor.backward(loss)
                self.actor.step()
                step_loss += float(loss.detach()) / self.n_micro
            losses.append(step_loss)
        timers["time/training"] += time.time() - t0

        has_eos = (responses == self.eos_id).any(1)
        local = {
            "reward": float(rewards.mean()),
            "kl_ref": float((old - ref).mean()),
            "length": float(mask.sum(1).mean()),
            "no_eos_fraction": float((~has_eos).float().mean()),
            "loss": losses[0],
        }
        if self.gold is not None:
            local["gold"] = sum(
                self.gold(p, r) for p, r in zip(prompts_text, responses_text, strict=True)
            ) / len(prompts_text)
        local.update(timers)
        # Every process has the same number of answers: the mean of the means is the global mean.
        row = eng.all_reduce_mean(local)
        row.update(stats)
        row["lr"] = self.actor.get_lr()[0]
        return row

    def evaluate(self) -> dict[str, float]:
        return evaluate_policy(
            self.actor,
            self.ref,
            self.reward_fn,
            self.eval_data,
            self.tokenizer,
            self.sampling,
            n_prompts=self.cfg.eval_prompts,
            batch_size=self.cfg.batch_size * self.cfg.samples_per_prompt,
            seed=self.m.project.seed,
            gold=self.gold,
        )

    def save(self, iteration: int) -> None:
        eng.save_checkpoint(
            {"actor": self.actor}, self.run.checkpoint_dir, iteration, {"stage": "dar"},
            self.cfg.keep_last,
        )  # fmt: skip

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        schedule = LoopSchedule(self.total, cfg.log_every, cfg.eval_every, cfg.save_every)
        start_eval, final = run_online_loop(
            self.run, "DAR", self.iteration, self.resuming, schedule, self.iterate,
            self.evaluate, self.save,
        )  # fmt: skip
        self.iteration = self.total
        eng.export_hf(self.actor, self.run.model_dir, self.tokenizer)
        return finish_online_run(
            self.m, self.run, "DAR", start_eval, final, ("iterations", self.iteration),
            {"model": str(self.run.model_dir)},
        )  # fmt: skip

    def close(self) -> None:
        close_reward_fn(getattr(self, "reward_fn", None))


def run(manifest: Manifest, run: RunDir, resuming: bool) -> dict[str, float]:
    recipe = DARRecipe(manifest, run, resuming)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.close()
