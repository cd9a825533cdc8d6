"""Where a stage's data comes from, by `dataset_name`: a file, a Hub id, or a source built in code (the tiny world).

The stages ask here what they used to ask by comparing `dataset_name` with the tiny world's name: the data a built-in
source generates (from a few plain values: seed, counts, rates) and its lineage entry, its text column, the tokenizer
it suits, whether it has a gold labeler and held-out prompts of its own, its entropy floor. A `None` answer means
"not a built-in source": the stage then loads files or Hub ids through `align.data.load`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from align.data import tinyworld, tinyworld_classify
from align.data.tinyworld import TINYWORLD
from align.errors import AlignError

DEFAULT_DATASET = TINYWORLD  # the `dataset_name` the stages default to: the tiny world, generated in code
# Prompts `align rank` draws from a built-in source when num_prompts is unset: 512 groups of K = 4 give 3072
# comparisons, enough for the tiny reward model.
RANK_DEFAULT_PROMPTS = 512
PTX_DOCUMENTS = 4000  # far more than a short PPO run samples (micro-batch rows per optimizer step)


def _builtin(name: str | None) -> bool:
    return name == TINYWORLD


# ---------------------------------------------------------------------------------------------------------------------
# Data and lineage


def pretrain_text(name: str | None, *, stories: int, seed: int, test_size) -> tuple[Any, Any, dict[str, Any]] | None:
    """(train, held-out, lineage entry) of a built-in pretraining corpus, one `text` column; None for other sources."""
    if not _builtin(name):
        return None
    train, test = tinyworld.pretrain_split(stories, seed, test_size)
    return train, test, {"name": TINYWORLD, "stories": stories, "seed": seed}


def demonstrations(name: str | None, *, n: int, seed: int, error_rate: float, habit_rate: float):
    """({"train": prompt/completion rows}, lineage entry) of built-in demonstrations; None for other sources."""
    if not _builtin(name):
        return None
    ds = tinyworld.demonstrations(n, seed=seed, error_rate=error_rate, habit_rate=habit_rate)
    info: dict[str, Any] = {
        "name": TINYWORLD,
        "seed": seed,
        "flawed_rows": sum(ds["flawed"]),
        "habit_rows": sum(ds["habit"]),
    }
    return {"train": ds.select_columns(["prompt", "completion"])}, info


def instruction_prompts(name: str | None, *, n: int, seed: int, prompt_only: bool):
    """(train prompts, lineage entry) of a built-in source; None for other sources. The prompts hold the columns
    `prompt` and `kind`, or only `prompt` with `prompt_only` (the lineage's fingerprint is of the dataset returned)."""
    if not _builtin(name):
        return None
    ds = tinyworld.instruction_prompts(n, seed=seed, split="train")
    if prompt_only:
        ds = ds.select_columns(["prompt"])
    return ds, {"name": TINYWORLD, "seed": seed, "fingerprint": ds._fingerprint, "rows": len(ds)}


def ptx_text(name: str | None, *, seed: int):
    """PPO-ptx rows (one `text` column) of a built-in pretraining corpus; None for other sources."""
    if not _builtin(name):
        return None
    return tinyworld.pretrain_corpus(PTX_DOCUMENTS, seed=seed).select_columns(["text"])


def classification(name: str | None, *, task: str, n: int, test_size, seed: int, heldout_places: bool,
                   train_split: str, test_split: str):  # fmt: skip
    """(splits, source label for messages, detected input format, lineage entry) of a built-in classification task;
    None for other sources. With `heldout_places`, train never mentions the held-out places and the held-out rows
    are about them."""
    if not _builtin(name):
        return None
    source = f"tinyworld ({task})"
    info: dict[str, Any] = {"name": TINYWORLD, "task": task, "seed": seed}
    if heldout_places:
        n_test = int(test_size) if test_size >= 1 else round(test_size * n)
        if not 1 <= n_test < n:
            raise AlignError(
                f"{source}: dataset_test_size {test_size:g} holds out {n_test} of tinyworld_examples {n}, leaving "
                f"{n - n_test} training rows. Hold out 1 to {n - 1} rows (e.g. {n // 10 or 1}) or raise "
                "tinyworld_examples."
            )
        parts = tinyworld_classify.split_by_place(task, n - n_test, n_test, seed=seed)
        dd = {train_split: parts["train"], test_split: parts["test"]}
        info["heldout_places"] = list(tinyworld_classify.HELDOUT_PLACES)
    else:
        dd = {train_split: tinyworld_classify.dataset(task, n, seed=seed)}
    return dd, source, tinyworld_classify.TASKS[task], info


def task_label(name: str | None, task: str | None) -> str | None:
    """What a classifier was trained on, for the report: a built-in source's task, else the dataset name."""
    return task if _builtin(name) else name


def rebuilds_pretrain_text(data: dict[str, Any]) -> bool:
    """Whether a pretrain stage's lineage `data` entry names a built-in corpus that can be rebuilt from it."""
    return _builtin(data.get("name")) and "stories" in data


def rebuilt_pretrain_train(data: dict[str, Any], test_size):
    """The training texts of the built-in corpus named by a pretrain lineage entry, split as `align pretrain` splits
    it."""
    train, _ = tinyworld.pretrain_split(int(data["stories"]), int(data.get("seed") or 0), test_size)
    return train


# ---------------------------------------------------------------------------------------------------------------------
# What a source is like


def text_column(name: str | None, configured: str) -> str:
    """The text column: `text` for a built-in corpus, else the configured `dataset_text_field`."""
    return "text" if _builtin(name) else configured


def tokenizer_kind(name: str | None) -> str:
    """The tokenizer `tokenizer_type: auto` trains: word-level on a built-in corpus (its words are known), else BPE."""
    return "wordlevel" if _builtin(name) else "bpe"


def vocabulary(name: str | None) -> list[str] | None:
    """A built-in source's whole vocabulary; None for other sources (count the corpus's words instead)."""
    return tinyworld.vocabulary() if _builtin(name) else None


def entropy_floor(name: str | None, eval_text) -> float | None:
    """The best achievable eval loss on a built-in corpus's held-out texts (the texts on which the copy probe also
    runs); None for other sources."""
    return tinyworld.entropy_floor(eval_text) if _builtin(name) else None


def has_gold(name: str | None) -> bool:
    """Whether the source has a built-in gold labeler and held-out gold prompts of its own."""
    return _builtin(name)


def gold_prompts(prompts: Sequence[str]) -> bool:
    """Whether the built-in gold labeler can score the responses to every one of `prompts` (False for none)."""
    return tinyworld.is_tinyworld(prompts)
