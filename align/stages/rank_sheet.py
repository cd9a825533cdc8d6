"""`align rank export` / `align rank import`: rankings from human labelers, through a sheet they fill in.

The sheet format is documented in `align.stages.rank` (module docstring) and in `align rank --help`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import set_seed

from align.config import find_config, load_recipe, log_config, parse_config, recipe_dict
from align.data import sources
from align.data.annotations import is_annotation_log
from align.data.rankings import parse_ranking, parse_ranking_row
from align.errors import AlignError
from align.io import atomic_write_json, atomic_write_text, output_lock, parent_of
from align.stages.rank import (
    EPILOG,
    HUMAN,
    SHEET_META_SUFFIX,
    SHEET_SUFFIXES,
    finish,
    group_stats,
    load_prompts,
    sample,
    sampling_settings,
    start_output,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Human labelers: export a sheet, import it filled in


def _sheet_parser(prog: str, description: str) -> argparse.ArgumentParser:
    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise AlignError(f"{prog}: {message}. See `{prog} --help`.")

    return _Parser(prog=prog, description=description, epilog=EPILOG, allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip


def _check_sheet_path(path: str, flag: str) -> Path:
    p = Path(path)
    if p.suffix.lower() not in SHEET_SUFFIXES:
        raise AlignError(f"{flag} {path}: unsupported sheet type '{p.suffix}'. Use .csv or .jsonl.")
    return p


def export_main(argv: list[str]) -> int:
    """`align rank export --config RECIPE --output SHEET`: sample as `align rank` does and write a sheet to fill in."""
    parser = _sheet_parser(
        "align rank export",
        "Sample K responses per prompt as `align rank` does and write a sheet for human labelers. Every other flag "
        "is a recipe key (--config RECIPE, --num_generations, ...: see `align rank --help`).",
    )
    parser.add_argument("--output", required=True, help="The sheet to write: .csv (spreadsheets) or .jsonl.")
    args, rest = parser.parse_known_args(argv)
    sheet = _check_sheet_path(args.output, "--output")
    # No output_dir is written here; the recipe's is kept (recorded for import) or a placeholder satisfies the config.
    cfg = parse_config("rank", rest, overrides=None if _has_output_dir(rest) else {"output_dir": str(sheet.parent)})
    set_seed(cfg.seed)
    log_config(cfg)
    prompts, data_info = load_prompts(cfg)
    groups, _ = sample(cfg, prompts)
    k = cfg.num_generations
    rows = [{"id": n, "prompt": p, **{f"response_{i}": r for i, r in enumerate(g)}, "ranking": ""}
            for n, (p, g) in enumerate(zip(prompts, groups, strict=True), 1)]  # fmt: skip
    sheet.parent.mkdir(parents=True, exist_ok=True)
    if sheet.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["id", "prompt", *[f"response_{i}" for i in range(k)], "ranking"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(sheet, buf.getvalue())
    else:
        atomic_write_text(sheet, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = {
        "parent": parent_of(cfg.model_name_or_path, cfg.model_hub_id),
        "recipe": recipe_dict(cfg),
        "data": data_info,
        "sampling": sampling_settings(cfg),
        "tinyworld": sources.has_gold(cfg.dataset_name),
    }
    atomic_write_json(Path(str(sheet) + SHEET_META_SUFFIX), meta)
    logger.info("rank export: wrote %s (%d prompts x %d responses). Fill its 'ranking' column (%s), then run "
                "`align rank import %s --output_dir DIR`.", sheet, len(rows), k, "e.g. 2>0=3>1", sheet)  # fmt: skip
    return 0


def _has_output_dir(argv: list[str]) -> bool:
    if any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        return True
    config = find_config(argv)
    return bool(config and load_recipe(config).get("output_dir"))


def read_sheet(path: Path) -> list[dict[str, Any]]:
    """The rows of a filled sheet (.csv: every cell a string; .jsonl: one object per line)."""
    if not path.is_file():
        raise AlignError(f"{path}: no such file. Give the sheet `align rank export` wrote, filled in.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets often save CSV with a BOM
    except UnicodeDecodeError as e:
        raise AlignError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}). Save the sheet as UTF-8.") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for n, row in enumerate(reader, 1):
            if None in row:
                raise AlignError(f"{path}:{n}: more cells than header columns. Check the row's quoting.")
            rows.append(row)
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlignError(f"{path}:{n}: not valid JSON ({e.msg}). Fix the line.") from None
        if not isinstance(row, dict):
            raise AlignError(f"{path}:{n}: a {type(row).__name__}, expected a JSON object. Fix the line.")
        rows.append(row)
    return rows


def sheet_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One filled sheet row -> a validated rankings row {prompt, responses, ranking}."""
    responses = sheet_responses(row, where)
    ranking = parse_ranking(row.get("ranking"), where=where)
    prompt, responses, _, _ = parse_ranking_row(
        {"prompt": row.get("prompt"), "responses": responses, "ranking": ranking}, where=where
    )
    return {"prompt": prompt, "responses": responses, "ranking": ranking}


