"""align.data.formats: the five SFT formats give identical standardized rows; bad rows name file, row and field."""

import json
import logging

import datasets
import pytest
from trl.data_utils import is_conversational

from align.data import load as dl
from align.data.formats import FORMATS, detect_format, standardize
from align.errors import AlignError

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")


def one(row: dict) -> datasets.Dataset:
    return datasets.Dataset.from_list([row])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# One demonstration in every conversational format.
SAME_DEMO = {
    "messages": {"messages": [user("Name a color.\n\nOne word."), assistant("Blue.")], "id": 7},
    "prompt_completion": {"prompt": "Name a color.\n\nOne word.", "completion": "Blue."},
    "alpaca": {"instruction": "Name a color.", "input": "One word.", "output": "Blue."},
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Name a color.\n\nOne word."}, {"from": "gpt", "value": "Blue."}]
    },
}
EXPECTED = {
    "prompt": [user("Name a color.\n\nOne word.")],
    "completion": [assistant("Blue.")],
    "messages": [user("Name a color.\n\nOne word."), assistant("Blue.")],
}


@pytest.mark.parametrize("fmt", list(SAME_DEMO))
def test_every_format_gives_the_same_row(fmt):
    out, skipped = standardize(one(SAME_DEMO[fmt]), source="d")
    assert skipped == 0
    assert out.column_names == ["prompt", "completion", "messages"]  # the user's other columns (id) are dropped
    assert out[0] == EXPECTED
    assert is_conversational(out[0])  # TRL takes it as conversational prompt-completion


SYSTEM = {"role": "system", "content": "Be brief."}
MULTI_TURN = [SYSTEM, user("Hi"), assistant("Hello."), user("2+2?"), assistant("4")]


@pytest.mark.parametrize(
    "row",
    [
        {"messages": MULTI_TURN},
        {
            "conversations": [
                {"from": m["role"].replace("user", "human").replace("assistant", "gpt"), "value": m["content"]}
                for m in MULTI_TURN
            ]
        },  # fmt: skip
        {"prompt": MULTI_TURN[:-1], "completion": MULTI_TURN[-1:]},
        {"prompt": MULTI_TURN[:-2], "completion": MULTI_TURN[-2:]},  # the split point is the final assistant turn
    ],
)
def test_multi_turn_prompt_is_everything_before_the_final_assistant_turn(row):
    out, _ = standardize(one(row), source="d")
    assert out[0] == {"prompt": MULTI_TURN[:-1], "completion": MULTI_TURN[-1:], "messages": MULTI_TURN}


def test_alpaca_without_input():
    out, _ = standardize(datasets.Dataset.from_list([{"instruction": "Say hi.", "output": "Hi."}]), source="d")
    assert out[0]["prompt"] == [user("Say hi.")]
    out, _ = standardize(one({"instruction": "Say hi.", "input": "  ", "output": "Hi."}), source="d")
    assert out[0]["prompt"] == [user("Say hi.")]


def test_extra_message_keys_are_dropped():
    row = {"messages": [{"role": "user", "content": "a", "name": "bob"}, assistant("b")]}
    out, _ = standardize(one(row), source="d")
    assert out[0]["messages"] == [user("a"), assistant("b")]


def test_text_format_is_left_as_is():
    ds = datasets.Dataset.from_dict({"text": ["a b", "c"], "source": ["x", "y"]})
    out, skipped = standardize(ds, source="d")
    assert skipped == 0 and out.to_list() == ds.to_list()


# Detection


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["messages", "id"], "messages"),
        (["prompt", "prompt_id", "messages"], "messages"),  # UltraChat's columns: 'prompt' alone is not a format
        (["prompt", "completion"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["conversations"], "sharegpt"),
        (["text"], "text"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_ambiguous_lists_columns_and_formats():
    with pytest.raises(AlignError) as info:
        detect_format(["messages", "text"], source="d.jsonl")
    msg = str(info.value)
    assert msg.startswith("d.jsonl: the columns messages, text match several formats (messages, text).")
    assert "dataset_format" in msg and "dataset_column_mapping" in msg
    assert all(fmt in msg for fmt in FORMATS)


def test_detect_format_none_hints_at_preference_data():
    with pytest.raises(AlignError, match=r"columns chosen, rejected match no SFT format\. These look like pref"):
        detect_format(["chosen", "rejected"], source="d.jsonl")


def test_dataset_format_overrides_detection():
    ds = one({"messages": [user("a"), assistant("b")], "text": "rendered"})
    with pytest.raises(AlignError, match="several formats"):
        standardize(ds, source="d")
    out, _ = standardize(ds, source="d", dataset_format="messages")
    assert out[0]["completion"] == [assistant("b")]
    with pytest.raises(AlignError, match=r"d: unknown dataset_format 'chat'\. Use one of messages, prompt_completion"):
        standardize(ds, source="d", dataset_format="chat")


def test_dataset_format_with_missing_column():
    with pytest.raises(AlignError, match=r"d: missing column 'conversations'; the columns are text"):
        standardize(one({"text": "a"}), source="d", dataset_format="sharegpt")


# Bad rows: the second row of a .jsonl file is bad; the message names the file, row 2 and the field.

GOOD = {"messages": [user("a"), assistant("b")]}
BAD_ROWS = {
    "messages_is_str": ({"messages": "hello"}, "'messages' is str, expected a list of {role, content}"),
    "unknown_role": (
        {"messages": [{"role": "bot", "content": "a"}, assistant("b")]},
        "message 1 of 'messages' has role 'bot'. Use one of the accepted roles: system, user, assistant",
    ),
    "ends_with_user": ({"messages": [user("a"), assistant("b"), user("c")]}, "'messages' ends with a 'user' turn"),
    "empty_assistant": ({"messages": [user("a"), assistant("  ")]}, "assistant turn 2 of 'messages' is empty"),
    "missing_content": ({"messages": [{"role": "user"}, assistant("b")]}, "message 1 of 'messages' has no 'content'"),
    "null_content": (
        {"messages": [{"role": "user", "content": None}, assistant("b")]},
        "message 1 of 'messages' has a null 'content'",
    ),
    "content_not_str": (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}, assistant("b")]},
        "'content' of message 1 of 'messages' is list, expected a string",
    ),
    "no_user_turn": ({"messages": [SYSTEM, assistant("b")]}, "'messages' has no user turn before the final"),
    "empty_list": ({"messages": []}, "'messages' is an empty list"),
}


