"""Atomic writes, the `align_stage.json` lineage file, and checkpoint lookup.

Every stage output dir is a Hugging Face model dir plus `align_stage.json`, written last and atomically: its
presence means "this stage finished". The next stage, the chain runner and the Hub model card read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from align.errors import AlignError

logger = logging.getLogger(__name__)

STAGE_FILE = "align_stage.json"
STAGES = ("pretrain", "sft", "rank", "reward", "ppo")
_VERSIONED = ("align", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "tokenizers")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (or the replaced file's), so reports
        # and model files stay readable by whoever could read them before.
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a power cut.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; restored at once
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a stage's result, for lineage."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def recipe_sha256(recipe: dict[str, Any]) -> str:
    """Fingerprint of a resolved recipe: sorted-key JSON, so key order in the YAML does not matter."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def write_stage_info(
    output_dir: str | os.PathLike,
    stage: str,
    *,
    parent: dict[str, Any] | None,
    recipe: dict[str, Any],
    data: dict[str, Any] | None,
    metrics: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Write `align_stage.json` (last, atomically) and return what was written.

    Args:
        parent: `{"stage": ..., "path": ...}` for an align stage, or `{"model": <hub id or path>}` for a base model.
        recipe: the resolved config as a plain dict (see `align.config.recipe_dict`).
        data: `{"name", "fingerprint", "rows"}` of the training data.
        metrics: numbers, e.g. `eval_loss` (nats per token), `perplexity`, `entropy_floor`.
        extra: stage-specific fields (e.g. `samples`, `log_history`).

    The finished dir keeps no pickle: Trainer's `training_args.bin` is removed here, also from `adapter/` (the
    resolved recipe is in this file), so what is pushed or shared loads without unpickling. Checkpoints keep theirs
    for resuming.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    info = {
        "stage": stage,
        "parent": parent,
        "recipe": recipe,
        "recipe_sha256": recipe_sha256(recipe),
        "data": data,
        "versions": package_versions(),
        "metrics": metrics,
        **extra,
    }
    for where in (Path(output_dir), Path(output_dir) / "adapter"):  # a merged LoRA stage keeps its adapter there
        (where / "training_args.bin").unlink(missing_ok=True)
    atomic_write_json(Path(output_dir) / STAGE_FILE, info)
    return info


def read_stage_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `align_stage.json` of a stage dir, or None when `path` is not a finished align stage (e.g. a Hub id)."""
    file = Path(path) / STAGE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        msg = f"{file}: not valid JSON ({e.msg} at line {e.lineno}). Delete the file and rerun the stage."
        raise AlignError(msg) from None


def parent_of(model_name_or_path: str) -> dict[str, Any]:
    """The `parent` entry for a stage trained from `model_name_or_path` (stage dir, model dir or Hub id)."""
    info = read_stage_info(model_name_or_path)
    if info is not None:
        return {"stage": info["stage"], "path": str(Path(model_name_or_path).resolve())}
    if Path(model_name_or_path).exists():
        return {"model": str(Path(model_name_or_path).resolve())}
    return {"model": model_name_or_path}


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` dir in `output_dir` (Trainer's layout), or None.

    A checkpoint is complete when its `trainer_state.json` exists and parses: Trainer writes that file last, and
    not atomically, so a run killed mid-save leaves a dir without it or with a truncated one. Such a dir is skipped
    (and said so in the log) rather than resumed from.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    for _, child in sorted(found, reverse=True):
        if _checkpoint_complete(child):
            return child
        logger.warning("Skipping incomplete checkpoint %s (interrupted while saving).", child)
    return None


def _checkpoint_complete(path: Path) -> bool:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def save_trained(trainer, output_dir: str | os.PathLike, *, merge_adapter: bool) -> None:
    """`trainer`'s model in `output_dir`; with `merge_adapter`, its PEFT adapter in `output_dir/adapter` and the merged
    model (loadable without peft) in `output_dir`."""
    if not merge_adapter:
        trainer.save_model(str(output_dir))
        return
    trainer.save_model(str(Path(output_dir) / "adapter"))
    if trainer.is_world_process_zero():
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(output_dir, safe_serialization=True)


def resume_checkpoint(args) -> str | None:
    """Where a Trainer run resumes: `args.resume_from_checkpoint` if set, else the newest complete checkpoint in
    `args.output_dir` (logged, so a rerun says it continued), else None for a fresh start."""
    if args.resume_from_checkpoint:
        return str(args.resume_from_checkpoint)
    found = last_checkpoint(args.output_dir)
    if found is not None:
        logger.info("Resuming from %s (found in output_dir).", found)
    return str(found) if found else None
