"""What `align grpo` and `align rloo` share: the reward as TRL reward functions, the prompts in TRL's conversational
format, and the run (config -> data -> models -> TRL trainer -> gold comparison and KL -> save -> align_stage.json).

The two stages differ only in TRL's trainer and config (GRPOTrainer: group-normalized advantages and a clipped
surrogate; RLOOTrainer: leave-one-out baselines), so each is a thin module over `run_online`: one code path, two
commands whose names say what TRL trains, as every stage's one word does.

The reward (`reward_funcs` and `reward_model_path`, summed by TRL with `reward_weights`):
- `reward_model_path`: an `align reward` model, scored as `align ppo` scores it (`align.trainers.rewards`);
- `module:function`: a user function with TRL's signature, handed to TRL as it is;
- `gold`: the gold labeler (tiny world's hidden one, or `gold_labeler`) as a verifiable reward, RLVR. It is what the
  stage is evaluated with, so its gold score is not comparable with the other methods': align_stage.json says
  `"reward": "gold"` and the report must not make it the headline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trl import get_peft_config

from align.evaluation.compare import compare_to_parent, score_parent, start_stage
from align.evaluation.gold import load_gold_labeler, resolved_gold_labeler
from align.evaluation.kl import kl_to_parent
from align.evaluation.score import load_function
from align.io import parent_of, read_stage_info
from align.models import modeling
from align.stages.lifecycle import finish_stage, hold_push, train_stage, wait_for_everyone
from align.stages.online_config import GOLD_REWARD
from align.stages.ppo import final_mean, load_prompts, load_reward_model
from align.stages.sft import save
from align.trainers.rewards import RewardModelReward, TextReward

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Reward


def build_rewards(cfg) -> tuple[list[Any], RewardModelReward | None, str | list[str]]:
    """(TRL's `reward_funcs`, the reward-model function to bind to the trainer's accelerator or None, what the stage
    was rewarded by for align_stage.json: "reward_model", "gold", or the list of every reward's name)."""
    funcs: list[Any] = []
    names: list[str] = []
    model_reward = None
    if cfg.reward_model_path:
        model, tokenizer = load_reward_model(cfg)  # `align ppo`'s loading: one-line errors for a wrong dir
        model_reward = RewardModelReward(model, tokenizer, batch_size=cfg.per_device_eval_batch_size)
        funcs.append(model_reward)
        names.append("reward_model")
    for spec in cfg.reward_funcs or []:
        if spec == GOLD_REWARD:
            labeler = load_gold_labeler(resolved_gold_labeler(cfg))
            funcs.append(TextReward(labeler.score, name=GOLD_REWARD))
            logger.warning("reward_funcs gold: the policy is trained on the gold labeler it is evaluated with (RLVR). "
                           "A comparison, not the headline: its gold score is not comparable with the methods that "
                           "learn from rankings.")  # fmt: skip
        else:
            funcs.append(load_function(spec, key="reward_funcs")[1])
        names.append(spec)
    return funcs, model_reward, names[0] if len(names) == 1 else names


def labels_used(cfg) -> float | None:
    """The ranked groups behind the reward: those the reward model was trained on (its stage's `data.rows`); None
    without a reward model stage (a user function or the gold labeler use no rankings that align can count)."""
    if not cfg.reward_model_path:
        return None
    info = read_stage_info(cfg.reward_model_path) or {}
    rows = (info.get("data") or {}).get("rows")
    return float(rows) if rows is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# Data


def conversational(ds):
    """Prompts (column `prompt`, str) in TRL's conversational format: one user message each, so TRL applies the
    policy's chat template with the generation prompt, as `align ppo` and the gold evaluation prompt it."""
    return ds.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]}, desc="chat prompts")


# ---------------------------------------------------------------------------------------------------------------------
# KL


