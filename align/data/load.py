"""Load a user's data (local files, `save_to_disk` folders, Hub ids) with `datasets`, and check it with clear errors.

Everything stays memory-mapped Arrow: checks read the Arrow schema first and scan in batches only when it cannot
answer. JSON files are read by `align.data.json_rows`, not datasets' json builder, so no value is coerced and every
row keeps its line. Every user mistake is an `AlignError` naming the file, the 1-based row (or line) and the column:

    data/sft.jsonl:17: 'messages' is str, expected a list. ...

`load_data` follows `datasets.load_dataset`: no `split` -> `DatasetDict`, a `split` -> `Dataset` (the iterable kinds
when `streaming=True`).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_reader import ReadInstruction
from datasets.data_files import DataFilesDict, DataFilesList, EmptyDatasetError, get_data_patterns

from align.data import json_rows
from align.data.hub_id import is_hub_id
from align.data.json_rows import first_non_utf8_line, line_of
from align.errors import AlignError

logger = logging.getLogger(__name__)

# File extension -> `datasets` packaged builder. `.json` may hold one JSON document or JSON Lines (the json builder
# reads both).
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SUPPORTED = ", ".join(BUILDERS)

# Files up to this size are hashed whole for the cache key; larger ones by size, mtime and their first/last bytes
# (hashing a multi-GB corpus on every run would cost more than it protects).
_FULL_HASH_MAX = 64 * 2**20
_EDGE_BYTES = 4 * 2**20

_TYPE_NAMES = {
    str: "a string",
    list: "a list",
    dict: "an object",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
}


# Load


def load_data(name: str, *, config: str | None = None, split: str | None = None, streaming: bool = False):
    """Load `name`: a data file, a folder of data files, a `save_to_disk` folder, or a Hub dataset id.

    Args:
        name: `.jsonl/.json/.csv/.parquet/.txt` file (`.txt`: one row per line in column `text`), a folder written by
            `save_to_disk` (Dataset or DatasetDict), a folder of data files (splits from file names, as on the Hub:
            `train.jsonl`, `test.jsonl`; otherwise all files are `train`), or a Hub id (`org/name`).
        config: Hub dataset configuration (`load_dataset(name, config)`); only for Hub ids.
        split: return this split as a `Dataset` (local files and Hub ids also take slices such as `train[:100]`).
        streaming: return `IterableDataset(Dict)`; errors in the rows then surface while iterating.

    Returns:
        `DatasetDict` when `split` is None, else `Dataset` (the `Iterable*` kinds when streaming).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            if config is not None:
                raise AlignError(f"{name}: a save_to_disk folder has no configurations; remove dataset_config.")
            out = _load_saved(path, name, split=split, streaming=streaming)
        else:
            out = _load_files(_folder_data_files(path, name), name, split=split, streaming=streaming)
    elif path.is_file():
        if config is not None:
            raise AlignError(f"{name}: a local file has no configurations; remove dataset_config.")
        out = _load_files({"train": [path]}, name, split=split, streaming=streaming)
    elif is_hub_id(name, bare=True):
        out = _load_hub(name, config, split=split, streaming=streaming)
    else:
        raise AlignError(f"{name}: no such file or directory. Check the path (relative to {os.getcwd()}).")
    if not streaming:
        _check_not_empty(out, name)
        parts = out.items() if isinstance(out, datasets.DatasetDict) else [(split, out)]
        logger.info("Loaded %s: %s", name, ", ".join(f"{k} {len(v):,} rows" for k, v in parts))
    return out


def _is_saved_dataset(path: Path) -> bool:
    # The marker files `save_to_disk` writes (datasets.load_from_disk checks the same ones).
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved(path: Path, name: str, *, split: str | None, streaming: bool):
    try:
        obj = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise AlignError(f"{name}: cannot read this save_to_disk folder ({_root_message(e)}). Save it again.") from e
    # A saved bare Dataset is the `train` split, as a single data file is.
    dd = obj if isinstance(obj, datasets.DatasetDict) else datasets.DatasetDict({"train": obj})
    if streaming:
        dd = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()})
    if split is None:
        return dd
    if split not in dd:
        raise AlignError(f"{name}: no split '{split}'; the splits are {', '.join(dd)}. Pick one of them.")
    return dd[split]


