"""`align pretrain`: GPT-style generative pretraining (GPT-1 "unsupervised pre-training") with the HF Trainer.

    align pretrain --config recipes/tiny/pretrain.yaml
    accelerate launch --config_file accelerate_config.yaml -m align pretrain --config recipes/gpt2-small/pretrain.yaml

Texts become `BOS text EOS`, are concatenated and cut into blocks of `max_length` tokens (packing, as in transformers'
run_clm), and a causal LM learns to predict every next token. On the tiny world the eval loss is reported next to the
corpus' entropy floor, the best loss any model can reach, in the same unit (nats per token).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, default_data_collator, set_seed

from align.config import log_config, parse_config
from align.data import load as dl
from align.data import sources
from align.errors import AlignError
from align.inspect.copy_probe import FAR, NEAR, copy_loss_by_distance
from align.io import parent_of, stage_lifecycle
from align.models import modeling
from align.stages.lifecycle import finish_stage, hold_push, train_stage, wait_for_everyone

logger = logging.getLogger(__name__)

COPY_PROBE_TEXTS = 2000  # held-out texts read by the copy probe: ~560 far copies, a few seconds of forward passes


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("pretrain", argv)
    run(cfg)
    return 0


def load_text_data(cfg) -> tuple[Any, Any, dict[str, Any]]:
    """Train/eval text datasets (one `text` column) and their lineage entry."""
    built = sources.pretrain_text(
        cfg.dataset_name, stories=cfg.tinyworld_stories, seed=cfg.tinyworld_seed, test_size=cfg.dataset_test_size
    )
    if built is not None:
        train, test, info = built
    else:
        dd = dl.load_data(cfg.dataset_name, config=cfg.dataset_config)
        # Columns before the split: a wrong column is the real problem, whatever the size of the data.
        dd = {name: dl.apply_column_mapping(part, cfg.dataset_column_mapping, source=cfg.dataset_name)
              for name, part in dd.items()}
        for part in dd.values():
            dl.require_columns(part, [cfg.dataset_text_field], source=cfg.dataset_name)
            dl.check_types(part, {cfg.dataset_text_field: str}, source=cfg.dataset_name)
        train, test = dl.train_test(
            dd,
            train_split=cfg.dataset_train_split,
            test_split=cfg.dataset_test_split,
            test_size=cfg.dataset_test_size,
            seed=cfg.seed,
        )
        info = {"name": cfg.dataset_name, "config": cfg.dataset_config}
    info.update({"fingerprint": train._fingerprint, "rows": len(train), "eval_rows": len(test) if test else 0})
    return train, test, info


def build_tokenizer(cfg, train):
    """The model's tokenizer, an existing one, or a new one trained on the training text."""
    name = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if name:
        tok = modeling.load_tokenizer(name, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code)
        modeling.ensure_chat_template(tok)
        return tok
    kind = cfg.tokenizer_type
    if kind == "auto":
        kind = sources.tokenizer_kind(cfg.dataset_name)
    if kind == "wordlevel":
        words = sources.vocabulary(cfg.dataset_name)
        if words is None:
            words = _corpus_words(train, cfg.dataset_text_field, cfg.vocab_size)
        return modeling.wordlevel_tokenizer(words, model_max_length=cfg.max_length)
    column = sources.text_column(cfg.dataset_name, cfg.dataset_text_field)
    batches = (b[column] for b in train.select_columns([column]).iter(batch_size=1000))
    tok = modeling.bpe_tokenizer(chain.from_iterable(batches), cfg.vocab_size, model_max_length=cfg.max_length)
    logger.info("Trained a byte-level BPE tokenizer: %d tokens.", len(tok))
    return tok


def _corpus_words(train, column: str, limit: int) -> list[str]:
    """The `limit` most frequent whitespace words of the corpus (streamed in batches), for a word-level tokenizer."""
    counts: Counter[str] = Counter()
    for batch in train.select_columns([column]).iter(batch_size=1000):
        for text in batch[column]:
            counts.update(text.split())
    return [w for w, _ in counts.most_common(max(limit - 16, 1))]


