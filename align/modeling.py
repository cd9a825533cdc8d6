"""Models and tokenizers: train a tokenizer, build a GPT-style model from sizes, load by path or Hub id, chat template.

Heavy imports (torch, transformers, tokenizers) happen inside functions so `align --help` stays instant.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from align.errors import AlignError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# The default chat template, installed when a tokenizer has none. `{% generation %}` marks the assistant tokens, so
# TRL's `assistant_only_loss` and `return_assistant_tokens_mask` work. Each assistant turn ends with EOS: generation
# stops there, and a pretrained model already knows EOS as "end of text".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] + ' ' + eos_token }}{% endgeneration %}{{ ' ' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|> ' }}{%- endif -%}"
)

# Sizes of a from-scratch model when the recipe gives no `model_config`: GPT-1-like shape, scaled down so a CPU can
# train it (recipes override every key).
DEFAULT_SIZES = {
    "llama": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
    "gpt2": {"n_embd": 256, "n_layer": 4, "n_head": 4},
}


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


def _wrap(tok, model_max_length: int):
    """Wrap a `tokenizers.Tokenizer` as a transformers tokenizer with our special tokens and chat template."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bos = SPECIAL_TOKENS["bos_token"]
    # `tokenizers` adds no BOS by itself: prepend it to every encoded text, as GPT/Llama tokenizers do.
    tok.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # tiny-world text keeps "word ." spacing; decoding must not alter it
        additional_special_tokens=CHAT_TOKENS,
        **SPECIAL_TOKENS,
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def wordlevel_tokenizer(words: Iterable[str], model_max_length: int = 1024):
    """A closed-vocabulary tokenizer: one token per whitespace-separated word (the tiny world's unit)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS.values(), *CHAT_TOKENS, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([*SPECIAL_TOKENS.values(), *CHAT_TOKENS])
    return _wrap(tok, model_max_length)


def bpe_tokenizer(texts: Iterator[str], vocab_size: int, model_max_length: int = 1024):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`: any input encodes, nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS.values(), *CHAT_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, model_max_length)


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained` with a one-line error, and a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = f"{name_or_path}: cannot load a tokenizer ({_first_line(e)}). {_where_fix(name_or_path)}"
        raise AlignError(msg) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def generation_marker(tokenizer) -> list[int]:
    """The token ids the tokenizer's chat template appends for `add_generation_prompt` (trailing whitespace-only
    tokens dropped: the response's first token may absorb them). AlignError when the template adds none."""
    messages = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    a = tokenizer(with_prompt, add_special_tokens=False)["input_ids"]
    b = tokenizer(without, add_special_tokens=False)["input_ids"]
    marker = a[len(b) :] if a[: len(b)] == b else []
    while len(marker) > 1 and not tokenizer.decode(marker[-1:]).strip():
        marker = marker[:-1]
    if not marker or not tokenizer.decode(marker).strip():
        raise AlignError(
            "likelihood_features: the tokenizer's chat template adds no generation prompt, so the response's tokens "
            "cannot be found. Use a template with one (align's, or the model's chat template), or drop "
            "likelihood_features."
        )
    return marker


def ensure_chat_template(tokenizer, model=None) -> bool:
    """Keep the tokenizer's own chat template; if it has none, install ours and its tokens. Returns True if installed.

    New tokens grow the vocabulary, so the model's embeddings are resized (new rows are the mean of the old ones,
    transformers' default, so the untrained tokens start near typical embeddings).
    """
    if tokenizer.chat_template:
        return False
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHAT_TEMPLATE
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    logger.info("The tokenizer had no chat template: installed align's default (%d new tokens).", len(missing))
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Models


def new_causal_lm(model_type: str, sizes: dict[str, Any] | None, tokenizer, max_length: int):
    """A randomly initialized GPT-style causal LM sized by `sizes`, with the tokenizer's vocabulary and special ids."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs = {**DEFAULT_SIZES[model_type], **(sizes or {})}
    try:
        if model_type == "llama":
            kwargs.setdefault("max_position_embeddings", max_length)
            config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **ids, **kwargs)
            return LlamaForCausalLM(config)
        kwargs.setdefault("n_positions", max_length)
        config = GPT2Config(vocab_size=len(tokenizer), **ids, **kwargs)
        return GPT2LMHeadModel(config)
    except (TypeError, ValueError) as e:
        raise AlignError(f"model_config: {_first_line(e)}. Use the {model_type} config's key names.") from None


def load_causal_lm(name_or_path: str, *, revision: str | None = None, dtype: str | None = "auto", **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained` (path or Hub id), one-line errors, no remote code by default."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("trust_remote_code", False)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=dtype or "auto", **kwargs)
    except (OSError, ValueError) as e:
        msg = f"{name_or_path}: cannot load a causal LM ({_first_line(e)}). {_where_fix(name_or_path)}"
        raise AlignError(msg) from e


def set_generation_defaults(model, tokenizer) -> None:
    """EOS and pad ids in the generation config (as the handbook does before saving) so generation stops cleanly."""
    gc = model.generation_config
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (avx512_bf16 or AMX); otherwise autocast emulates it, slowly."""
    import torch

    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def precision_summary(args) -> str:
    """What precision training runs in, and why (nanochat logs its dtype choice; so do we)."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    if args.bf16:
        if device == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "bf16: true on a CPU without native bf16 (%s): autocast is emulated here, measured ~15x slower "
                "than float32. Set bf16: false on this machine.",
                torch.backends.cpu.get_cpu_capability(),
            )
            return f"{device}, bf16 autocast, emulated (bf16: true, no avx512_bf16/AMX: slow)"
        why = "bf16: true; ~1.4x faster than fp32 on CPUs with avx512_bf16, the norm on GPUs"
        return f"{device}, bf16 autocast over float32 weights ({why})"
    if args.fp16:
        return f"{device}, fp16 mixed precision (fp16: true)"
    return f"{device}, float32 (bf16: false; set bf16: true for autocast)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _where_fix(name_or_path: str) -> str:
    if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
        return "Check that the directory holds a saved model (config.json, weights, tokenizer)."
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 and it is not in the local cache: pass a local path or unset HF_HUB_OFFLINE."
    return "It is neither a local path nor a reachable Hub id; check the name and your network/HF_TOKEN."
