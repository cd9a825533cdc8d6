"""`align ppo`: optimize the policy against the reward model with PPO (InstructGPT step 3), align's PPOTrainer.

    align ppo --config recipes/tiny/ppo.yaml
    align ppo --config recipes/tiny/ppo.yaml --model_name_or_path runs/tiny/sft --reward_model_path runs/tiny/reward
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml \
        -m align ppo --config recipes/gpt2-small/ppo.yaml

Four roles: the policy (`model_name_or_path`: the SFT stage, or any causal LM; full fine-tune or LoRA with
`use_peft`), the reference (a frozen copy, or the LoRA policy with its adapter disabled), the reward model
(`reward_model_path`: an `align reward` output with its own tokenizer and stored offset) and the value model
(`value_model_path`, else a copy of the reward model as InstructGPT, or the policy with a fresh head:
`value_model_init`). Prompts: tiny-world instructions (train split), or your file (`prompt` column, or `messages`
ending in a user turn). The policy and its parent answer held-out prompts and a gold labeler scores both: on the tiny
world the prompts `align sft` used and its hidden labeler; on any data `gold_eval_dataset` and `gold_labeler`
(`align.evaluation.gold`, e.g. align.data.verifiable:score).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForSequenceClassification
from trl import get_peft_config

from align.config import parse_config
from align.data import formats, sources
from align.data import load as dl
from align.errors import AlignError
from align.evaluation.compare import GoldSettings, compare_to_parent, score_parent, start_stage
from align.evaluation.kl import kl_to_parent
from align.io import parent_of, read_stage_info, resume_checkpoint, stage_lifecycle
from align.models import modeling, modeling_reward  # noqa: F401 - registers LikelihoodRewardModel with the Auto classes
from align.stages.lifecycle import finish_stage, hold_push, wait_for_everyone
from align.trainers.ppo import PPOTrainer
from align.trainers.ppo_models import VALUE_HEAD_FILE
from align.trainers.reward import score

logger = logging.getLogger(__name__)

# `reward` and `kl` in align_stage.json: means over the last tenth of the updates (at least one logged entry), where
# the policy has settled; the first updates would mostly measure the SFT model.
FINAL_SHARE = 0.1


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config("ppo", argv)
    run(cfg)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Data


def load_prompts(cfg) -> tuple[Any, Any, dict[str, Any]]:
    """Train prompts, held-out prompts (or None) as datasets with one column `prompt` (str), and the lineage entry."""
    built = sources.instruction_prompts(cfg.dataset_name, n=cfg.tinyworld_prompts, seed=cfg.tinyworld_seed,
                                        prompt_only=True)  # fmt: skip
    if built is not None:
        train, info = built
        return train, None, info

    source = cfg.dataset_name
    dd = dl.load_data(source, config=cfg.dataset_config)
    train, test = dl.train_test(
        dd,
        train_split=cfg.dataset_train_split,
        test_split=cfg.dataset_test_split,
        test_size=cfg.dataset_test_size,
        seed=cfg.seed,
        source=source,
    )
    out = []
    for part in (train, test):
        if part is None:
            out.append(None)
            continue
        if cfg.dataset_column_mapping:
            part = dl.apply_column_mapping(part, cfg.dataset_column_mapping, source=source)
        columns = list(part.column_names)
        if "prompt" not in columns and "messages" not in columns:
            raise AlignError(
                f"{source}: no 'prompt' or 'messages' column (columns present: {', '.join(columns)}). "
                'Rename one with dataset_column_mapping, e.g. {"question": "prompt"}.'
            )
        keep = "prompt" if "prompt" in columns else "messages"
        rows = part.select_columns([keep]).to_list()
        prompts = [formats.prompt_text(r, f"{source}:{dl.source_row(part, i)}", "PPO") for i, r in enumerate(rows)]
        out.append(datasets.Dataset.from_dict({"prompt": prompts}))
    train, test = out
    if len(train) == 0:
        raise AlignError(f"{source}: no prompts. Check the data and dataset_train_split.")
    info = {"name": source, "config": cfg.dataset_config, "fingerprint": train._fingerprint, "rows": len(train),
            "eval_rows": len(test) if test is not None else 0}  # fmt: skip
    return train, test, info


def load_ptx(cfg, tokenizer):
    """PPO-ptx rows (column `text`), or None when ptx_coef is 0."""
    if not cfg.ptx_coef:
        return None
    built = sources.ptx_text(cfg.ptx_dataset_name, seed=cfg.tinyworld_seed)
    if built is not None:
        return built
    dd = dl.load_data(cfg.ptx_dataset_name)
    train, _ = dl.train_test(dd, train_split=cfg.dataset_train_split, test_size=0, source=cfg.ptx_dataset_name)
    dl.require_columns(train, ["text"], cfg.ptx_dataset_name)
    return train.select_columns(["text"])


# ---------------------------------------------------------------------------------------------------------------------
# Models


def reward_dtype(cfg):
    """The reward model's load dtype: bf16 when the stage runs in bf16 and `dtype` is auto. It is frozen and only read
    under bf16 autocast, so float32 weights would only double its memory (TRL loads reward models so too); an explicit
    `dtype` wins."""
    dtype = cfg.dtype or "auto"
    return torch.bfloat16 if cfg.bf16 and dtype == "auto" else dtype


def load_reward_model(cfg):
    """The frozen reward model and its own tokenizer; a one-line error when the path is not a scalar-head model."""
    path = cfg.reward_model_path
    info = read_stage_info(path)
    if info is not None and info.get("stage") != "reward":
        raise AlignError(
            f"reward_model_path {path}: an align '{info.get('stage')}' stage, not a reward model. Point it at the "
            "output of `align reward` (e.g. runs/tiny/reward)."
        )
    if not Path(path).exists() and ("/" not in path or path.startswith((".", "/", "~"))):
        raise AlignError(f"reward_model_path {path}: no such directory. Run `align reward` first, or fix the path.")
    model = modeling.load_pretrained(AutoModelForSequenceClassification, path, what="a sequence-classification model",
                                     key="reward_model_path", dtype=reward_dtype(cfg),
                                     trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    if model.config.num_labels != 1:
        raise AlignError(
            f"reward_model_path {path}: the model has {model.config.num_labels} labels; a reward model has one "
            "scalar output (num_labels=1)."
        )
    tokenizer = modeling.load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer


def load_value_model(cfg):
    if not cfg.value_model_path:
        return None
    return modeling.load_pretrained(AutoModelForSequenceClassification, cfg.value_model_path, what="a value model",
                                    key="value_model_path", dtype=cfg.dtype or "auto",
                                    trust_remote_code=cfg.trust_remote_code)  # fmt: skip


def final_mean(log_history: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` over the last FINAL_SHARE of the logged entries that have it (nan when none)."""
    values = [h[key] for h in log_history if key in h]
    if not values:
        return math.nan
    tail = values[-max(1, math.ceil(len(values) * FINAL_SHARE)) :]
    return float(sum(tail) / len(tail))


