"""Gold-labeler evaluation on held-out prompts: the honest measure of every stage's gain.

The same prompts and the same decoding are used for a model and its parent, so their `gold_score`s compare directly
(and per prompt, for win-rates). Two cases of one mechanism (`gold_setup`):
- tiny world: the hidden gold labeler (`gold_labeler: gold`, the default there) on `instruction_prompts(n, seed,
  split="test")`;
- any data: `gold_labeler: package.module:function` (or `path/to/file.py:function`), called as
  `function(prompt, response) -> float` (higher = better, e.g. in [0, 1]), on the `prompt` column of
  `gold_eval_dataset`. If the module also has `score_detail(prompt, response)` returning `{"constraints": [{"kind",
  "passed"}, ...]}` (as `align.data.verifiable`), the pass rate of each constraint kind is stored too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import align.generation.generate as generation
from align.data import formats, sources, tinyworld
from align.data import load as dl
from align.data.tinyworld import GOLD
from align.errors import AlignError
from align.evaluation.score import load_function
from align.io import atomic_write_json, package_versions

logger = logging.getLogger(__name__)

# Sampled gold evaluation (`gold_eval_samples`): the model's own distribution, as PPO samples its rollouts.
SAMPLED_TEMPERATURE = 1.0


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """The held-out tiny-world instruction prompts every stage is evaluated on."""
    return list(tinyworld.instruction_prompts(n, seed=seed, split="test")["prompt"])


@dataclass(frozen=True)
class GoldLabeler:
    """A checker of answers: `check(prompt, response) -> (score, {constraint: value in [0, 1]})` (the dict may be
    empty); `name` is the recipe's `gold_labeler` value."""

    name: str
    check: Callable[[str, str], tuple[float, dict[str, float]]]

    def score(self, prompt: str, response: str) -> float:
        return self.check(prompt, response)[0]


def load_gold_labeler(spec: str) -> GoldLabeler:
    """`gold` (the tiny-world gold labeler) or a function spec (module docstring); AlignError naming `gold_labeler`."""
    if spec == GOLD:

        def check_gold(prompt: str, response: str) -> tuple[float, dict[str, float]]:
            d = tinyworld.score_details(prompt, response)
            return d["score"], {k: v for k, v in d.items() if k != "score"}

        return GoldLabeler(GOLD, check_gold)
    if ":" not in spec:
        raise AlignError(
            f"gold_labeler {spec!r}: expected 'gold' (tiny world), 'package.module:function' or "
            "'path/to/file.py:function'."
        )
    module, fn = load_function(spec, key="gold_labeler")
    detail = getattr(module, "score_detail", None)

    def check(prompt: str, response: str) -> tuple[float, dict[str, float]]:
        got = fn(prompt, response)
        try:
            value = math.nan if isinstance(got, (bool, str, bytes)) else float(got)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise AlignError(
                f"gold_labeler {spec}: returned {got!r} for prompt {prompt[:40]!r}; it must return one finite number "
                "per (prompt, response), higher = better."
            )
        if not callable(detail):
            return value, {}
        kinds: dict[str, list[float]] = {}
        for c in detail(prompt, response).get("constraints") or []:
            kinds.setdefault(str(c["kind"]), []).append(float(bool(c["passed"])))
        return value, {k: sum(v) / len(v) for k, v in kinds.items()}

    return GoldLabeler(spec, check)


