"""How far a trained model moved from its reference (the SFT model), measured the same way for every method.

PPO logs the KL of its own rollouts during training; DPO, GRPO, RLOO and best-of-n log something else or nothing. To
set methods side by side, each trained model answers the same held-out prompts, sampled at temperature 1, and

    KL(pi || pi_ref) = E_{y ~ pi(.|x)} [ log pi(y|x) - log pi_ref(y|x) ]

is estimated per prompt by its one sampled answer: the sum over the answer's tokens (its EOS included) of
`logprob - ref_logprob`, both by teacher forcing in fp32-accumulated log-softmax. The mean over prompts is in nats per
answer, as PPO's `kl` is; its 95 % interval is the normal one over prompts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from trl.trainer.utils import selective_log_softmax

from align.evaluation.gold import paired_interval
from align.generation.decode import decode, eos_list
from align.generation.generate import prompt_texts

logger = logging.getLogger(__name__)


def answer_logprobs(model, prompt_ids: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *,
                    pad_token_id: int, batch_size: int = 32) -> list[float]:  # fmt: skip
    """Summed log-probability under `model` of each answer given its prompt (teacher forcing).

    prompt_ids[i], answers[i]: token ids, the answer as it was generated (its EOS included, no padding). Rows are
    left-padded to one length per batch, so the answer always ends at the last position.
    """
    if len(prompt_ids) != len(answers):
        raise ValueError(f"answer_logprobs: {len(prompt_ids)} prompts but {len(answers)} answers")
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(answers), batch_size):
        batch = range(start, min(start + batch_size, len(answers)))
        rows = [list(prompt_ids[i]) + list(answers[i]) for i in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            attn[i, width - len(r) :] = 1
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        # Rows are left-padded, so every answer lies in the last `keep - 1` positions: only their logits are made
        # (SmolLM2's 49,152-token vocabulary over whole prompts would cost GiBs), log p row by row (TRL's helper).
        keep = max(len(answers[j]) for j in batch) + 1
        with torch.no_grad():
            out_ = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                         position_ids=position_ids.to(device), use_cache=False, logits_to_keep=keep)  # fmt: skip
            logits = out_.logits[:, -keep:-1].float()
            # logits[:, t] predicts the token after it: the last keep - 1 tokens
            targets = ids[:, width - keep + 1 :].to(device)
            logp = selective_log_softmax(logits, targets).cpu()
        del logits
        for i, j in enumerate(batch):
            n = len(answers[j])
            out.append(float(logp[i, logp.shape[1] - n :].sum()) if n else 0.0)
    return out


def trim_answers(tokens: torch.Tensor, eos_token_ids) -> list[list[int]]:
    """Rows of `decode`'s output cut after their first EOS (kept); a row without one keeps all its tokens."""
    eos = set(eos_list(eos_token_ids))
    answers = []
    for row in tokens.tolist():
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos), len(row))
        answers.append(row[:end])
    return answers


@contextlib.contextmanager
def _reference(model, reference):
    """The reference model: `reference`, or `model` itself with its peft adapters off (`disable_adapter`)."""
    if reference is not None:
        yield reference
        return
    if not hasattr(model, "disable_adapter"):
        raise ValueError("sampled_kl: reference=None needs a peft model (its adapters off are the reference)")
    with model.disable_adapter():
        yield model


def sampled_kl(model, tokenizer, prompts: list[str], *, reference=None, max_new_tokens: int = 64,
               batch_size: int = 32, seed: int = 0, chat: bool = True) -> dict[str, Any]:  # fmt: skip
    """KL of `model` to `reference` on `prompts`, in nats per answer (module docstring).

    reference: a causal LM with the same tokenizer, or None for `model` with its peft adapters off (a LoRA stage's
    own base). One answer per prompt is sampled at temperature 1 from `model`, seeded with `seed` without touching the
    caller's random state. Returns `{"kl", "kl_low", "kl_high", "kl_per_prompt", "answer_tokens"}`.
    """
    texts, add_special = prompt_texts(tokenizer, prompts, chat)
    prompt_ids = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        tokens = decode(model, prompt_ids, max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad,
                        temperature=1.0, batch_size=batch_size, generator=generator)  # fmt: skip
        answers = trim_answers(tokens, eos)
        logp = answer_logprobs(model, prompt_ids, answers, pad_token_id=pad, batch_size=batch_size)
        with _reference(model, reference) as ref:
            ref_logp = answer_logprobs(ref, prompt_ids, answers, pad_token_id=pad, batch_size=batch_size)
    finally:
        model.train(was_training)
    kls = [a - b for a, b in zip(logp, ref_logp, strict=True)]
    interval = paired_interval(logp, ref_logp)  # the mean of logp - ref_logp over prompts, with its 95 % interval
    return {"kl": interval["mean"], "kl_low": interval["low"], "kl_high": interval["high"], "kl_per_prompt": kls,
            "answer_tokens": sum(len(a) for a in answers) / len(answers)}  # fmt: skip


def kl_to_parent(gold, model, tokenizer, *, reference=None, stage: str) -> dict[str, float]:
    """The KL metrics every stage trained from SFT records: `kl_to_parent` and its 95 % interval
    (`kl_to_parent_low`, `kl_to_parent_high`), `sampled_kl` on `gold`'s prompts (its answer length, batch and seed:
    an `align.evaluation.compare.GoldSettings`); reference as `sampled_kl` takes it. Logged once, as `stage`."""
    kl = sampled_kl(model, tokenizer, gold.prompts, reference=reference, max_new_tokens=gold.max_new_tokens,
                    batch_size=gold.batch_size, seed=gold.seed)  # fmt: skip
    logger.info("%s: KL to the parent on %d held-out prompts: %.4f nats per answer (95%% %.4f to %.4f; %.1f tokens "
                "an answer).", stage, len(gold.prompts), kl["kl"], kl["kl_low"], kl["kl_high"],
                kl["answer_tokens"])  # fmt: skip
    return {"kl_to_parent": kl["kl"], "kl_to_parent_low": kl["kl_low"], "kl_to_parent_high": kl["kl_high"]}
