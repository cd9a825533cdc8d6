"""Read JSON / JSON Lines data files into Arrow without changing a value, remembering each row's line.

`datasets`' json builder coerces values (measured, datasets 5.2): pyarrow infers `timestamp` from date strings and
promotes ints to floats in a column that also holds a float, and a column mixing JSON types makes it fall back to
`pandas.read_json`, which turns the string "0.5" into a float. The checks then report the coerced data at the wrong
row. So align reads JSON itself, in two streaming passes with the `json` module (memory stays flat):

1. every row is parsed, structural errors are raised naming the file's 1-based line, and each column's JSON type is
   inferred; a column whose rows disagree (a string here, a number there, ints beside floats) becomes datasets'
   `Json` type, which stores each value as its own JSON text and decodes it back unchanged;
2. the rows are written to an Arrow file with exactly that schema (cached by content), which is memory-mapped.

The line of each row is kept beside the Arrow file when it is not simply the row number (blank lines, or a `.json`
list document), so `line_of(ds)` names the file's line after select, filter or a split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import config as hf_config
from datasets.arrow_writer import ArrowWriter

from align.errors import AlignError

logger = logging.getLogger(__name__)

# Bump when the Arrow written for the same bytes changes, so old cache files are not reused.
_VERSION = "1"
_BATCH_ROWS = 10_000
_READ_CHARS = 2**20
# A struct with more distinct keys than this is kept as JSON: per-row ids as keys would grow the schema with the file.
_MAX_FIELDS = 1000
_INT64 = (-(2**63), 2**63)
_MIXED = "mixed"

# Arrow data file -> its rows' 1-based lines (None: line = row + 1), for the datasets this module loaded.
_LINES: dict[str, Any] = {}


def load_json_files(files: dict[str, list[Path]], signatures: dict[Path, str]):
    """`DatasetDict` of split -> the rows of its JSON / JSON Lines files, every value as `json` reads it.

    Args:
        files: split -> data files (all JSON or JSON Lines).
        signatures: file -> content hash (the cache key).
    """
    all_files = [f for fs in files.values() for f in fs]
    cache = Path(hf_config.HF_DATASETS_CACHE) / "align_json"
    # The suffix is part of the key: a .json file of one object is refused, the same line in a .jsonl is a row.
    key = [_VERSION, [(signatures[f], f.suffix.lower()) for f in all_files]]
    key = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    arrows = [cache / f"{key}-{i}.arrow" for i in range(len(all_files))]
    if not all(a.is_file() for a in arrows):
        features = infer_features(all_files)
        cache.mkdir(parents=True, exist_ok=True)
        for f, a in zip(all_files, arrows, strict=True):
            _write_arrow(f, a, features)
    parts: dict[str, list] = {}
    for f, a in zip(all_files, arrows, strict=True):
        lines = a.with_suffix(".lines")
        _LINES[str(a)] = _read_lines(lines) if lines.is_file() else None
        split = next(s for s, fs in files.items() if f in fs)
        parts.setdefault(split, []).append(datasets.Dataset.from_file(str(a), split=split))
    return datasets.DatasetDict(
        {s: ds[0] if len(ds) == 1 else datasets.concatenate_datasets(ds, split=s) for s, ds in parts.items()}
    )


def line_of(ds):
    """A function: row index of `ds` -> 1-based line of its source file (row number when no file is known)."""
    indices = getattr(ds, "_indices", None)  # set by select, filter, shuffle, train_test_split
    files = ds.cache_files if getattr(ds, "_data", None) is not None else []
    lines = _LINES.get(files[0]["filename"]) if len(files) == 1 else None

    def line(index: int) -> int:
        if indices is not None:
            index = indices.column(0)[index].as_py()
        return lines[index].as_py() if lines is not None else index + 1

    return line


# Pass 1: rows and their JSON types


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line, row) for each row of a JSON Lines file or a `.json` list of objects; AlignError otherwise."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(_READ_CHARS)
            first = head.lstrip()[:1]
            f.seek(0)
            if first == "[":
                yield from _document_rows(path, f)
            else:
                yield from _line_rows(path, f)
    except UnicodeDecodeError as e:
        raise AlignError(first_non_utf8_line(path) or f"{path}: not valid UTF-8. Save it as UTF-8.") from e


def first_non_utf8_line(path: Path) -> str | None:
    """The error naming the first line of `path` that is not UTF-8 (line and column), or None if all of it is."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}). "
                    "Save the file as UTF-8."
                )
    return None


