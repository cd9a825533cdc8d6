"""Configuration of `align ppo`: the trainer's `PPOConfig` (TRL 1.12's PPO keys on `TrainingArguments`) with TRL's
`ModelConfig` (policy and LoRA keys) and `ScriptArguments` (dataset keys), plus the stage's models, data and gold
evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import ModelConfig, ScriptArguments

from align.config import (
    changed_default,
    gold_eval_dataset_field,
    gold_eval_max_new_tokens_field,
    gold_eval_prompts_field,
    gold_eval_samples_field,
    gold_labeler_field,
    merge_adapter_field,
    model_hub_id_field,
    post_init_common,
    tinyworld_seed_field,
    tokenizer_name_or_path_field,
)
from align.data import sources
from align.data.sources import DEFAULT_DATASET
from align.trainers.ppo_config import PPOConfig


@dataclass
class PPOStageConfig(PPOConfig, ModelConfig, ScriptArguments):
    """`align ppo`: optimize the policy against the reward model with PPO (InstructGPT step 3).

    Changed defaults: `dataset_name="tinyworld"` (the world's instruction prompts), `report_to="none"`,
    `save_total_limit=2`, `dtype="auto"`. `max_steps` counts PPO updates (each = one rollout of
    `per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches` prompts per process).
    """

    # Changed defaults
    dataset_name: str | None = changed_default(ScriptArguments, "dataset_name", DEFAULT_DATASET)
    report_to: None | str | list[str] = changed_default(TrainingArguments, "report_to", "none")
    save_total_limit: int | None = changed_default(TrainingArguments, "save_total_limit", 2)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    # Models
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "The reward model: an `align reward` output dir (or any AutoModelForSequenceClassification with "
            "one label, with its own tokenizer). Its `align_reward_offset` is subtracted from every score."
        },
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Value model to start from (a sequence-classification dir, e.g. a PPO output's value_model/). "
            "None: built per value_model_init."
        },
    )
    tokenizer_name_or_path: str | None = tokenizer_name_or_path_field()
    model_hub_id: str | None = model_hub_id_field()
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modeling code from the model repos. Off unless you ask."}
    )
    merge_adapter: bool = merge_adapter_field()
    # Data
    dataset_column_mapping: dict | str | None = field(
        default=None,
        metadata={
            "help": "Rename your columns to the ones the stage expects, e.g. {'question': 'prompt'}. A JSON object on "
            "the command line."
        },
    )
    dataset_test_size: float = field(
        default=0.0,
        metadata={
            "help": "Own data without `dataset_test_split`: hold out this fraction (< 1) or number (>= 1) of prompts; "
            "every eval_steps the policy answers them and the reward model's mean score is logged as eval/reward. "
            "0 (default): train on all prompts. Tiny world evaluates with the gold labeler instead."
        },
    )
    tinyworld_prompts: int = field(
        default=4000, metadata={"help": "Generated training prompts (dataset_name: tinyworld, train split)."}
    )
    tinyworld_seed: int = tinyworld_seed_field()
    ptx_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "PPO-ptx data (with ptx_coef > 0): a file, save_to_disk dir or Hub id with a 'text' column, or "
            "'tinyworld' for the pretraining stories."
        },
    )
    # Evaluation
    gold_eval_prompts: int = gold_eval_prompts_field("0 = off. Decoding: eval_temperature.")
    gold_labeler: str | None = gold_labeler_field()
    gold_eval_dataset: str | None = gold_eval_dataset_field()
    gold_eval_max_new_tokens: int = gold_eval_max_new_tokens_field()
    gold_eval_samples: int = gold_eval_samples_field()

    def __post_init__(self):
        post_init_common(self, PPOConfig)
        errors = []
        if not self.reward_model_path:
            errors.append("reward_model_path is not set; point it at an `align reward` output (e.g. runs/tiny/reward)")
        if not self.model_name_or_path:
            errors.append("model_name_or_path is not set; point it at the SFT stage (e.g. runs/tiny/sft)")
        if self.value_model_init == "policy_lora" and not self.use_peft:
            errors.append("value_model_init 'policy_lora' shares the LoRA policy's base; set use_peft: true, or "
                          "value_model_init: policy")  # fmt: skip
        if self.value_model_init in ("policy_lora", "policy_head") and self.value_model_path:
            errors.append(f"value_model_init {self.value_model_init!r} builds the value model on the policy, and "
                          f"value_model_path {self.value_model_path!r} names one too; drop one")  # fmt: skip
        if self.merge_adapter and not self.use_peft:
            errors.append("merge_adapter: true needs use_peft: true (there is no adapter to merge)")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            errors.append("load_in_4bit/8bit (QLoRA) trains adapters only; set use_peft: true")
        if self.ptx_coef > 0 and not self.ptx_dataset_name:
            errors.append(f"ptx_coef {self.ptx_coef} > 0 but no ptx_dataset_name; set one or ptx_coef: 0")
        if self.ptx_dataset_name and self.ptx_coef == 0:
            errors.append(f"ptx_dataset_name {self.ptx_dataset_name!r} is set but ptx_coef is 0; set ptx_coef > 0 "
                          "(InstructGPT: 27.8) or drop ptx_dataset_name")  # fmt: skip
        # The tiny world has its own held-out prompts; any other data needs a file of them (align.evaluation.gold).
        if self.gold_labeler and not self.gold_eval_dataset and not sources.has_gold(self.dataset_name):
            errors.append(f"gold_labeler {self.gold_labeler!r} needs held-out prompts off the tiny world; set "
                          "gold_eval_dataset: FILE (a 'prompt' column) or drop gold_labeler")  # fmt: skip
        if self.gold_eval_dataset and not self.gold_labeler:
            errors.append(f"gold_eval_dataset {self.gold_eval_dataset!r} is set but no gold_labeler scores the "
                          "answers; set gold_labeler: module:function (e.g. align.data.verifiable:score)")  # fmt: skip
        if errors:
            raise ValueError("ppo: " + "; ".join(errors) + ".")
