"""`align dpo`: direct preference optimization on pairs from align's rankings (Rafailov et al. 2023), TRL's DPOTrainer.

    align dpo --config recipes/tiny/dpo.yaml
    align dpo --config recipes/tiny/dpo.yaml --ranking_pairs best_vs_rest --loss_type ipo --beta 0.5
    align dpo --config recipes/smollm2-135m/dpo.yaml

The same labels as the reward model: `dataset_name` is an `align rank` output (or a rankings / pairs file), split
into train and held-out groups as `align reward` splits them, and each ranked group becomes chosen/rejected pairs as
`ranking_pairs` says (all, best_vs_rest, adjacent; `align.data.rankings.ranking_pairs`). Pairs reach DPOTrainer in
TRL's conversational preference format (prompt, chosen and rejected as messages), so the model's chat template
renders them as SFT trained and the gold evaluation prompts. The reference is the SFT model: with LoRA (`use_peft`)
the same model with its adapters off (TRL loads no second model), else a frozen copy. `loss_type` (one or several,
with `loss_weights`) and `beta` are TRL's. The model and its parent answer the gold evaluation's held-out prompts as
in `align ppo`, and `kl_to_parent` is the sampled KL to the reference on the same prompts (`align.evaluation.kl`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from trl import DPOTrainer, get_peft_config

from align.config import parse_config
from align.data.rankings import ranking_pairs
from align.evaluation.compare import compare_to_parent, score_parent, start_stage
from align.evaluation.kl import kl_to_parent
from align.io import parent_of, read_stage_info, save_trained, stage_lifecycle
from align.models import modeling
from align.stages.lifecycle import finish_stage, hold_push, train_stage, wait_for_everyone
from align.stages.reward import load_reward_data

logger = logging.getLogger(__name__)

# DPOTrainer's evaluation metrics kept in align_stage.json, under Trainer's names.
EVAL_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("dpo", argv)
    run(cfg)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Data


def conversational(pairs):
    """`{prompt, chosen, rejected}` strings -> TRL's conversational preference rows: the prompt a user turn, each
    answer an assistant turn, so DPOTrainer renders them with the chat template as SFT trained on them."""

    def to_messages(row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}  # fmt: skip

    return pairs.map(to_messages, remove_columns=pairs.column_names, desc="Pairs as chat messages")


def load_pairs(cfg) -> tuple[Any, Any, dict[str, Any], dict[str, Any] | None]:
    """Train pairs (`cfg.ranking_pairs`), held-out pairs (all of theirs, or None), the lineage entry with the counts
    (`groups`, `pairs`) and the rank stage the rankings came from (or None)."""
    train_groups, eval_groups, info, rank_parent = load_reward_data(cfg)
    train = ranking_pairs(train_groups, cfg.ranking_pairs, per_group=cfg.pairs_per_group, seed=cfg.seed)
    info.update({"ranking_pairs": cfg.ranking_pairs, "pairs_per_group": cfg.pairs_per_group, "train_pairs": len(train),
                 "train_groups_with_pairs": len(set(train["group"]))})  # fmt: skip
    held = None
    if eval_groups is not None and len(eval_groups):
        held = conversational(ranking_pairs(eval_groups, "all"))
        info["eval_pairs"] = len(held)
    return conversational(train), held, info, rank_parent


def prompt_source(dataset_name: str) -> str:
    """Where the rankings' prompts came from: an `align rank` stage's own data (e.g. `tinyworld`, so the tiny world's
    gold labeler and held-out prompts apply), else `dataset_name` itself."""
    info = read_stage_info(dataset_name) if Path(dataset_name).is_dir() else None
    if info is not None and info.get("stage") == "rank":
        return (info.get("data") or {}).get("name") or dataset_name
    return dataset_name


def gold_view(cfg):
    """`cfg` as the gold evaluation reads it: `dataset_name` the prompts' source (`prompt_source`), so the tiny world's
    held-out prompts and labeler apply to its rankings and the SFT stage's stored scores match (`compare.RECIPE_KEYS`).
    A shallow copy: `cfg` itself still names the rankings."""
    view = copy.copy(cfg)
    view.dataset_name = prompt_source(cfg.dataset_name)
    return view


# ---------------------------------------------------------------------------------------------------------------------
# Model and trainer


def frozen_copy(model):
    """A copy of `model` in eval mode with no gradients: the full fine-tuning reference."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def build_trainer(cfg, model, tokenizer, train_ds, eval_ds) -> DPOTrainer:
    """DPOTrainer on `model`. LoRA (`use_peft`): no `ref_model`, so TRL computes the reference with the adapters off
    and loads no second model. Full fine-tuning: a frozen copy of `model` made here, not TRL's default reload from
    `config._name_or_path`, which cannot reload a GGUF or `package:` model (the same weights either way)."""
    peft_config = get_peft_config(cfg)
    ref_model = frozen_copy(model) if peft_config is None else None
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stage