def _line_rows(path: Path, f) -> Iterator[tuple[int, dict]]:
    single = path.suffix.lower() == ".json"  # a .json file of one object is a document, not a row: hold it back
    held, n = None, 0
    for lineno, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            if n == 0 and single:
                _raise_if_object_document(path)
            raise AlignError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}). Fix or remove that line; each line "
                "must be one complete JSON object."
            ) from e
        if not isinstance(row, dict) and n == 0 and single:
            raise AlignError(f"{path}: the JSON document is {_type_name(row)}, expected a list of objects. Put the "
                             "rows in a top-level list ([{...}, {...}]) or write JSON Lines.")  # fmt: skip
        if not isinstance(row, dict):
            raise AlignError(f"{path}:{lineno}: the line is {_type_name(row)}, expected a JSON object. Make each "
                             "line {...}.")  # fmt: skip
        n += 1
        if single and n == 1:
            held = (lineno, row)
            continue
        if held is not None:
            yield held
            held = None
        yield lineno, row
    if held is not None:
        _raise_object_document(path, held[1])


def _raise_if_object_document(path: Path) -> None:
    """A `.json` file holding one (multi-line) object: refuse it as a document, not rows."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read(64 * 2**20)
    try:
        doc, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except json.JSONDecodeError:
        return
    if isinstance(doc, dict) and not text[end:].strip():
        _raise_object_document(path, doc)


def _raise_object_document(path: Path, doc: dict) -> None:
    lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    held = f" (its '{lists[0]}' holds a list of {len(doc[lists[0]])} objects)" if lists else ""
    raise AlignError(
        f"{path}: the JSON document is an object{held}, not a list of rows. Put the rows in a top-level list "
        "([{...}, {...}]) or write JSON Lines (one object per line, .jsonl)."
    )


def _document_rows(path: Path, f) -> Iterator[tuple[int, dict]]:
    """The objects of a top-level JSON list, decoded one at a time from a sliding buffer (flat memory)."""
    decoder = json.JSONDecoder()
    buf, eof = "", False
    base_pos, base_line, base_col = 0, 1, 1  # where buf[0] sits in the file (character, line, column)

    def more() -> bool:
        nonlocal buf, eof
        chunk = f.read(_READ_CHARS)
        eof = not chunk
        buf += chunk
        return bool(chunk)

    def skip_ws(i: int) -> int:
        while True:
            j = len(buf) - len(buf[i:].lstrip())
            if j < len(buf) or not more():
                return j

    def where(i: int) -> tuple[int, int]:
        nl = buf.count("\n", 0, i)
        col = i - buf.rfind("\n", 0, i) if nl else base_col + i
        return base_line + nl, col

    def invalid(i: int, msg: str) -> AlignError:
        line, col = where(i)
        return AlignError(
            f"{path}:{line}:{col}: invalid JSON ({msg}, character {base_pos + i}). Fix the file; it must be a list of "
            "objects or JSON Lines."
        )

    more()
    i = skip_ws(0) + 1  # past "["
    n = 0
    while True:
        i = skip_ws(i)
        if i >= len(buf):
            raise invalid(i, "Expecting ',' delimiter or ']'")
        if buf[i] == "]" and n == 0:
            i += 1
            break
        while True:
            try:
                item, end = decoder.raw_decode(buf, i)
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as e:
                # More text can only help when the decoder ran out of it.
                if eof or not (e.pos >= len(buf) or e.msg.startswith("Unterminated string")):
                    raise invalid(e.pos, e.msg) from e
            if not more():
                continue
        n += 1
        line, _ = where(i)
        if not isinstance(item, dict):
            raise AlignError(f"{path}:{line}: item {n} is {_type_name(item)}, expected an object. Make every item an "
                             "object.")  # fmt: skip
        yield line, item
        i = skip_ws(end)
        if i < len(buf) and buf[i] == ",":
            i += 1
        elif i < len(buf) and buf[i] == "]":
            i += 1
            break
        else:
            raise invalid(i, "Expecting ',' delimiter")
        # Drop what is decoded, keeping the position bookkeeping.
        base_line, base_col = where(i)
        base_pos += i
        buf, i = buf[i:], 0
    rest = skip_ws(i)
    if rest < len(buf):
        raise invalid(rest, "Extra data")


def infer_features(files: list[Path]):
    """datasets `Features` holding every row of `files` unchanged: a column whose JSON types disagree is `Json`."""
    shapes: dict[str, Any] = {}
    rows = 0
    for path in files:
        for lineno, row in iter_rows(path):
            rows += 1
            for col, value in row.items():
                shape = _shape(value, path, lineno, col)
                old = shapes.get(col)
                if old is not _MIXED and old != shape:
                    shapes[col] = new = _merge(old, shape) if col in shapes else shape
                    if new is _MIXED:
                        logger.debug("%s:%d: column '%s' mixes JSON types; kept as JSON values", path, lineno, col)
    if not rows:
        where = files[0] if len(files) == 1 else ", ".join(map(str, files))
        raise AlignError(f"{where}: the data has 0 rows. Add rows to it or point to another file.")
    return datasets.Features({col: _feature(shape) for col, shape in shapes.items()})


def _shape(v: Any, path: Path, lineno: int, col: str) -> Any:
    """A value's JSON type: None (null), "string", "int64", "float64", "bool", ("list", item), ("struct", {k: ..})."""
    t = type(v)
    if t is str:
        return "string"
    if v is None:
        return None
    if t is bool:
        return "bool"
    if t is int:
        if not _INT64[0] <= v < _INT64[1]:
            raise AlignError(f"{path}:{lineno}: '{col}' holds the integer {v}, beyond 64 bits. Store it as a string.")
        return "int64"
    if t is float:
        return "float64"
    if t is list:
        item = None
        for x in v:
            s = _shape(x, path, lineno, col)
            if s != item:
                item = _merge(item, s)
                if item is _MIXED:
                    return _MIXED
        return ("list", item)
    fields = {}
    for k, x in v.items():
        s = _shape(x, path, lineno, col)
        if s is _MIXED:
            return _MIXED
        fields[k] = s
    return ("struct", fields) if 0 < len(fields) <= _MAX_FIELDS else _MIXED