def gold_setup(cfg) -> tuple[GoldLabeler, list[str]] | None:
    """(labeler, held-out prompts) for a stage config (`gold_labeler`, `gold_eval_dataset`, `gold_eval_prompts`,
    `dataset_name`, `tinyworld_seed`), or None when the stage has no gold evaluation. Fails before any work on a bad
    labeler or file."""
    spec = resolved_gold_labeler(cfg)
    if spec is None or cfg.gold_eval_prompts <= 0:
        return None
    labeler = load_gold_labeler(spec)
    if not cfg.gold_eval_dataset:
        return labeler, heldout_prompts(cfg.gold_eval_prompts, seed=cfg.tinyworld_seed)
    source = cfg.gold_eval_dataset
    ds = dl.load_data(source, split="train")
    if "prompt" not in ds.column_names and "messages" not in ds.column_names:
        raise AlignError(
            f"gold_eval_dataset {source}: no 'prompt' or 'messages' column (columns present: "
            f"{', '.join(ds.column_names)}). Give held-out prompts in a 'prompt' column."
        )
    keep = "prompt" if "prompt" in ds.column_names else "messages"
    rows = ds.select_columns([keep]).to_list()[: cfg.gold_eval_prompts]
    prompts = [formats.prompt_text(r, f"{source}:{i}", "gold eval") for i, r in enumerate(rows, 1)]
    if len(ds) > len(prompts):
        logger.info("gold eval: the first %d of %d prompts of %s (gold_eval_prompts).", len(prompts), len(ds), source)
    return labeler, prompts


def resolved_gold_labeler(cfg) -> str | None:
    """`gold_labeler` as set, else `gold` on the tiny world without `gold_eval_dataset`, else None (no gold eval).
    AlignError when one of `gold_labeler` / `gold_eval_dataset` lacks the other (off the tiny world)."""
    spec, data = cfg.gold_labeler, cfg.gold_eval_dataset
    tiny = sources.has_gold(cfg.dataset_name)
    if spec is None:
        if data:
            raise AlignError(
                f"gold_eval_dataset {data} is set but no gold_labeler scores the answers. Set gold_labeler: "
                "package.module:function (e.g. align.data.verifiable:score)."
            )
        return GOLD if tiny else None
    if not data and not tiny:
        raise AlignError(
            f"gold_labeler {spec} is set but there are no held-out prompts to answer. Set gold_eval_dataset: FILE "
            "(a 'prompt' column)."
        )
    if spec == GOLD and data:
        logger.info("gold eval: the tiny-world gold labeler on %s (it scores only tiny-world prompts).", data)
    return spec


