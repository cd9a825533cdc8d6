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

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

from align.config import log_config, parse_config
from align.data.tinyworld import TINYWORLD
from align.errors import AlignError
from align.evaluation import gold
from align.io import parent_of, read_stage_info, resume_checkpoint, stage_lifecycle
from align.stages.lifecycle import finish_stage, hold_push, wait_for_everyone

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
    import datasets

    if cfg.dataset_name == TINYWORLD:
        from align.data import tinyworld

        train = tinyworld.instruction_prompts(cfg.tinyworld_prompts, seed=cfg.tinyworld_seed, split="train")
        train = train.select_columns(["prompt"])
        info = {"name": TINYWORLD, "seed": cfg.tinyworld_seed, "fingerprint": train._fingerprint, "rows": len(train)}
        return train, None, info

    from align.data import formats
    from align.data import load as dl

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
    if cfg.ptx_dataset_name == TINYWORLD:
        from align.data import tinyworld

        # 4000 documents: far more than a short PPO run samples (micro-batch rows per optimizer step).
        return tinyworld.pretrain_corpus(4000, seed=cfg.tinyworld_seed).select_columns(["text"])
    from align.data import load as dl

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
    import torch

    dtype = cfg.dtype or "auto"
    return torch.bfloat16 if cfg.bf16 and dtype == "auto" else dtype


def load_reward_model(cfg):
    """The frozen reward model and its own tokenizer; a one-line error when the path is not a scalar-head model."""
    from transformers import AutoModelForSequenceClassification

    from align.models import modeling, modeling_reward  # noqa: F401 - registers LikelihoodRewardModel with the Auto classes

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
    from transformers import AutoModelForSequenceClassification

    from align.models import modeling, modeling_reward  # noqa: F401 - registers LikelihoodRewardModel with the Auto classes

    return modeling.load_pretrained(AutoModelForSequenceClassification, cfg.value_model_path, what="a value model",
                                    key="value_model_path", dtype=cfg.dtype or "auto",
                                    trust_remote_code=cfg.trust_remote_code)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Gold evaluation (tiny world, or gold_labeler + gold_eval_dataset)


def _gold(cfg, model, tokenizer, prompts: list[str], samples: int = 0, labeler=None) -> dict[str, Any]:
    """Gold eval at `eval_temperature`, or `samples` sampled answers per prompt (`stage_gold_eval`, as `align sft`)."""
    from align.evaluation.gold import stage_gold_eval

    return stage_gold_eval(cfg, model, tokenizer, prompts, temperature=cfg.eval_temperature, samples=samples,
                           labeler=labeler)  # fmt: skip


GOLD_KEYS = ("dataset_name", "tinyworld_seed", "gold_eval_prompts", "gold_eval_max_new_tokens", "gold_labeler",
             "gold_eval_dataset")  # fmt: skip


