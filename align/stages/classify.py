"""`align classify`: GPT-1's discriminative fine-tuning (Radford et al. 2018), a causal LM becomes a text classifier.

    align classify --config recipes/tiny/classify.yaml
    align classify --config recipes/tiny/classify.yaml --lm_aux_coef 0          # without the auxiliary LM loss
    align classify --config recipes/tiny/classify.yaml --random_init true       # without pretraining
    align classify --model_name_or_path DIR --dataset_name data/labels.jsonl --output_dir runs/my/classify

Data: `text` + `label` (int or string) rows, `text_pair` for pairs, `choices` + `label` (index) for multiple choice
(`align.data.classification`), or `dataset_name: tinyworld` with `tinyworld_task`. The label set is stored in the
model's `id2label` / `label2id`. The model is `AutoModelForSequenceClassification` on `model_name_or_path` with a
new linear head read at the extract token (the last one); GPT-1's start, delimiter and extract tokens are added to the
tokenizer and baked into its post-processor, so `pipeline("text-classification", model=DIR)` builds the same
sequences as training. The loss adds `lm_aux_coef` x the LM loss on the inputs (`align.trainers.classify`).
Held-out accuracy, F1 and (binary) Matthews correlation come from `evaluate`, with metric modules shipped in
`align/metrics` and loaded by path, offline.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed
from trl import get_peft_config

from align.config import log_config, parse_config
from align.data import classification as cl
from align.data import load as dl
from align.data import sources
from align.data.classification import ClassifyCollator, add_special_tokens, tokenize
from align.errors import AlignError
from align.io import parent_of, save_trained, stage_lifecycle
from align.models import modeling
from align.stages.classify_embeddings import run_averaged
from align.stages.lifecycle import finish_stage, hold_push, train_stage, wait_for_everyone
from align.trainers.classify import ClassifyMetrics, ClassifyTrainer

logger = logging.getLogger(__name__)

EVAL_METRICS = ("accuracy", "f1", "matthews_correlation")
NUM_SAMPLES = 8  # held-out predictions kept in align_stage.json (and shown on the Hub card)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("classify", argv)
    run(cfg)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Data


def load_classify_data(cfg) -> dict[str, Any]:
    """Validated train / held-out rows, the input format, the label maps and the lineage entry."""
    built = sources.classification(
        cfg.dataset_name,
        task=cfg.tinyworld_task,
        n=cfg.tinyworld_examples,
        test_size=cfg.dataset_test_size,
        seed=cfg.tinyworld_seed,
        heldout_places=cfg.tinyworld_heldout_places,
        train_split=cfg.dataset_train_split,
        test_split=cfg.dataset_test_split,
    )
    info: dict[str, Any]
    if built is not None:
        dd, source, detected, info = built
    else:
        dd = dl.load_data(cfg.dataset_name, config=cfg.dataset_config)
        source = cfg.dataset_name
        if cfg.dataset_column_mapping:
            dd = dl.apply_column_mapping(dd, cfg.dataset_column_mapping, source=source)
        train_part = dd[cfg.dataset_train_split] if cfg.dataset_train_split in dd else next(iter(dd.values()))
        detected = cl.detect_format(train_part.column_names, source)
        info = {"name": cfg.dataset_name, "config": cfg.dataset_config}
    input_format = detected if cfg.input_format == "auto" else cfg.input_format
    train, test = dl.train_test(dd, train_split=cfg.dataset_train_split, test_split=cfg.dataset_test_split,
                                test_size=cfg.dataset_test_size, seed=cfg.seed, source=source)  # fmt: skip
    parts, labels, most = {}, {}, 1
    for name, part in (("train", train), ("eval", test)):
        if part is None:
            continue
        split = cfg.dataset_test_split
        where = source if name == "train" or split not in dd else f"{source}[{split}]"
        cl.check_columns(part.column_names, input_format, where)
        labels[name], k = cl.scan_labels(part, input_format, where)
        parts[name], most = part, max(most, k)
    if input_format == "multiple_choice":
        id2label, label2id = {0: "score"}, None
    else:
        id2label, label2id = cl.label_maps(labels["train"], labels.get("eval", ()))
        if len(id2label) < 2:
            raise AlignError(
                f"{source}: every row has label {labels['train'][0]!r}; a classifier needs 2 or more classes."
            )
        unseen = sorted({str(v) for v in labels.get("eval", ())} - {str(v) for v in labels["train"]})
        if unseen:
            logger.warning("%s: held-out labels %s never occur in training.", source, ", ".join(unseen))
    counts = Counter(str(v) for v in labels["train"])
    info.update(fingerprint=train._fingerprint, rows=len(train), eval_rows=len(test) if test is not None else 0,
                label_counts=dict(sorted(counts.items())))  # fmt: skip
    return {"train": parts["train"], "eval": parts.get("eval"), "format": input_format, "id2label": id2label,
            "label2id": label2id, "num_choices": most, "info": info, "eval_labels": labels.get("eval")}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Model


def load_classifier(cfg, num_labels: int, id2label: dict[int, str], label2id: dict[str, int] | None):
    """(AutoModelForSequenceClassification on model_name_or_path, its tokenizer with GPT-1's tokens, their ids)."""
    path = cfg.model_name_or_path
    tokenizer = modeling.load_tokenizer(cfg.tokenizer_name_or_path or path, revision=cfg.model_revision,
                                        trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    kwargs = {"revision": cfg.model_revision, "trust_remote_code": cfg.trust_remote_code}
    label2id = label2id or {v: k for k, v in id2label.items()}
    labels = {"num_labels": num_labels, "id2label": id2label, "label2id": label2id}
    if cfg.random_init:
        config = modeling.load_pretrained(AutoConfig, path, what="a model config", **kwargs)
        for k, v in labels.items():
            setattr(config, k, v)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = modeling.load_pretrained(AutoModelForSequenceClassification, path,
                                         what="it as a sequence-classification model", dtype=cfg.dtype or "auto",
                                         attn_implementation=cfg.attn_implementation, **labels, **kwargs)  # fmt: skip
    if modeling.is_encoder(model.config, tokenizer):
        raise AlignError(
            f"{path}: a {model.config.model_type} encoder; classify is GPT-1's recipe for a causal LM (a decoder read "
            "at its last token). Start from a causal LM, e.g. runs/tiny/pretrain."
        )
    ids = add_special_tokens(tokenizer, model)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if cfg.lm_aux_coef > 0 and not model.config.get_text_config().tie_word_embeddings:
        _keep_lm_head(cfg, model, len(tokenizer))
    return model, tokenizer, ids


def _keep_lm_head(cfg, model, vocab: int) -> None:
    """An untied LM head for the auxiliary loss, kept beside the classifier as `align_lm_head` while training (and in
    checkpoints) and dropped before the final save: the classifier itself has no LM head."""
    hidden = model.get_input_embeddings().weight.shape[1]
    if cfg.random_init:
        head = torch.nn.Linear(hidden, vocab, bias=False)
    else:
        lm = modeling.load_causal_lm(cfg.model_name_or_path, revision=cfg.model_revision, dtype=cfg.dtype,
                                     trust_remote_code=cfg.trust_remote_code)  # fmt: skip
        old = lm.get_output_embeddings().weight.detach()
        head = torch.nn.Linear(hidden, vocab, bias=False, dtype=old.dtype)
        with torch.no_grad():
            head.weight[: old.shape[0]] = old
            head.weight[old.shape[0] :] = old.mean(0)
        del lm
    model.align_lm_head = head


# ---------------------------------------------------------------------------------------------------------------------
# Stage


@stage_lifecycle
def run(cfg) -> Path:
    set_seed(cfg.seed)
    log_config(cfg)
    output_dir = Path(cfg.output_dir)

    # ---- Data
    data = load_classify_data(cfg)
    fmt, id2label, label2id = data["format"], data["id2label"], data["label2id"]
    num_labels = 1 if fmt == "multiple_choice" else len(id2label)
    if data["eval"] is None and cfg.eval_strategy != "no":
        cfg.eval_strategy = "no"

    if cfg.averaged_embeddings:  # the bag-of-vectors baseline: a logistic regression, no Trainer
        return run_averaged(cfg, data)

    # ---- Model: the classifier, its input format's special tokens, the tokenized rows, LoRA
    model, tokenizer, ids = load_classifier(cfg, num_labels, id2label, label2id)
    train_ds, eval_ds = tokenize_splits(cfg, data, tokenizer, ids)
    peft_config = get_peft_config(cfg)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    _log_setup(cfg, model, peft_config, data, train_ds, eval_ds)

    # ---- Train
    push_to_hub = hold_push(cfg)
    trainer = ClassifyTrainer(
        model=model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=ClassifyCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        compute_metrics=ClassifyMetrics(num_labels if label2id else data["num_choices"], fmt),
        input_format=fmt,
        special_ids=ids,
        lm_aux_coef=cfg.lm_aux_coef,
        num_choices=data["num_choices"],
    )
    metrics: dict[str, Any] = train_stage(trainer, cfg)[1]
    extra: dict[str, Any] = {}

    # ---- Evaluate
    if eval_ds is not None:
        extra["samples"] = eval_metrics(trainer, eval_ds, data, metrics)

    # ---- Save: the classifier alone (no auxiliary LM head), its input format in the config
    strip_for_saving(trainer, peft_config, data)
    # A LoRA classifier is saved merged (pipeline() loads it as any classifier), its adapter in output_dir/adapter.
    save_trained(trainer, output_dir, merge_adapter=peft_config is not None)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        _check_saved_format(output_dir, tokenizer, data["train"][0], fmt)
        finish_stage(
            output_dir,
            "classify",
            cfg,
            push_to_hub,
            parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
            data=data["info"],
            metrics={k: float(v) for k, v in metrics.items()},
            log_history=trainer.state.log_history,
            num_processes=trainer.accelerator.num_processes,
            peft={"adapter": peft_config is not None, "merged": peft_config is not None},
            input_format=fmt,
            id2label={str(k): v for k, v in id2label.items()},
            **extra,
        )
        logger.info("classify: wrote %s", output_dir)
    wait_for_everyone()
    return output_dir


def tokenize_splits(cfg, data: dict[str, Any], tokenizer, ids):
    """(train, eval) rows tokenized in the input format; eval None when there is no held-out split."""
    fmt, label2id = data["format"], data["label2id"]
    train_ds = tokenize(data["train"], tokenizer, fmt, ids, label2id, cfg.max_length, desc="tokenizing train")
    eval_ds = None
    if data["eval"] is not None:
        eval_ds = tokenize(data["eval"], tokenizer, fmt, ids, label2id, cfg.max_length, desc="tokenizing eval")
    return train_ds, eval_ds


def _log_setup(cfg, model, peft_config, data: dict[str, Any], train_ds, eval_ds) -> None:
    id2label = data["id2label"]
    total, trainable = modeling.count_parameters(model)
    logger.info(
        "classify: %s (%.2fM parameters, %.2fM trainable%s%s), %s, %s, %d train / %d held-out rows, lm_aux_coef %g, "
        "batch %d x %d accum x %d processes, %s",
        cfg.model_name_or_path, total / 1e6, trainable / 1e6, ", random init" if cfg.random_init else "",
        f", LoRA r={cfg.lora_r}" if peft_config else "", data["format"],
        f"{len(id2label)} classes {list(id2label.values())}" if data["label2id"] else
        f"up to {data['num_choices']} choices",
        len(train_ds), len(eval_ds) if eval_ds is not None else 0, cfg.lm_aux_coef,
        cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.world_size,
        modeling.precision_summary(cfg),
    )  # fmt: skip


def eval_metrics(trainer, eval_ds, data: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Held-out metrics (and the majority-class accuracy to compare with) into `metrics`; returns sample rows."""
    pred = trainer.predict(eval_ds, metric_key_prefix="eval")
    ev = pred.metrics
    metrics["eval_loss"] = ev["eval_loss"]
    metrics.update({k: ev[f"eval_{k}"] for k in EVAL_METRICS if f"eval_{k}" in ev})
    majority = Counter(pred.label_ids.tolist()).most_common(1)[0][1] / len(pred.label_ids)
    metrics["majority_accuracy"] = majority
    samples = _samples(data["eval"], pred, data["id2label"], data["format"])
    logger.info("Held-out (%d rows): %s; majority class %.4f.", len(eval_ds),
                ", ".join(f"{k} {metrics[k]:.4f}" for k in EVAL_METRICS if k in metrics), majority)  # fmt: skip
    return samples


def strip_for_saving(trainer, peft_config, data: dict[str, Any]) -> None:
    """Drop the auxiliary loss's LM head (no part of the classifier) and record the input format in the config."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    inner = unwrapped.get_base_model() if peft_config is not None else unwrapped
    if hasattr(inner, "align_lm_head"):
        del inner.align_lm_head
    inner.config.align_input_format = data["format"]
    if data["format"] == "multiple_choice":
        inner.config.align_num_choices = data["num_choices"]


def _samples(rows, pred, id2label: dict[int, str], fmt: str) -> list[dict[str, Any]]:
    """The first held-out rows with their true and predicted label (multiple choice: choice index)."""
    out = []
    guesses = pred.predictions.argmax(-1).tolist()
    for i in range(min(NUM_SAMPLES, len(rows))):
        row = rows[i]
        text = row["text"] + (f" || {row['text_pair']}" if fmt in ("pair", "similarity") else "")
        if fmt == "multiple_choice":
            text += "".join(f"\n[{k}] {c}" for k, c in enumerate(row["choices"]))
            out.append({"text": text, "label": int(row["label"]), "predicted": guesses[i]})
        else:
            out.append({"text": text, "label": str(row["label"]), "predicted": id2label[guesses[i]]})
    return out


def _check_saved_format(output_dir: Path, tokenizer, row: dict[str, Any], fmt: str) -> None:
    """Warn when the saved tokenizer, reloaded, does not build GPT-1's sequences itself (some tokenizer classes
    rebuild their post-processor on load): `pipeline()` would then read the model differently from training."""
    saved = modeling.load_tokenizer(str(output_dir))
    pair = row.get("text_pair") if fmt in ("pair", "similarity") else (row["choices"][0] if fmt == "multiple_choice"
                                                                         else None)  # fmt: skip
    want = tokenizer(row["text"], pair)["input_ids"]
    got = saved(row["text"], pair)["input_ids"]
    if got != want:
        logger.warning(
            "%s: the saved %s does not add GPT-1's start/delimiter/extract tokens by itself after reloading; "
            "pipeline('text-classification') will not match training. Build the inputs as in "
            "align.data.classification.build.", output_dir, type(saved).__name__,
        )  # fmt: skip