@stage_lifecycle
def run(cfg) -> Path:
    gold = start_stage(gold_view(cfg), temperature=cfg.eval_temperature)  # seed; a bad gold_labeler fails first
    output_dir = Path(cfg.output_dir)

    # ---- Data: ranked groups -> pairs
    train_ds, eval_ds, data_info, rank_parent = load_pairs(cfg)
    if eval_ds is None and cfg.eval_strategy != "no":
        cfg.eval_strategy = "no"

    # ---- Model
    model, tokenizer = modeling.load_model_and_tokenizer(cfg)
    # The parent's gold score, before training (the model trains in place); the SFT stage's own when it matches
    parent = None
    if gold is not None:
        parent = score_parent(gold, model, tokenizer, parent=cfg.model_name_or_path, reuse=True, sampled=True)
    total, _ = modeling.count_parameters(model)
    logger.info(
        "dpo: %s (%.2fM parameters%s), %d train groups as %d '%s' pairs / %d held-out pairs, loss %s, beta %g, "
        "batch %d x %d accum x %d processes, %s",
        cfg.model_name_or_path,
        total / 1e6,
        f", LoRA r={cfg.lora_r}" if cfg.use_peft else "",
        data_info["rows"],
        len(train_ds),
        cfg.ranking_pairs,
        len(eval_ds) if eval_ds is not None else 0,
        "+".join(cfg.loss_type),
        cfg.beta,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.world_size,
        modeling.precision_summary(cfg),
    )

    # ---- Train
    push_to_hub = hold_push(cfg)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds)
    metrics: dict[str, Any] = dict(train_stage(trainer, cfg)[1])
    # The labels behind the model: the ranked groups its pairs came from, as the reward model's `rows`
    metrics["labels_used"] = data_info["train_groups_with_pairs"]
    metrics["pairs_used"] = len(train_ds)
    # What training went through (repeats counted; the last batch of an epoch may be short): below pairs_used when
    # max_steps ends it within the first epoch, so not every group's pairs were seen
    metrics["pairs_seen"] = (trainer.state.global_step * cfg.per_device_train_batch_size
                             * cfg.gradient_accumulation_steps * trainer.accelerator.num_processes)  # fmt: skip

    # ---- Evaluate: DPO's held-out loss and implicit-reward pair accuracy
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics.update({k: ev[k] for k in EVAL_METRICS if k in ev})

    # ---- Compare to parent: gold scores, win-rates, and the KL to the reference on the same prompts
    extra: dict[str, Any] = {}
    if gold is not None and trainer.is_world_process_zero():
        found = compare_to_parent(gold, parent, trainer.model, tokenizer, answers=True)
        metrics = {**found.parent_metrics, **metrics, **found.metrics}
        extra = found.extra
        # the reference is TRL's: the frozen copy, or (ref_model None) the model with its adapters off
        reference = None if trainer.ref_model is None else trainer.accelerator.unwrap_model(trainer.ref_model)
        metrics.update(kl_to_parent(gold, trainer.accelerator.unwrap_model(trainer.model), tokenizer,
                                    reference=reference, stage="dpo"))  # fmt: skip

    # ---- Save
    save(trainer, tokenizer, cfg, output_dir)
    if trainer.is_world_process_zero():
        lineage = {"data_parent": {"stage": "rank", "path": rank_parent["path"]}} if rank_parent else {}
        finish_stage(
            output_dir,
            "dpo",
            cfg,
            push_to_hub,
            parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
            data=data_info,
            metrics={k: float(v) for k, v in metrics.items()},
            log_history=trainer.state.log_history,
            reference="the model with its adapters off" if cfg.use_peft else "a frozen copy of the parent",
            peft={"adapter": bool(cfg.use_peft), "merged": bool(cfg.merge_adapter)},
            num_processes=trainer.accelerator.num_processes,
            **lineage,
            **extra,
        )
        logger.info("dpo: wrote %s", output_dir)
    wait_for_everyone()
    return output_dir


def save(trainer, tokenizer, cfg, output_dir: Path) -> None:
    """Model (or adapter, or merged model + adapter) + tokenizer with its chat template + generation config."""
    save_trained(trainer, output_dir, merge_adapter=bool(cfg.use_peft and cfg.merge_adapter))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        trainer.accelerator.unwrap_model(trainer.model).generation_config.save_pretrained(output_dir)
