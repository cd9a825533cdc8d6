"""Configuration of `align reward`: the trainer's `RankingRewardConfig` (TRL's RewardConfig plus the ranking loss) with
TRL's `ModelConfig` (model and LoRA keys) and `ScriptArguments` (dataset keys), plus the reward model's own keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, RewardConfig, ScriptArguments

from align.config import (
    changed_default,
    column_mapping_field,
    model_hub_id_field,
    post_init_common,
    resolve_auto_bf16,
)
from align.models.modeling_reward import feature_error
from align.trainers.reward_config import RankingRewardConfig


@dataclass
class RewardStageConfig(RankingRewardConfig, ModelConfig, ScriptArguments):
    """`align reward`: train a reward model on K-way rankings (InstructGPT step 2), RankingRewardTrainer underneath.

    Changed defaults: `report_to="none"`, `save_total_limit=2`, `dtype="auto"`, `gradient_checkpointing` unset =
    off (TRL turns it on; small models do not need it, GPU recipes set it), `bf16` = auto (on where the
    hardware has fast bf16: a CUDA GPU, or a CPU with AMX/avx512_bf16), `dataset_test_size=0.1`,
    `lora_task_type="SEQ_CLS"` (with `use_peft` the adapters and the new score head train; the stage saves the model
    merged, the adapter beside it). `dataset_name` has no default: an
    `align rank` output dir, a rankings or pairs file, a save_to_disk dir or a Hub id.
    """

    # Changed defaults
    report_to: None | str | list[str] = changed_default(RewardConfig, "report_to", "none")
    save_total_limit: int | None = changed_default(RewardConfig, "save_total_limit", 2)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    # None (not False): TRL sets True, transformers 5 renamed it; None lets either name work, unset = off.
    gradient_checkpointing: bool | None = changed_default(RewardConfig, "gradient_checkpointing", None)
    bf16: bool | None = changed_default(RewardConfig, "bf16", None)
    lora_task_type: str = changed_default(ModelConfig, "lora_task_type", "SEQ_CLS")
    # Model
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer dir or Hub id, when not the model's own. It is saved with the reward model: scoring "
            "always uses the reward model's own tokenizer and chat template, whatever the policy's are."
        },
    )
    model_hub_id: str | None = model_hub_id_field()
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modeling code from the model repo. Off unless you ask."}
    )
    likelihood_features: list[str] | None = field(
        default=None,
        metadata={
            "help": "Add the model's own likelihood of the response to its score: reward = head(last token) + "
            "sum of learned weights x features, the features being the 'mean' and/or 'min' log-probability of the "
            "response's tokens under the model's LM head (kept, and trained with the rest). Needs a causal LM to "
            "start from (the SFT stage) and a chat template with a generation prompt. Empty: InstructGPT's scalar "
            "head only. Saved as LikelihoodRewardModel (align.models.modeling_reward), which "
            "`import align.models.modeling_reward` "
            "registers with AutoModelForSequenceClassification.",
        },
    )
    likelihood_init: float = field(
        default=1.0, metadata={"help": "With likelihood_features: each feature's starting weight."}
    )
    # Data
    dataset_column_mapping: dict | str | None = column_mapping_field()
    dataset_test_size: float = field(
        default=0.1,
        metadata={
            "help": "When the data has no `dataset_test_split`, hold out this fraction (< 1) or number (>= 1) of "
            "ranked groups for the held-out metrics (pair accuracy, top-1, Kendall tau, gold agreement) and the "
            "reward offset. 0.1: ~50 groups (~250 pairs) of a 512-group tiny-world run, enough to tell 0.8 from 0.9."
        },
    )
    ranking_as_pairs: bool = field(
        default=False,
        metadata={
            "help": "Expand each ranked training group into its C(K,2) chosen/rejected pairs, each its own training "
            "example, as pair-only frameworks (TRL's RewardTrainer) train; for comparison with the same labels. "
            "Every response is then forwarded K-1 times per epoch. Evaluation stays on the ranked groups."
        },
    )
    # Evaluation
    gold_eval: bool | None = field(
        default=None,
        metadata={
            "help": "Report gold_agreement: held-out pair accuracy against the tiny-world gold labeler's ranking of "
            "the same responses (gold ties skipped). None: on when every held-out prompt is a tiny-world prompt."
        },
    )

    def __post_init__(self):
        resolve_auto_bf16(self)
        post_init_common(self, RankingRewardConfig)
        errors = []
        if not self.dataset_name:
            errors.append(
                "dataset_name is not set; point it at an `align rank` output (e.g. runs/tiny/rank), a rankings file "
                "{prompt, responses, ranking} or a pairs file {prompt, chosen, rejected}"
            )
        if not self.model_name_or_path:
            errors.append("model_name_or_path is not set; point it at the SFT stage (e.g. runs/tiny/sft) or a model")
        if self.use_peft and self.lora_task_type != "SEQ_CLS":
            errors.append(
                f"lora_task_type {self.lora_task_type!r}: a LoRA reward model needs SEQ_CLS (peft then trains the new "
                "score head too); remove the key"
            )
        if self.likelihood_features:
            if error := feature_error(self.likelihood_features):
                errors.append(error)
            if self.use_peft:
                errors.append("likelihood_features with use_peft: not supported together; set one of them")
            if self.model_init_kwargs:
                errors.append("likelihood_features with model_init_kwargs: the likelihood model is built from the "
                              "causal LM as it is; remove model_init_kwargs")  # fmt: skip
        if self.load_in_4bit or self.load_in_8bit:
            errors.append(
                "load_in_4bit/8bit: quantized reward models are not supported (the stage saves the reward model "
                "merged, for PPO and `align score`); use use_peft: true without them, or remove the key"
            )
        if errors:
            raise ValueError("reward: " + "; ".join(errors) + ".")
