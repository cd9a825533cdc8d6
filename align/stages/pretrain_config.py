"""Configuration of `align pretrain`: transformers' `TrainingArguments` plus TRL's `ModelConfig` (model keys) and
`ScriptArguments` (dataset keys), and the keys a from-scratch model and its tokenizer need."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import ModelConfig, ScriptArguments

from align.config import (
    changed_default,
    column_mapping_field,
    post_init_common,
    test_size_field,
    tinyworld_seed_field,
)
from align.data.sources import DEFAULT_DATASET


@dataclass
class PretrainConfig(TrainingArguments, ModelConfig, ScriptArguments):
    """`align pretrain`: causal-LM pretraining (GPT-style), from scratch or continued.

    Changed defaults: `dataset_name="tinyworld"` (the embedded generated world), `logging_steps=10`,
    `report_to="none"` (opt in to tensorboard/wandb/trackio as in transformers), `save_total_limit=2`,
    `dtype="auto"`.
    """

    # Changed defaults
    dataset_name: str | None = changed_default(ScriptArguments, "dataset_name", DEFAULT_DATASET)
    logging_steps: float = changed_default(TrainingArguments, "logging_steps", 10)
    report_to: None | str | list[str] = changed_default(TrainingArguments, "report_to", "none")
    save_total_limit: int | None = changed_default(TrainingArguments, "save_total_limit", 2)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    # Model
    model_type: str = field(
        default="llama",
        metadata={
            "help": "Architecture when training from scratch (no model_name_or_path): 'llama', 'gpt2', or "
            "'lstm' (the recurrent baseline, align.models.modeling_lstm).",
            "choices": ["llama", "gpt2", "lstm"],
        },
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Sizes for a from-scratch model, passed to LlamaConfig/GPT2Config, e.g. {hidden_size: 128, "
            "num_hidden_layers: 4, num_attention_heads: 4}. Keys use the transformers config names; lstm takes "
            "hidden_size, num_hidden_layers, dropout."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modeling code from the model repo. Off unless you ask."}
    )
    # Tokenizer
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Existing tokenizer (dir or Hub id). Default: the model's when model_name_or_path is set, "
            "else a new one trained on the training data."
        },
    )
    tokenizer_type: str = field(
        default="auto",
        metadata={
            "help": "Kind of tokenizer to train: 'wordlevel' (closed vocabulary, used for tinyworld), 'bpe' "
            "(byte-level, any text), or 'auto' (wordlevel for tinyworld, bpe otherwise).",
            "choices": ["auto", "wordlevel", "bpe"],
        },
    )
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size when training a BPE tokenizer."})
    # Data
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the raw text."})
    dataset_column_mapping: dict | str | None = column_mapping_field()
    dataset_test_size: float = test_size_field()
    max_length: int = field(
        default=256,
        metadata={"help": "Block size: texts are joined with EOS and cut into blocks of this many tokens."},
    )
    tinyworld_stories: int = field(
        default=20_000,
        metadata={"help": "Number of generated documents, one story each (dataset_name: tinyworld)."},
    )
    tinyworld_seed: int = tinyworld_seed_field()
    # Output
    num_samples: int = field(
        default=4, metadata={"help": "Texts sampled from the trained model and stored in align_stage.json."}
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Length of those samples."})

    def __post_init__(self):
        post_init_common(self)
        if self.model_name_or_path and self.model_config:
            raise ValueError(
                "model_config sets sizes for a model trained from scratch, but model_name_or_path loads an "
                "existing model; remove one of them."
            )