def eval_during_training(cfg, gold: GoldSettings | None, eval_ds, reward_model, reward_tokenizer):
    """(eval_fn, eval_metric, eval_dataset) of the trainer's evaluation during training: the gold labeler's mean score
    on the held-out prompts; else, with held-out prompts of your data, the reward model's mean score; else none."""
    if gold is not None:
        if cfg.eval_strategy == "no":
            # No curve asked for: the trainer's one eval, at the end, would score the gold prompts greedily a second
            # time (4 of the SmolLM2 chain's 80 minutes); the stage scores the policy itself (compare_to_parent).
            return None, "gold_score", None
        labeler = gold.labeler

        def gold_fn(ps: list[str], rs: list[str]) -> float:
            return sum(labeler.score(p, r) for p, r in zip(ps, rs, strict=True)) / len(ps)

        return gold_fn, "gold_score", [{"prompt": p} for p in gold.prompts]
    if eval_ds is not None:

        def reward_fn(ps: list[str], rs: list[str]) -> float:
            return float(score(reward_model, reward_tokenizer, ps, rs).mean())

        return reward_fn, "reward", eval_ds
    return None, "gold_score", None


def train_metrics(log_history: list[dict[str, Any]], updates: int, runtime: float) -> dict[str, float]:
    """`reward` and `kl` (`final_mean`: where the policy settled), `updates` and `train_runtime`."""
    return {"reward": final_mean(log_history, "ppo/score"), "kl": final_mean(log_history, "ppo/kl"),
            "updates": float(updates), "train_runtime": runtime}  # fmt: skip


