"""`align score MODEL`: score (prompt, response) pairs with a reward model or the tiny-world gold labeler.

    align score runs/tiny/reward --prompt "write one sentence about eva ." --response "eva has a red ball ."
    align score runs/tiny/reward --prompt P --response R1 --response R2      # several responses to one prompt
    align score gold --file samples.jsonl       # rows {prompt, response} or {prompt, responses}

Scores of an `align reward` model are centered: the mean score of the SFT model's samples is subtracted (stored as
`align_reward_offset` in its config.json; `--raw` skips that). In Python, `load_scorer(path)(prompts, responses)`
returns the same numbers; `align.trainers.reward.score(model, tokenizer, prompts, responses)` does it for a model you
have already loaded.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from align.data import tinyworld
from align.data.load import load_data
from align.data.tinyworld import GOLD
from align.errors import AlignError
from align.io import read_stage_info
from align.models import modeling_reward  # noqa: F401 - registers LikelihoodRewardModel with the Auto classes
from align.models.modeling import load_pretrained, load_tokenizer
from align.trainers.reward import score

logger = logging.getLogger(__name__)

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]


def load_scorer(
    name_or_path: str,
    *,
    batch_size: int = 64,
    raw: bool = False,
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Scorer:
    """A function `(prompts, responses) -> scores` (one float per pair, higher = better).

    Args:
        name_or_path: "gold" (the tiny-world gold labeler, scores in [0, 1]), an `align reward` output dir, or any
            sequence-classification model with `num_labels=1` (dir or Hub id).
        raw: do not subtract the model's `align_reward_offset`.
        device: "cpu", "cuda", ...; default: CUDA when available.
    """
    if name_or_path == GOLD:
        def gold(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
            _check_lengths(prompts, responses)
            return [tinyworld.score(p, r) for p, r in zip(prompts, responses, strict=True)]

        return gold

    info = read_stage_info(name_or_path)
    if info is not None and info.get("stage") != "reward":
        raise AlignError(
            f"{name_or_path}: an align '{info.get('stage')}' stage, not a reward model. Score with the output of "
            "`align reward` (e.g. runs/tiny/reward), or 'gold' on tiny-world prompts."
        )
    tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    model = load_pretrained(AutoModelForSequenceClassification, name_or_path, what="a reward model", revision=revision,
                            trust_remote_code=trust_remote_code)  # fmt: skip
    if model.config.num_labels != 1:
        raise AlignError(
            f"{name_or_path}: a classifier with num_labels={model.config.num_labels}; a reward model gives one score "
            "per text. Train one with `align reward`."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    max_length = getattr(model.config, "align_reward_max_length", None)

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(prompts, responses)
        out = score(
            model,
            tokenizer,
            list(prompts),
            list(responses),
            batch_size=batch_size,
            offset=0.0 if raw else None,
            max_length=max_length,
        )
        return out.tolist()

    return reward


def load_function(spec: str, *, key: str = "labeler") -> tuple[Any, Callable[..., Any]]:
    """(module, function) named by `spec`, 'package.module:function' or 'path/to/file.py:function' (a path relative to
    the working directory). `key` (e.g. "gold_labeler") names the recipe key in the AlignError of a bad spec."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AlignError(
            f"{key} {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'. Check the spelling."
        )
    # `align` as a console script does not put the working directory on sys.path; `python -m align` does.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        if module_name.endswith(".py"):  # a file: path/to/labeler.py:function
            if not Path(module_name).is_file():
                raise ImportError(f"no such file {module_name}, relative to the working directory {os.getcwd()}")
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise AlignError(
            f"{key} {spec}: cannot import module '{module_name}' ({e}). Put it on PYTHONPATH or in the working "
            "directory."
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AlignError(f"{key} {spec}: module '{module_name}' has no function '{attr}'. Check the name.")
    return module, fn


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise AlignError(f"align score: {message}. See `align score --help`.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="align score", description=__doc__.strip().split("\n")[0])
    p.add_argument("model", help="'gold' (tiny-world gold labeler), an align reward dir, or a reward model Hub id.")
    p.add_argument("--prompt", action="append", default=[], help="Prompt; repeat it to pair with several --response.")
    p.add_argument("--response", action="append", default=[], help="Response to score; repeatable.")
    p.add_argument(
        "--file",
        default=None,
        help="JSONL/CSV/Parquet with columns prompt + response (or prompt + responses); prints each row as JSON with "
        "'score' (or 'scores') added.",
    )
    p.add_argument("--raw", action="store_true", help="Do not subtract the model's align_reward_offset.")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code (off by default).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.file and (args.prompt or args.response):
        raise AlignError("align score: give --file, or --prompt/--response, not both.")
    if not args.file:
        if not args.prompt or not args.response:
            raise AlignError("align score: nothing to score. Pass --prompt P --response R (or --file FILE).")
        prompts = args.prompt
        if len(prompts) == 1:
            prompts = prompts * len(args.response)
        if len(prompts) != len(args.response):
            raise AlignError(
                f"align score: {len(args.prompt)} --prompt but {len(args.response)} --response. Give one prompt, "
                "or one prompt per response."
            )
    # A bad file fails before the model loads.
    rows, file_prompts, file_responses = _read_file(args.file) if args.file else (None, None, None)
    scorer = load_scorer(
        args.model,
        batch_size=args.batch_size,
        raw=args.raw,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    if rows is None:
        for s, r in zip(scorer(prompts, args.response), args.response, strict=True):
            print(f"{s:+.4f}\t{r}")
        return 0
    scores = iter(scorer(file_prompts, file_responses))
    for row in rows:
        if "responses" in row and "response" not in row:
            row = {**row, "scores": [next(scores) for _ in row["responses"]]}
        else:
            row = {**row, "score": next(scores)}
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _read_file(path: str) -> tuple[list[dict], list[str], list[str]]:
    """Rows of a scoring file, checked, and the flat (prompts, responses) to score."""
    ds = load_data(path, split="train")
    cols = ds.column_names
    if "prompt" not in cols or not ({"response", "responses"} & set(cols)):
        raise AlignError(f"{path}: needs columns prompt + response (or responses); the columns are {', '.join(cols)}.")
    rows = ds.to_list()
    key = "response" if "response" in cols else "responses"
    prompts, responses = [], []
    for i, row in enumerate(rows, 1):
        if not isinstance(row["prompt"], str):
            raise AlignError(f"{path}:{i}: 'prompt' is {type(row['prompt']).__name__}, expected a string.")
        value = row[key]
        if key == "response" and not isinstance(value, str):
            raise AlignError(f"{path}:{i}: 'response' is {type(value).__name__}, expected a string.")
        if key == "responses" and (not isinstance(value, list) or not all(isinstance(r, str) for r in value)):
            raise AlignError(f"{path}:{i}: 'responses' must be a list of strings.")
        values = [value] if key == "response" else value
        prompts += [row["prompt"]] * len(values)
        responses += values
    return rows, prompts, responses
