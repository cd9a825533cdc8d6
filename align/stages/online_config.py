"""What the configs of `align grpo` and `align rloo` share: the reward (`reward_model_path`, `reward_funcs`), the
prompts and the gold evaluation, as fields added to TRL's `GRPOConfig` / `RLOOConfig` (`grpo_config.py`,
`rloo_config.py`), and the checks both run in `__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments
from trl.trainer.base_config import _BaseConfig

from align.config import (
    changed_default,
    column_mapping_field,
    gold_eval_dataset_field,
    gold_eval_max_new_tokens_field,
    gold_eval_prompts_field,
    gold_eval_samples_field,
    gold_eval_temperature_field,
    gold_labeler_field,
    merge_adapter_field,
    model_hub_id_field,
    post_init_common,
    resolve_auto_bf16,
    tinyworld_seed_field,
    tokenizer_name_or_path_field,
)
from align.data import sources
from align.data.sources import DEFAULT_DATASET

GOLD_REWARD = "gold"  # `reward_funcs: [gold]`: the gold labeler as the reward (RLVR; a comparison, not the headline)


@dataclass
class OnlineStageFields:
    """Fields of `align grpo` and `align rloo` beyond TRL's trainer config. Changed defaults (both stages):
    `dataset_name="tinyworld"`, `report_to="none"`, `save_total_limit=2`, `dtype="auto"`, `gradient_checkpointing`
    off (None: small models; TRL's default is on), `bf16` = auto (`align.config.resolve_auto_bf16`)."""

    # Changed defaults
    dataset_name: str | None = changed_default(ScriptArguments, "dataset_name", DEFAULT_DATASET)
    report_to: None | str | list[str] = changed_default(_BaseConfig, "report_to", "none")
    save_total_limit: int | None = changed_default(_BaseConfig, "save_total_limit", 2)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    gradient_checkpointing: bool | None = changed_default(_BaseConfig, "gradient_checkpointing", None)
    bf16: bool | None = changed_default(_BaseConfig, "bf16", None)
    # Reward
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "The reward model: an `align reward` output dir (or any AutoModelForSequenceClassification with "
            "one label and its own tokenizer), scored as `align ppo` scores it (minus its align_reward_offset). "
            "Summed with reward_funcs when both are set (TRL's reward_weights weigh them, reward model first)."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions, as TRL calls them: 'package.module:function' or 'path/to/file.py:function' "
            "with TRL's signature f(prompts, completions, **kwargs) -> list[float]; or 'gold', the gold labeler "
            "(the tiny world's hidden one, or gold_labeler): RLVR, a comparison, never the headline."
        },
    )
    # Model
    tokenizer_name_or_path: str | None = tokenizer_name_or_path_field()
    model_hub_id: str | None = model_hub_id_field()
    merge_adapter: bool = merge_adapter_field()
    # Data
    dataset_column_mapping: dict | str | None = column_mapping_field()
    dataset_test_size: float = field(
        default=0.0,
        metadata={"help": "Own data without dataset_test_split: prompts held out (unused by training; 0 = none)."},
    )
    tinyworld_prompts: int = field(
        default=4000, metadata={"help": "Generated training prompts (dataset_name: tinyworld, train split)."}
    )
    tinyworld_seed: int = tinyworld_seed_field()
    # Evaluation
    gold_eval_prompts: int = gold_eval_prompts_field(
        "0 = off. The KL to the parent (kl_to_parent) is measured on them too."
    )
    gold_labeler: str | None = gold_labeler_field()
    gold_eval_dataset: str | None = gold_eval_dataset_field()
    gold_eval_max_new_tokens: int = gold_eval_max_new_tokens_field()
    eval_temperature: float = gold_eval_temperature_field()
    gold_eval_samples: int = gold_eval_samples_field("The SFT parent's stored sampled scores are reused. ")


def check_online(cfg, stage: str, trainer_config: type) -> None:
    """`__post_init__` of both stages: auto bf16, the shared checks (`post_init_common`, TRL's own), then the reward's
    and the model's keys; one ValueError naming every problem and its fix."""
    resolve_auto_bf16(cfg)
    post_init_common(cfg, trainer_config)
    errors = []
    funcs = list(cfg.reward_funcs or [])
    if not cfg.reward_model_path and not funcs:
        errors.append("no reward; set reward_model_path (an `align reward` output, e.g. runs/tiny/reward) or "
                      "reward_funcs (module:function, or gold for RLVR on the tiny world)")  # fmt: skip
    for spec in funcs:
        if spec != GOLD_REWARD and ":" not in spec:
            errors.append(f"reward_funcs {spec!r}: expected 'package.module:function', 'path/to/file.py:function' "
                          f"or '{GOLD_REWARD}'")  # fmt: skip
    if GOLD_REWARD in funcs and not (cfg.gold_labeler or sources.has_gold(cfg.dataset_name)):
        errors.append(f"reward_funcs '{GOLD_REWARD}' is the gold labeler, and dataset_name {cfg.dataset_name!r} has "
                      "none; use it on dataset_name: tinyworld (or set gold_labeler), or reward with "
                      "reward_model_path")  # fmt: skip
    if len(funcs) != len(set(funcs)):
        errors.append(f"reward_funcs {funcs} names one function twice; weigh it with reward_weights instead")
    n = len(funcs) + bool(cfg.reward_model_path)
    if cfg.reward_weights is not None and len(cfg.reward_weights) != n:
        errors.append(f"reward_weights has {len(cfg.reward_weights)} weights for {n} rewards (reward_model_path "
                      "first, then reward_funcs); give one per reward")  # fmt: skip
    if not cfg.model_name_or_path:
        errors.append("model_name_or_path is not set; point it at the SFT stage (e.g. runs/tiny/sft)")
    if cfg.merge_adapter and not cfg.use_peft:
        errors.append("merge_adapter: true needs use_peft: true (there is no adapter to merge)")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        errors.append("load_in_4bit/8bit (QLoRA) trains adapters only; set use_peft: true")
    if cfg.gold_labeler and not cfg.gold_eval_dataset and not sources.has_gold(cfg.dataset_name):
        errors.append(f"gold_labeler {cfg.gold_labeler!r} needs held-out prompts off the tiny world; set "
                      "gold_eval_dataset: FILE (a 'prompt' column) or drop gold_labeler")  # fmt: skip
    if errors:
        raise ValueError(f"{stage}: " + "; ".join(errors) + ".")