def save(trainer: PPOTrainer, tokenizer, cfg, output_dir: Path) -> None:
    """The policy (merged, or its adapter) and the value model; with `merge_adapter`, the adapter in `adapter/` too."""
    merged = bool(cfg.use_peft and cfg.merge_adapter)
    trainer.save_model(output_dir, merge_adapter=merged)
    if merged and trainer.accelerator.is_main_process:
        # only the policy's adapter (with value_model_init policy_lora the peft model holds the critic's too)
        trainer.policy.save_pretrained(output_dir / "adapter", selected_adapters=[trainer.policy.active_adapter])
        tokenizer.save_pretrained(output_dir / "adapter")


# ---------------------------------------------------------------------------------------------------------------------
# Stage


@stage_lifecycle
def run(cfg) -> Path:
    gold = start_stage(cfg, temperature=cfg.eval_temperature)  # seed; a bad gold_labeler fails first; config logged
    output_dir = Path(cfg.output_dir)

    # ---- Data
    train_ds, eval_ds, data_info = load_prompts(cfg)

    # ---- Models
    reward_model, reward_tokenizer = load_reward_model(cfg)
    policy, tokenizer = modeling.load_model_and_tokenizer(cfg)
    value_model = load_value_model(cfg)
    peft_config = get_peft_config(cfg)
    ptx_ds = load_ptx(cfg, tokenizer)

    # ---- The parent's gold score, before the trainer exists: the policy is trained in place (and a resumed run
    # loads its checkpoint later). Read from the SFT stage when it scored the same prompts the same way.
    parent = None
    if gold is not None:
        parent = score_parent(gold, policy, tokenizer, parent=cfg.model_name_or_path, reuse=True, sampled=True)
    eval_fn, eval_metric, eval_ds = eval_during_training(cfg, gold, eval_ds, reward_model, reward_tokenizer)

    # ---- Train
    # Trainer would push every checkpoint; align pushes the finished stage once, with lineage (as the SFT stage).
    push_to_hub = hold_push(cfg)
    trainer = PPOTrainer(
        args=cfg,
        policy=policy,
        reward_model=reward_model,
        value_model=value_model,
        processing_class=tokenizer,
        reward_tokenizer=reward_tokenizer,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        peft_config=peft_config,
        eval_fn=eval_fn,
        eval_metric=eval_metric,
        ptx_dataset=ptx_ds,
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
    metrics = train_metrics(trainer.state.log_history, result.global_step, time.perf_counter() - start)
    logger.info("ppo: reward %.4f, KL %.4f (means over the last updates).", metrics["reward"], metrics["kl"])
    acc = trainer.accelerator

    # ---- Compare to parent
    extra: dict[str, Any] = {}
    if gold is not None and acc.is_main_process:
        # gold_responses (and parent_gold_responses): the greedy answers the per-prompt scores are of, to audit them
        found = compare_to_parent(gold, parent, trainer.policy, tokenizer, answers=True, samples_key="gold_samples")
        kl = kl_to_parent(gold, trainer.policy, tokenizer, reference=trainer.ref_policy, stage="ppo")
        metrics = {**found.parent_metrics, **metrics, **found.metrics, **kl}
        extra = found.extra

    # ---- Save
    save(trainer, tokenizer, cfg, output_dir)
    if acc.is_main_process:
        finish_stage(
            output_dir,
            "ppo",
            cfg,
            push_to_hub,
            parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
            data=data_info,
            metrics={k: float(v) for k, v in metrics.items()},
            reward_model=parent_of(cfg.reward_model_path),
            value_model={
                "init": "path" if cfg.value_model_path else cfg.value_model_init,
                "path": cfg.value_model_path,
                "saved": VALUE_HEAD_FILE if cfg.value_model_init == "policy_head" else "value_model",
            },  # fmt: skip
            log_history=trainer.state.log_history,
            samples=trainer.samples,
            peft={"adapter": bool(peft_config), "merged": bool(cfg.use_peft and cfg.merge_adapter)},
            num_processes=acc.num_processes,
            **extra,
        )
        logger.info("ppo: wrote %s (%s parameters)", output_dir, f"{modeling.count_parameters(trainer.policy)[0]:,}")
    wait_for_everyone()
    return output_dir
