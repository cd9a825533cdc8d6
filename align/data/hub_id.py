"""Is a name a Hugging Face Hub repo id, or a local path or file? Data loading asks it of `dataset_name`, the config
of every model key, the cards and the push of parents and base models. It lives here, at the bottom of the layers
(`tests/test_layering.py`), so that data loading need not import `align.hub`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow", ".safetensors", ".bin"}


def hub_id_problem(name: Any, *, bare: bool = True) -> str | None:
    """Why `name` is not a Hub repo id, or None. `bare`: a name without `org/` is one, as `gpt2` or datasets'
    canonical ids (`imdb`) are; a card's base model or parent needs the `org/` to be linked."""
    if not isinstance(name, str):
        return "is not a string"
    if os.path.isabs(name) or Path(name).exists():
        return "is a local path, not a Hub id"
    if Path(name).suffix.lower() in _FILE_SUFFIXES:  # `data/sft.jsonl` is a file that moved, not a repo
        return "is a file name, not a Hub id"
    if not bare and name.count("/") != 1:
        return "has no org/ in front (org/name)"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "is not a valid Hub repo id (org/name: letters, digits, '-', '_', '.', one '/')"
    return None


def is_hub_id(name: Any, *, bare: bool = False) -> bool:
    """True for `org/name` Hub ids (with `bare`, `name` too) that are no local path or file name."""
    return hub_id_problem(name, bare=bare) is None