def _jsonl(tmp_path, rows):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_messages_row_names_file_row_and_field(tmp_path, case):
    bad, what = BAD_ROWS[case]
    path = _jsonl(tmp_path, [GOOD, bad, GOOD])
    ds = dl.load_data(str(path), split="train")
    with pytest.raises(AlignError) as info:
        standardize(ds, source=str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: {what}")
    assert "skip_invalid" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "rows, what",
    [
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
            "message 2 of 'conversations' has from 'bot'. Use one of the accepted roles: system, human, user, gpt",
        ),
        ([{"instruction": "a", "input": "", "output": ""}], "'output' is empty"),
        ([{"instruction": "", "input": "x", "output": "b"}], "'instruction' is empty"),
        ([{"prompt": "a", "completion": ""}], "'completion' is empty"),
        ([{"prompt": "a", "completion": 3}], "'completion' is int, expected a string or a list of {role, content}"),
    ],
)
def test_bad_rows_in_other_formats(rows, what):
    with pytest.raises(AlignError, match="^" + json.dumps(f"d.jsonl:1: {what}")[1:-1].replace("{", r"\{")):
        standardize(datasets.Dataset.from_list(rows), source="d.jsonl")


def _load(tmp_path, rows):
    # Through a .jsonl file: datasets reads a column mixing strings and lists as its Json type.
    return dl.load_data(str(_jsonl(tmp_path, rows)), split="train")


def test_error_counts_every_invalid_row(tmp_path):
    rows = [GOOD, {"messages": "x"}, GOOD, {"messages": [user("a")]}]
    with pytest.raises(AlignError, match=r"^d:2: 'messages' is str.* \(2 invalid rows in all\)\. "):
        standardize(_load(tmp_path, rows), source="d")


def test_skip_invalid_drops_and_counts(tmp_path, caplog):
    rows = [GOOD, {"messages": "x"}, {"messages": [user("c"), assistant("d")]}, {"messages": [user("a")]}]
    with caplog.at_level(logging.WARNING, logger="align.data.formats"):
        out, skipped = standardize(_load(tmp_path, rows), source="d", skip_invalid=True)
    assert skipped == 2
    assert [r["completion"] for r in out] == [[assistant("b")], [assistant("d")]]
    assert "skipped 2 invalid rows of 4; the first: d:2: 'messages' is str" in caplog.text


def test_skip_invalid_with_nothing_left_is_an_error():
    with pytest.raises(AlignError, match=r"d: all 2 rows are invalid; the first: d:1: "):
        standardize(datasets.Dataset.from_list([{"messages": "x"}, {"messages": "y"}]), source="d", skip_invalid=True)


def test_text_rows_checked():
    ds = datasets.Dataset.from_dict({"text": ["a", None, "c"]})
    with pytest.raises(AlignError, match=r"d.txt:2: 'text' is null, expected a string"):
        standardize(ds, source="d.txt")
    out, skipped = standardize(ds, source="d.txt", skip_invalid=True)
    assert skipped == 1 and list(out["text"]) == ["a", "c"]


def test_row_numbers_after_a_split_point_at_the_file_rows(tmp_path):
    rows = [GOOD] * 5 + [{"messages": "x"}] + [GOOD] * 4  # row 6 is bad
    ds = _load(tmp_path, rows)
    train, test = dl.train_test({"train": ds}, test_size=3, seed=0)
    part = train if "x" in [r["messages"] for r in train] else test
    assert [r["messages"] for r in part].index("x") != 5  # it moved: a plain position would give another number
    with pytest.raises(AlignError, match=r"sft.jsonl:6: 'messages' is str"):
        standardize(part, source=str(tmp_path / "sft.jsonl"))
