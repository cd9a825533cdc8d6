"""What every Trainer stage shares between its start (output lock, stale marker set aside: `align.io.stage_lifecycle`)
and its end.

    push_to_hub = hold_push(cfg)      # before the Trainer is built
    result, metrics, resume = train_stage(trainer, cfg)
    ...evaluate, save the model dir...
    if main process:
        finish_stage(output_dir, "sft", cfg, push_to_hub, parent=..., data=..., metrics=...)
    wait_for_everyone()
"""

from __future__ import annotations

import os
import time
from typing import Any


def hold_push(cfg) -> bool:
    """Turn `cfg.push_to_hub` off for the trainer and return what the user set. Trainer would push every checkpoint
    with its own card; align pushes the finished stage once, with its lineage (`finish_stage`)."""
    push_to_hub, cfg.push_to_hub = cfg.push_to_hub, False
    return push_to_hub


def train_stage(trainer, cfg) -> tuple[Any, dict[str, float], str | None]:
    """Train `trainer` from where `cfg` says (`resume_checkpoint`: the user's checkpoint, else the newest in
    output_dir, else fresh), a finished checkpoint only loaded (`train_or_load`). Returns the TrainOutput, the metrics
    every stage reports (`train_loss`, `train_runtime`: wall seconds of this run) and the checkpoint resumed from."""
    from align.io import resume_checkpoint, train_or_load

    resume = resume_checkpoint(cfg)
    start = time.perf_counter()
    result = train_or_load(trainer, resume)
    return result, {"train_loss": result.training_loss, "train_runtime": time.perf_counter() - start}, resume


def finish_stage(output_dir: str | os.PathLike, stage: str, cfg, push_to_hub: bool, **info: Any) -> dict[str, Any]:
    """On the main process, once the stage's files are saved: write align_stage.json last, with the resolved recipe
    (`push_to_hub` recorded as the user set it) and `info` (parent, data, metrics, ...; see `io.write_stage_info`),
    then push the finished stage when asked. Returns what was written."""
    from align.config import recipe_dict
    from align.io import write_stage_info

    cfg.push_to_hub = push_to_hub
    written = write_stage_info(output_dir, stage, recipe=recipe_dict(cfg), **info)
    push_finished(output_dir, cfg)
    return written


def push_finished(output_dir: str | os.PathLike, cfg) -> None:
    """Push a finished stage dir to `cfg.hub_model_id` (default: the dir's name) when `cfg.push_to_hub`."""
    if cfg.push_to_hub:
        from align.hub import push_after_stage

        push_after_stage(output_dir, cfg.hub_model_id, private=bool(cfg.hub_private_repo), revision=None)


def wait_for_everyone() -> None:
    """The barrier at a stage's end: the other processes of an `accelerate launch` wait for the main one's files."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()