def _folder_data_files(path: Path, name: str) -> dict[str, list[Path]]:
    """Split -> data files of a folder, named as on the Hub (`train*.jsonl`, `test*.jsonl`, else all `train`)."""
    try:
        patterns = get_data_patterns(str(path))
        files = DataFilesDict.from_patterns(patterns, base_path=str(path), allowed_extensions=list(BUILDERS))
    except (EmptyDatasetError, FileNotFoundError) as e:
        raise AlignError(
            f"{name}: the folder holds no data files. Put {SUPPORTED} files in it, or save a dataset there with "
            "save_to_disk."
        ) from e
    return {str(split): [Path(f) for f in fs] for split, fs in files.items()}


def _load_files(files: dict[str, list[Path]], name: str, *, split: str | None, streaming: bool):
    """Load local data files with the `datasets` builder their extension names, turning failures into AlignError."""
    all_files = [f for fs in files.values() for f in fs]
    builders = {BUILDERS.get(f.suffix.lower()) for f in all_files}
    if None in builders:
        bad = next(f for f in all_files if f.suffix.lower() not in BUILDERS)
        raise AlignError(f"{bad}: unsupported file type '{bad.suffix}'. Use one of {SUPPORTED}.")
    if len(builders) > 1:
        kinds = ", ".join(sorted({f.suffix.lower() for f in all_files}))
        raise AlignError(f"{name}: mixes file types ({kinds}). Keep one kind of data file per dataset.")
    for f in all_files:
        if f.stat().st_size == 0:
            raise AlignError(f"{f}: the file is empty. Add rows to it or point to another file.")
    builder = builders.pop()
    # pyarrow's JSON reader stores invalid UTF-8 as is and the row fails only when read (measured), so JSON files are
    # checked while they are hashed; the csv and text builders raise UnicodeDecodeError themselves.
    check_utf8 = builder == "json"
    # datasets keys its cache on the files' mtime only, so a file rewritten within the same timestamp tick (or copied
    # with its mtime kept) would load stale rows; a content signature keys the cache on what the file holds.
    signatures = {f: _signature(f, check_utf8=check_utf8) for f in all_files}
    if builder == "json":
        return _load_json(files, signatures, name, split=split, streaming=streaming)
    data_files = DataFilesDict(
        {k: DataFilesList([str(f.resolve()) for f in fs], [signatures[f] for f in fs]) for k, fs in files.items()}
    )
    try:
        out = datasets.load_dataset(builder, data_files=data_files, split=split, streaming=streaming)
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration, _arrow_error()) as e:
        _raise_split_error(e, name, split, list(files))
        for f in all_files:
            found = _diagnose(f, builder)
            if found:
                raise AlignError(found) from e
        if _is_no_data(e):
            raise AlignError(f"{name}: the data has 0 rows. Add rows to it or point to another file.") from e
        raise AlignError(f"{name}: cannot load it as {builder} ({_root_message(e)}). Check the file's format.") from e
    return out


def _load_json(
    files: dict[str, list[Path]], signatures: dict[Path, tuple[str]], name: str, *, split: str | None, streaming: bool
):
    """JSON files through align's own reader (`json_rows`): datasets' json builder coerces values (see there)."""
    dd = json_rows.load_json_files(files, {f: sig[0] for f, sig in signatures.items()})
    if split is not None:
        try:
            parts = ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in dd.items()})
        except ValueError as e:
            _raise_split_error(e, name, split, list(files))
            msg = f"{name}: cannot read split '{split}' ({e}). Write it as e.g. train or train[:100]."
            raise AlignError(msg) from e
        # An explicit indices mapping (a contiguous select would slice the table) keeps rows' lines findable.
        sel = [
            dd[p.splitname]
            if (p.from_, p.to) == (0, len(dd[p.splitname]))
            else dd[p.splitname]._select_with_indices_mapping(range(p.from_, p.to))
            for p in parts
        ]
        out = sel[0] if len(sel) == 1 else datasets.concatenate_datasets(sel)
        return out.to_iterable_dataset() if streaming else out
    if streaming:
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()})
    return dd


