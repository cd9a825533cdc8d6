"""PPO for language models (InstructGPT step 3) on accelerate: rollout -> score -> KL penalty -> GAE -> clipped
PPO epochs, with checkpoints that resume exactly, NaN guards and per-phase timings.

TRL removed its PPOTrainer in 1.13; this one keeps its config keys and metric names (`ppo/kl`, `ppo/clipfrac`, ...)
and reuses the TRL helpers that remain (`selective_log_softmax`, `entropy_from_logits`, `disable_dropout_in_model`,
`create_reference_model`). The math lives in `align.rl.ppo` (pure torch, tested by hand); the rollout (generate,
score, KL penalty, GAE -> a typed `Rollout`) in `align/trainers/ppo_rollout.py`, checkpoint files in
`align/trainers/ppo_checkpoint.py`, and what `__init__` builds (accelerator, the `PPOModels` record, encoded data,
memory plan, optimizer, sampling engine) in `align/trainers/ppo_setup.py`: plain functions this trainer calls with
its models and settings. One update reads
top to bottom here: `train` -> `_rollout` (-> `make_rollout`) -> `_rollout_metrics` -> `_train_on`.

Four models: the policy (trained; full or LoRA), the reference (frozen copy, or the LoRA policy with its adapter
disabled: no second copy), the reward model (frozen, `*ForSequenceClassification` with one label, may have its own
tokenizer: responses are decoded and re-tokenized for it) and the value model (trained; a sequence-classification
model read at every token: backbone + `score` head on all hidden states). With a LoRA policy, `value_model_init:
policy_lora` puts the value model on the policy's own frozen base instead (a second LoRA adapter + a head:
`SharedBaseCritic`), so one copy of the weights serves policy, reference and value; `value_model_init: policy_head`
puts a value head on the policy's own last hidden state (`PolicyValueHead`, LoRA or not), so one forward and one
backward serve both losses. Ouyang et al. 2022:
https://arxiv.org/abs/2203.02155 ; Ziegler et al. 2019: https://arxiv.org/abs/1909.08593
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import TrainerControl, TrainerState
from transformers.trainer_utils import TrainOutput
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from align.data.padding import pad_right
from align.errors import AlignError
from align.io import last_checkpoint
from align.models.modeling import count_parameters, precision_summary
from align.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    masked_mean,
    policy_loss,
    response_mask,
    value_loss,
)
from align.trainers.ppo_checkpoint import VALUE_DIR, load_checkpoint, save_checkpoint
from align.trainers.ppo_config import PPOConfig
from align.trainers.ppo_models import PolicyValueHead, SharedBaseCritic, plain_model_state
from align.trainers.ppo_rollout import (
    Rollout,
    decode_responses,
    gen_logits_fit,
    generate_responses,
    make_rollout,
    reward_model_scores,
)
from align.trainers.ppo_setup import (
    build_engine,
    build_optimizer,
    build_ppo_models,
    check_inputs,
    encode_data,
    make_accelerator,
    plan_memory,
)
from align.trainers.sharding import full_parameters, is_sharded, state_dict_kwargs

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Trainer


class PPOTrainer:
    """PPO on an accelerate loop that mirrors Trainer's UX (tqdm, `report_to`, `logging_steps`, `save_steps`,
    `checkpoint-N` dirs, `train(resume_from_checkpoint=...)`, `save_model`).

    Args:
        args: `PPOConfig`.
        policy: causal LM to train (e.g. the SFT model); wrapped with `peft_config` if given (LoRA).
        ref_policy: frozen reference; None = a frozen copy of the policy, or, for a peft policy, the policy with its
            adapters disabled.
        reward_model: `*ForSequenceClassification`, num_labels=1; `config.align_reward_offset` is subtracted.
        value_model: `*ForSequenceClassification` read per token; None = built per `args.value_model_init`
            ('policy_lora': a critic adapter + head on the LoRA policy's base, `SharedBaseCritic`; 'policy_head': a
            head on the policy's own last hidden state, `PolicyValueHead`).
        processing_class: the policy's tokenizer. reward_tokenizer: the reward model's (None = the policy's).
        train_dataset: prompts, column "prompt" (str; the chat template is applied when the tokenizer has one) or
            pre-tokenized "input_ids" (used as is).
        reward_fn: `(prompts, responses) -> (B,) tensor`, used instead of reward_model (tests, rule-based rewards).
        eval_fn: `(prompts, responses) -> float` on eval_dataset's prompts, logged as `eval/<eval_metric>`.
        eval_metric: name of that metric: "gold_score" (tiny world's labeler, default) or e.g. "reward".
        format_fn: `(prompt, response) -> str` for the reward model; None = `align.data.rankings.format_for_reward`.
        ptx_dataset: pretraining-style data ("text" or "input_ids") for PPO-ptx when `args.ptx_coef > 0`.
        callbacks: `transformers.TrainerCallback`s; `on_train_begin`, `on_step_end`, `on_log`, `on_save`,
            `on_train_end` are called, and `control.should_training_stop` is honoured.
    """

    def __init__(
        self,
        args: PPOConfig,
        policy,
        ref_policy=None,
        reward_model=None,
        value_model=None,
        processing_class=None,
        reward_tokenizer=None,
        train_dataset=None,
        eval_dataset=None,
        peft_config=None,
        reward_fn: Callable[[list[str], list[str]], torch.Tensor] | None = None,
        eval_fn: Callable[[list[str], list[str]], float] | None = None,
        format_fn: Callable[[str, str], str] | None = None,
        ptx_dataset=None,
        callbacks: list | None = None,
        eval_metric: str = "gold_score",
    ):
        check_inputs(args, processing_class, reward_model, reward_fn, train_dataset, ptx_dataset)
        self.args, self.processing_class = args, processing_class
        self.reward_fn, self.eval_fn, self.format_fn, self.eval_metric = reward_fn, eval_fn, format_fn, eval_metric
        self.callbacks = list(callbacks or [])
        # Seeded before the models are built: LoRA and a fresh value head take their first weights from this RNG
        self.accelerator = acc = make_accelerator(args)
        self.models = models = build_ppo_models(
            args, policy, tokenizer=processing_class, ref_policy=ref_policy, reward_model=reward_model,
            value_model=value_model, reward_tokenizer=reward_tokenizer, peft_config=peft_config,
        )  # fmt: skip
        self.train_prompts, self.eval_prompts, self.ptx_rows = encode_data(
            args, processing_class, models.policy, acc, train_dataset, eval_dataset, ptx_dataset
        )
        self.world_size = acc.num_processes
        self.num_updates = args.num_updates(len(self.train_prompts[0]), self.world_size)
        if args.local_batch_size * self.world_size > len(self.train_prompts[0]):
            logger.warning("ppo: a rollout takes %d prompts but train_dataset has %d; prompts repeat within an "
                           "update.", args.local_batch_size * self.world_size, len(self.train_prompts[0]))  # fmt: skip
        self._use_gen_logits = gen_logits_fit(models.policy, mixed_precision=acc.mixed_precision,
                                              batch_size=min(args.local_rollout_forward_batch_size,
                                                             args.local_batch_size),
                                              max_new_tokens=args.max_new_tokens)  # fmt: skip
        # Memory plan: logged, and on a GPU checked against its free memory before any model moves there
        prompt_length = max(len(x) for x in self.train_prompts[0])
        self.memory_plan = plan_memory(models, args, acc, prompt_length=prompt_length, gen_logits=self._use_gen_logits)
        for frozen in models.frozen():
            frozen.to(acc.device)
        self.optimizer_steps = self.num_updates * args.num_ppo_epochs * args.num_mini_batches
        wrapper, optimizer, self.lr_scheduler = build_optimizer(models, args, self.optimizer_steps)
        self.model, self.optimizer = acc.prepare(wrapper, optimizer)
        self.sampler, self.vllm = build_engine(args, acc, self.policy, processing_class, models.eos_token_ids)
        kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.adaptive_kl else None
        self.kl_ctl = kl_ctl or FixedKLController(args.kl_coef)
        self.state = TrainerState(max_steps=self.num_updates, logging_steps=args.logging_steps,
                                  save_steps=args.save_steps, eval_steps=args.eval_steps,
                                  train_batch_size=args.local_batch_size, is_world_process_zero=acc.is_main_process,
                                  is_local_process_zero=acc.is_local_main_process)  # fmt: skip
        self.control, self.episodes = TrainerControl(), 0
        self.samples: list[dict[str, Any]] = []
        self._perm_cache: dict[int, torch.Tensor] = {}
        self._log_window: dict[str, list[float]] = defaultdict(list)

    # ---------------------------------------------------------------- properties

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self):
        return self.accelerator.unwrap_model(self.model).value_model

    @property
    def ref_policy(self):
        """The frozen reference; None for a LoRA policy (the policy with its adapters disabled)."""
        return self.models.ref_policy

    @property
    def reward_model(self):
        return self.models.reward_model

    @property
    def is_peft(self) -> bool:
        return self.models.is_peft

    @property
    def eos_token_ids(self):
        return self.models.eos_token_ids

    # ---------------------------------------------------------------- rollout

    def _batch_indices(self, step: int) -> list[int]:
        """This process's prompt indices for update `step` (0-based): a fixed function of (seed, step), so a resumed
        run sees exactly the prompts an uninterrupted one would."""
        n = len(self.train_prompts[0])
        global_batch = self.args.local_batch_size * self.world_size
        start = step * global_batch + self.accelerator.process_index * self.args.local_batch_size
        out = []
        for pos in range(start, start + self.args.local_batch_size):
            epoch, i = divmod(pos, n)
            if epoch not in self._perm_cache:
                self._perm_cache = {
                    epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + epoch))
                }
            out.append(int(self._perm_cache[epoch][i]))
        return out

    def _rollout(self, step: int) -> tuple[Rollout, dict[str, float], list[dict]]:
        """This process's rollout of update `step` (1-based), its metrics (global: all processes) and up to two
        samples; the KL controller takes this update's KL."""
        idx = self._batch_indices(step - 1)
        if self.vllm is not None:
            self.vllm.sync_weights()  # the policy as the last update left it (LoRA merged in for the push)
        if self.sampler is not None:
            self.sampler.sync()  # likewise: the merged copy align's decode samples from
        with self._full_parameters():
            rollout = make_rollout(
                self.policy,
                self.ref_policy,
                self.value_model,
                self.processing_class,
                [self.train_prompts[0][i] for i in idx],
                [self.train_prompts[1][i] for i in idx],
                self.score,
                args=self.args,
                kl_coef=self.kl_ctl.value,
                eos_token_ids=self.eos_token_ids,
                accelerator=self.accelerator,
                use_gen_logits=self._use_gen_logits,
                engine=self.vllm or self.sampler,
            )
        self._check_finite(step, **{"ppo/score": rollout.raw_scores})
        metrics = self._rollout_metrics(rollout)
        self.kl_ctl.update(metrics["ppo/kl"], rollout.kl.shape[0] * self.world_size)
        samples = [
            {"step": step, "prompt": p, "response": r, "score": float(s)}
            for p, r, s in zip(
                rollout.prompts[:2], rollout.response_texts[:2], rollout.raw_scores[:2].tolist(), strict=False
            )
        ]
        return rollout, metrics, samples

    def _rollout_metrics(self, r: Rollout) -> dict[str, float]:
        """TRL's rollout metrics over all processes (per-response values gathered; `ppo/value_mean` this process's)."""
        g = self.accelerator.gather
        kl_seq, score_g, raw_g = g(r.kl.sum(1)), g(r.scores), g(r.raw_scores)
        return {
            "ppo/kl": kl_seq.mean().item(),
            "ppo/reward": g(r.rewards.sum(1)).mean().item(),
            # the score PPO optimizes: the reward model's (or reward function's), less missing_eos_penalty, clipped
            "ppo/score": score_g.mean().item(),
            "ppo/score_std": score_g.std().item() if score_g.numel() > 1 else 0.0,
            # the reward model's own score, before the penalty and the clip, and what they took off it
            "ppo/rm_score": raw_g.mean().item(),
            "ppo/rm_score_std": raw_g.std().item() if raw_g.numel() > 1 else 0.0,
            "ppo/score_adjustment": (score_g - raw_g).mean().item(),
            "ppo/response_length": g(r.mask.sum(1).float()).mean().item(),
            "ppo/eos_rate": g(r.has_eos.float()).mean().item(),
            "ppo/kl_coef": r.kl_coef,
            "ppo/explained_variance": explained_variance(
                self._gather_tokens(r.values), self._gather_tokens(r.returns), self._gather_tokens(r.mask)
            ).item(),
            "ppo/value_mean": masked_mean(r.values, r.mask).item(),
            "time/generation": r.generation_time,
            "time/sampling": r.sampling_time,
            "time/scoring": r.scoring_time,
        }

    def _gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, T)` of this process -> `(world_size * B, max T)` of all (right-padded with 0 / False)."""
        if self.world_size == 1:
            return x
        acc = self.accelerator
        return acc.gather(acc.pad_across_processes(x.long() if x.dtype == torch.bool else x, dim=1)).to(x.dtype)

    # ---------------------------------------------------------------- optimization

    def _micro_inputs(self, rollout: Rollout, idx: torch.Tensor) -> dict[str, Any]:
        """The rows `idx` of a rollout, trimmed to their own longest prompt and response (less padding compute)."""
        P = rollout.prompt_length
        mask = rollout.mask[idx]
        t_len = int(mask.sum(1).max())
        first = int((rollout.attention_mask[idx, :P].sum(0) > 0).long().argmax())  # first column a prompt token uses
        cols = slice(first, P + t_len)
        return {
            "input_ids": rollout.query_responses[idx, cols],
            "attention_mask": rollout.attention_mask[idx, cols],
            "position_ids": rollout.position_ids[idx, cols],
            "responses": rollout.responses[idx, :t_len],
            "mask": mask[:, :t_len],
            "logprobs": rollout.logprobs[idx, :t_len],
            "values": rollout.values[idx, :t_len],
            "advantages": rollout.advantages[idx, :t_len],
            "returns": rollout.returns[idx, :t_len],
        }

    def _ptx_batch(self, step: int, k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step * 10_007 + k)
        rows = torch.randint(len(self.ptx_rows), (self.args.per_device_train_batch_size,), generator=g).tolist()
        ids, mask = pad_right([self.ptx_rows[r] for r in rows], self.processing_class.pad_token_id)
        return {"input_ids": ids.to(self.accelerator.device), "attention_mask": mask.to(self.accelerator.device)}

    def _train_on(self, rollout: Rollout, step: int) -> dict[str, float]:
        """`num_ppo_epochs` passes over the rollout in `num_mini_batches` optimizer steps (clipped policy and value
        losses, entropy bonus, PPO-ptx); the mean losses and statistics over all processes."""
        args, acc = self.args, self.accelerator
        B = rollout.query_responses.shape[0]
        mini, micro = args.local_mini_batch_size, args.per_device_train_batch_size
        sums: dict[str, float] = defaultdict(float)
        self.model.train()
        k = 0
        n_micro = args.num_ppo_epochs * args.num_mini_batches * args.gradient_accumulation_steps
        warmup = step <= args.critic_warmup_steps  # `step` counts updates from 1
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(B)
            for m in range(args.num_mini_batches):
                mb = order[m * mini : (m + 1) * mini]
                mb_tokens = rollout.mask[mb].sum().clamp(min=1)
                for a in range(args.gradient_accumulation_steps):
                    x = self._micro_inputs(rollout, mb[a * micro : (a + 1) * micro])
                    n_tok = x["mask"].sum()
                    weight = n_tok / mb_tokens  # token mean over the whole mini-batch, however it is split
                    ptx = self._ptx_batch(step, k) if self.ptx_rows is not None else None
                    k += 1
                    last = a == args.gradient_accumulation_steps - 1
                    sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
                    with sync:
                        with acc.autocast():
                            logits, vpred, ptx_loss = self.model(
                                x["input_ids"], x["attention_mask"], x["position_ids"], x["responses"].shape[1], ptx
                            )
                        logits = logits.float()
                        new_logprobs = selective_log_softmax(logits, x["responses"], args.temperature)
                        pg, clipfrac, approx_kl = policy_loss(
                            new_logprobs, x["logprobs"], x["advantages"], x["mask"], args.cliprange
                        )
                        vf, vf_clipfrac = value_loss(vpred, x["values"], x["returns"], x["mask"], args.cliprange_value)
                        with torch.set_grad_enabled(args.entropy_coef > 0):
                            entropy = masked_mean(entropy_from_logits(logits / args.temperature), x["mask"])
                        # during the critic's warm-up the policy's terms are kept at weight 0, so every parameter
                        # stays in the graph (DDP), and their gradients are dropped before the step
                        keep = 0.0 if warmup else 1.0
                        loss = (keep * (pg - args.entropy_coef * entropy) + args.vf_coef * vf) * weight
                        checks = {"ppo/policy_loss": pg, "ppo/value_loss": vf}
                        if ptx_loss is not None:
                            loss = loss + keep * args.ptx_coef * ptx_loss / args.gradient_accumulation_steps
                            checks["ppo/ptx_loss"] = ptx_loss
                        self._check_finite(step, **checks)
                        acc.backward(loss)
                    w = float(weight) / (args.num_ppo_epochs * args.num_mini_batches)
                    for name, v in (
                        ("policy_loss", pg),
                        ("value_loss", vf),
                        ("clipfrac", clipfrac),
                        ("approx_kl", approx_kl),
                        ("vf_clipfrac", vf_clipfrac),
                        ("entropy", entropy),
                    ):
                        sums[f"ppo/{name}"] += float(v.detach()) * w
                    if ptx_loss is not None:
                        sums["ppo/ptx_loss"] += float(ptx_loss.detach()) / n_micro
                if warmup:  # AdamW skips a parameter without a gradient: no update, no moment, no decay
                    for p in self.optimizer.param_groups[0]["params"]:
                        p.grad = None
                if args.max_grad_norm and args.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self._check_finite(step, **{"ppo/grad_norm": torch.as_tensor(norm)})
                    sums["ppo/grad_norm"] += float(norm) / (args.num_ppo_epochs * args.num_mini_batches)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        if self.world_size > 1:
            names = sorted(sums)
            reduced = acc.reduce(torch.tensor([sums[n] for n in names], device=acc.device), "mean")
            sums = dict(zip(names, reduced.tolist(), strict=True))
        sums["ppo/lr"] = self.lr_scheduler.get_last_lr()[0]
        if args.critic_warmup_steps:
            sums["ppo/critic_warmup"] = float(warmup)
        return dict(sums)

    # ---------------------------------------------------------------- train

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None):
        """Run PPO updates up to `num_updates`; `resume_from_checkpoint`: a checkpoint dir, or True for the newest
        complete one in `output_dir`. Returns `transformers.trainer_utils.TrainOutput`."""
        args, acc = self.args, self.accelerator
        if resume_from_checkpoint:
            path = last_checkpoint(args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path is None:
                raise AlignError(
                    f"{args.output_dir}: no complete checkpoint-N to resume from. Drop resume_from_checkpoint."
                )
            self._load_checkpoint(Path(path))
        if acc.is_main_process:
            self._log_summary()
        if args.report_to:  # on every process: accelerate keeps the trackers on the main one
            acc.init_trackers(args.project or "align", config=_plain(args.to_sanitized_dict()))
        self._callback("on_train_begin")
        start = self.state.global_step
        bar = tqdm(
            total=self.num_updates,
            initial=start,
            desc="PPO",
            disable=not acc.is_main_process or bool(args.disable_tqdm),
        )
        every = max(1, self.num_updates // args.num_sample_generations) if args.num_sample_generations else 0
        t_start = time.perf_counter()
        saved_at = None
        for step in range(start + 1, self.num_updates + 1):
            rollout, metrics, samples = self._rollout(step)
            t0 = time.perf_counter()
            metrics.update(self._train_on(rollout, step))
            metrics["time/training"] = time.perf_counter() - t0
            del rollout
            self.episodes += args.local_batch_size * self.world_size
            metrics["ppo/episodes"] = self.episodes
            self.state.global_step = step
            self.state.epoch = self.episodes / len(self.train_prompts[0])
            for key, value in metrics.items():
                self._log_window[key].append(value)
            if every and (step % every == 0 or step == 1) and acc.is_main_process:
                self.samples.extend(samples)
                for s in samples:
                    logger.info(
                        "ppo: update %d sample (score %.3f): %r -> %r", step, s["score"], s["prompt"], s["response"]
                    )
            bar.update(1)
            bar.set_postfix(score=f"{metrics['ppo/score']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
            self._callback("on_step_end")
            if step % self._every(args.logging_steps) == 0 or step == self.num_updates:
                self.log({})
            if self._should_eval(step):
                self.log(self.evaluate())
            if args.save_strategy == "steps" and args.save_steps and step % self._every(args.save_steps) == 0:
                self._save_checkpoint()
                saved_at = step
            if self.control.should_training_stop:
                break
        bar.close()
        if self._log_window:
            self.log({})
        final_step = self.state.global_step
        if self.eval_fn is not None and self.eval_prompts is not None and not self._evaluated_at(final_step):
            self.log(self.evaluate())
        if args.save_strategy != "no" and saved_at != self.state.global_step and self.state.global_step > start:
            self._save_checkpoint()
        self._callback("on_train_end")
        if args.report_to:
            acc.end_training()
        runtime = time.perf_counter() - t_start
        losses = [h["ppo/policy_loss"] for h in self.state.log_history if "ppo/policy_loss" in h]
        loss = sum(losses) / len(losses) if losses else math.nan
        return TrainOutput(self.state.global_step, loss, {"train_runtime": runtime, "episodes": self.episodes})

    def _every(self, value: float) -> int:
        """Trainer's `*_steps` semantics: an int >= 1 is a number of updates, a float < 1 a share of the run."""
        return max(1, math.ceil(value * self.num_updates) if value < 1 else int(value))

    def _should_eval(self, step: int) -> bool:
        args = self.args
        return bool(
            self.eval_fn is not None
            and self.eval_prompts is not None
            and args.eval_strategy == "steps"
            and args.eval_steps
            and step % self._every(args.eval_steps) == 0
        )

    def log(self, logs: dict[str, float]) -> None:
        """Log `logs` plus the mean of every metric since the last log (Trainer's averaging), on the main process."""
        out = {k: sum(v) / len(v) for k, v in self._log_window.items()}
        self._log_window.clear()
        out.update(logs)
        if not out:
            return
        out["step"] = self.state.global_step
        self.state.log_history.append(out)
        if self.accelerator.is_main_process:
            if self.args.report_to:
                self.accelerator.log({k: v for k, v in out.items() if k != "step"}, step=self.state.global_step)
            # 4 significant digits, not 4 decimals: a learning rate of 2e-5 must not print as 0.0.
            shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in out.items()}
            logger.info("%s", shown)
        self._callback("on_log", logs=out)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`eval/<eval_metric>` (default `eval/gold_score`): `eval_fn` on responses to every eval prompt (decoding
        per `eval_temperature`)."""
        if self.eval_fn is None or self.eval_prompts is None:
            return {}
        ids, texts = self.eval_prompts
        rank, world = self.accelerator.process_index, self.world_size
        mine = list(range(rank, len(ids), world))
        responses: list[str] = []
        with self._full_parameters():  # every rank enters (a collective under FSDP2), even one with no prompt
            if mine:
                _, _, resp, _ = self.generate(
                    [ids[i] for i in mine],
                    sample=self.args.eval_temperature > 0,
                    temperature=self.args.eval_temperature or None,
                )
                mask, has_eos = response_mask(resp, self.eos_token_ids)
                responses = decode_responses(self.processing_class, resp, mask, has_eos)
        pairs = (
            gather_object([(i, r) for i, r in zip(mine, responses, strict=True)])
            if world > 1
            else list(zip(mine, responses, strict=True))
        )
        pairs = sorted(pairs)
        score = float(self.eval_fn([texts[i] for i, _ in pairs], [r for _, r in pairs]))
        return {f"eval/{self.eval_metric}": score}

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], *, sample: bool = True, temperature: float | None = None):
        """Responses of the policy to `prompt_ids` (`align.trainers.ppo_rollout.generate_responses`). Returns
        (query_responses `(B, P + T)`, prompt_mask `(B, P)`, responses `(B, T)`, old logprobs `(B, T)` or None)."""
        return generate_responses(
            self.policy,
            self.processing_class,
            prompt_ids,
            args=self.args,
            eos_token_ids=self.eos_token_ids,
            accelerator=self.accelerator,
            sample=sample,
            temperature=temperature,
            output_logits=self._use_gen_logits,
            engine=self._synced_sampler(),
        )

    def _synced_sampler(self):
        """The sampler copy, synced with the policy, when generation_backend is align; None otherwise."""
        if self.sampler is None:
            return None
        self.sampler.sync()
        return self.sampler

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Scores `(B,)` float32 of (prompt, response) texts: `reward_fn`, or the reward model minus its offset."""
        if self.reward_fn is not None:
            return torch.as_tensor(self.reward_fn(prompts, responses), dtype=torch.float32).reshape(-1).cpu()
        return reward_model_scores(
            self.reward_model,
            self.models.reward_tokenizer,
            prompts,
            responses,
            format_fn=self.format_fn,
            offset=self.models.reward_offset,
            batch_size=self.args.local_rollout_forward_batch_size,
            accelerator=self.accelerator,
        )

    def _full_parameters(self):
        """`align.trainers.sharding.full_parameters` of the policy + value wrapper: under FSDP2 its shards gathered
        for generation, scoring and saving, which call the policy and critic below the sharded root."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return full_parameters(self.model, getattr(plugin, "reshard_after_forward", True))

    # ---------------------------------------------------------------- checkpoints and saving

    def _save_checkpoint(self) -> Path:
        with self._full_parameters():
            final = self._write_checkpoint()
        self._callback("on_save")
        return final

    def _write_checkpoint(self) -> Path:
        return save_checkpoint(
            self.args.output_dir,
            self.state,
            {
                "global_step": self.state.global_step,
                "episodes": self.episodes,
                "kl_controller": self.kl_ctl.state_dict(),
                "world_size": self.world_size,
                # what the next log averages and the samples so far: a resumed run logs and records the same
                "log_window": self._log_window,
                "samples": self.samples,
            },
            accelerator=self.accelerator,
            policy=self.policy,
            value_model=self.value_model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            save_total_limit=self.args.save_total_limit,
            model=self.model,
        )

    def _load_checkpoint(self, ckpt: Path) -> None:
        ppo_state, saved = load_checkpoint(
            ckpt,
            accelerator=self.accelerator,
            policy=self.policy,
            value_model=self.value_model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            is_peft=self.is_peft,
            world_size=self.world_size,
            model=self.model,
        )
        self.kl_ctl.load_state_dict(ppo_state["kl_controller"])
        self.episodes = int(ppo_state["episodes"])
        self.samples = list(ppo_state.get("samples", []))
        self._log_window.clear()
        self._log_window.update({k: list(v) for k, v in ppo_state.get("log_window", {}).items()})
        self.state.global_step = saved.global_step
        self.state.epoch = saved.epoch
        self.state.log_history = saved.log_history
        logger.info("ppo: resumed from %s at update %d (kl_coef %.4g)", ckpt, saved.global_step, self.kl_ctl.value)

    def _evaluated_at(self, step: int) -> bool:
        """Whether log_history holds an eval of update `step`: the loop's, or the one a run resumed from its final
        checkpoint restored (evaluating again would log it twice)."""
        return any(h.get("step") == step and any(k.startswith("eval/") for k in h) for h in self.state.log_history)

    def save_model(self, output_dir: str | os.PathLike | None = None, merge_adapter: bool | None = None) -> None:
        """Save the policy as a plain HF causal LM (pipeline-loadable) with tokenizer and a generation config that
        stops at EOS; a LoRA policy is merged when `merge_adapter` (default: `args.merge_adapter` if the config has
        it), else saved as an adapter (its own only, not the critic's). The value model goes to
        `output_dir/value_model/`, a plain `*ForSequenceClassification` (a shared-base critic is merged into a copy
        of the base there); a value head on the policy's trunk to `output_dir/value_head.safetensors`, beside the
        policy it reads."""
        acc = self.accelerator
        out = Path(output_dir or self.args.output_dir)
        merge = merge_adapter if merge_adapter is not None else bool(getattr(self.args, "merge_adapter", False))
        acc.wait_for_everyone()
        with self._full_parameters():
            if acc.is_main_process:
                self._save_policy_and_value(out, merge)
        acc.wait_for_everyone()

    def _save_policy_and_value(self, out: Path, merge: bool) -> None:
        tok = self.processing_class
        policy = self.policy
        value = self.value_model
        shared = isinstance(value, SharedBaseCritic)
        if shared:
            value = value.to_sequence_classifier()  # before any merge below: it reads the unmerged base
        # Under FSDP2 the weights are read off the gathered parameters (state_dict_kwargs), and a merge is computed
        # from them (FSDP2 modules cannot be deep-copied)
        sharded = is_sharded(self.model)
        if self.is_peft and merge and sharded:
            policy_state = {"state_dict": plain_model_state(policy, policy.active_adapter)}
            policy = policy.get_base_model()
        else:
            if self.is_peft and merge:
                policy = copy.deepcopy(policy).merge_and_unload()  # merges the active (policy) adapter only
            policy_state = state_dict_kwargs(policy, sharded)
        gc = policy.generation_config
        gc.eos_token_id, gc.pad_token_id = self.eos_token_ids, tok.pad_token_id
        if tok.bos_token_id is not None:
            gc.bos_token_id = tok.bos_token_id
        if shared and not merge:
            policy.save_pretrained(out, selected_adapters=[self.value_model.policy_adapter], **policy_state)
        else:
            policy.save_pretrained(out, **policy_state)
        tok.save_pretrained(out)
        if isinstance(value, PolicyValueHead):  # the head alone: its trunk is the policy just saved
            value.save_pretrained(out)
            return
        value.save_pretrained(out / VALUE_DIR, **state_dict_kwargs(value, sharded))
        tok.save_pretrained(out / VALUE_DIR)

    # ---------------------------------------------------------------- misc

    def _check_finite(self, step: int, **values: torch.Tensor) -> None:
        """Stop on nan/inf, naming the update and the metric; all ranks stop together (no hang in a collective)."""
        bad = [name for name, v in values.items() if not bool(torch.isfinite(v).all())]
        if self.world_size > 1:
            flags = torch.tensor([float(bool(bad))], device=self.accelerator.device)
            if float(self.accelerator.reduce(flags, "sum")) > 0 and not bad:
                bad = ["(on another process)"]
        if bad:
            ckpt = last_checkpoint(self.args.output_dir)
            where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
            raise AlignError(
                f"ppo: update {step}: {', '.join(bad)} is nan or inf; stopped ({where}). Lower learning_rate, set "
                "reward_clip or max_grad_norm, and check the reward model's outputs."
            )

    def _callback(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(
                    self.args,
                    self.state,
                    self.control,
                    model=self.policy,
                    processing_class=self.processing_class,
                    **kwargs,
                )

    def _log_summary(self) -> None:
        args = self.args
        total, trainable = count_parameters(self.model)
        logger.info(
            "ppo: %d prompts, %d updates x %d prompts (%d per process x %d), %d epochs x %d mini-batches of %d "
            "(micro %d); policy+value %.2fM params (%.2fM trainable)%s; reference: %s; value: %s; reward: %s; old "
            "logprobs from %s; %s",
            len(self.train_prompts[0]),
            self.num_updates,
            args.local_batch_size * self.world_size,
            args.local_batch_size,
            self.world_size,
            args.num_ppo_epochs,
            args.num_mini_batches,
            args.local_mini_batch_size,
            args.per_device_train_batch_size,
            total / 1e6,
            trainable / 1e6,
            " (LoRA)" if self.is_peft else "",
            "policy with adapters disabled" if self.ref_policy is None else "frozen copy",
            _value_summary(self.value_model),
            "reward_fn" if self.reward_fn is not None else type(self.reward_model).__name__,
            "generate's logits" if self._use_gen_logits else "a policy forward",
            precision_summary(args),
        )


def _value_summary(value_model) -> str:
    if isinstance(value_model, SharedBaseCritic):
        return "critic adapter + head on the policy's base"
    if isinstance(value_model, PolicyValueHead):
        return "a head on the policy's last hidden state (one forward for both)"
    return type(value_model).__name__


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in d.items()}
