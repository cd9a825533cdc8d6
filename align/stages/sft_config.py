"""Configuration of `align sft`: TRL's `SFTConfig` with its `ModelConfig` (model and LoRA keys) and `ScriptArguments`
(dataset keys), plus the demonstration formats, the tiny world's demonstrators and the gold evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, SFTConfig

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
    test_size_field,
    tinyworld_seed_field,
    tokenizer_name_or_path_field,
)
from align.data.sources import DEFAULT_DATASET


@dataclass
class SFTStageConfig(SFTConfig, ModelConfig, ScriptArguments):
    """`align sft`: supervised fine-tuning on demonstrations (InstructGPT step 1), TRL's SFTTrainer underneath.

    Changed defaults: `dataset_name="tinyworld"`, `report_to="none"`, `save_total_limit=2`, `dtype="auto"`,
    `gradient_checkpointing=False` (small models; GPU recipes turn it on), `bf16` = auto
    (null: on where the hardware has fast bf16, a CUDA GPU or a CPU with AMX/avx512_bf16; `resolve_auto_bf16`).
    """

    # Changed defaults
    dataset_name: str | None = changed_default(ScriptArguments, "dataset_name", DEFAULT_DATASET)
    report_to: None | str | list[str] = changed_default(SFTConfig, "report_to", "none")
    save_total_limit: int | None = changed_default(SFTConfig, "save_total_limit", 2)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    # None (not False): TRL sets True, transformers 5 renamed it; None lets either name work, unset = off.
    gradient_checkpointing: bool | None = changed_default(SFTConfig, "gradient_checkpointing", None)
    bf16: bool | None = changed_default(SFTConfig, "bf16", None)
    # Model
    tokenizer_name_or_path: str | None = tokenizer_name_or_path_field()
    model_hub_id: str | None = model_hub_id_field()
    merge_adapter: bool = merge_adapter_field()
    # Data
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Format of the demonstrations; auto detects it from the columns.",
            "choices": ["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"],
        },
    )
    dataset_column_mapping: dict | str | None = column_mapping_field()
    dataset_test_size: float = test_size_field()
    skip_invalid_rows: bool = field(
        default=False,
        metadata={"help": "Drop rows that fail validation (counted in the log) instead of stopping at the first."},
    )
    tinyworld_demos: int = field(default=4000, metadata={"help": "Generated demonstrations (tinyworld)."})
    tinyworld_error_rate: float = field(
        default=0.3,
        metadata={"help": "Share of flawed demonstrations (tinyworld), as imperfect human demonstrators."},
    )
    tinyworld_habit_rate: float = field(
        default=0.0,
        metadata={
            "help": "Share of demonstrations (tinyworld) showing the demonstrators' one habit: the same step "
            "left undone every time (see tinyworld.demonstrations); the rest get tinyworld_error_rate."
        },
    )
    tinyworld_seed: int = tinyworld_seed_field()
    # Evaluation
    gold_eval_prompts: int = gold_eval_prompts_field()
    gold_labeler: str | None = gold_labeler_field()
    gold_eval_dataset: str | None = gold_eval_dataset_field()
    gold_eval_max_new_tokens: int = gold_eval_max_new_tokens_field()
    gold_eval_temperature: float = gold_eval_temperature_field()
    gold_eval_samples: int = gold_eval_samples_field()

    def __post_init__(self):
        resolve_auto_bf16(self)
        post_init_common(self, SFTConfig)
        if self.merge_adapter and not self.use_peft:
            raise ValueError("merge_adapter: true needs use_peft: true (there is no adapter to merge).")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("load_in_4bit/8bit (QLoRA) trains adapters only; set use_peft: true.")