def parent_gold_settings(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The SFT stage's gold-eval settings (its recipe over `align sft`'s defaults), or None if it has no gold score."""
    if not info or "gold_score" not in (info.get("metrics") or {}) or info.get("stage") != "sft":
        return None
    from align.config import config_class

    defaults = {f.name: f.default for f in dataclasses.fields(config_class("sft"))}
    recipe = info.get("recipe") or {}
    keys = (*GOLD_KEYS, "gold_eval_temperature", "gold_eval_samples")
    return {k: recipe.get(k, defaults[k]) for k in keys}


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def parent_gold_score(cfg, model, tokenizer, prompts: list[str], samples: int = 0, labeler=None) -> dict[str, Any]:
    """The parent's per-prompt gold scores on `prompts` (greedy, or `samples` per prompt as `_gold`): read from the
    SFT stage when it used the same prompts, labeler and decoding, else computed now (before training: the policy is
    trained in place). Returns `{"gold_scores", "gold_pass_rates" (per constraint), "responses" (the first answer
    per prompt), "source"}`; pass rates and responses are None when the SFT stage did not store them."""
    info = read_stage_info(cfg.model_name_or_path)
    settings = parent_gold_settings(info)
    ours = {k: getattr(cfg, k) for k in GOLD_KEYS}
    ours.update({"gold_eval_samples": samples} if samples else {"gold_eval_temperature": cfg.eval_temperature})
    key = "gold_scores_sampled" if samples else "gold_scores"
    if settings is not None and all(_same_setting(settings[k], v) for k, v in ours.items()):
        if len(info.get(key) or []) == len(prompts):
            greedy = not samples
            return {"gold_scores": [float(s) for s in info[key]],
                    "gold_pass_rates": info.get("gold_pass_rates") if greedy else None,
                    "responses": info.get("gold_responses") if greedy else None,
                    "source": f"{cfg.model_name_or_path}/align_stage.json"}  # fmt: skip
    if settings is not None:
        logger.info("ppo: the SFT stage's gold eval used other settings (%s); scoring the parent again.", settings)
    def compute() -> dict[str, Any]:
        result = _gold(cfg, model, tokenizer, prompts, samples, labeler)
        return {"gold_scores": [float(s) for s in result["gold_scores"]],
                "gold_pass_rates": result["gold_pass_rates"], "responses": result["responses"]}  # fmt: skip

    # The same model, prompts and decoding on a rerun (a recipe tuned around a fixed parent): read it back
    fingerprint = gold.model_fingerprint(cfg.model_name_or_path)
    name = getattr(labeler, "name", None)
    key = None if fingerprint is None else {
        "model": fingerprint, "prompts": prompts, "settings": ours, "seed": cfg.seed, "dtype": str(model.dtype),
        "batch_size": cfg.per_device_eval_batch_size, "backend": cfg.generation_backend, "labeler": name,
        "labeler_source": gold.source_digest(name),
    }  # fmt: skip
    result, source = gold.cached_gold_eval(key, compute)
    return {**result, "source": source}


def final_mean(log_history: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` over the last FINAL_SHARE of the logged entries that have it (nan when none)."""
    values = [h[key] for h in log_history if key in h]
    if not values:
        return math.nan
    tail = values[-max(1, math.ceil(len(values) * FINAL_SHARE)) :]
    return float(sum(tail) / len(tail))


# ---------------------------------------------------------------------------------------------------------------------
# Stage


