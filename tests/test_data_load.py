"""align.data.load: every file type, save_to_disk folders, splits, column checks, and one clear error per bad input."""

import json
import os
import socket

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align.data import load as dl
from align.errors import AlignError

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": "f"}]


# Happy paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_lines_in_json", "csv", "parquet"])
def test_load_each_file_type(tmp_path, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS, indent=2))
    elif kind == "json_lines_in_json":
        path = write_jsonl(tmp_path / "d.json", ROWS)
    elif kind == "csv":
        path = tmp_path / "d.csv"
        path.write_text('prompt,completion\na,b\nc,d\n"e",f\n')
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    dd = dl.load_data(str(path))
    assert isinstance(dd, datasets.DatasetDict)
    assert list(dd) == ["train"]
    assert dd["train"].to_list() == ROWS


def test_load_txt_one_row_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("once upon a time\nthe end\n")
    ds = dl.load_data(str(path), split="train")
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == ["once upon a time", "the end"]


def test_load_save_to_disk_dataset_and_datasetdict(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "two"))

    one = dl.load_data(str(tmp_path / "one"))
    assert list(one) == ["train"] and one["train"].to_list() == ROWS
    two = dl.load_data(str(tmp_path / "two"))
    assert {k: len(v) for k, v in two.items()} == {"train": 3, "test": 1}
    assert dl.load_data(str(tmp_path / "two"), split="test").to_list() == ROWS[:1]
    with pytest.raises(AlignError, match=r"no split 'validation'; the splits are train, test"):
        dl.load_data(str(tmp_path / "two"), split="validation")


