"""`align rank`: sample K responses per prompt from a policy and rank them best -> worst (InstructGPT step 2, data).

    align rank --config recipes/tiny/rank.yaml
    align rank --config recipes/tiny/rank.yaml --model_name_or_path runs/tiny/sft --labeler_noise 0
    align rank export --config recipes/tiny/rank.yaml --output sheet.csv     # samples only, for human labelers
    align rank import sheet.csv --output_dir runs/tiny/rank                  # their rankings back, validated
    align rank serve sheet.csv                                               # or rank in a browser (rank_serve.py)

Prompts: tiny-world instructions (train split; the test split is kept for held-out gold evaluation), or your file
(`prompt` column, or `messages` ending in a user turn; `dataset_column_mapping` renames columns). The labeler
(`labeler`) gives each of the K responses a score, higher = better; equal scores are ties, and identical responses
always tie. Groups where all K responses tie (e.g. K identical samples) hold no comparison, and groups with an empty
response (the policy ended at once) are not valid rankings data: both are dropped, counted in the log and in
`align_stage.json` (`dropped_all_tied`, `dropped_empty`).

Output dir (what `align reward --dataset_name DIR` reads):
    rankings.jsonl    one group per line: {"prompt": str, "responses": [K str], "ranking": [[i, ...], ...],
                      "scores": [K float]}. `ranking` lists response indices best -> worst, always as a list of
                      lists so ties fit one Arrow type: [[2], [0, 3], [1]] = 2 best, 0 and 3 tie, 1 worst.
                      `scores` are the labeler's (noise included); human rankings have none.
    dataset/          the same rows as a `datasets.save_to_disk` folder.
    align_stage.json  lineage, sampling settings and stats (tie rate, dropped groups, response lengths, agreement with
                      the gold labeler on tiny-world prompts); written last: its presence means "done".

Human labelers (InstructGPT's setting): `align rank export` samples exactly as `align rank` does, without a labeler,
and writes a sheet (`.csv` or `.jsonl`) with columns

    id, prompt, response_0, ..., response_{K-1}, ranking

`ranking` is empty; the annotator writes response numbers best -> worst separated by `>`, tied responses joined by
`=`: `2>0=3>1` (2 best, 0 and 3 tie, 1 worst). Every response appears exactly once; at least two must differ in rank.
A JSON list (`[2, [0, 3], 1]`) is accepted too. `align rank import SHEET --output_dir DIR` checks every row (errors
name `SHEET:row`, counted from 1 after the header, the column and the fix) and writes the output dir above with
labeler `human`. Export also writes `SHEET.align.json` (policy, sampling, prompts); import reads it for lineage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import set_seed

from align.config import config_class, log_config, parse_config, recipe_dict, stage_parser
from align.data import formats, sources, tinyworld
from align.data import load as dl
from align.data.rankings import format_ranking
from align.data.tinyworld import GOLD
from align.errors import AlignError
from align.evaluation.score import load_function, load_scorer
from align.generation.generate import generate
from align.io import STAGE_FILE, atomic_write_text, parent_of, stage_lifecycle, write_stage_info
from align.models import modeling
from align.models.modeling import load_model_and_tokenizer
from align.stages.lifecycle import push_finished, wait_for_everyone

logger = logging.getLogger(__name__)

HUMAN = "human"
RANKINGS_FILE = "rankings.jsonl"
DATASET_DIR = "dataset"
SHEET_META_SUFFIX = ".align.json"
SHEET_SUFFIXES = (".csv", ".jsonl")
NUM_SAMPLES = 5  # groups kept in align_stage.json (and the Hub card) as examples

Labeler = Callable[[Sequence[str], Sequence[Sequence[str]]], list[list[float]]]

EPILOG = """\
subcommands (human labelers):
  align rank export --config RECIPE --output SHEET.csv|.jsonl [--key value ...]
      sample K responses per prompt (no labeler) and write a sheet: id, prompt, response_0..response_{K-1}, ranking
  align rank import SHEET --output_dir DIR
      read the filled sheet back, validate every row, write DIR as `align rank` does (labeler: human)
  align rank serve SHEET [--port 8765] [--host H --token T]
      rank in a browser instead (docs/labeling.md); then `align rank import SHEET.annotations.jsonl --output_dir
      DIR [--disagreement majority|per_annotator]`