def _load_hub(name: str, config: str | None, *, split: str | None, streaming: bool):
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except OSError as e:
        # Measured (datasets 5.2), offline and not cached: ConnectionError("Couldn't reach 'x' on the Hub
        # (OfflineModeIsEnabled)") chained to FileNotFoundError("Dataset x is not cached"). Online, a missing repo is
        # DatasetNotFoundError (a FileNotFoundError) and HTTP failures HfHubHTTPError (an OSError).
        if offline:
            raise AlignError(
                f"{name}: not a local path, and this Hub dataset is not in the local cache while HF_HUB_OFFLINE is "
                "set. Unset HF_HUB_OFFLINE to download it, or pass a local file or folder."
            ) from e
        raise AlignError(
            f"{name}: neither a local path nor a reachable Hub dataset id ({_root_message(e)}). Check the name and "
            "your network, or pass a local file or folder."
        ) from e
    except ValueError as e:
        _raise_split_error(e, name, split, None)
        # e.g. an unknown config: datasets lists the available ones in its message.
        raise AlignError(f"{name}: {_root_message(e)}. Check dataset_config and dataset splits.") from e


def _raise_split_error(e: BaseException, name: str, split: str | None, present: list[str] | None) -> None:
    # datasets: ValueError('Unknown split "x". Should be one of [\'train\'].')
    if split is not None and "Unknown split" in str(e):
        where = f"the splits are {', '.join(present)}" if present else str(e).strip()
        raise AlignError(f"{name}: no split '{split}'; {where}. Pick one of them.") from e


def _is_no_data(e: BaseException) -> bool:
    # Measured: whitespace-only .jsonl or `[]` in .json -> ValueError('Instruction "train" corresponds to no data!').
    return any("corresponds to no data" in str(x) for x in _chain(e))


def _check_not_empty(out, name: str) -> None:
    parts = out.items() if isinstance(out, datasets.DatasetDict) else [(None, out)]
    for split, ds in parts:
        if len(ds) == 0:
            where = f"{name} (split '{split}')" if split else name
            raise AlignError(f"{where}: the data has 0 rows. Add rows to it or point to another file.")


def _signature(path: Path, *, check_utf8: bool = False) -> tuple[str]:
    """A cache key for a local file that changes whenever its content does; optionally checks that it is UTF-8."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}".encode())
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_MAX:
            decoder = codecs.getincrementaldecoder("utf-8")() if check_utf8 else None
            try:
                for block in iter(lambda: f.read(2**20), b""):
                    h.update(block)
                    if decoder:
                        decoder.decode(block)
                if decoder:
                    decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                raise AlignError(first_non_utf8_line(path) or f"{path}: not valid UTF-8. Save it as UTF-8.") from e
        else:
            h.update(f"{st.st_mtime_ns}".encode())
            h.update(f.read(_EDGE_BYTES))
            f.seek(st.st_size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))
    return (h.hexdigest(),)


# Locate a load failure: datasets reports CSV errors by pandas' line count, so a failed load is re-scanned here to name
# the 1-based line of the file. (JSON files are read by `json_rows`, which names the line itself.)


def _diagnose(path: Path, builder: str) -> str | None:
    """The first problem in a data file, as an AlignError message, or None when none is found."""
    bad = first_non_utf8_line(path) if builder != "parquet" else None
    if bad:
        return bad
    if builder == "csv":
        return _diagnose_csv(path)
    if builder == "parquet":
        return _diagnose_parquet(path)
    return None


def _diagnose_csv(path: Path) -> str | None:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header:
                return f"{path}: no header row. Put the column names on the first line."
            for row in reader:
                # pandas (which datasets uses) skips blank lines.
                if row and len(row) != len(header):
                    return (
                        f"{path}:{reader.line_num}: the row has {len(row)} fields, the header has {len(header)}. "
                        "Quote fields that contain commas or fix the row."
                    )
        except csv.Error as e:
            return f"{path}:{reader.line_num}: unparseable CSV ({e}). Fix that line."
    return None


def _diagnose_parquet(path: Path) -> str | None:
    try:
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            try:
                pf.read_row_group(i)
            except (pa.ArrowException, OSError) as e:
                return f"{path}: row group {i + 1} of the Parquet file is corrupted ({e}). Write the file again."
    except (pa.ArrowException, OSError) as e:
        return f"{path}: not a readable Parquet file ({e}). The file is corrupted or truncated; write it again."
    return None


def _arrow_error() -> type[BaseException]:
    return pa.ArrowException


def _chain(e: BaseException | None) -> Iterable[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _root_message(e: BaseException) -> str:
    """The innermost exception's first line: datasets wraps the useful one ('An error occurred ...' says nothing)."""
    root = list(_chain(e))[-1]
    msg = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {msg}".rstrip(": ")


