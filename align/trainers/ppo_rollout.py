"""The rollout of align's PPO (InstructGPT step 3) as plain functions: prompts tokenized, responses generated (KV
cache, left padding), log-probs of the policy and the reference, values, scores, the per-token KL penalty and GAE,
returned as one typed `Rollout` (as torchtune's `rlhf/_types.py` `Trajectory`: data passed between phases is a
dataclass). Every function takes its models, tokenizer and settings as arguments; `PPOTrainer`
(`align/trainers/ppo.py`) calls them and owns the state (step, KL controller, prompt order)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from torch import nn
from transformers import GenerationConfig
from trl.trainer.utils import selective_log_softmax

from align.data.padding import pad_left, pad_right
from align.data.rankings import encode_for_reward
from align.errors import AlignError
from align.generation.decode import decode
from align.models.modeling import is_encoder, max_positions
from align.rl.ppo import gae, kl_penalty, masked_whiten, per_token_rewards, response_mask
from align.trainers.ppo_models import PolicyValueHead, adapters_disabled, policy_logits, value_head_forward
from align.trainers.ppo_sampler import SamplerCopy
from align.trainers.ppo_vllm import vllm_responses

if TYPE_CHECKING:
    from accelerate import Accelerator

    from align.trainers.ppo_config import PPOConfig

logger = logging.getLogger(__name__)

# Old logprobs come from generate's own logits when they fit in this many bytes per rollout chunk (saves one full
# policy forward per update); larger vocabularies fall back to a forward pass.
GEN_LOGITS_BUDGET = 256 * 2**20

ScoreFn = Callable[[list[str], list[str]], torch.Tensor]


@dataclasses.dataclass
class Rollout:
    """One process's rollout of one PPO update: B prompts (left-padded to P tokens), their sampled responses (right-
    padded to T tokens) and everything the PPO epochs read. Tensors are on the accelerator's device; `(B, T)` ones
    are aligned on response tokens, and the float ones hold 0 where `mask` is False, except `logprobs`,
    `ref_logprobs` and `values`, whose masked positions are never read (see `align.rl.ppo`).

    Attributes:
        query_responses: `(B, P + T)` long, prompt then response tokens (what the policy reads).
        attention_mask: `(B, P + T)` long, 1 on prompt tokens and on counted response tokens (`mask`).
        position_ids: `(B, P + T)` long, positions that skip the left padding.
        responses: `(B, T)` long, generated tokens (padding after the first EOS).
        mask: `(B, T)` bool, True up to and including the first EOS.
        has_eos: `(B,)` bool, whether the response ended with EOS (else it hit `max_new_tokens`).
        logprobs: `(B, T)` float32, the sampling policy's log-probabilities of the response tokens.
        ref_logprobs: `(B, T)` float32, the reference policy's.
        values: `(B, T)` float32, the value model's estimate at each response token.
        kl: `(B, T)` float32, per-token KL(policy || reference) estimate (`args.kl_estimator`).
        raw_scores: `(B,)` float32, the reward (`score_fn`) of each (prompt, response) text.
        scores: `(B,)` float32, `raw_scores` after `missing_eos_penalty` and `reward_clip`.
        kl_coef: beta, the KL coefficient the rewards were computed with.
        rewards: `(B, T)` float32, per-token reward: -kl_coef * kl, + the score on the last token (before
            `whiten_rewards`; `rewards.sum(1)` is InstructGPT's score - beta * KL of each response).
        advantages: `(B, T)` float32, GAE advantages, whitened over the valid tokens.
        returns: `(B, T)` float32, value targets (GAE advantages before whitening + values).
        prompt_length: P.
        prompts: the B prompt texts. response_texts: the B decoded responses (without EOS).
        generation_time, scoring_time: seconds spent generating (and old logprobs), and on reference, values,
            scores and advantages.
    """

    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    has_eos: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    kl_coef: float
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    prompt_length: int
    prompts: list[str]
    response_texts: list[str]
    generation_time: float
    scoring_time: float
    sampling_time: float = 0.0  # the part of generation_time spent sampling (the rest: the old logprobs' forward)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and PPO-ptx text


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one prompt: the chat template's user turn + generation prompt when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def encode_prompts(
    ds, tokenizer, name: str, *, max_prompt_length: int | None, accelerator: Accelerator
) -> tuple[list[list[int]], list[str]]:
    """(token ids, prompt texts) of every row of `ds` (a Dataset or a list of dicts with "prompt" str or
    "input_ids"); prompts over `max_prompt_length` keep their last tokens, with a warning. AlignError naming the row
    on bad data."""
    if isinstance(ds, list):
        ds = Dataset.from_list(ds)
    columns = list(ds.column_names)
    if "input_ids" not in columns and "prompt" not in columns:
        raise AlignError(f"{name}: no 'prompt' or 'input_ids' column (columns present: {columns}). Rename one.")
    if len(ds) == 0:
        raise AlignError(f"{name}: no rows.")

    def encode(batch, indices):
        out = {"ids": [], "text": []}
        for j, i in enumerate(indices):
            if "input_ids" in batch:
                ids = list(batch["input_ids"][j])
                text = batch["prompt"][j] if "prompt" in batch else tokenizer.decode(ids, skip_special_tokens=True)
            else:
                text = batch["prompt"][j]
                if not isinstance(text, str):
                    raise AlignError(f"{name}:{i + 1}: 'prompt' is {type(text).__name__}, expected a string.")
                ids = encode_prompt(tokenizer, text)
            if not ids:
                raise AlignError(f"{name}:{i + 1}: the prompt encodes to no tokens. Drop or fix the row.")
            out["ids"].append(ids)
            out["text"].append(text)
        return out

    with accelerator.main_process_first():
        enc = ds.map(encode, batched=True, with_indices=True, remove_columns=columns, desc=f"Tokenizing {name}")
    ids, texts = enc["ids"], enc["text"]
    limit = max_prompt_length
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


def encode_ptx(ds, tokenizer, max_length: int | None) -> list[list[int]]:
    """Token ids of the PPO-ptx rows ("input_ids" as is, or "text" truncated to `max_length`)."""
    columns = list(ds.column_names)
    if "input_ids" in columns:
        return [list(x) for x in ds["input_ids"]]
    if "text" not in columns:
        raise AlignError(f"ptx_dataset: no 'text' or 'input_ids' column (columns present: {columns}).")
    return [tokenizer(t, truncation=max_length is not None, max_length=max_length)["input_ids"] for t in ds["text"]]


def gen_logits_fit(policy, *, mixed_precision: str, batch_size: int, max_new_tokens: int) -> bool:
    """Whether generate's logits can give the old logprobs: float32 only (a bf16 forward and the KV-cache path
    differ by ~1e-2, which would show as clipping at ratio 1), and only when `batch_size` x `max_new_tokens` x vocab
    float32 logits fit `GEN_LOGITS_BUDGET`."""
    if mixed_precision != "no":
        return False
    vocab = policy.get_output_embeddings().weight.shape[0]
    return batch_size * max_new_tokens * vocab * 4 <= GEN_LOGITS_BUDGET


# ---------------------------------------------------------------------------------------------------------------------
# Generation, forwards, scores


@torch.no_grad()
def generate_responses(
    policy,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    args: PPOConfig,
    eos_token_ids: int | list[int] | None,
    accelerator: Accelerator,
    sample: bool = True,
    temperature: float | None = None,
    output_logits: bool = False,
    engine=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Responses to `prompt_ids` (left-padded, KV cache, in chunks of `args.local_rollout_forward_batch_size`).

    Args:
        sample: sample at `temperature` (default `args.temperature`; 0 = greedy) with `args.top_k`/`top_p`.
        output_logits: also return the sampled tokens' logprobs from generate's logits (when sampling).
        engine: a vLLM engine (`align.trainers.ppo_vllm`) that samples instead, with the rollout's settings.
    Returns:
        (query_responses `(B, P + T)`, prompt_mask `(B, P)`, responses `(B, T)`, logprobs `(B, T)` or None).
    """
    temperature = args.temperature if temperature is None else temperature
    if isinstance(engine, SamplerCopy):
        return sampler_responses(engine, tokenizer, prompt_ids, args=args, eos_token_ids=eos_token_ids,
                                 device=accelerator.device, temperature=temperature if sample else 0.0)  # fmt: skip
    if engine is not None:
        return vllm_responses(engine, tokenizer, prompt_ids, device=accelerator.device)
    sample = sample and temperature > 0
    gen_config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens or None,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=args.top_k if sample else None,
        top_p=args.top_p if sample else None,
        eos_token_id=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=sample and output_logits,
    )
    was_training = policy.training
    policy.eval()
    input_ids, prompt_mask = pad_left(prompt_ids, tokenizer.pad_token_id)
    device = accelerator.device
    responses, logprobs = [], []
    chunk = args.local_rollout_forward_batch_size
    try:
        for s in range(0, len(prompt_ids), chunk):
            ids, mask = input_ids[s : s + chunk].to(device), prompt_mask[s : s + chunk].to(device)
            with accelerator.autocast():
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
        [nn.functional.pad(r, (0, width - r.shape[1]), value=tokenizer.pad_token_id) for r in responses]
    )
    old = torch.cat([nn.functional.pad(x, (0, width - x.shape[1])) for x in logprobs]) if logprobs else None
    query_responses = torch.cat([input_ids.to(device), responses], dim=1)
    return query_responses, prompt_mask.to(device), responses, old


