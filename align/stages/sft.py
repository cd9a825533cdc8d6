"""`align sft`: supervised fine-tuning on demonstrations (InstructGPT step 1), with TRL's SFTTrainer.

    align sft --config recipes/tiny/sft.yaml
    align sft --config recipes/own-data/sft.yaml --dataset_name data/demos.jsonl --model_name_or_path HF_ID_OR_DIR

Demonstrations in any common format (messages, prompt/completion, alpaca, ShareGPT, text) are standardized to TRL's
conversational prompt/completion form, so the loss is on the response only under any chat template
(`completion_only_loss: false` trains on the whole sequence; `assistant_only_loss: true` trains every assistant turn
of multi-turn data, which needs `{% generation %}` markers in the template). LoRA/QLoRA through peft (`use_peft`).
The model and its parent answer the same held-out prompts and a gold labeler scores both: the tiny world's hidden
labeler, or on any data `gold_labeler` on `gold_eval_dataset` (`align.evaluation.gold`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trl import SFTTrainer, get_peft_config

from align.config import parse_config
from align.data import formats, sources
from align.data import load as dl
from align.errors import AlignError
from align.evaluation.compare import compare_to_parent, score_parent, start_stage
from align.io import parent_of, save_trained, stage_lifecycle
from align.models import modeling
from align.stages.lifecycle import finish_stage, hold_push, train_stage, wait_for_everyone

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("sft", argv)
    run(cfg)
    return 0


def load_sft_data(cfg) -> tuple[Any, Any, dict[str, Any]]:
    """Train/eval datasets in TRL's format (conversational prompt/completion, messages or text) + lineage entry."""
    built = sources.demonstrations(
        cfg.dataset_name,
        n=cfg.tinyworld_demos,
        seed=cfg.tinyworld_seed,
        error_rate=cfg.tinyworld_error_rate,
        habit_rate=cfg.tinyworld_habit_rate,
    )
    info: dict[str, Any]
    source = cfg.dataset_name
    if built is not None:
        dd, info = built
    else:
        dd = dl.load_data(cfg.dataset_name, config=cfg.dataset_config)
        info = {"name": cfg.dataset_name, "config": cfg.dataset_config}
    train, test = dl.train_test(
        dd,
        train_split=cfg.dataset_train_split,
        test_split=cfg.dataset_test_split,
        test_size=cfg.dataset_test_size,
        seed=cfg.seed,
    )
    fmt = None if cfg.dataset_format == "auto" else cfg.dataset_format
    out = []
    for part in (train, test):
        if part is None:
            out.append(None)
            continue
        if cfg.dataset_column_mapping:
            part = dl.apply_column_mapping(part, cfg.dataset_column_mapping, source=source)
        part, skipped = formats.standardize(
            part, source=source, dataset_format=fmt, skip_invalid=cfg.skip_invalid_rows
        )
        if skipped:
            info["skipped_rows"] = info.get("skipped_rows", 0) + skipped
        if "prompt" in part.column_names and not cfg.assistant_only_loss:
            part = part.select_columns(["prompt", "completion"])
        elif "messages" in part.column_names:
            part = part.select_columns(["messages"])
        out.append(part)
    train, test = out
    if len(train) == 0:
        raise AlignError(f"{source}: no training rows left. Check the data (and skip_invalid_rows).")
    info.update({"fingerprint": train._fingerprint, "rows": len(train), "eval_rows": len(test) if test else 0})
    return train, test, info


@stage_lifecycle
def run(cfg) -> Path:
    gold = start_stage(cfg, temperature=cfg.gold_eval_temperature)  # seed; a bad gold_labeler fails first
    output_dir = Path(cfg.output_dir)

    # ---- Data
    train_ds, eval_ds, data_info = load_sft_data(cfg)
    if eval_ds is None and cfg.eval_strategy != "no":
        cfg.eval_strategy = "no"

    # ---- Model
    model, tokenizer = modeling.load_model_and_tokenizer(cfg)
    peft_config = get_peft_config(cfg)
    # The parent's gold score, before training (the model is trained in place)
    parent = score_parent(gold, model, tokenizer, parent=cfg.model_name_or_path) if gold is not None else None
    total, _ = modeling.count_parameters(model)
    logger.info(
        "sft: %s (%.2fM parameters%s), %d train / %d eval rows, batch %d x %d accum x %d processes, %s",
        cfg.model_name_or_path,
        total / 1e6,
        f", LoRA r={cfg.lora_r}" if peft_config else "",
        len(train_ds),
        len(eval_ds) if eval_ds is not None else 0,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.world_size,
        modeling.precision_summary(cfg),
    )

    # ---- Train
    push_to_hub = hold_push(cfg)
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    metrics = dict(train_stage(trainer, cfg)[1])

    # ---- Evaluate
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        if "eval_mean_token_accuracy" in ev:
            metrics["eval_mean_token_accuracy"] = ev["eval_mean_token_accuracy"]

    # ---- Compare to parent
    extra: dict[str, Any] = {}
    if gold is not None:
        found = compare_to_parent(gold, parent, trainer.model, tokenizer)
        metrics = {**found.parent_metrics, **metrics, **found.metrics}
        extra = found.extra

    # ---- Save
    save(trainer, tokenizer, cfg, output_dir)
    if trainer.is_world_process_zero():
        finish_stage(
            output_dir,
            "sft",
            cfg,
            push_to_hub,
            parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
            data=data_info,
            metrics={k: float(v) for k, v in metrics.items()},
            log_history=trainer.state.log_history,
            peft={"adapter": bool(peft_config), "merged": bool(cfg.merge_adapter)},
            num_processes=trainer.accelerator.num_processes,
            **extra,
        )
    wait_for_everyone()
    return output_dir


def save(trainer, tokenizer, cfg, output_dir: Path) -> None:
    """Model (or adapter, or merged model + adapter) + tokenizer with its chat template + generation config."""
    model = trainer.model
    save_trained(trainer, output_dir, merge_adapter=bool(cfg.use_peft and cfg.merge_adapter))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        base = trainer.accelerator.unwrap_model(model)
        base.generation_config.save_pretrained(output_dir)