def sheet_responses(row: dict[str, Any], where: str) -> Any:
    """A sheet row's responses (its `responses` list, or its response_0..response_{K-1} cells), none empty."""
    if "responses" in row:
        responses = row["responses"]
    else:
        cols = sorted((c for c in row if c.startswith("response_") and c[9:].isdigit()), key=lambda c: int(c[9:]))
        if [int(c[9:]) for c in cols] != list(range(len(cols))):
            raise AlignError(f"{where}: response columns {cols} are not response_0..response_{len(cols) - 1}.")
        responses = [row[c] for c in cols]
    for i, r in enumerate(responses if isinstance(responses, list) else []):
        if r is None or (isinstance(r, str) and not r.strip()):
            raise AlignError(
                f"{where}: 'response_{i}' is empty; an empty response cannot be ranked. Drop the row or fill it."
            )
    return responses


def import_main(argv: list[str]) -> int:
    """`align rank import SHEET --output_dir DIR`: validate a filled sheet and write the rank output dir."""

    parser = _sheet_parser(
        "align rank import",
        "Read a filled sheet back, validate every row, and write the output dir as `align rank` does "
        "(labeler: human).",
    )
    parser.add_argument("sheet", help="The filled sheet (.csv or .jsonl) from `align rank export`, or the "
                        "annotations log of `align rank serve`.")  # fmt: skip
    parser.add_argument("--output_dir", required=True, help="Where rankings.jsonl, dataset/ and align_stage.json go.")
    from align.stages import rank_serve  # import cycle: rank_serve imports this module

    rank_serve.add_import_arguments(parser)
    args = parser.parse_args(argv)
    if is_annotation_log(Path(args.sheet)):
        rank_serve.import_annotations(args.sheet, args.output_dir, args.disagreement or "majority")
        return 0
    if args.disagreement is not None:
        raise AlignError(f"--disagreement: {args.sheet} is a sheet (one ranking per row), not an `align rank serve` "
                         "log. Drop the flag.")  # fmt: skip
    import_sheet(args.sheet, args.output_dir)
    return 0


def import_sheet(sheet: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Read and validate a filled sheet, then write `output_dir` as `align rank` does (labeler: human)."""
    path = _check_sheet_path(os.fspath(sheet), "sheet")
    rows = read_sheet(path)
    if not rows:
        raise AlignError(f"{path}: no rows. Export a sheet with `align rank export` and fill its 'ranking' column.")
    parsed = [sheet_row(row, f"{path}:{n}") for n, row in enumerate(rows, 1)]
    meta_file = Path(str(path) + SHEET_META_SUFFIX)
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    prompts = [r["prompt"] for r in parsed]
    groups = [r["responses"] for r in parsed]
    rankings = [r["ranking"] for r in parsed]
    ks = sorted({len(g) for g in groups})
    metrics: dict[str, Any] = {
        "num_groups": len(parsed),
        "num_prompts": len(parsed),
        "k": ks[-1],  # a JSONL sheet may hold groups of different sizes: the largest
        "dropped_all_tied": 0,  # all-tied or empty rows are errors here: the annotator can fix them
        "dropped_empty": 0,
        **group_stats(prompts, groups, rankings, gold=bool(meta.get("tinyworld")) or sources.gold_prompts(prompts)),
    }
    output_dir = Path(output_dir)
    data = {"name": str(path), "rows": len(parsed), "exported": meta.get("data")}
    with output_lock(output_dir):  # one writer per dir, as `align rank` (its run is a stage_lifecycle)
        start_output(output_dir)
        finish(output_dir, parsed, metrics=metrics, parent=meta.get("parent"), recipe=meta.get("recipe") or {},
               data=data, sampling=meta.get("sampling"), labeler={"name": HUMAN, "kind": HUMAN, "sheet": str(path)})
    return output_dir