@stage_lifecycle
def run(cfg) -> Path:
    from transformers import set_seed
    from trl import get_peft_config

    from align.evaluation.gold import gold_setup
    from align.models import modeling
    from align.trainers.ppo import PPOTrainer

    set_seed(cfg.seed)
    gold_spec = gold_setup(cfg)  # first: a bad gold_labeler or gold_eval_dataset is one line, before any work
    log_config(cfg)
    output_dir = Path(cfg.output_dir)

    # Data
    train_ds, eval_ds, data_info = load_prompts(cfg)

    # Model
    reward_model, reward_tokenizer = load_reward_model(cfg)
    policy, tokenizer = modeling.load_model_and_tokenizer(cfg)
    value_model = load_value_model(cfg)
    peft_config = get_peft_config(cfg)
    ptx_ds = load_ptx(cfg, tokenizer)

    gold = gold_spec is not None
    metrics: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    eval_fn, eval_metric = None, "gold_score"
    if gold:
        from align.evaluation.gold import win_rate

        labeler, prompts = gold_spec
        extra["gold_labeler"] = labeler.name
        # Before the trainer exists: the policy is trained in place (and a resumed run loads its checkpoint later).
        parent = parent_gold_score(cfg, policy, tokenizer, prompts, labeler=labeler)
        parent_scores = parent["gold_scores"]
        metrics["parent_gold_score"] = sum(parent_scores) / len(parent_scores)
        extra["parent_gold_scores"] = parent_scores
        if parent["gold_pass_rates"] is not None:
            extra["parent_gold_pass_rates"] = parent["gold_pass_rates"]
        if parent["responses"] is not None:
            extra["parent_gold_responses"] = parent["responses"]
        logger.info("Parent model (%s): gold score %.4f (%s).", cfg.model_name_or_path, metrics["parent_gold_score"],
                    parent["source"])  # fmt: skip
        if cfg.gold_eval_samples:
            parent_sampled = parent_gold_score(cfg, policy, tokenizer, prompts, cfg.gold_eval_samples, labeler=labeler)
            metrics["parent_gold_score_sampled"] = sum(parent_sampled["gold_scores"]) / len(prompts)
            extra["parent_gold_scores_sampled"] = parent_sampled["gold_scores"]
            logger.info("Parent model: gold score sampled (%d per prompt) %.4f (%s).", cfg.gold_eval_samples,
                        metrics["parent_gold_score_sampled"], parent_sampled["source"])  # fmt: skip
        eval_ds = [{"prompt": p} for p in prompts]

        def eval_fn(ps: list[str], rs: list[str]) -> float:
            return sum(labeler.score(p, r) for p, r in zip(ps, rs, strict=True)) / len(ps)

    elif eval_ds is not None:
        from align.trainers.reward import score

        eval_metric = "reward"

        def eval_fn(ps: list[str], rs: list[str]) -> float:
            return float(score(reward_model, reward_tokenizer, ps, rs).mean())

    if gold and cfg.eval_strategy == "no":
        # No curve asked for: the trainer's one eval, at the end, would score the gold prompts greedily a second time
        # (4 of the SmolLM2 chain's 80 minutes); the stage scores the policy itself below.
        eval_fn = None

    # Train
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
        eval_dataset=eval_ds if eval_fn is not None else None,
        peft_config=peft_config,
        eval_fn=eval_fn,
        eval_metric=eval_metric,
        ptx_dataset=ptx_ds,
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg))
    runtime = time.perf_counter() - start
    history = trainer.state.log_history
    metrics.update(
        {
            "reward": final_mean(history, "ppo/score"),
            "kl": final_mean(history, "ppo/kl"),
            "updates": float(result.global_step),
            "train_runtime": runtime,
        }
    )
    acc = trainer.accelerator

    # Evaluate
    if gold and acc.is_main_process:
        this = _gold(cfg, trainer.policy, tokenizer, prompts, labeler=labeler)
        metrics["gold_score"] = this["gold_score"]
        metrics["gold_win_rate"] = win_rate(this["gold_scores"], parent_scores)
        # gold_responses (and parent_gold_responses): the greedy answers the per-prompt scores are of, to audit them.
        extra.update(gold_pass_rates=this["gold_pass_rates"], gold_pass_counts=this["gold_pass_counts"],
                     gold_scores=this["gold_scores"],
                     gold_responses=this["responses"], gold_samples=this["samples"])  # fmt: skip
        if cfg.gold_eval_samples:
            sampled = _gold(cfg, trainer.policy, tokenizer, prompts, cfg.gold_eval_samples, labeler)
            metrics["gold_score_sampled"] = sampled["gold_score"]
            metrics["gold_win_rate_sampled"] = win_rate(sampled["gold_scores"], extra["parent_gold_scores_sampled"])
            extra["gold_scores_sampled"] = sampled["gold_scores"]
            logger.info("Gold score sampled (%d per prompt): %.4f (parent %.4f), win-rate over it %.3f.",
                        cfg.gold_eval_samples, sampled["gold_score"], metrics["parent_gold_score_sampled"],
                        metrics["gold_win_rate_sampled"])  # fmt: skip
        logger.info(
            "Gold score on %d held-out prompts: %.4f (parent %.4f), win-rate over it %.3f; reward %.4f, KL %.4f.",
            len(prompts),
            this["gold_score"],
            metrics["parent_gold_score"],
            metrics["gold_win_rate"],
            metrics["reward"],
            metrics["kl"],
        )

    # Save
    trainer.save_model(output_dir, merge_adapter=bool(cfg.use_peft and cfg.merge_adapter))
    if acc.is_main_process:
        if cfg.use_peft and cfg.merge_adapter:
            # only the policy's adapter (with value_model_init policy_lora the peft model holds the critic's too)
            trainer.policy.save_pretrained(output_dir / "adapter", selected_adapters=[trainer.policy.active_adapter])
            tokenizer.save_pretrained(output_dir / "adapter")
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
                "saved": "value_model",
            },  # fmt: skip
            log_history=history,
            samples=trainer.samples,
            peft={"adapter": bool(peft_config), "merged": bool(cfg.use_peft and cfg.merge_adapter)},
            num_processes=acc.num_processes,
            **extra,
        )
        logger.info("ppo: wrote %s (%s parameters)", output_dir, f"{modeling.count_parameters(trainer.policy)[0]:,}")
    wait_for_everyone()
    return output_dir
