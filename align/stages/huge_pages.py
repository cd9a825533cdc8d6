"""PPO's huge pages: the `prepare` hook of the PPO stage record (`align/stages/registry.py`), which `align ppo` calls
with its command line before the PPO stage module, and so torch, is imported. It imports neither torch nor
`align.config` (which loads transformers, and torch with it)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)


def huge_pages_for_mapped_heap(argv: list[str]) -> None:
    """Set THP_MEM_ALLOC_ENABLE=1 (PyTorch's transparent huge pages for CPU tensors of 2 MB or more) when a PPO run
    sets `malloc_mmap_threshold` and the environment does not choose: mapped blocks are faulted in and zeroed
    afresh, and huge pages make that cheap (SmolLM2-135M PPO, 2-core AMD EPYC: 1.34x slower per epoch without them,
    0.9x the default heap's time with them). PyTorch reads the variable at its first allocation, so it must be set
    before torch loads: here, not in the trainer. THP_MEM_ALLOC_ENABLE=0 opts out."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ or not sys.platform.startswith("linux"):
        return
    threshold = _flag(argv, "malloc_mmap_threshold")
    if threshold is None:
        threshold = _recipe_value(argv, "malloc_mmap_threshold")
    if threshold in (None, "", "null", "None"):
        return
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    logging.getLogger("align.cli").info(
        "ppo: THP_MEM_ALLOC_ENABLE=1 (PyTorch's huge pages for CPU tensors of 2 MB or more): malloc_mmap_threshold "
        "maps blocks afresh and huge pages make that cheap. Set THP_MEM_ALLOC_ENABLE=0 to opt out."
    )


def _flag(argv: list[str], key: str) -> str | None:
    """The last value of `--key VALUE` / `--key=VALUE` in `argv`, or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{key}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _recipe_value(argv: list[str], key: str):
    """`key` of the one `--config` recipe, or None when there is none or it cannot be read: the stage itself then
    reports the bad command line or recipe with its file and line."""
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if len(configs) != 1:
        return None
    try:
        recipe = yaml.safe_load(Path(configs[0]).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return recipe.get(key) if isinstance(recipe, dict) else None