def sampler_responses(sampler: SamplerCopy, tokenizer, prompt_ids: list[list[int]], *, args: PPOConfig,
                      eos_token_ids, device, temperature: float):  # fmt: skip
    """`generate_responses`' tuple from align's decode loop on the policy's merged copy: (query_responses
    `(B, P + T)`, prompt_mask `(B, P)`, responses `(B, T)` right-padded with the pad token after each EOS, None:
    the old logprobs come from the policy's own forward)."""
    responses = decode(
        sampler.model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_k=args.top_k or 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        min_new_tokens=args.min_new_tokens or 0,
        batch_size=args.local_rollout_forward_batch_size,
    )
    input_ids, prompt_mask = pad_left(prompt_ids, tokenizer.pad_token_id)
    return torch.cat([input_ids, responses], dim=1).to(device), prompt_mask.to(device), responses.to(device), None


@torch.no_grad()
def forward_logprobs(
    model,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    responses: torch.Tensor,
    *,
    temperature: float,
    batch_size: int,
    accelerator: Accelerator,
    disable_adapter: bool = False,
) -> torch.Tensor:
    """`(B, T)` float32 logprobs of `responses` `(B, T)` under `model` (a peft model with `disable_adapter`: its base)
    reading `query_responses` `(B, P + T)`, in chunks of `batch_size`."""
    T = responses.shape[1]
    out = []
    ctx = adapters_disabled(model) if disable_adapter else contextlib.nullcontext()
    with ctx, accelerator.autocast():
        for s in range(0, query_responses.shape[0], batch_size):
            rows = slice(s, s + batch_size)
            logits = policy_logits(model, query_responses[rows], attention_mask[rows], position_ids[rows], T)
            out.append(selective_log_softmax(logits.float(), responses[rows], temperature))
    return torch.cat(out)