def _merge(a: Any, b: Any) -> Any:
    """The type holding both `a` and `b` unchanged (null fits any), or _MIXED."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    if a is _MIXED or b is _MIXED or not (isinstance(a, tuple) and isinstance(b, tuple)) or a[0] != b[0]:
        return _MIXED
    if a[0] == "list":
        item = _merge(a[1], b[1])
        return _MIXED if item is _MIXED else ("list", item)
    if a[1].keys() != b[1].keys():
        return _MIXED  # an Arrow struct would read a missing key as null: keep such objects as JSON
    fields = {k: _merge(s, b[1][k]) for k, s in a[1].items()}
    return _MIXED if _MIXED in fields.values() else ("struct", fields)


def _feature(shape: Any):
    if shape is _MIXED:
        return datasets.Json()
    if shape is None:
        return datasets.Value("null")
    if isinstance(shape, str):
        return datasets.Value(shape)
    if shape[0] == "list":
        return datasets.List(_feature(shape[1]))
    return {k: _feature(s) for k, s in shape[1].items()}


# Pass 2: Arrow


def _write_arrow(path: Path, out: Path, features) -> None:
    """Write the rows of `path` with `features` to `out`, and their lines to `out.lines` unless line = row + 1."""
    schema = features.arrow_schema
    is_json = {name: isinstance(f, _json_type()) for name, f in features.items()}
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    lines = _LineWriter(out.with_suffix(".lines"))
    writer = ArrowWriter(features=features, path=str(tmp))
    try:
        batch: list[dict] = []
        for lineno, row in iter_rows(path):
            lines.add(lineno)
            batch.append(row)
            if len(batch) == _BATCH_ROWS:
                writer.write_table(_table(batch, schema, is_json))
                batch = []
        if batch:
            writer.write_table(_table(batch, schema, is_json))
        writer.finalize()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        writer.close()
        lines.close()
    os.replace(tmp, out)


class _LineWriter:
    """Streams rows' line numbers to an Arrow file, only once some line is not its row number + 1."""

    def __init__(self, path: Path):
        self.path, self.rows, self.pending, self.writer, self.sink = path, 0, [], None, None
        path.unlink(missing_ok=True)

    def add(self, lineno: int) -> None:
        self.rows += 1
        if self.writer is None and lineno == self.rows:
            return
        if self.writer is None:
            self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            self.sink = pa.OSFile(str(self.tmp), "wb")
            self.writer = pa.ipc.new_stream(self.sink, pa.schema([("line", pa.int64())]))
            for start in range(1, self.rows, _BATCH_ROWS):  # the rows so far sat on their own lines
                self._write(range(start, min(start + _BATCH_ROWS, self.rows)))
        self.pending.append(lineno)
        if len(self.pending) == _BATCH_ROWS:
            self._write(self.pending)
            self.pending = []

    def _write(self, lines) -> None:
        self.writer.write_batch(pa.record_batch([pa.array(lines, pa.int64())], names=["line"]))

    def close(self) -> None:
        if self.writer is None:
            return
        if self.pending:
            self._write(self.pending)
        self.writer.close()
        self.sink.close()
        os.replace(self.tmp, self.path)
        self.writer = None


def _table(rows: list[dict], schema, is_json: dict[str, bool]):
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if is_json[field.name]:
            # Encoded here: datasets' Json.encode_example keeps a str that parses as JSON ("0.5") as that JSON.
            text = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())
            arrays.append(pa.ExtensionArray.from_storage(pa.json_(), text))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _json_type():
    return datasets.Json


def _read_lines(path: Path):
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().column(0)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