def pack(ds, tokenizer, column: str, block: int, desc: str):
    """Tokenize `BOS text EOS`, concatenate, and cut into blocks of `block` tokens (the tail of each map batch that
    does not fill a block is dropped, as in transformers' run_clm)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        return {"ids": [([bos] if bos is not None else []) + x + [eos] for x in ids]}

    def group(batch):
        flat = list(chain.from_iterable(batch["ids"]))
        n = (len(flat) // block) * block
        blocks = [flat[i : i + block] for i in range(0, n, block)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {desc}")
    return ds.map(group, batched=True, remove_columns=["ids"], desc=f"Packing {desc} into blocks of {block}")


@stage_lifecycle
def run(cfg) -> Path:
    set_seed(cfg.seed)
    log_config(cfg)
    output_dir = Path(cfg.output_dir)

    # ---- Data: texts, tokenizer, packed blocks
    train_text, eval_text, data_info = load_text_data(cfg)
    tokenizer = build_tokenizer(cfg, train_text)
    train_ds, eval_ds = pack_splits(cfg, tokenizer, train_text, eval_text)

    # ---- Model: continued or new
    model = build_model(cfg, tokenizer)
    total, _ = modeling.count_parameters(model)
    _log_setup(cfg, model, total, train_ds, eval_ds)

    # ---- Train
    push_to_hub = hold_push(cfg)
    trainer = Trainer(
        model=model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    _, metrics, resume = train_stage(trainer, cfg)
    metrics.update(throughput_metrics(trainer, cfg, metrics["train_runtime"], resume))

    # ---- Evaluate: eval loss, and on the tiny world its entropy floor and the copy probe
    metrics = eval_metrics(trainer, tokenizer, cfg, metrics, eval_ds, eval_text)

    # ---- Save: model, tokenizer, samples, align_stage.json
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        model.generation_config.save_pretrained(output_dir)
        samples = sample_texts(trainer.model, tokenizer, cfg.num_samples, cfg.sample_max_new_tokens, cfg.seed)
        parent = parent_of(cfg.model_name_or_path) if cfg.model_name_or_path else None
        finish_stage(
            output_dir,
            "pretrain",
            cfg,
            push_to_hub,
            parent=parent,
            data=data_info,
            metrics=metrics,
            samples=samples,
            log_history=trainer.state.log_history,
            model={"type": model.config.model_type, "parameters": total},
            num_processes=trainer.accelerator.num_processes,
        )
        _log_result(metrics)
    wait_for_everyone()
    return output_dir


def pack_splits(cfg, tokenizer, train_text, eval_text):
    """(train, eval) packed into blocks of `max_length` tokens; eval None (and evaluation off) when there is no eval
    split or it is shorter than one block."""
    column = sources.text_column(cfg.dataset_name, cfg.dataset_text_field)
    with cfg.main_process_first(desc="packing"):
        train_ds = pack(train_text, tokenizer, column, cfg.max_length, "train")
        eval_ds = pack(eval_text, tokenizer, column, cfg.max_length, "eval") if eval_text is not None else None
    if len(train_ds) == 0:
        raise AlignError(
            f"{cfg.dataset_name}: the training text gives 0 blocks of max_length {cfg.max_length} tokens. "
            "Use more data or a smaller max_length."
        )
    if eval_ds is not None and len(eval_ds) == 0:
        logger.warning("The eval split is shorter than one block of %d tokens: evaluation is off.", cfg.max_length)
        eval_ds = None
    if eval_ds is None and cfg.eval_strategy != "no":
        cfg.eval_strategy = "no"
    return train_ds, eval_ds


def build_model(cfg, tokenizer):
    """The model to pretrain: `model_name_or_path` continued (embeddings grown to the tokenizer), or a new one of
    `model_type` and `model_config` sizes; generation defaults set from the tokenizer."""
    if cfg.model_name_or_path:
        model = modeling.load_causal_lm(
            cfg.model_name_or_path,
            revision=cfg.model_revision,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = modeling.new_causal_lm(cfg.model_type, cfg.model_config, tokenizer, cfg.max_length)
    modeling.set_generation_defaults(model, tokenizer)
    return model


def _log_setup(cfg, model, total: int, train_ds, eval_ds) -> None:
    logger.info(
        "pretrain: %s %s, %.2fM parameters, %d train blocks x %d tokens, %d eval blocks, batch %d x %d accum x %d "
        "processes, %s",
        "continued" if cfg.model_name_or_path else "new",
        model.config.model_type,
        total / 1e6,
        len(train_ds),
        cfg.max_length,
        len(eval_ds) if eval_ds is not None else 0,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.world_size,
        modeling.precision_summary(cfg),
    )


def throughput_metrics(trainer, cfg, train_seconds: float, resume) -> dict[str, float]:
    """`tokens_per_second` of this run (steps since the resumed checkpoint), `train_tokens` of the whole training."""
    steps_run = trainer.state.global_step - (_step_of(resume) if resume else 0)
    tokens = steps_run * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.world_size
    return {
        "tokens_per_second": tokens * cfg.max_length / max(train_seconds, 1e-9),
        "train_tokens": (
            trainer.state.global_step
            * cfg.max_length
            * cfg.per_device_train_batch_size
            * (cfg.gradient_accumulation_steps * cfg.world_size)
        ),
    }


def eval_metrics(trainer, tokenizer, cfg, metrics: dict[str, Any], eval_ds, eval_text) -> dict[str, float]:
    """`metrics` plus eval loss and perplexity, on the tiny world the entropy floor and the copy probe; as floats."""
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["perplexity"] = math.exp(min(ev["eval_loss"], 50.0))
    floor = sources.entropy_floor(cfg.dataset_name, eval_text) if eval_text is not None else None
    if floor is not None:
        metrics["entropy_floor"] = floor
        if "eval_loss" in metrics:
            metrics["eval_loss_above_floor"] = metrics["eval_loss"] - metrics["entropy_floor"]
        metrics.update(copy_metrics(trainer.model, tokenizer, eval_text, cfg))
    return {k: float(v) for k, v in metrics.items()}


def copy_metrics(model, tokenizer, eval_text, cfg) -> dict[str, float]:
    """`copy_loss_near/far` (nats) and their token counts on the held-out tiny-world texts: the long-range probe
    that compares a Transformer with the LSTM baseline (`align.inspect.copy_probe`).
    A bucket with no token is left out."""
    texts = eval_text.select(range(min(len(eval_text), COPY_PROBE_TEXTS)))["text"]
    probe = copy_loss_by_distance(
        model, tokenizer, texts, batch_size=cfg.per_device_eval_batch_size, max_length=cfg.max_length
    )
    out = {}
    for bucket in ("near", "far"):
        if probe[f"n_{bucket}"]:
            out[f"copy_loss_{bucket}"] = probe[bucket]
            out[f"copy_tokens_{bucket}"] = probe[f"n_{bucket}"]
    logger.info("copy loss (nats): %.4f within %d tokens of the source (%d tokens), %.4f at %d or more (%d)",
                probe["near"], NEAR, probe["n_near"], probe["far"], FAR, probe["n_far"])  # fmt: skip
    return out


def _step_of(checkpoint) -> int:
    try:
        return int(Path(checkpoint).name.split("-")[-1])
    except ValueError:
        return 0


def sample_texts(model, tokenizer, n: int, max_new_tokens: int, seed: int) -> list[dict[str, str]]:
    """`n` texts sampled from BOS (unconditional generation), to show what the model learned."""
    if n <= 0:
        return []
    torch.manual_seed(seed)
    model.eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n, 1), start, dtype=torch.long, device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return [{"text": tokenizer.decode(row[1:], skip_special_tokens=True)} for row in out]


def _log_result(metrics: dict[str, float]) -> None:
    if "eval_loss" in metrics and "entropy_floor" in metrics:
        logger.info(
            "eval loss %.4f nats/token (perplexity %.3f) vs entropy floor %.4f: %.4f above the best possible.",
            metrics["eval_loss"],
            metrics["perplexity"],
            metrics["entropy_floor"],
            metrics["eval_loss_above_floor"],
        )
    elif "eval_loss" in metrics:
        logger.info("eval loss %.4f nats/token (perplexity %.3f).", metrics["eval_loss"], metrics["perplexity"])
    logger.info("%.0f tokens/s of training.", metrics["tokens_per_second"])
