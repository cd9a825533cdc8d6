"""`align generate MODEL --prompt TEXT`: sample from any stage's output (or a Hub model), as plain text or chat.

align generate runs/tiny/pretrain --prompt "tom finds"
align generate runs/tiny/sft --prompt "write a story about tom and the red ball ." --num_return_sequences 3
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from transformers import set_seed

from align.errors import AlignError
from align.generation.decode import decode
from align.io import read_stage_info
from align.models.modeling import load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)

# Stages whose models answer in the chat format; a pretrain output only continues text.
CHAT_STAGES = {"sft", "ppo"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise AlignError(f"align generate: {message}. See `align generate --help`.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="align generate", description=__doc__.strip().split("\n")[0])
    p.add_argument("model", help="Stage output dir, model dir or Hub id.")
    p.add_argument("--prompt", action="append", default=[], help="Prompt text; repeat for several prompts.")
    p.add_argument(
        "--chat",
        choices=["auto", "yes", "no"],
        default="auto",
        help="Wrap prompts in the chat template: auto = yes for sft/ppo stages and non-align models with "
        "a chat template, no for pretrain outputs.",
    )
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy decoding.")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = no top-k filtering.")
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code (off by default).")
    return p


def use_chat(model: str, tokenizer, mode: str) -> bool:
    """Whether to apply the chat template, per `--chat` and what the model is."""
    if mode != "auto":
        return mode == "yes"
    info = read_stage_info(model) if not model.startswith("hf://") else None
    if info is not None:
        return info["stage"] in CHAT_STAGES
    return bool(tokenizer.chat_template)


def prompt_texts(tokenizer, prompts: list[str], chat: bool) -> tuple[list[str], bool]:
    """(texts to tokenize, whether the tokenizer adds its special tokens): user turns in the chat template, whose
    text writes BOS itself, or the prompts as they are."""
    if not chat:
        return prompts, True
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return texts, False


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    chat: bool,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    batch_size: int = 32,
    backend: str = "transformers",
) -> list[list[str]]:
    """Batched sampling with left padding and the KV cache. Returns, per prompt, `num_return_sequences` responses.

    `backend` "align" samples with `align.generation.decode` (a model with its own recurrent state, the LSTM,
    always uses `generate`); `batch_size` counts prompts either way."""
    if backend == "align" and not getattr(model, "_is_stateful", False):
        return _generate_align(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k,
                               num_return_sequences=num_return_sequences, batch_size=batch_size)  # fmt: skip

    texts, add_special = prompt_texts(tokenizer, prompts, chat)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last real token
    out: list[list[str]] = []
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_return_sequences": num_return_sequences}
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        gen_kwargs.update(do_sample=False)
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            batch = texts[i : i + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                seqs = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
            new = seqs[:, enc["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            for j in range(0, len(decoded), num_return_sequences):
                out.append([d.strip() for d in decoded[j : j + num_return_sequences]])
    finally:
        tokenizer.padding_side = side
    return out


def _generate_align(model, tokenizer, prompts, *, chat, max_new_tokens, temperature, top_p, top_k,
                    num_return_sequences, batch_size) -> list[list[str]]:  # fmt: skip
    texts, add_special = prompt_texts(tokenizer, prompts, chat)
    ids = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else (
        tokenizer.eos_token_id)  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        tokens = decode(model, ids, max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        num_return_sequences=num_return_sequences,
                        batch_size=batch_size * num_return_sequences)  # fmt: skip
    finally:
        model.train(was_training)
    decoded = [d.strip() for d in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    k = num_return_sequences
    return [decoded[i : i + k] for i in range(0, len(decoded), k)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.prompt:
        raise AlignError("align generate: no prompt. Pass --prompt TEXT (repeat it for several prompts).")
    if args.max_new_tokens < 1 or args.num_return_sequences < 1:
        raise AlignError("align generate: --max_new_tokens and --num_return_sequences must be at least 1.")
    set_seed(args.seed)
    tokenizer = load_tokenizer(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    model = load_causal_lm(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    chat = use_chat(args.model, tokenizer, args.chat)
    if chat and not tokenizer.chat_template:
        raise AlignError(f"{args.model}: the tokenizer has no chat template. Use --chat no for plain continuation.")
    results = generate(
        model,
        tokenizer,
        args.prompt,
        chat=chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_return_sequences=args.num_return_sequences,
    )
    for prompt, responses in zip(args.prompt, results, strict=True):
        print(f">>> {prompt}")
        for r in responses:
            print(r if chat else f"{prompt} {r}".strip())
        print()
    return 0