# Splits


def train_test(
    dd: Mapping[str, Any],
    *,
    train_split: str = "train",
    test_split: str = "test",
    test_size: float | int | None = None,
    seed: int = 0,
    source: str = "dataset",
):
    """The training split and the held-out split (None when there is none).

    The named `test_split` is used when present. Otherwise `test_size` rows (>= 1) or that fraction (< 1) of the
    training split are held out with `train_test_split(seed=seed)`; `test_size` 0 or None means no held-out split.

    Args:
        dd: `DatasetDict` or a plain dict of split name -> `Dataset`.
        source: the dataset's name, for error messages.
    """
    if train_split not in dd:
        raise AlignError(
            f"{source}: no split '{train_split}'; the splits are {', '.join(dd) or 'none'}. "
            "Set dataset_train_split to one of them."
        )
    train = dd[train_split]
    if test_split in dd:
        return train, dd[test_split]
    if not test_size:
        return train, None
    size: float | int = test_size
    if test_size >= 1:
        if test_size != int(test_size):
            raise AlignError(
                f"{source}: test_size {test_size} is neither a fraction (< 1) nor a whole number of rows."
            )
        size = int(test_size)
        if size >= len(train):
            raise AlignError(
                f"{source}: test_size {size} leaves no training rows of the {len(train)} in '{train_split}'. "
                "Use a fraction below 1 or fewer rows."
            )
    try:
        parts = train.train_test_split(test_size=size, seed=seed)
    except ValueError as e:  # e.g. a fraction that rounds to every row
        raise AlignError(
            f"{source}: cannot hold out test_size {test_size} of the {len(train)} rows in '{train_split}' ({e}). "
            "Pick a smaller test_size."
        ) from e
    logger.info(
        "No '%s' split: held out %d of %d '%s' rows (test_size=%s, seed=%d)",
        test_split, len(parts["test"]), len(train), train_split, test_size, seed,
    )  # fmt: skip
    return parts["train"], parts["test"]


# Columns and types


def apply_column_mapping(ds, mapping: Mapping[str, str] | None, source: str):
    """Rename the user's columns to ours: `{"question": "prompt"}` turns column `question` into `prompt`."""
    if not mapping:
        return ds
    if isinstance(ds, datasets.DatasetDict):
        return datasets.DatasetDict({k: apply_column_mapping(v, mapping, f"{source}[{k}]") for k, v in ds.items()})
    present = ds.column_names
    for theirs in mapping:
        if theirs not in present:
            raise AlignError(
                f"{source}: dataset_column_mapping names column '{theirs}', which is not in the data. "
                f"The columns are {', '.join(present)}."
            )
    renames = {k: v for k, v in mapping.items() if k != v}
    targets = list(renames.values())
    for ours in targets:
        if targets.count(ours) > 1:
            raise AlignError(f"{source}: dataset_column_mapping maps several columns to '{ours}'. Map only one.")
        if ours in present and ours not in renames:
            raise AlignError(
                f"{source}: dataset_column_mapping renames a column to '{ours}', but the data already has a "
                f"'{ours}' column. Map that one to another name too, e.g. {{'{ours}': '{ours}_orig'}}."
            )
    return ds.rename_columns(renames) if renames else ds


