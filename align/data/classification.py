"""Classification rows for `align classify`: validation, the label set, and GPT-1's input transformations.

Rows (a file, save_to_disk dir, Hub id or the tiny world; JSON read by align itself, so a label is the value the
file holds, never coerced):

    {"text": "a story ...", "label": "yes"}                                    single text
    {"text": "premise ...", "text_pair": "hypothesis ...", "label": 0}         pair (entailment) or similarity
    {"text": "context ...", "choices": ["a", "b", "c"], "label": 2}            multiple choice: label = choice index

GPT-1 (Radford et al. 2018, Sec. 3.3, Fig. 1) turns every task into token sequences for the pretrained decoder,
read at the last token by a linear head:

    single          <s> text <extract>
    pair            <s> premise <delim> hypothesis <extract>
    similarity      both <s> a <delim> b <extract> and <s> b <delim> a <extract>; their representations summed
    multiple choice <s> context <delim> choice_k <extract> for each k, one score each, softmax over the choices

`<s>` is the tokenizer's BOS (a new `<|start|>` when it has none); `<|delim|>` and `<|extract|>` are new tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers.processors import TemplateProcessing

from align.data import load as dl
from align.data.padding import pad_right
from align.errors import AlignError

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("single", "pair", "similarity", "multiple_choice")
START, DELIM, EXTRACT = "<|start|>", "<|delim|>", "<|extract|>"


# ---------------------------------------------------------------------------------------------------------------------
# Rows


def detect_format(columns: Sequence[str], source: str) -> str:
    """The input format the columns imply: `choices` -> multiple_choice, `text_pair` -> pair, else single."""
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        raise AlignError(
            f"{source}: missing column {', '.join(repr(c) for c in missing)}; the columns are {', '.join(columns)}. "
            "classify needs text and label (plus text_pair for pairs, or choices for multiple choice); rename yours "
            "with dataset_column_mapping."
        )
    if "choices" in columns:
        return "multiple_choice"
    return "pair" if "text_pair" in columns else "single"


def check_columns(columns: Sequence[str], input_format: str, source: str) -> None:
    """AlignError unless the columns hold what `input_format` reads."""
    need = {"single": ["text", "label"], "pair": ["text", "text_pair", "label"],
            "similarity": ["text", "text_pair", "label"], "multiple_choice": ["text", "choices", "label"]}  # fmt: skip
    missing = [c for c in need[input_format] if c not in columns]
    if missing:
        raise AlignError(
            f"{source}: input_format {input_format} needs column {', '.join(repr(c) for c in missing)}; the columns "
            f"are {', '.join(columns)}. Rename yours with dataset_column_mapping, or set input_format."
        )


def _is_label(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, str)


def check_row(row: dict[str, Any], input_format: str, where: str) -> Any:
    """Validate one row; returns its label. `where` is `file:line` for the error."""
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise AlignError(f"{where}: 'text' is {_show(text)}, expected a non-empty string. Fix that row.")
    if input_format in ("pair", "similarity"):
        pair = row.get("text_pair")
        if not isinstance(pair, str) or not pair.strip():
            raise AlignError(f"{where}: 'text_pair' is {_show(pair)}, expected a non-empty string. Fix that row.")
    label = row.get("label")
    if not _is_label(label):
        raise AlignError(
            f"{where}: 'label' is {_show(label)}, expected an integer or a string (a class name). Fix that row."
        )
    if input_format == "multiple_choice":
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise AlignError(f"{where}: 'choices' is {_show(choices)}, expected a list of 2 or more strings.")
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                raise AlignError(f"{where}: 'choices'[{i}] is {_show(c)}, expected a non-empty string. Fix it.")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise AlignError(
                f"{where}: 'label' is {label!r}; for multiple choice it is the 0-based index of the right choice, "
                f"0 to {len(choices) - 1} here."
            )
    return label


def _show(v: Any) -> str:
    if v is None:
        return "missing or null"
    text = repr(v)
    return f"{type(v).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def scan_labels(ds, input_format: str, source: str) -> tuple[list[Any], int]:
    """Check every row of `ds` (naming file:line) and return (the labels in row order, the most choices in a row)."""
    line = dl.source_rows(ds)
    labels: list[Any] = []
    kind: type | None = None
    most = 1
    cols = [c for c in ("text", "text_pair", "choices", "label") if c in ds.column_names]
    for start in range(0, len(ds), 1000):
        batch = ds.select_columns(cols)[start : start + 1000]
        for j in range(len(batch["text"])):
            row = {c: batch[c][j] for c in cols}
            where = f"{source}:{line(start + j)}"
            label = check_row(row, input_format, where)
            this = str if isinstance(label, str) else int
            if kind is None:
                kind = this
            elif this is not kind:
                raise AlignError(
                    f"{where}: 'label' is {_show(label)}, but earlier rows' labels are {kind.__name__}s. Use one type "
                    "for every label (all class names, or all integers)."
                )
            labels.append(label)
            if input_format == "multiple_choice":
                most = max(most, len(row["choices"]))
    return labels, most


def label_maps(train_labels: Sequence[Any], eval_labels: Sequence[Any] = ()) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) over the labels seen, sorted (integers numerically): labels 0..K-1 keep their ids."""
    found = sorted(set(train_labels) | set(eval_labels))
    id2label = {i: str(v) for i, v in enumerate(found)}
    return id2label, {v: i for i, v in id2label.items()}