ranking format: response numbers best -> worst, '>' between ranks, '=' joining ties, e.g. 2>0=3>1
(2 best, 0 and 3 tie, 1 worst); a JSON list such as [2, [0, 3], 1] is accepted too.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from align.stages import rank_serve  # import cycle: rank_serve imports this module

        return rank_serve.serve_main(argv[1:])
    if argv and argv[0] in ("export", "import"):
        from align.stages import rank_sheet  # import cycle: rank_sheet imports this module

        return (rank_sheet.export_main if argv[0] == "export" else rank_sheet.import_main)(argv[1:])
    if "-h" in argv or "--help" in argv:
        _print_help()
    cfg = parse_config("rank", argv)
    run(cfg)
    return 0


def _print_help() -> None:
    """The recipe keys (as every stage's --help) plus the export/import subcommands; exits 0 like argparse."""
    parser = stage_parser(config_class("rank"), "align rank")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.parse_args(["--help"])


# ---------------------------------------------------------------------------------------------------------------------
# Data


def load_prompts(cfg) -> tuple[list[str], dict[str, Any]]:
    """The prompts to rank (`num_prompts` of them) and the `data` entry of align_stage.json."""
    n = cfg.num_prompts or sources.RANK_DEFAULT_PROMPTS
    built = sources.instruction_prompts(cfg.dataset_name, n=n, seed=cfg.tinyworld_seed, prompt_only=False)
    if built is not None:
        ds, info = built
        return list(ds["prompt"]), info

    source = cfg.dataset_name
    if not source:
        raise AlignError("align rank: no dataset_name. Use `tinyworld`, or your prompts file (a `prompt` column).")
    ds = dl.load_data(source, config=cfg.dataset_config, split=cfg.dataset_train_split)
    if cfg.dataset_column_mapping:
        ds = dl.apply_column_mapping(ds, cfg.dataset_column_mapping, source=source)
    columns = list(ds.column_names)
    if "prompt" not in columns and "messages" not in columns:
        raise AlignError(
            f"{source}: no 'prompt' or 'messages' column (columns present: {', '.join(columns)}). "
            'Rename one with dataset_column_mapping, e.g. {"question": "prompt"}.'
        )
    if cfg.num_prompts is not None and cfg.num_prompts < len(ds):
        ds = ds.select(range(cfg.num_prompts))
    rows = ds.select_columns([c for c in ("prompt", "messages") if c in columns]).to_list()
    prompts = [formats.prompt_text(r, f"{source}:{dl.source_row(ds, i)}", "rank") for i, r in enumerate(rows)]
    for i, p in enumerate(prompts):
        if not p.strip():
            raise AlignError(f"{source}:{dl.source_row(ds, i)}: the prompt is empty. Drop or fix the row.")
    info = {"name": source, "config": cfg.dataset_config, "fingerprint": ds._fingerprint, "rows": len(prompts)}
    return prompts, info


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def sampling_settings(cfg) -> dict[str, Any]:
    keys = ("num_generations", "temperature", "top_p", "top_k", "max_new_tokens", "generation_batch_size", "seed")
    return {k: getattr(cfg, k) for k in keys}


def sample(cfg, prompts: list[str]) -> tuple[list[list[str]], Any]:
    """K = num_generations sampled responses per prompt from the policy (chat template), and the tokenizer."""
    if not cfg.model_name_or_path:
        raise AlignError("align rank: no model_name_or_path. Point it at the policy, usually the SFT stage dir.")
    # Under `accelerate launch` each process samples its share of the prompts (its own seed), then all are gathered.
    # cpu=True on a machine without CUDA: PartialState does not read ACCELERATE_USE_CPU, and without it a CPU launch
    # yields lone rank-0 processes (measured with a rank probe under recipes/accelerate_configs/cpu_2proc.yaml).
    state = PartialState(cpu=cfg.use_cpu or not torch.cuda.is_available())
    set_seed(cfg.seed + state.process_index)
    model, tokenizer = load_model_and_tokenizer(cfg)
    device = state.device if torch.cuda.is_available() and not cfg.use_cpu else "cpu"
    model.to(device)
    all_prompts = prompts
    with state.split_between_processes(list(range(len(prompts)))) as mine:
        prompts = [all_prompts[i] for i in mine]
    logger.info(
        "rank: sampling %d x %d responses from %s (%s parameters, %s, %s); temperature %s, top_p %s, top_k %s, "
        "max_new_tokens %d.", len(prompts), cfg.num_generations, cfg.model_name_or_path,
        f"{modeling.count_parameters(model)[0]:,}", device, model.dtype, cfg.temperature, cfg.top_p, cfg.top_k,
        cfg.max_new_tokens)  # fmt: skip
    out: list[list[str]] = []
    step = cfg.generation_batch_size
    for i in tqdm(range(0, len(prompts), step), desc="rank: sampling", unit="batch", disable=not _main_process()):
        out += generate(
            model,
            tokenizer,
            prompts[i : i + step],
            chat=True,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            num_return_sequences=cfg.num_generations,
            batch_size=step,
            backend=cfg.generation_backend,
        )
    if state.num_processes > 1:
        pairs = sorted(gather_object(list(zip(mine, out, strict=True))))
        out = [group for _, group in pairs]
    return out, tokenizer