@torch.no_grad()
def forward_logprobs_and_values(
    head: PolicyValueHead,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    responses: torch.Tensor,
    *,
    temperature: float,
    batch_size: int,
    accelerator: Accelerator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, values), each `(B, T)` float32, as `forward_logprobs` and `forward_values` give them, from one policy
    forward per chunk (`value_model_init: policy_head`: the values read the policy's last hidden state)."""
    T = responses.shape[1]
    logprobs, values = [], []
    with accelerator.autocast():
        for s in range(0, query_responses.shape[0], batch_size):
            rows = slice(s, s + batch_size)
            logits, v = head.logits_and_values(query_responses[rows], attention_mask[rows], position_ids[rows], T)
            logprobs.append(selective_log_softmax(logits.float(), responses[rows], temperature))
            values.append(v)
    return torch.cat(logprobs), torch.cat(values)


@torch.no_grad()
def forward_values(
    value_model,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_length: int,
    *,
    batch_size: int,
    accelerator: Accelerator,
) -> torch.Tensor:
    """`(B, T)` float32 values of the last `response_length` tokens of `query_responses`, in chunks of
    `batch_size`."""
    with accelerator.autocast():
        return torch.cat(
            [
                value_head_forward(
                    value_model,
                    query_responses[s : s + batch_size],
                    attention_mask[s : s + batch_size],
                    position_ids[s : s + batch_size],
                    response_length,
                )
                for s in range(0, query_responses.shape[0], batch_size)
            ]
        )


@torch.no_grad()
def reward_model_scores(
    reward_model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    *,
    format_fn: Callable[[str, str], str] | None,
    offset: float,
    batch_size: int,
    accelerator: Accelerator,
) -> torch.Tensor:
    """`(B,)` float32 CPU scores of (prompt, response) texts by `reward_model` minus `offset`: each pair
    formatted by `format_fn` (None = `align.data.rankings.encode_for_reward`, as the reward stage trained) and
    tokenized by the reward model's `tokenizer`, keeping the last tokens that fit its positions."""
    limit = max_positions(reward_model.config)
    if format_fn is not None:
        seqs = [
            tokenizer(format_fn(p, r))["input_ids"][-limit if limit else 0 :]
            for p, r in zip(prompts, responses, strict=True)
        ]
    else:
        pair = is_encoder(reward_model.config, tokenizer)  # an encoder reads the tokenizer's pair, as in training
        seqs = [encode_for_reward(tokenizer, p, r, limit, pair=pair) for p, r in zip(prompts, responses, strict=True)]
    out = torch.empty(len(seqs), dtype=torch.float32)
    device = accelerator.device
    with accelerator.autocast():
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[s : s + batch_size], reward_model.config.get_text_config().pad_token_id)
            logits = reward_model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out[s : s + batch_size] = logits[:, 0].float().cpu()
    return out - offset


