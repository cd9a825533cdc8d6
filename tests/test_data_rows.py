"""Row-exact data errors: a JSON file's values are never coerced, and every error names the file's true line.

datasets' json builder coerced mixed-type columns (pandas turned the string "0.5" into 0.5, ints beside a float
became floats), so the checks reported a valid row, or row 1, instead of the bad one (issue 19). These go through
the entry points the stages use: `load_sft_data` and `load_reward_data`.
"""

import json

import pytest

from align.config import parse_config
from align.data import load as dl
from align.data.formats import standardize
from align.errors import AlignError
from align.stages.reward import load_reward_data
from align.stages.sft import load_sft_data

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(path, tmp_path, **over):
    overrides = {"dataset_name": str(path), "output_dir": str(tmp_path / "out"), "dataset_test_size": 0, **over}
    return load_sft_data(parse_config("sft", [], overrides=overrides))


def _reward(path, tmp_path):
    overrides = {"dataset_name": str(path), "output_dir": str(tmp_path / "out"), "dataset_test_size": 0,
                 "model_name_or_path": str(tmp_path)}  # fmt: skip
    return load_reward_data(parse_config("reward", [], overrides=overrides))


def _messages(answer):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(AlignError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_int_content_is_named_at_its_line_not_at_a_coerced_row(tmp_path):
    rows = [_messages(f"answer {i}") for i in range(40)]
    rows[11], rows[37] = _messages(4), _messages("0.5")  # line 12 is bad; line 38 holds a valid string
    path = _write(tmp_path / "sft.jsonl", rows)
    # With seed 0, line 12 is held out: the training split is checked first.
    msg = _error(_sft, path, tmp_path, dataset_test_size=0.05, seed=0)
    # Before: "sft.jsonl:38: 'content' of message 2 of 'messages' is float" ("0.5" had been read as a number).
    assert msg.startswith(f"{path}:12: 'content' of message 2 of 'messages' is int, expected a string"), msg
    assert ":38:" not in msg and "invalid rows in all" not in msg
    train, _, info = _sft(path, tmp_path, skip_invalid_rows=True)
    assert info["skipped_rows"] == 1 and train[36]["completion"] == [{"role": "assistant", "content": "0.5"}]


def test_list_completion_is_named_at_its_line_not_at_a_coerced_row(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    rows[7]["completion"], rows[37]["completion"] = [1, 2, 3], "0.5"
    path = _write(tmp_path / "pc.jsonl", rows)
    msg = _error(_sft, path, tmp_path, dataset_test_size=0.05, seed=0)
    # Before: "pc.jsonl:38: 'completion' is float, expected a string or a list of {role, content} (2 invalid rows".
    assert msg.startswith(f"{path}:8: message 1 of 'completion' is int, expected an object"), msg
    assert ":38:" not in msg and "(2 invalid rows" not in msg


def test_float_ranking_index_is_named_at_its_line_not_row_1(tmp_path):
    rows = [{"prompt": f"p{i}", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]} for i in range(10)]
    rows[2]["ranking"] = [0, 1, 2.5]
    path = _write(tmp_path / "rank.jsonl", rows)
    msg = _error(_reward, path, tmp_path)
    # Before: "rank.jsonl:1: 'ranking' holds 0.0 (float)": the ints beside 2.5 had become floats.
    assert msg.startswith(f"{path}:3: 'ranking' holds 2.5 (float), expected an int index"), msg


def test_ints_and_floats_in_one_column_keep_their_types(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": m} for m in (1, 0.5, 2)]
    train, _, info, _ = _reward(_write(tmp_path / "pairs.jsonl", rows), tmp_path)
    assert [type(m) for m in train["margin"]] == [int, float, int] and info["pairs"] == 3


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_ranking_prompt_is_refused_naming_its_line(tmp_path, prompt):
    rows = [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}] * 3
    rows[1] = {**rows[1], "prompt": prompt}
    path = _write(tmp_path / "rank.jsonl", rows)
    msg = _error(_reward, path, tmp_path)
    assert msg.startswith(f"{path}:2: 'prompt' is empty;") and "Write the prompt or drop the row" in msg


@pytest.mark.parametrize("indent", [None, 2])
def test_json_object_document_is_refused_with_the_fix(tmp_path, indent):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"data": [{"prompt": "p", "completion": "c"}] * 5}, indent=indent))
    msg = _error(_sft, path, tmp_path, dataset_test_size=0.05)
    # Before: "dataset: cannot hold out test_size 0.05 of the 1 rows in 'train'".
    assert msg.startswith(f"{path}: the JSON document is an object (its 'data' holds a list of 5 objects), not a "
                          "list of rows. Put the rows in a top-level list"), msg  # fmt: skip


def test_string_that_looks_like_a_number_loads_unchanged(tmp_path):
    # Valid: `completion` is a string in one row and a list of messages in another (datasets' Json type).
    rows = [
        {"prompt": "p", "completion": "0.5"},
        {"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
    ]
    train, _, _ = _sft(_write(tmp_path / "pc.jsonl", rows), tmp_path)
    assert train[0]["completion"] == [{"role": "assistant", "content": "0.5"}]  # before: refused as a float


def test_date_strings_stay_strings(tmp_path):
    rows = [{"prompt": "2020-01-01", "completion": "a"}, {"prompt": "2021-02-03", "completion": "b"}]
    train, _, _ = _sft(_write(tmp_path / "pc.jsonl", rows), tmp_path)
    # Before: pyarrow read the column as timestamp[s] and the check refused 'prompt' as a datetime.
    assert [r[0]["content"] for r in train["prompt"]] == ["2020-01-01", "2021-02-03"]


def test_lines_count_blank_lines_and_json_documents(tmp_path):
    good, bad = {"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join([json.dumps(good), "", json.dumps(good), "", "", json.dumps(bad), json.dumps(good)]))
    assert _error(_sft, path, tmp_path).startswith(f"{path}:6: 'completion' is empty")
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps([good, good, bad], indent=2))  # each object spans 4 lines
    assert _error(_sft, doc, tmp_path).startswith(f"{doc}:10: 'completion' is empty")
    # A slice of the split still names the file's line.
    part = dl.load_data(str(path), split="train[1:]")
    with pytest.raises(AlignError, match=r"gaps.jsonl:6: 'completion' is empty"):
        standardize(part, source=str(path))


def test_bad_item_of_a_json_document_names_its_line(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('[\n  {"prompt": "p", "completion": "c"},\n  5\n]\n')
    assert _error(dl.load_data, str(path)).startswith(f"{path}:3: item 2 is int, expected an object")