def gold_eval(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 32,
    num_samples: int = 4,
    samples_per_prompt: int = 1,
    seed: int = 0,
    labeler: GoldLabeler | None = None,
    backend: str = "transformers",
) -> dict[str, Any]:
    """Answer `prompts` with the chat template and score each answer with `labeler` (default: the tiny world's).

    With `samples_per_prompt` k > 1 (needs temperature > 0), each prompt is answered k times and its score is the mean
    of the k: the model as a distribution, which is what PPO optimizes (greedy decoding shows only its mode).
    Sampling is seeded with `seed` without touching the caller's RNG state, so two models (or two runs) are compared
    on the same random draws where their distributions agree.

    Returns `{"gold_score": mean, "gold_pass_rates": {constraint: mean over the answers it applies to},
    "gold_pass_counts": {constraint: how many answers that is},
    "gold_scores": per-prompt list, "responses": the first answer to each prompt, "samples": first `num_samples`
    (prompt, response, gold_score), one answer per prompt}`.
    """
    import torch  # here, not at the top: the report and best-of-n import this module for its scores alone

    labeler = labeler or load_gold_labeler(GOLD)

    if samples_per_prompt < 1 or (samples_per_prompt > 1 and temperature <= 0):
        raise ValueError(
            f"gold_eval: samples_per_prompt={samples_per_prompt} at temperature={temperature}; use 1, or > 1 with "
            "temperature > 0 (greedy answers are all alike)."
        )
    was_training = model.training
    device = getattr(model, "device", torch.device("cpu"))
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        groups = generation.generate(
            model,
            tokenizer,
            prompts,
            chat=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            num_return_sequences=samples_per_prompt,
            batch_size=batch_size,
            backend=backend,
        )
    if was_training:
        model.train()
    checked = [[labeler.check(p, r) for r in g] for p, g in zip(prompts, groups, strict=True)]
    scores = [sum(c[0] for c in cs) / len(cs) for cs in checked]
    flat = [c[1] for cs in checked for c in cs]
    keys = sorted({k for d in flat for k in d})
    # Over the answers a constraint applies to (a verifiable prompt has 1-3 of 19 kinds; tiny world: all, always).
    counts = {k: sum(k in d for d in flat) for k in keys}
    rates = {k: sum(d[k] for d in flat if k in d) / counts[k] for k in keys}
    return {
        "gold_score": sum(scores) / len(scores),
        "gold_pass_rates": rates,
        "gold_pass_counts": counts,  # answers each rate is over: a rate on 4 answers is not one on 40
        "gold_scores": scores,
        "responses": [g[0] for g in groups],
        "samples": [
            {"prompt": p, "response": g[0], "gold_score": cs[0][0]}
            for p, g, cs in list(zip(prompts, groups, checked, strict=True))[:num_samples]
        ],
    }


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Fraction of prompts where `scores` beats `baseline` (same prompts, same order), ties counted as half a win.

    Args:
        scores, baseline: per-prompt scores of two models, e.g. `gold_scores` of the PPO and SFT stages.
    """
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"win_rate needs two equally long, non-empty score lists; got {len(scores)}, {len(baseline)}")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    return wins / len(scores)


def paired_interval(scores: list[float], baseline: list[float], z: float = 1.96) -> dict[str, float]:
    """Mean per-prompt difference `scores - baseline` with its normal-approximation interval (z = 1.96: 95%).

    Paired: each prompt is its own control, so the spread of prompt difficulty cancels. Returns `{"mean", "low",
    "high"}`; with one prompt the interval is the mean itself.
    """
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"paired_interval needs equally long, non-empty lists; got {len(scores)} and {len(baseline)}")
    d = [a - b for a, b in zip(scores, baseline, strict=True)]
    n = len(d)
    mean = sum(d) / n
    half = z * math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0
    return {"mean": mean, "low": mean - half, "high": mean + half}


# ---------------------------------------------------------------------------------------------------------------------
# A cache of a fixed model's gold evaluations (the parent of a PPO run: the same model, prompts and settings across
# reruns of a recipe, 6 of the SmolLM2 chain's 80 minutes)

CACHE_ENV = "ALIGN_CACHE_DIR"


def source_digest(name: str | None) -> str | None:
    """sha256 of the source file of a labeler named `module:function` (or `module`), so a cached score is not reused
    once the labeler's code changes; None when the module has no file."""
    if not name:
        return None
    module = name.split(":", 1)[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


def model_fingerprint(name_or_path: str) -> dict[str, Any] | None:
    """What identifies a local model's weights without reading them: each weight file's name, size and mtime (a
    `.gguf` file, or a directory's `*.safetensors` / `*.bin` / `*.gguf`). None for a Hub id or an unknown layout."""
    path = Path(name_or_path)
    if path.is_file():
        files = [path]
    else:
        weights = (".safetensors", ".bin", ".gguf")
        files = sorted(p for p in path.glob("*") if p.suffix in weights) if path.is_dir() else []
    if not files:
        return None
    return {"path": str(path.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def gold_eval_cache_dir() -> Path:
    """`$ALIGN_CACHE_DIR/gold_eval`, else `$XDG_CACHE_HOME/align/gold_eval` (default `~/.cache/align/gold_eval`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "gold_eval"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "align" / "gold_eval"


def cached_gold_eval(key: dict[str, Any] | None, compute) -> tuple[dict[str, Any], str]:
    """`compute()`'s JSON-able result for `key` (model fingerprint, prompts, decoding, labeler, versions), read from
    the cache when an earlier run stored it, else computed and stored. Returns (result, source): the cache file, or
    "computed". A None `key` (a model without a fingerprint) is never cached, nor anything while the environment
    sets ALIGN_GOLD_EVAL_CACHE=0."""
    if key is None or os.environ.get("ALIGN_GOLD_EVAL_CACHE") == "0":
        return compute(), "computed"
    key = {**key, "versions": package_versions()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = gold_eval_cache_dir() / f"{digest}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key, default=str)):
            return stored["result"], str(path)
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # no entry, or a damaged one: computed again and rewritten
    result = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "result": result})
    except OSError as e:  # a read-only home: the run goes on uncached
        logger.warning("gold eval cache: cannot write %s (%s); not cached.", path, e)
    return result, "computed"