# ---------------------------------------------------------------------------------------------------------------------
# GPT-1 input transformations


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of GPT-1's start, delimiter and extract tokens."""

    start: int
    delim: int
    extract: int


def add_special_tokens(tokenizer, model=None) -> SpecialIds:
    """Add `<|delim|>` and `<|extract|>` (and `<|start|>` when there is no BOS), install GPT-1's format as the
    tokenizer's post-processor (so `tokenizer(text)` and `tokenizer(text, text_pair)`, hence `pipeline`, build the
    same sequences as training), and grow the model's embeddings to the new tokens (new rows start at the mean)."""
    start = tokenizer.bos_token or START
    new = [t for t in (start, DELIM, EXTRACT) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    ids = SpecialIds(*(tokenizer.convert_tokens_to_ids(t) for t in (start, DELIM, EXTRACT)))
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise AlignError(
            f"{type(tokenizer).__name__}: a slow (Python) tokenizer; classify needs a fast one (tokenizer.json) to "
            "store GPT-1's input format in it. Save the model with a fast tokenizer."
        )
    backend.post_processor = TemplateProcessing(
        single=f"{start} $A {EXTRACT}",
        pair=f"{start} $A {DELIM} $B:1 {EXTRACT}:1",
        special_tokens=[(start, ids.start), (DELIM, ids.delim), (EXTRACT, ids.extract)],
    )
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return ids


def build(a: Sequence[int], b: Sequence[int] | None, ids: SpecialIds, max_length: int | None):
    """`<s> a <extract>` or `<s> a <delim> b <extract>`, cut to `max_length` by dropping the longer part's last
    tokens first (the tokenizers library's longest_first). Returns (ids: list[int], whether anything was cut)."""
    a, b = list(a), None if b is None else list(b)
    cut = False
    if max_length is not None:
        room = max_length - (2 if b is None else 3)
        if room < (1 if b is None else 2):
            raise AlignError(f"max_length {max_length} leaves no room for text beside GPT-1's special tokens.")
        while len(a) + (len(b) if b is not None else 0) > room:
            cut = True
            if b is not None and len(b) > len(a):
                b.pop()
            else:
                a.pop()
    if b is None:
        return [ids.start, *a, ids.extract], cut
    return [ids.start, *a, ids.delim, *b, ids.extract], cut


def encode_row(tokenizer, row: dict[str, Any], input_format: str, ids: SpecialIds, max_length: int | None):
    """The token sequences of one row (1 for single/pair, 2 for similarity, K for multiple choice) and whether
    any was cut to max_length."""

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    a = tok(row["text"])
    if input_format == "single":
        parts = [(a, None)]
    elif input_format == "pair":
        parts = [(a, tok(row["text_pair"]))]
    elif input_format == "similarity":
        b = tok(row["text_pair"])
        parts = [(a, b), (b, a)]
    else:
        parts = [(a, tok(c)) for c in row["choices"]]
    out = [build(x, y, ids, max_length) for x, y in parts]
    return [s for s, _ in out], any(c for _, c in out)


def tokenize(ds, tokenizer, input_format: str, ids: SpecialIds, label2id: dict[str, int] | None, max_length, *,
             desc: str = "tokenizing"):  # fmt: skip
    """`ds` -> columns `input_ids` (a list of sequences per row) and `labels` (class id, or choice index); logs
    how many rows were cut to max_length."""
    cols = list(ds.column_names)

    def fn(batch):
        out: dict[str, list] = {"input_ids": [], "labels": [], "cut": []}
        for j in range(len(batch["text"])):
            row = {c: batch[c][j] for c in cols}
            seqs, cut = encode_row(tokenizer, row, input_format, ids, max_length)
            label = row["label"]
            out["input_ids"].append(seqs)
            out["labels"].append(label if label2id is None else label2id[str(label)])
            out["cut"].append(cut)
        return out

    ds = ds.map(fn, batched=True, remove_columns=cols, desc=desc)
    cut = sum(ds["cut"])
    if cut:
        logger.warning("%s: %d of %d rows were cut to max_length %s tokens (the longer part's end first). Raise "
                       "max_length to keep them whole.", desc, cut, len(ds), max_length)  # fmt: skip
    return ds.remove_columns("cut")


# ---------------------------------------------------------------------------------------------------------------------
# Collator


@dataclass
class ClassifyCollator:
    """Rows of n_b sequences each -> one right-padded batch of all N = sum n_b sequences.

    Returns
        `input_ids`, `attention_mask`: `(N, T)`.
        `num_seqs`: `(B,)` sequences per row (1 single/pair, 2 similarity, K_b multiple choice).
        `labels`: `(B,)` long.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]):
        seqs = [s for f in features for s in f["input_ids"]]
        input_ids, attention_mask = pad_right(seqs, self.pad_token_id, self.pad_to_multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "num_seqs": torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.long),
            "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.long),
        }