def decode_responses(tokenizer, responses: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor) -> list[str]:
    """Texts of `responses` `(B, T)`: the `mask` tokens without the final EOS (chat templates add their own)."""
    lengths = (mask.sum(1) - has_eos.long()).tolist()
    rows = responses.cpu().tolist()
    return tokenizer.batch_decode([r[:n] for r, n in zip(rows, lengths, strict=True)], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------------
# Rollout


@torch.no_grad()
def adjusted_scores(raw_scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_penalty: float | None,
                    reward_clip: float | None) -> torch.Tensor:  # fmt: skip
    """The scores PPO optimizes: `missing_eos_penalty` off responses without EOS, then clipped to `reward_clip`."""
    scores = raw_scores
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~has_eos).float()
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


def make_rollout(
    policy,
    ref_policy,
    value_model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    prompts: list[str],
    score_fn: ScoreFn,
    *,
    args: PPOConfig,
    kl_coef: float,
    eos_token_ids: int | list[int] | None,
    accelerator: Accelerator,
    use_gen_logits: bool,
    engine=None,
) -> Rollout:
    """Generate responses to `prompt_ids`, score them and compute the KL-penalized rewards and GAE advantages.

    Args:
        policy: the causal LM being trained (unwrapped). ref_policy: the frozen reference; None = `policy` with its
            (peft) adapters disabled. value_model: `*ForSequenceClassification` read per token, or a critic on the
            policy's base (`SharedBaseCritic`) or trunk (`PolicyValueHead`: old logprobs and values in one forward).
        tokenizer: the policy's. prompt_ids, prompts: B prompts as token ids and as texts (for `score_fn`).
        score_fn: `(prompts, responses) -> (B,)` float scores of the texts (a reward model, or a rule).
        args: `PPOConfig` (generation, `kl_estimator`, `missing_eos_penalty`, `reward_clip`, `whiten_rewards`,
            `gamma`, `lam`, `local_rollout_forward_batch_size`). kl_coef: beta for this rollout.
        use_gen_logits: take the old logprobs from generate's logits (`gen_logits_fit`), else a policy forward.
        engine: a vLLM engine that samples the responses (`generate_responses`).
    Scores are not checked here: a nan flows into `Rollout.raw_scores` (the trainer stops on it).
    """
    limit = max_positions(policy.config)
    longest = max(len(p) for p in prompt_ids)
    if limit is not None and longest + args.max_new_tokens > limit:
        raise AlignError(
            f"train_dataset: a prompt of {longest} tokens + max_new_tokens {args.max_new_tokens} exceeds the "
            f"policy's {limit} positions. Set max_prompt_length <= {limit - args.max_new_tokens}."
        )
    chunk = args.local_rollout_forward_batch_size
    t0 = time.perf_counter()
    seq, prompt_mask, responses, logprobs = generate_responses(
        policy,
        tokenizer,
        list(prompt_ids),
        args=args,
        eos_token_ids=eos_token_ids,
        accelerator=accelerator,
        output_logits=use_gen_logits and engine is None,
        engine=engine,
    )
    t_sampled = time.perf_counter()
    mask, has_eos = response_mask(responses, eos_token_ids)
    attn = torch.cat([prompt_mask, mask.long()], dim=1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    T = responses.shape[1]
    fwd = dict(temperature=args.temperature, batch_size=chunk, accelerator=accelerator)
    values = None
    if logprobs is None and isinstance(value_model, PolicyValueHead):  # one forward gives both
        logprobs, values = forward_logprobs_and_values(value_model, seq, attn, pos, responses, **fwd)
    elif logprobs is None:
        logprobs = forward_logprobs(policy, seq, attn, pos, responses, **fwd)
    t1 = time.perf_counter()

    if ref_policy is None:
        ref_logprobs = forward_logprobs(policy, seq, attn, pos, responses, disable_adapter=True, **fwd)
    else:
        ref_logprobs = forward_logprobs(ref_policy, seq, attn, pos, responses, **fwd)
    if values is None:
        values = forward_values(value_model, seq, attn, pos, T, batch_size=chunk, accelerator=accelerator)
    texts = decode_responses(tokenizer, responses, mask, has_eos)
    raw_scores = torch.as_tensor(score_fn(prompts, texts), dtype=torch.float32).reshape(-1).to(values.device)
    scores = adjusted_scores(raw_scores, has_eos, args.missing_eos_penalty, args.reward_clip)
    kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator).masked_fill(~mask, 0.0)
    rewards = per_token_rewards(scores, kl, mask, kl_coef)
    gae_rewards = rewards
    if args.whiten_rewards and mask.sum() > 1:
        gae_rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(gae_rewards, values, mask, args.gamma, args.lam)
    if mask.sum() > 1:
        advantages = masked_whiten(advantages, mask)
    t2 = time.perf_counter()
    return Rollout(
        query_responses=seq,
        attention_mask=attn,
        position_ids=pos,
        responses=responses,
        mask=mask,
        has_eos=has_eos,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        kl=kl,
        raw_scores=raw_scores,
        scores=scores,
        kl_coef=kl_coef,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        prompt_length=prompt_mask.shape[1],
        prompts=list(prompts),
        response_texts=texts,
        generation_time=t1 - t0,
        scoring_time=t2 - t1,
        sampling_time=t_sampled - t0,
    )
