"""SFT data formats: detect, validate every row, and standardize to TRL's conversational format.

Accepted (TRL dataset formats, plus the two common community ones):

    messages            [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]
    prompt_completion   "prompt" + "completion": strings, or lists of messages
    alpaca              "instruction", optional "input", "output"
    sharegpt            "conversations": [{"from": "human" | "gpt" | "system", "value": ...}]
    text                plain "text" (language modeling; left as is)

Every conversational format becomes the same row: `prompt` (all turns before the final assistant turn, system
included), `completion` (the final assistant turn) and `messages` (the whole conversation). `prompt` + `completion`
is TRL's conversational prompt-completion format: SFTTrainer then computes the loss on the completion only, under any
chat template. To train on every assistant turn instead (`assistant_only_loss`, which needs a template with
generation markers), keep only `messages`: TRL picks the prompt-completion path whenever `prompt` is present.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import datasets
import pyarrow.compute as pc

from align.data.load import check_types, require_columns, source_row
from align.errors import AlignError

logger = logging.getLogger(__name__)

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (`from`) -> role. "model" is Gemini's name for the assistant.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}  # fmt: skip

_COLUMNS = {
    "messages": ["messages"],
    "sharegpt": ["conversations"],
    "prompt_completion": ["prompt", "completion"],
    "alpaca": ["instruction", "output"],
    "text": ["text"],
}
_SEP = "\x1f"  # between the "what" and the "fix" of a row error in the temporary `_error` column


def detect_format(column_names: Iterable[str], *, source: str = "dataset") -> str:
    """The SFT format the columns describe: one of FORMATS; AlignError when none or several match."""
    cols = list(column_names)
    found = [fmt for fmt, needed in _COLUMNS.items() if all(c in cols for c in needed)]
    if len(found) == 1:
        return found[0]
    hint = ""
    if "chosen" in cols and "rejected" in cols:
        hint = " These look like preference pairs, which are for the reward stage, not SFT."
    what = f"match several formats ({', '.join(found)})" if found else "match no SFT format"
    accepted = "; ".join(f"{fmt} ({' + '.join(c)})" for fmt, c in _COLUMNS.items())
    raise AlignError(
        f"{source}: the columns {', '.join(cols) or '(none)'} {what}.{hint} Set dataset_format to one of "
        f"{', '.join(FORMATS)}, or rename columns with dataset_column_mapping. Accepted: {accepted}."
    )


def standardize(ds, *, source: str, dataset_format: str | None = None, skip_invalid: bool = False) -> tuple[Any, int]:
    """Validate every row and convert to TRL's conversational prompt-completion format.

    Args:
        ds: `Dataset` in any of FORMATS.
        source: the data's name (file path, Hub id), used in error messages as `source:row`.
        dataset_format: one of FORMATS; detected from the columns when None.
        skip_invalid: drop invalid rows (warning with their count and the first reason) instead of raising.

    Returns:
        (dataset, number of rows skipped). Conversational formats give columns `prompt` (list of messages),
        `completion` (list holding the final assistant message) and `messages` (the whole conversation); every
        message is exactly `{"role", "content"}` and the user's other columns are dropped. `text` keeps the dataset.
    """
    fmt = dataset_format or detect_format(ds.column_names, source=source)
    if fmt not in FORMATS:
        raise AlignError(f"{source}: unknown dataset_format '{fmt}'. Use one of {', '.join(FORMATS)}.")
    require_columns(ds, _COLUMNS[fmt], source)
    if fmt == "text":
        return _standardize_text(ds, source=source, skip_invalid=skip_invalid)

    message = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    features = datasets.Features({"prompt": message, "completion": message, "messages": message,
                                  "_error": datasets.Value("string")})  # fmt: skip
    out = ds.map(
        functools.partial(_convert_batch, fmt=fmt),
        batched=True,
        remove_columns=ds.column_names,
        features=features,
        desc=f"Checking {fmt} rows",
    )
    # Row errors are collected in a column rather than raised inside `map`, so one pass can count them all for the
    # message (an exception raised in `map` does reach the caller unchanged, even with num_proc > 1: measured).
    n_bad, first_bad = _error_rows(out)
    if n_bad:
        first = f"{source}:{source_row(ds, first_bad)}: {out[first_bad]['_error']}"
        if not skip_invalid:
            more = f" ({n_bad} invalid rows in all)" if n_bad > 1 else ""
            what, fix = first.split(_SEP)
            raise AlignError(f"{what}{more}. {fix} Or set skip_invalid_rows: true to drop invalid rows.")
        if n_bad == len(out):
            raise AlignError(f"{source}: all {len(out)} rows are invalid; the first: {first.split(_SEP)[0]}.")
        out = out.filter(lambda errors: [e == "" for e in errors], input_columns="_error", batched=True,
                         desc="Dropping invalid rows")  # fmt: skip
        logger.warning("%s: skipped %d invalid rows of %d; the first: %s", source, n_bad, len(ds),
                       first.split(_SEP)[0])  # fmt: skip
    return out.remove_columns("_error"), n_bad


def _error_rows(out) -> tuple[int, int]:
    """(number of rows with a non-empty `_error`, position of the first), computed in Arrow without decoding rows."""
    failed = pc.not_equal(out.data.column("_error"), "")  # `out` comes fresh from map: no indices mapping
    return pc.sum(failed).as_py() or 0, pc.index(failed, True).as_py()


def _standardize_text(ds, *, source: str, skip_invalid: bool) -> tuple[Any, int]:
    if not skip_invalid:
        check_types(ds, {"text": str}, source)
        return ds, 0
    kept = ds.filter(lambda texts: [isinstance(t, str) for t in texts], input_columns="text", batched=True,
                     desc="Checking text rows")  # fmt: skip
    skipped = len(ds) - len(kept)
    if skipped:
        logger.warning("%s: skipped %d of %d rows whose 'text' is not a string", source, skipped, len(ds))
    if len(kept) == 0:
        raise AlignError(f"{source}: no row has a string 'text'. Check the column or dataset_column_mapping.")
    return kept, skipped


# Row conversion. Each converter turns one row into a list of {role, content} or raises _Invalid(what, fix).


class _Invalid(Exception):
    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}{_SEP}{fix}")


def _convert_batch(batch: dict[str, list], *, fmt: str) -> dict[str, list]:
    out: dict[str, list] = {"prompt": [], "completion": [], "messages": [], "_error": []}
    for j in range(len(next(iter(batch.values())))):
        row = {k: v[j] for k, v in batch.items()}
        try:
            messages = _CONVERTERS[fmt](row)
            _check_conversation(
                messages, f"'{_COLUMNS[fmt][0]}'" if fmt in ("messages", "sharegpt") else "the conversation"
            )
            error = ""
        except _Invalid as e:
            messages, error = [], str(e)
        out["prompt"].append(messages[:-1])
        out["completion"].append(messages[-1:])
        out["messages"].append(messages)
        out["_error"].append(error)
    return out


def _from_messages(row: dict) -> list[dict]:
    return _message_list(row["messages"], "messages", role_key="role", content_key="content")


def _from_sharegpt(row: dict) -> list[dict]:
    return _message_list(row["conversations"], "conversations", role_key="from", content_key="value",
                         roles=SHAREGPT_ROLES)  # fmt: skip


def _from_prompt_completion(row: dict) -> list[dict]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = _message_list(prompt, "prompt", role_key="role", content_key="content", kind="a string or ")
    if isinstance(completion, str):
        if not completion.strip():
            raise _Invalid("'completion' is empty", "Write the reply or drop the row.")
        completion = [{"role": "assistant", "content": completion}]
    else:
        completion = _message_list(completion, "completion", role_key="role", content_key="content",
                                   kind="a string or ")  # fmt: skip
    return prompt + completion


def _from_alpaca(row: dict) -> list[dict]:
    instruction, output, extra = row["instruction"], row["output"], row.get("input")
    _require_str(instruction, "instruction")
    _require_str(output, "output")
    if not instruction.strip():
        raise _Invalid("'instruction' is empty", "Write the instruction or drop the row.")
    if not output.strip():
        raise _Invalid("'output' is empty", "Write the reply or drop the row.")
    if extra is not None and not isinstance(extra, str):
        raise _Invalid(f"'input' is {_type_name(extra)}, expected a string", "Make 'input' a string or leave it out.")
    # The Stanford Alpaca layout: the optional input follows the instruction after a blank line.
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "alpaca": _from_alpaca,
}


def _message_list(
    value: Any, field: str, *, role_key: str, content_key: str, roles: dict[str, str] | None = None, kind: str = ""
) -> list[dict]:
    """Messages of one column as [{role, content}], roles mapped through `roles` (identity over ROLES by default)."""
    roles = roles or {r: r for r in ROLES}
    shape = f"{{{role_key}, {content_key}}}"
    if not isinstance(value, list):
        raise _Invalid(f"'{field}' is {_type_name(value)}, expected {kind}a list of {shape}",
                       f"Store the conversation as a list of {shape} objects.")  # fmt: skip
    if not value:
        raise _Invalid(f"'{field}' is an empty list", "Add the conversation or drop the row.")
    out = []
    for n, m in enumerate(value, 1):
        where = f"message {n} of '{field}'"
        if not isinstance(m, dict):
            raise _Invalid(f"{where} is {_type_name(m)}, expected an object {shape}", f"Make it {shape}.")
        for key in (role_key, content_key):
            if m.get(key) is None:
                has = "a null" if key in m else "no"
                raise _Invalid(
                    f"{where} has {has} '{key}'", f"Give every message a '{role_key}' and a '{content_key}'."
                )
        role, content = m[role_key], m[content_key]
        if role not in roles:
            raise _Invalid(f"{where} has {role_key} '{role}'", f"Use one of the accepted roles: {', '.join(roles)}.")
        if not isinstance(content, str):
            raise _Invalid(f"'{content_key}' of {where} is {_type_name(content)}, expected a string",
                           "Use plain text content.")  # fmt: skip
        out.append({"role": roles[role], "content": content})
    return out


def _check_conversation(messages: list[dict], field: str) -> None:
    """A conversation SFT can learn from: ends with a non-empty assistant turn that has something before it."""
    for n, m in enumerate(messages, 1):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Invalid(f"assistant turn {n} of {field} is empty", "Write the reply or drop the row.")
    last = messages[-1]["role"]
    if last != "assistant":
        raise _Invalid(f"{field} ends with a '{last}' turn, expected the assistant's reply last",
                       "End every conversation with an assistant turn (it is what SFT learns).")  # fmt: skip
    if not any(m["role"] != "system" for m in messages[:-1]):
        raise _Invalid(f"{field} has no user turn before the final assistant turn", "Add the user's turn.")


def _require_str(value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise _Invalid(f"'{field}' is {_type_name(value)}, expected a string", f"Make '{field}' a string.")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def prompt_text(row: dict[str, Any], where: str, stage: str) -> str:
    """The single-turn prompt of a prompts-file row (`align rank`, `align ppo`): `prompt` (a string, or messages ending
    in a user turn) or `messages` (a trailing assistant turn is dropped). Errors name `where` and the `stage`."""
    # A file may mix both forms: JSON loading fills the absent one with null.
    column = "prompt" if row.get("prompt") is not None or row.get("messages") is None else "messages"
    value = row.get(column)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        if column == "messages" and value[-1].get("role") == "assistant":
            value = value[:-1]  # a demonstration: the policy answers its prompt itself
        users = [m for m in value if m.get("role") == "user"]
        if len(users) == 1 and value[-1].get("role") == "user" and isinstance(value[-1].get("content"), str):
            return value[-1]["content"]
        raise AlignError(
            f"{where}: '{column}' is not a single user turn ({len(users)} user messages); {stage} prompts are "
            "single-turn. Keep one user message per row."
        )
    raise AlignError(
        f"{where}: '{column}' is {type(value).__name__}, expected a string or a list of {{role, content}}."
    )
