"""The end every stage shares; the start (output lock, stale marker set aside) is `align.io.stage_lifecycle`.

    push_to_hub = hold_push(cfg)      # before the Trainer is built
    ...train, evaluate, save the model dir...
    if main process:
        finish_stage(output_dir, "sft", cfg, push_to_hub, parent=..., data=..., metrics=...)
    wait_for_everyone()
"""

from __future__ import annotations

import os
from typing import Any


def hold_push(cfg) -> bool:
    """Turn `cfg.push_to_hub` off for the trainer and return what the user set. Trainer would push every checkpoint
    with its own card; align pushes the finished stage once, with its lineage (`finish_stage`)."""
    push_to_hub, cfg.push_to_hub = cfg.push_to_hub, False
    return push_to_hub


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