def require_columns(ds, columns: Iterable[str], source: str) -> None:
    """Raise AlignError unless every column in `columns` exists, listing those that do."""
    present = ds.column_names
    missing = [c for c in columns if c not in present]
    if missing:
        names = ", ".join(f"'{c}'" for c in missing)
        raise AlignError(
            f"{source}: missing column {names}; the columns are {', '.join(present)}. "
            "Rename yours with dataset_column_mapping."
        )


def check_types(ds, types: Mapping[str, type | tuple[type, ...]], source: str, *, batch_size: int = 10_000) -> None:
    """Raise AlignError at the first row whose column value is not of the expected Python type (null counts as wrong).

    The Arrow schema answers most cases without reading rows: a `string` column holds only str, so only its nulls
    need finding. Columns of mixed JSON types (datasets' `Json` type) are scanned in batches.

    Args:
        types: column -> `str`, `list`, `dict`, `int`, `float`, `bool`, or a tuple of them (`float` accepts ints).
    """
    require_columns(ds, types, source)
    for col, want in types.items():
        want = want if isinstance(want, tuple) else (want,)
        if float in want:
            want = (*want, int)
        kind = _arrow_kind(ds.data.schema.field(col).type)
        if kind is not None:
            if kind in want and ds.data.column(col).null_count == 0:
                continue  # the schema proves it: no scan
            row, value = _first_null(ds, col, batch_size) if kind in want else (0, _first_value(ds, col))
        else:
            row, value = _first_wrong_value(ds, col, want, batch_size)
        if row is not None:
            expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in want if t is not int or float not in want)
            raise AlignError(
                f"{source}:{source_row(ds, row)}: '{col}' is {_type_name(value)}, expected {expected}. "
                "Fix that row, or map the right column with dataset_column_mapping."
            )


def _arrow_kind(t) -> type | None:
    """The Python type every non-null value of an Arrow type has, or None when it varies (datasets' Json type)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return str
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return list
    if pa.types.is_struct(t):
        return dict
    if pa.types.is_boolean(t):
        return bool
    if pa.types.is_integer(t):
        return int
    if pa.types.is_floating(t):
        return float
    return None


def _first_null(ds, col: str, batch_size: int) -> tuple[int | None, Any]:
    start = 0
    for batch in ds.select_columns([col]).with_format("arrow").iter(batch_size=batch_size):
        i = pc.index(pc.is_null(batch.column(0)), True).as_py()
        if i >= 0:
            return start + i, None
        start += batch.num_rows
    return None, None


def _first_value(ds, col: str) -> Any:
    return ds.select_columns([col])[0][col]


def _first_wrong_value(ds, col: str, want: tuple[type, ...], batch_size: int) -> tuple[int | None, Any]:
    start = 0
    for batch in ds.select_columns([col]).iter(batch_size=batch_size):
        for i, v in enumerate(batch[col]):
            if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
                return start + i, v
        start += len(batch[col])
    return None, None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def source_row(ds, index: int) -> int:
    """1-based line in its file (a JSON file: blank lines and `.json` documents counted) or row in the loaded data of
    row `index` of `ds`, looking through select/filter/split indices."""
    return source_rows(ds)(index)


def source_rows(ds):
    """`source_row` of `ds` as a function of the row index, for checks that name rows one by one."""
    return line_of(ds)


# Lineage


def fingerprint(ds) -> str:
    """datasets' fingerprint: changes when the rows or any transform applied to them change."""
    return ds._fingerprint


def describe(ds, name: str) -> dict[str, Any]:
    """The `data` entry of align_stage.json."""
    return {"name": name, "fingerprint": fingerprint(ds), "rows": len(ds)}
