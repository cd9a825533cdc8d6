"""Configuration of `align classify`: transformers' TrainingArguments + TRL's ModelConfig and ScriptArguments, plus
GPT-1's keys (`lm_aux_coef`, `input_format`, `random_init`) and the tiny world's classification tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import ModelConfig, ScriptArguments

from align.config import (
    changed_default,
    column_mapping_field,
    model_hub_id_field,
    post_init_common,
    resolve_auto_bf16,
    tinyworld_seed_field,
)
from align.data.classification import INPUT_FORMATS
from align.data.sources import DEFAULT_DATASET
from align.data.tinyworld_classify import TASKS


@dataclass
class ClassifyStageConfig(TrainingArguments, ModelConfig, ScriptArguments):
    """`align classify`: GPT-1's discriminative fine-tuning of a causal LM into a classifier (Radford et al. 2018).

    Changed defaults: `dataset_name="tinyworld"` (`tinyworld_task`), `report_to="none"`, `save_total_limit=2`,
    `dtype="auto"`, `bf16` = auto (on where the hardware has fast bf16), `lora_task_type="SEQ_CLS"` (with `use_peft`
    the adapters and the new head train; the stage saves the model merged, the adapter beside it),
    `dataset_test_size=0.1`.
    """

    # Changed defaults
    dataset_name: str | None = changed_default(ScriptArguments, "dataset_name", DEFAULT_DATASET)
    report_to: None | str | list[str] = changed_default(TrainingArguments, "report_to", "none")
    save_total_limit: int | None = changed_default(TrainingArguments, "save_total_limit", 2)
    dtype: str | None = changed_default(ModelConfig, "dtype", "auto")
    bf16: bool | None = changed_default(TrainingArguments, "bf16", None)
    lora_task_type: str = changed_default(ModelConfig, "lora_task_type", "SEQ_CLS")
    # Model
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer dir or Hub id, when not the model's own; saved with the model."}
    )
    model_hub_id: str | None = model_hub_id_field()
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modeling code from the model repo. Off unless you ask."}
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "Ignore model_name_or_path's weights: the same architecture and tokenizer, randomly initialized "
            "(GPT-1's 'no pre-training' ablation, Table 5). Off: start from the pretrained model."
        },
    )
    averaged_embeddings: bool = field(
        default=False,
        metadata={
            "help": "A baseline instead of GPT-1's fine-tuning: logistic regression on the mean of the texts' input "
            "embeddings (of embeddings_from, default model_name_or_path; with random_init, fresh ones), fit to "
            "convergence; nothing else trains (align.stages.classify_embeddings). Off: GPT-1's fine-tuning."
        },
    )
    embeddings_from: str | None = field(
        default=None,
        metadata={
            "help": "averaged_embeddings: the model dir, Hub id or word2vec dir (`align inspect embeddings "
            "--word2vec`) whose vectors are averaged. Default: model_name_or_path."
        },
    )
    # Objective
    lm_aux_coef: float = field(
        default=0.5,
        metadata={
            "help": "lambda of GPT-1's L3 = L2 + lambda * L1: the language-modeling loss on the task's inputs added "
            "to the classification loss (GPT-1: 0.5). 0 turns it off."
        },
    )
    # Data
    input_format: str = field(
        default="auto",
        metadata={
            "help": "GPT-1's input transformation: 'single' (<s> text <extract>), 'pair' (ordered, e.g. entailment: "
            "<s> text <delim> text_pair <extract>), 'similarity' (both orders, representations summed), "
            "'multiple_choice' (<s> text <delim> choice <extract> per choice, softmax over choices). 'auto': "
            "choices -> multiple_choice, text_pair -> pair, else single (tinyworld: the task's own).",
            "choices": ["auto", *INPUT_FORMATS],
        },
    )
    max_length: int | None = field(
        default=256,
        metadata={
            "help": "Longest sequence in tokens, special tokens included; longer rows are cut (the longer part's end "
            "first) and counted in a warning. null = no cut."
        },
    )
    dataset_column_mapping: dict | str | None = column_mapping_field()
    dataset_test_size: float = field(
        default=0.1,
        metadata={
            "help": "When the data has no `dataset_test_split`, hold out this fraction (< 1) or number (>= 1) of rows "
            "for the held-out metrics (accuracy, F1, Matthews correlation). 0 disables evaluation."
        },
    )
    tinyworld_task: str = field(
        default="happy",
        metadata={
            "help": "The generated task (dataset_name: tinyworld; align.data.tinyworld_classify): 'happy' (is the "
            "hero happy at the end of the story?), 'entail' (does the story entail 'X is in the P .'?), "
            "'same_place' (do two stories' heroes end in the same place?), 'where' (multiple choice: where is X?).",
            "choices": list(TASKS),
        },
    )
    tinyworld_examples: int = field(
        default=2000, metadata={"help": "Generated examples (tinyworld), unique and class-balanced."}
    )
    tinyworld_heldout_places: bool = field(
        default=False,
        metadata={
            "help": "Transfer (tinyworld entail, same_place, where): the held-out rows are about 4 places that no "
            "training row mentions (tinyworld_classify.HELDOUT_PLACES), so only pretraining has seen those words."
        },
    )
    tinyworld_seed: int = tinyworld_seed_field()

    def __post_init__(self):
        resolve_auto_bf16(self)
        post_init_common(self)
        errors = []
        if not self.model_name_or_path:
            errors.append(
                "model_name_or_path is not set; point it at a causal LM (e.g. runs/tiny/pretrain) or a Hub id"
            )
        if self.use_peft and self.lora_task_type != "SEQ_CLS":
            errors.append(
                f"lora_task_type {self.lora_task_type!r}: a LoRA classifier needs SEQ_CLS (peft then trains the new "
                "head too); remove the key"
            )
        if self.use_peft and self.random_init:
            errors.append("use_peft with random_init: adapters on random weights train nothing useful; set one")
        if self.tinyworld_heldout_places and self.tinyworld_task == "happy":
            errors.append("tinyworld_heldout_places with tinyworld_task happy: happy asks about moods, not places; "
                          "use entail, same_place or where")  # fmt: skip
        if self.tinyworld_heldout_places and not self.dataset_test_size:
            errors.append("tinyworld_heldout_places needs held-out rows: set dataset_test_size (e.g. 300)")
        if self.embeddings_from and not self.averaged_embeddings:
            errors.append("embeddings_from is read only with averaged_embeddings true; set it, or remove the key")
        if self.averaged_embeddings and (self.use_peft or self.push_to_hub):
            errors.append("averaged_embeddings with use_peft or push_to_hub: the baseline fits a logistic regression "
                          "on fixed vectors and saves no transformers model; remove those keys")  # fmt: skip
        if self.load_in_4bit or self.load_in_8bit:
            errors.append("load_in_4bit/8bit: not supported (the stage saves the classifier merged); remove the key")
        if errors:
            raise ValueError("classify: " + "; ".join(errors) + ".")