def test_load_folder_of_files_takes_splits_from_names(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    (tmp_path / "README.md").write_text("# my data\n")
    dd = dl.load_data(str(tmp_path))
    assert {k: len(v) for k, v in dd.items()} == {"train": 3, "test": 1}


def test_load_split_of_a_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert len(dl.load_data(str(path), split="train")) == 3
    assert len(dl.load_data(str(path), split="train[:2]")) == 2
    with pytest.raises(AlignError, match=r"d.jsonl: no split 'test'; the splits are train"):
        dl.load_data(str(path), split="test")


def test_load_streaming(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = dl.load_data(str(path), split="train", streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    assert list(ds) == ROWS


def test_rewritten_file_with_same_mtime_is_reloaded(tmp_path):
    # datasets' own cache key is the file's mtime only: this exact sequence returned the stale row 1 (measured).
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    os.utime(path, ns=(5, 5))
    assert list(dl.load_data(str(path), split="train")["a"]) == [1]
    write_jsonl(path, [{"a": 2}])
    os.utime(path, ns=(5, 5))
    assert list(dl.load_data(str(path), split="train")["a"]) == [2]


def test_describe_and_fingerprint_follow_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = dl.describe(dl.load_data(str(path), split="train"), "d.jsonl")
    assert first["name"] == "d.jsonl" and first["rows"] == 3 and first["fingerprint"]
    write_jsonl(path, ROWS[:2])
    second = dl.describe(dl.load_data(str(path), split="train"), "d.jsonl")
    assert second["rows"] == 2 and second["fingerprint"] != first["fingerprint"]


# Bad files: AlignError naming the file and the 1-based line


def _bad_file(tmp_path, name, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_FILES = {
    # name: (content, parts of the message)
    "truncated.jsonl": ('{"a": 1}\n{"a": 2}\n{"a": 3\n{"a": 4}\n', ["truncated.jsonl:3:", "invalid JSON"]),
    "notobject.jsonl": ('{"a": 1}\n[1, 2]\n', ["notobject.jsonl:2:", "is list, expected a JSON object"]),
    "bad.json": ('[{"a": 1},\n {"a": 2,]', ["bad.json:2:10:", "invalid JSON", "character 20"]),
    "scalar.json": ("5", ["scalar.json:", "is int, expected a list of objects"]),
    "ragged.csv": ("a,b\n1,2\n3,4,5\n6,7\n", ["ragged.csv:3:", "3 fields, the header has 2"]),
    "latin1.jsonl": (b'{"a": "x"}\n{"a": "caf\xe9"}\n', ["latin1.jsonl:2:", "not valid UTF-8", "0xe9"]),
    "latin1.csv": (b"a\nok\ncaf\xe9\n", ["latin1.csv:3:", "not valid UTF-8"]),
    "broken.parquet": (b"PAR1 this is not parquet", ["broken.parquet:", "not a readable Parquet file"]),
    "empty.jsonl": ("", ["empty.jsonl:", "the file is empty"]),
    "empty.txt": ("", ["empty.txt:", "the file is empty"]),
    "blank.jsonl": ("\n\n", ["blank.jsonl:", "0 rows"]),
    "header_only.csv": ("a,b\n", ["header_only.csv:", "0 rows"]),
    "empty_list.json": ("[]", ["empty_list.json:", "0 rows"]),
    "table.xlsx": (
        "whatever",
        ["table.xlsx:", "unsupported file type '.xlsx'", ".jsonl, .json, .csv, .parquet, .txt"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_gives_one_clear_error(tmp_path, name):
    content, parts = BAD_FILES[name]
    path = _bad_file(tmp_path, name, content)
    with pytest.raises(AlignError) as info:
        dl.load_data(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg
    assert msg.startswith(str(path))


def test_truncated_parquet(tmp_path):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(AlignError, match=r"cut.parquet: not a readable Parquet file"):
        dl.load_data(str(path))


def test_original_exception_is_chained(tmp_path):
    path = _bad_file(tmp_path, "t.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(AlignError) as info:
        dl.load_data(str(path))
    # JSON is read by align's own reader (json_rows): the json module's error is the cause.
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_missing_path(tmp_path):
    with pytest.raises(AlignError, match=r"nope.jsonl: no such file or directory"):
        dl.load_data(str(tmp_path / "nope.jsonl"))


def test_folder_without_data_files(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(AlignError, match=r"holds no data files. Put .jsonl, .json"):
        dl.load_data(str(tmp_path))


def test_folder_mixing_file_types(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.csv").write_text("prompt,completion\na,b\n")
    with pytest.raises(AlignError, match=r"mixes file types \(.csv, .jsonl\)"):
        dl.load_data(str(tmp_path))


def test_unknown_hub_id_offline_is_a_clean_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    connects = []

    def no_network(self, address):
        connects.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(AlignError) as info:
        dl.load_data("someone/no-such-dataset-xyz")
    msg = str(info.value)
    assert msg.startswith("someone/no-such-dataset-xyz: ")
    assert "not in the local cache" in msg and "HF_HUB_OFFLINE" in msg and "local file or folder" in msg
    assert connects == []


# Splits


def _numbers(n):
    return datasets.Dataset.from_dict({"x": list(range(n))})


def test_train_test_uses_named_test_split():
    train, test = dl.train_test({"train": _numbers(10), "test": _numbers(2)}, test_size=0.5, seed=0)
    assert (len(train), len(test)) == (10, 2)


@pytest.mark.parametrize("test_size, n_test", [(0.2, 2), (3, 3), (3.0, 3)])
def test_train_test_holds_out_when_test_split_missing(test_size, n_test):
    train, test = dl.train_test({"train": _numbers(10)}, test_size=test_size, seed=1)
    assert len(test) == n_test and len(train) == 10 - n_test
    assert sorted(list(train["x"]) + list(test["x"])) == list(range(10))
    again_train, again_test = dl.train_test({"train": _numbers(10)}, test_size=test_size, seed=1)
    assert list(again_test["x"]) == list(test["x"])


@pytest.mark.parametrize("test_size", [0, None])
def test_train_test_without_held_out_part(test_size):
    train, test = dl.train_test({"train": _numbers(4)}, test_size=test_size, seed=0)
    assert len(train) == 4 and test is None


def test_train_test_unknown_train_split_lists_splits():
    with pytest.raises(AlignError, match=r"data.jsonl: no split 'training'; the splits are train, validation"):
        dl.train_test({"train": _numbers(2), "validation": _numbers(2)}, train_split="training", source="data.jsonl")


@pytest.mark.parametrize("test_size, match", [(10, "leaves no training rows of the 10"), (2.5, "neither a fraction")])
def test_train_test_bad_test_size(test_size, match):
    with pytest.raises(AlignError, match=match):
        dl.train_test({"train": _numbers(10)}, test_size=test_size, seed=0)


# Columns and types


def test_apply_column_mapping_renames():
    ds = datasets.Dataset.from_list([{"question": "q", "answer": "a", "id": 1}])
    out = dl.apply_column_mapping(ds, {"question": "prompt", "answer": "completion"}, source="d.jsonl")
    assert out.column_names == ["prompt", "completion", "id"]
    assert out[0] == {"prompt": "q", "completion": "a", "id": 1}
    dd = dl.apply_column_mapping(datasets.DatasetDict({"train": ds}), {"question": "prompt"}, source="d")
    assert dd["train"].column_names == ["prompt", "answer", "id"]


def test_apply_column_mapping_missing_column_lists_present():
    ds = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(AlignError, match=r"d.jsonl: .*names column 'query'.*The columns are question, answer"):
        dl.apply_column_mapping(ds, {"query": "prompt"}, source="d.jsonl")


def test_apply_column_mapping_refuses_to_overwrite_a_column():
    ds = datasets.Dataset.from_list([{"question": "q", "prompt": "p"}])
    with pytest.raises(AlignError, match=r"already has a 'prompt' column"):
        dl.apply_column_mapping(ds, {"question": "prompt"}, source="d.jsonl")
    # Swapping two columns is fine.
    swapped = dl.apply_column_mapping(ds, {"question": "prompt", "prompt": "question"}, source="d.jsonl")
    assert swapped[0] == {"prompt": "q", "question": "p"}


def test_require_columns_lists_present():
    ds = datasets.Dataset.from_list([{"a": 1, "b": 2}])
    dl.require_columns(ds, ["a"], source="x.csv")
    with pytest.raises(AlignError, match=r"x.csv: missing column 'text'; the columns are a, b"):
        dl.require_columns(ds, ["a", "text"], source="x.csv")


def test_check_types_names_file_row_and_column(tmp_path):
    # The house-style example: row 17 holds a string where every other row holds a conversation.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [{"messages": msgs}] * 16 + [{"messages": "hi there"}] + [{"messages": msgs}] * 3
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    ds = dl.load_data(str(path), split="train")
    with pytest.raises(AlignError, match=r"sft.jsonl:17: 'messages' is str, expected a list\. "):
        dl.check_types(ds, {"messages": list}, source=str(path))


def test_check_types_null_and_wrong_arrow_type(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "n": 1}, {"text": "b", "n": 2}, {"text": None, "n": 3}])
    ds = dl.load_data(str(path), split="train")
    with pytest.raises(AlignError, match=r"t.jsonl:3: 'text' is null, expected a string"):
        dl.check_types(ds, {"text": str}, source="t.jsonl")
    # An int64 column is wrong from its first row on.
    with pytest.raises(AlignError, match=r"t.jsonl:1: 'n' is int, expected a string"):
        dl.check_types(ds, {"n": str}, source="t.jsonl")
    dl.check_types(ds, {"n": float}, source="t.jsonl")  # ints are numbers


def test_check_types_trusts_the_schema_without_scanning(monkeypatch):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "ids": [[1], [2]]})

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned rows although the Arrow schema answers")

    monkeypatch.setattr(dl, "_first_null", no_scan)
    monkeypatch.setattr(dl, "_first_wrong_value", no_scan)
    dl.check_types(ds, {"text": str, "ids": list}, source="d")


def test_row_numbers_survive_a_split():
    # Row 4 (1-based) is the bad one; after train_test_split it sits at another position in its part.
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", None, "e", "f"]})
    train, test = dl.train_test({"train": ds}, test_size=2, seed=0)
    part = train if None in list(train["text"]) else test
    assert list(part["text"]).index(None) != 3  # the bad row moved: a plain position would give another number
    with pytest.raises(AlignError, match=r"d.jsonl:4: 'text' is null"):
        dl.check_types(part, {"text": str}, source="d.jsonl")