def _main_process() -> bool:
    return PartialState().is_main_process


# ---------------------------------------------------------------------------------------------------------------------
# Labelers: (prompts, groups of K responses) -> K scores per group, higher = better


def load_labeler(cfg) -> tuple[str, Labeler]:
    """(kind, labeler) for `cfg.labeler`: kind is "gold", "function" or "reward_model"."""
    spec = cfg.labeler
    if spec == GOLD:
        return GOLD, _flat(load_scorer(GOLD), GOLD)
    if ":" in spec and not Path(spec).exists():
        return "function", function_labeler(spec)
    device = "cpu" if cfg.use_cpu else None
    scorer = load_scorer(spec, batch_size=cfg.labeler_batch_size, device=device,
                         trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    return "reward_model", _flat(scorer, spec)


def _flat(scorer: Callable[[Sequence[str], Sequence[str]], list[float]], name: str) -> Labeler:
    """A per-pair scorer as a labeler: all groups' responses are scored in one batched call."""

    def label(prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[float]]:
        flat_p = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
        flat_r = [r for g in groups for r in g]
        it = iter(scorer(flat_p, flat_r))
        out = [[float(next(it)) for _ in g] for g in groups]
        for n, s in enumerate(out, 1):
            if not all(map(math.isfinite, s)):
                # e.g. a reward model overflowing in float16: a ranking of nan is no ranking
                raise AlignError(f"labeler {name}: scores {s} of group {n} are not all finite. Try dtype float32.")
        return out

    return label


def function_labeler(spec: str) -> Labeler:
    """`package.module:function` or `path/to/file.py:function`, called as function(prompt, responses) -> K scores;
    each result is checked."""
    _, fn = load_function(spec, key="labeler")

    def label(prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for n, (prompt, group) in enumerate(zip(prompts, groups, strict=True), 1):
            got = fn(prompt, list(group))
            out.append(_check_scores(got, len(group), f"labeler {spec} (group {n}, prompt {prompt[:40]!r})"))
        return out

    return label


def _check_scores(got: Any, k: int, where: str) -> list[float]:
    if isinstance(got, (str, bytes)) or not hasattr(got, "__len__") or not hasattr(got, "__iter__"):
        raise AlignError(f"{where}: returned {type(got).__name__}; it must return a list of {k} numbers.")
    got = list(got)
    if len(got) != k:
        raise AlignError(f"{where}: returned {len(got)} scores for {k} responses; return one number per response.")
    out = []
    for i, s in enumerate(got):
        try:
            v = float(s)
        except (TypeError, ValueError):
            v = math.nan
        if isinstance(s, bool) or not math.isfinite(v):
            raise AlignError(f"{where}: score {i} is {s!r}; every score must be a finite number (higher = better).")
        out.append(v)
    return out


def tie_identical(groups: Sequence[Sequence[str]], scores: list[list[float]]) -> list[list[float]]:
    """Identical responses get the score of their first occurrence: they always tie (a reward model scoring the same
    text at two batch positions can differ in the last float bits, and labeler noise is drawn per distinct text)."""
    out = []
    for group, s in zip(groups, scores, strict=True):
        first: dict[str, float] = {}
        out.append([first.setdefault(r, v) for r, v in zip(group, s, strict=True)])
    return out


def add_noise(groups: Sequence[Sequence[str]], scores: list[list[float]], std: float, seed: int) -> list[list[float]]:
    """Scores plus N(0, std^2) noise, one draw per distinct response of a group (seeded): a labeler who disagrees
    with the gold labeler on close calls. std = 0 returns the scores unchanged."""
    if std == 0:
        return [list(s) for s in scores]
    rng = np.random.default_rng(seed)
    out = []
    for group, s in zip(groups, scores, strict=True):
        noise: dict[str, float] = {}
        out.append([v + noise.setdefault(r, float(rng.normal(0.0, std))) for r, v in zip(group, s, strict=True)])
    return out


def ranking_from_scores(scores: Sequence[float]) -> list[list[int]]:
    """Indices best -> worst, equal scores tied in one block: [0.2, 0.9, 0.2, 0.5] -> [[1], [3], [0, 2]]."""
    blocks: dict[float, list[int]] = {}
    for i, s in enumerate(scores):
        blocks.setdefault(s, []).append(i)
    return [blocks[s] for s in sorted(blocks, reverse=True)]


# ---------------------------------------------------------------------------------------------------------------------
# Stats


def gold_agreement(rankings: Sequence[Sequence[Sequence[int]]], gold: Sequence[Sequence[float]]) -> float:
    """Pairwise agreement with the gold labeler: over pairs the gold scores order strictly, the share the ranking
    orders the same way (a tie in the ranking counts 1/2). nan when gold orders no pair."""
    agree = total = 0.0
    for ranking, g in zip(rankings, gold, strict=True):
        rank = {i: pos for pos, block in enumerate(ranking) for i in block}
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if g[i] == g[j]:
                    continue
                total += 1
                better, worse = (i, j) if g[i] > g[j] else (j, i)
                agree += 1.0 if rank[better] < rank[worse] else 0.5 if rank[better] == rank[worse] else 0.0
    return agree / total if total else math.nan


def _tied_pairs(ranking: Sequence[Sequence[int]]) -> int:
    return sum(len(b) * (len(b) - 1) // 2 for b in ranking)


def group_stats(
    prompts: Sequence[str],
    groups: Sequence[Sequence[str]],
    rankings: Sequence[Sequence[Sequence[int]]],
    *,
    tokenizer=None,
    max_new_tokens: int | None = None,
    gold: bool = False,
) -> dict[str, float]:
    """Stats of all groups (before dropping all-tied ones): ties, diversity, lengths, and gold metrics."""
    pairs = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    responses = [r for g in groups for r in g]
    stats = {
        "tie_rate": sum(_tied_pairs(r) for r in rankings) / pairs if pairs else math.nan,
        "distinct_responses_mean": sum(len(set(g)) for g in groups) / len(groups) if groups else math.nan,
        "response_words_mean": sum(len(r.split()) for r in responses) / len(responses) if responses else math.nan,
        "empty_response_rate": sum(not r.strip() for r in responses) / len(responses) if responses else math.nan,
    }
    if tokenizer is not None and responses:
        lengths = [len(ids) for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
        stats["response_tokens_mean"] = sum(lengths) / len(lengths)
        if max_new_tokens:
            # Re-tokenized length below the budget: the policy ended the response itself (EOS), not the length cap.
            stats["finished_rate"] = sum(n < max_new_tokens for n in lengths) / len(lengths)
    if gold:
        gold_scores = [[tinyworld.score(p, r) for r in g] for p, g in zip(prompts, groups, strict=True)]
        stats["gold_agreement"] = gold_agreement(rankings, gold_scores)
        stats["gold_score_mean"] = sum(map(sum, gold_scores)) / len(responses)
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Output


def build_rows(
    prompts: Sequence[str],
    groups: Sequence[Sequence[str]],
    rankings: Sequence[list[list[int]]],
    scores: Sequence[Sequence[float]] | None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of rankings.jsonl and the dropped-group counts: all tied (no pair to learn from), and with an empty
    response (the policy ended at once; rankings data must not hold empty responses, `parse_ranking_row`)."""
    rows, dropped = [], {"dropped_all_tied": 0, "dropped_empty": 0}
    for n, (p, g, rk) in enumerate(zip(prompts, groups, rankings, strict=True)):
        if len(rk) < 2:
            dropped["dropped_all_tied"] += 1
            continue
        if not all(r.strip() for r in g):
            dropped["dropped_empty"] += 1
            continue
        row: dict[str, Any] = {"prompt": p, "responses": list(g), "ranking": rk}
        if scores is not None:
            row["scores"] = [float(s) for s in scores[n]]
        rows.append(row)
    return rows, dropped


def write_rankings(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    """rankings.jsonl and dataset/ (save_to_disk), each written beside and then moved into place."""
    if not rows:
        raise AlignError(
            "align rank: every group was dropped (all responses tied, or one was empty); nothing to write. Raise "
            "temperature or num_generations, or use a labeler that tells the responses apart."
        )
    atomic_write_text(output_dir / RANKINGS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ds = datasets.Dataset.from_list(rows)
    tmp = output_dir / (DATASET_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    final = output_dir / DATASET_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows[:NUM_SAMPLES]:
        lines = []
        for pos, block in enumerate(row["ranking"], 1):
            for i in block:
                score = f" ({row['scores'][i]:.3f})" if "scores" in row else ""
                lines.append(f"{pos}. [{i}]{score} {row['responses'][i]}")
        out.append({"prompt": row["prompt"], "response": "\n".join(lines), "ranking": format_ranking(row["ranking"])})
    return out


def finish(
    output_dir: Path,
    rows: list[dict[str, Any]],
    *,
    metrics: dict[str, Any],
    parent: dict[str, Any] | None,
    recipe: dict[str, Any],
    data: dict[str, Any] | None,
    **extra: Any,
) -> dict[str, Any]:
    """Write the rows, then align_stage.json last; log a short summary."""
    write_rankings(output_dir, rows)
    metrics = {k: float(v) for k, v in metrics.items()}
    info = write_stage_info(output_dir, "rank", parent=parent, recipe=recipe, data=data, metrics=metrics,
                            samples=_samples(rows), **extra)  # fmt: skip
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    logger.info("rank: wrote %s (%d groups): %s", output_dir, len(rows), shown)
    return info


def start_output(output_dir: Path) -> None:
    """Create the output dir; drop a previous align_stage.json so an interrupted rerun never looks finished."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STAGE_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# Stage


@stage_lifecycle
def run(cfg) -> Path:
    set_seed(cfg.seed)
    log_config(cfg)
    output_dir = Path(cfg.output_dir)

    # Data
    prompts, data_info = load_prompts(cfg)
    tiny = sources.has_gold(cfg.dataset_name) or sources.gold_prompts(prompts)
    if cfg.labeler == GOLD and not tiny:
        raise AlignError(
            f"labeler gold: {data_info['name']} holds prompts that are not tiny-world instructions, and the gold "
            "labeler scores only those. Use a 'package.module:function' labeler or a reward model dir."
        )
    kind, labeler = load_labeler(cfg)  # before sampling: a bad labeler fails in seconds, not after generation
    start_output(output_dir)

    # Sample
    start = time.perf_counter()
    groups, tokenizer = sample(cfg, prompts)
    sample_seconds = time.perf_counter() - start
    if not _main_process():  # the main process labels and writes; the others have done their share
        wait_for_everyone()
        return output_dir

    # Rank
    start = time.perf_counter()
    scores = tie_identical(groups, labeler(prompts, groups))
    scores = add_noise(groups, scores, cfg.labeler_noise, cfg.seed)
    rankings = [ranking_from_scores(s) for s in scores]
    label_seconds = time.perf_counter() - start

    # Save
    rows, dropped = build_rows(prompts, groups, rankings, scores)
    if dropped["dropped_all_tied"]:
        logger.warning("rank: dropped %d of %d groups whose %d responses all tie (no pair to learn from).",
                       dropped["dropped_all_tied"], len(groups), cfg.num_generations)  # fmt: skip
    if dropped["dropped_empty"]:
        logger.warning("rank: dropped %d of %d groups holding an empty response (the policy ended at once).",
                       dropped["dropped_empty"], len(groups))  # fmt: skip
    metrics = {
        "num_groups": len(rows),
        "num_prompts": len(prompts),
        "k": cfg.num_generations,
        **dropped,
        **group_stats(
            prompts, groups, rankings, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens, gold=tiny
        ),  # fmt: skip
        "sample_seconds": sample_seconds,
        "label_seconds": label_seconds,
    }
    if _main_process():
        finish(
            output_dir,
            rows,
            metrics=metrics,
            parent=parent_of(cfg.model_name_or_path, cfg.model_hub_id),
            recipe=recipe_dict(cfg),
            data=data_info,
            sampling=sampling_settings(cfg),
            labeler={"name": cfg.labeler, "kind": kind, "noise": cfg.labeler_noise},
            num_processes=_num_processes(),
        )
        push_finished(output_dir, cfg)
    wait_for_everyone()
    return output_dir


def _num_processes() -> int:
    return PartialState().num_processes