def measure_kl(cfg, gold, model, tokenizer, stage: str) -> dict[str, float]:
    """`align.evaluation.kl.kl_to_parent` of the trained policy. Reference: the policy with its adapters off
    (LoRA), else the SFT model loaded again (the policy was trained in place)."""
    reference = None
    if not cfg.use_peft:
        reference, _ = modeling.load_model_and_tokenizer(cfg)
        reference.to(next(model.parameters()).device)
    return kl_to_parent(gold, model, tokenizer, reference=reference, stage=stage)


# ---------------------------------------------------------------------------------------------------------------------
# Stage


def train_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """TRL's logged `reward` (the summed reward, before the group baseline) and, with beta > 0, `kl`: means over the
    last updates, where the policy settled (`align.stages.ppo.final_mean`)."""
    out = {"reward": final_mean(log_history, "reward")}
    if any("kl" in h for h in log_history):
        out["kl"] = final_mean(log_history, "kl")
    return out


def run_online(cfg, stage: str, trainer_cls) -> Path:
    """The run of `align <stage>` with TRL's `trainer_cls` (GRPOTrainer or RLOOTrainer); the caller holds the
    output lock (`@io.stage_lifecycle`)."""
    gold = start_stage(cfg, temperature=cfg.eval_temperature)  # seed; a bad gold_labeler fails first; config logged
    output_dir = Path(cfg.output_dir)

    # ---- Data
    train_ds, _, data_info = load_prompts(cfg)  # `align ppo`'s prompts: the tiny world's, or a `prompt` column
    train_ds = conversational(train_ds)

    # ---- Models
    reward_funcs, model_reward, rewarded_by = build_rewards(cfg)
    policy, tokenizer = modeling.load_model_and_tokenizer(cfg)
    peft_config = get_peft_config(cfg)
    # The parent's gold scores, before training (the policy trains in place); the SFT stage's own when they match.
    parent = None
    if gold is not None:
        parent = score_parent(gold, policy, tokenizer, parent=cfg.model_name_or_path, reuse=True, sampled=True)
    logger.info("%s: %s (%.2fM parameters%s), %d prompts x %d generations, reward %s, beta %g, %s", stage,
                cfg.model_name_or_path, modeling.count_parameters(policy)[0] / 1e6,
                f", LoRA r={cfg.lora_r}" if peft_config else "", len(train_ds), cfg.num_generations, rewarded_by,
                cfg.beta, modeling.precision_summary(cfg))  # fmt: skip

    # ---- Train
    push_to_hub = hold_push(cfg)
    trainer = trainer_cls(model=policy, reward_funcs=reward_funcs, args=cfg, train_dataset=train_ds,
                          processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
    if model_reward is not None:
        model_reward.bind(trainer.accelerator)
    _, metrics, _ = train_stage(trainer, cfg)
    metrics.update(train_metrics(trainer.state.log_history))
    if (used := labels_used(cfg)) is not None:
        metrics["labels_used"] = used

    # ---- Compare to parent, KL
    extra: dict[str, Any] = {}
    if gold is not None and trainer.is_world_process_zero():
        found = compare_to_parent(gold, parent, trainer.model, tokenizer, answers=True)
        metrics = {**found.parent_metrics, **metrics, **found.metrics, **measure_kl(cfg, gold, trainer.model,
                                                                                    tokenizer, stage)}  # fmt: skip
        extra = found.extra

    # ---- Save
    save(trainer, tokenizer, cfg, output_dir)
    if trainer.is_world_process_zero():
        finish_stage(
            output_dir,
            stage,
            cfg,
            push_to_hub,
            parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
            data=data_info,
            metrics={k: float(v) for k, v in metrics.items()},
            reward=rewarded_by,
            reward_model=parent_of(cfg.reward_model_path) if cfg.reward_model_path else None,
            log_history=trainer.state.log_history,
            peft={"adapter": bool(peft_config), "merged": bool(cfg.use_peft and cfg.merge_adapter)},
            num_processes=trainer.accelerator.num_processes,
            **extra,
        )
        logger.info("%s: wrote %s", stage, output_dir)
    wait_for_everyone()
    return output_dir
