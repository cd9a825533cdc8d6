"""The data and rollout half of align's `PPOTrainer` (InstructGPT step 3): prompts and PPO-ptx text tokenized, the
fixed prompt order that makes resume exact, generation (KV cache, left padding), log-probs of the policy and the
reference, values, reward-model scores, the per-token KL penalty and GAE. The update half (PPO epochs, logging,
`train`) is in `align/trainers/ppo.py`, checkpoints in `align/trainers/ppo_checkpoint.py`."""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch import nn

from align.errors import AlignError
from align.io import last_checkpoint
from align.modeling import max_positions
from align.rl.ppo import gae, kl_penalty, masked_mean, masked_whiten, per_token_rewards, response_mask
from align.trainers.padding import pad_left, pad_right
from align.trainers.ppo_models import (
    policy_logits,
    value_head_forward,
)

logger = logging.getLogger(__name__)

# Old logprobs come from generate's own logits when they fit in this many bytes per rollout chunk (saves one full
# policy forward per update); larger vocabularies fall back to a forward pass.
GEN_LOGITS_BUDGET = 256 * 2**20


class PPORolloutMixin:
    """Data and rollout methods of `PPOTrainer` (they use its args, accelerator, tokenizers and models)."""

    # ---------------------------------------------------------------- data in

    def _encode_prompt(self, text: str) -> list[int]:
        tok = self.processing_class
        if getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return tok(rendered, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    def _prepare_prompts(self, ds, name: str) -> tuple[list[list[int]], list[str]]:
        """(token ids, prompt texts) of every row; AlignError naming the row on bad data."""
        if isinstance(ds, list):
            from datasets import Dataset

            ds = Dataset.from_list(ds)
        columns = list(ds.column_names)
        if "input_ids" not in columns and "prompt" not in columns:
            raise AlignError(f"{name}: no 'prompt' or 'input_ids' column (columns present: {columns}). Rename one.")
        if len(ds) == 0:
            raise AlignError(f"{name}: no rows.")
        tok = self.processing_class

        def encode(batch, indices):
            out = {"ids": [], "text": []}
            for j, i in enumerate(indices):
                if "input_ids" in batch:
                    ids = list(batch["input_ids"][j])
                    text = batch["prompt"][j] if "prompt" in batch else tok.decode(ids, skip_special_tokens=True)
                else:
                    text = batch["prompt"][j]
                    if not isinstance(text, str):
                        raise AlignError(f"{name}:{i + 1}: 'prompt' is {type(text).__name__}, expected a string.")
                    ids = self._encode_prompt(text)
                if not ids:
                    raise AlignError(f"{name}:{i + 1}: the prompt encodes to no tokens. Drop or fix the row.")
                out["ids"].append(ids)
                out["text"].append(text)
            return out

        with self.accelerator.main_process_first():
            enc = ds.map(encode, batched=True, with_indices=True, remove_columns=columns, desc=f"Tokenizing {name}")
        ids, texts = enc["ids"], enc["text"]
        limit = self.args.max_prompt_length
        if limit is not None:
            cut = sum(len(x) > limit for x in ids)
            if cut:
                logger.warning(
                    "%s: %d of %d prompts are longer than max_prompt_length=%d; kept their last %d tokens.",
                    name,
                    cut,
                    len(ids),
                    limit,
                    limit,
                )
                ids = [x[-limit:] for x in ids]
        return ids, texts

    def _prepare_ptx(self, ds, policy) -> list[list[int]]:
        columns = list(ds.column_names)
        if "input_ids" in columns:
            return [list(x) for x in ds["input_ids"]]
        if "text" not in columns:
            raise AlignError(f"ptx_dataset: no 'text' or 'input_ids' column (columns present: {columns}).")
        limit = max_positions(policy.config)
        return [
            self.processing_class(t, truncation=limit is not None, max_length=limit)["input_ids"] for t in ds["text"]
        ]

    def _gen_logits_fit(self, policy) -> bool:
        """Whether generate's logits can give the old logprobs: float32 only (a bf16 forward and the KV-cache path
        differ by ~1e-2, which would show as clipping at ratio 1), and only when they fit the memory budget."""
        if self.accelerator.mixed_precision != "no":
            return False
        vocab = policy.get_output_embeddings().weight.shape[0]
        chunk = min(self.args.local_rollout_forward_batch_size, self.args.local_batch_size)
        return chunk * self.args.max_new_tokens * vocab * 4 <= GEN_LOGITS_BUDGET

    # ---------------------------------------------------------------- data order

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

    # ---------------------------------------------------------------- rollout

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], *, sample: bool = True, temperature: float | None = None):
        """Responses to `prompt_ids` (left-padded, KV cache, chunked). Returns (query_responses `(B, P + T)`,
        prompt_mask `(B, P)`, responses `(B, T)`, old logprobs `(B, T)` or None)."""
        from transformers import GenerationConfig
        from trl.trainer.utils import selective_log_softmax

        args, tok = self.args, self.processing_class
        temperature = args.temperature if temperature is None else temperature
        sample = sample and temperature > 0
        gen_config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens or None,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=args.top_k if sample else None,
            top_p=args.top_p if sample else None,
            eos_token_id=self.eos_token_ids,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=sample and self._use_gen_logits,
        )
        policy = self.policy
        was_training = policy.training
        policy.eval()
        input_ids, prompt_mask = pad_left(prompt_ids, tok.pad_token_id)
        device = self.accelerator.device
        responses, logprobs = [], []
        chunk = args.local_rollout_forward_batch_size
        try:
            for s in range(0, len(prompt_ids), chunk):
                ids, mask = input_ids[s : s + chunk].to(device), prompt_mask[s : s + chunk].to(device)
                with self.accelerator.autocast():
                    out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
                resp = out.sequences[:, ids.shape[1] :]
                responses.append(resp)
                if out.logits is not None:
                    logits = torch.stack(out.logits, dim=1)
                    logprobs.append(selective_log_softmax(logits, resp, temperature=temperature))
                    del logits
        finally:
            policy.train(was_training)
        width = max(r.shape[1] for r in responses)
        responses = torch.cat(
            [nn.functional.pad(r, (0, width - r.shape[1]), value=tok.pad_token_id) for r in responses]
        )
        old = torch.cat([nn.functional.pad(x, (0, width - x.shape[1])) for x in logprobs]) if logprobs else None
        query_responses = torch.cat([input_ids.to(device), responses], dim=1)
        return query_responses, prompt_mask.to(device), responses, old

    @torch.no_grad()
    def _forward_logprobs(self, model, seq, attn, pos, responses, *, disable_adapter: bool = False) -> torch.Tensor:
        from trl.trainer.utils import selective_log_softmax

        chunk = self.args.local_rollout_forward_batch_size
        T = responses.shape[1]
        out = []
        ctx = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
        with ctx, self.accelerator.autocast():
            for s in range(0, seq.shape[0], chunk):
                logits = policy_logits(model, seq[s : s + chunk], attn[s : s + chunk], pos[s : s + chunk], T)
                out.append(selective_log_softmax(logits.float(), responses[s : s + chunk], self.args.temperature))
        return torch.cat(out)

    @torch.no_grad()
    def _forward_values(self, seq, attn, pos, T: int) -> torch.Tensor:
        chunk = self.args.local_rollout_forward_batch_size
        with self.accelerator.autocast():
            return torch.cat(
                [
                    value_head_forward(
                        self.value_model, seq[s : s + chunk], attn[s : s + chunk], pos[s : s + chunk], T
                    )
                    for s in range(0, seq.shape[0], chunk)
                ]
            )

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Scores `(B,)` float32 of (prompt, response) texts: `reward_fn`, or the reward model minus its offset."""
        if self.reward_fn is not None:
            return torch.as_tensor(self.reward_fn(prompts, responses), dtype=torch.float32).reshape(-1).cpu()
        tok = self.reward_tokenizer
        limit = max_positions(self.reward_model.config)
        if self.format_fn is not None:
            seqs = [
                tok(self.format_fn(p, r))["input_ids"][-limit if limit else 0 :]
                for p, r in zip(prompts, responses, strict=True)
            ]
        else:
            from align.data.rankings import encode_for_reward
            from align.modeling import is_encoder

            pair = is_encoder(self.reward_model.config, tok)  # an encoder reads the tokenizer's pair, as in training
            seqs = [encode_for_reward(tok, p, r, limit, pair=pair) for p, r in zip(prompts, responses, strict=True)]
        out = torch.empty(len(seqs), dtype=torch.float32)
        chunk = self.args.local_rollout_forward_batch_size
        device = self.accelerator.device
        with self.accelerator.autocast():
            for s in range(0, len(seqs), chunk):
                ids, mask = pad_right(seqs[s : s + chunk], self.reward_model.config.get_text_config().pad_token_id)
                logits = self.reward_model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out[s : s + chunk] = logits[:, 0].float().cpu()
        return out - self.reward_offset

    def _decode_responses(self, responses: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor) -> list[str]:
        lengths = (mask.sum(1) - has_eos.long()).tolist()  # the text ends before EOS; templates add their own
        rows = responses.cpu().tolist()
        return self.processing_class.batch_decode(
            [r[:n] for r, n in zip(rows, lengths, strict=True)], skip_special_tokens=True
        )

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

    def _rollout(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float], list[dict]]:
        """Generate, score and compute advantages for this process's prompts of update `step` (1-based)."""
        args, acc = self.args, self.accelerator
        idx = self._batch_indices(step - 1)
        prompt_ids = [self.train_prompts[0][i] for i in idx]
        prompt_texts = [self.train_prompts[1][i] for i in idx]
        limit = max_positions(self.policy.config)
        longest = max(len(p) for p in prompt_ids)
        if limit is not None and longest + args.max_new_tokens > limit:
            raise AlignError(
                f"train_dataset: a prompt of {longest} tokens + max_new_tokens {args.max_new_tokens} exceeds the "
                f"policy's {limit} positions. Set max_prompt_length <= {limit - args.max_new_tokens}."
            )
        t0 = time.perf_counter()
        seq, prompt_mask, responses, old_logprobs = self.generate(prompt_ids)
        mask, has_eos = response_mask(responses, self.eos_token_ids)
        attn = torch.cat([prompt_mask, mask.long()], dim=1)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        T = responses.shape[1]
        if old_logprobs is None:
            old_logprobs = self._forward_logprobs(self.policy, seq, attn, pos, responses)
        t1 = time.perf_counter()

        if self.ref_policy is None:
            ref_logprobs = self._forward_logprobs(self.policy, seq, attn, pos, responses, disable_adapter=True)
        else:
            ref_logprobs = self._forward_logprobs(self.ref_policy, seq, attn, pos, responses)
        values = self._forward_values(seq, attn, pos, T)
        texts = self._decode_responses(responses, mask, has_eos)
        raw_scores = self.score(prompt_texts, texts).to(values.device)
        self._check_finite(step, **{"ppo/score": raw_scores})
        scores = raw_scores
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~has_eos).float()
        if args.reward_clip is not None:
            scores = scores.clamp(-args.reward_clip, args.reward_clip)
        kl = kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator).masked_fill(~mask, 0.0)
        kl_coef = self.kl_ctl.value
        rewards = per_token_rewards(scores, kl, mask, kl_coef)
        reward_seq = rewards.sum(1)  # before any whitening: score - beta * KL per response
        if args.whiten_rewards and mask.sum() > 1:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if mask.sum() > 1:
            advantages = masked_whiten(advantages, mask)
        t2 = time.perf_counter()

        # Global statistics (all processes): per-response sums gathered, token sums reduced.
        g = acc.gather
        kl_seq, score_g = g(kl.sum(1)), g(scores)
        stats = torch.stack(
            [
                mask.sum(),
                (returns * mask).sum(),
                (returns**2 * mask).sum(),
                ((returns - values) * mask).sum(),
                ((returns - values) ** 2 * mask).sum(),
            ]
        ).double()
        stats = acc.reduce(stats, "sum") if self.world_size > 1 else stats
        n, s1, s2, e1, e2 = stats.tolist()
        var_ret, var_err = s2 / n - (s1 / n) ** 2, e2 / n - (e1 / n) ** 2
        metrics = {
            "ppo/kl": kl_seq.mean().item(),
            "ppo/reward": g(reward_seq).mean().item(),
            "ppo/score": score_g.mean().item(),
            "ppo/score_std": score_g.std().item() if score_g.numel() > 1 else 0.0,
            "ppo/response_length": g(mask.sum(1).float()).mean().item(),
            "ppo/eos_rate": g(has_eos.float()).mean().item(),
            "ppo/kl_coef": kl_coef,
            "ppo/explained_variance": 1.0 - var_err / var_ret if var_ret > 0 else math.nan,
            "ppo/value_mean": masked_mean(values, mask).item(),
            "time/generation": t1 - t0,
            "time/scoring": t2 - t1,
        }
        self.kl_ctl.update(metrics["ppo/kl"], kl_seq.numel())
        batch = {
            "seq": seq,
            "attn": attn,
            "pos": pos,
            "responses": responses,
            "mask": mask,
            "logprobs": old_logprobs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "prompt_len": prompt_mask.shape[1],
        }
        samples = [
            {"step": step, "prompt": p, "response": r, "score": float(s)}
            for p, r, s in zip(prompt_texts[:2], texts[:2], raw_scores[:2].tolist(), strict=False)
        ]
        return batch, metrics, samples
