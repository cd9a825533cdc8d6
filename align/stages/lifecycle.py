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

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerState
from transformers.trainer_utils import TrainOutput

from align.config import recipe_dict
from align.hub import push_after_stage
from align.io import resume_checkpoint, write_stage_info
from align.stages import registry

logger = logging.getLogger(__name__)


def hold_push(cfg) -> bool:
    """Turn `cfg.push_to_hub` off for the trainer and return what the user set. Trainer would push every checkpoint
    with its own card; align pushes the finished stage once, with its lineage (`finish_stage`)."""
    push_to_hub, cfg.push_to_hub = cfg.push_to_hub, False
    return push_to_hub


def train_stage(trainer, cfg) -> tuple[Any, dict[str, float], str | None]:
    """Train `trainer` from where `cfg` says (`resume_checkpoint`: the user's checkpoint, else the newest in
    output_dir, else fresh), a finished checkpoint only loaded (`train_or_load`). Returns the TrainOutput, the metrics
    every stage reports (`train_loss`, `train_runtime`: wall seconds of this run) and the checkpoint resumed from."""
    resume = resume_checkpoint(cfg)
    start = time.perf_counter()
    result = train_or_load(trainer, resume)
    return result, {"train_loss": result.training_loss, "train_runtime": time.perf_counter() - start}, resume


def train_or_load(trainer, resume: str | None):
    """`trainer.train(resume_from_checkpoint=resume)`, except when `resume` already holds step `max_steps` (a run
    killed after its last checkpoint, while it evaluated or saved): then its weights and state are loaded and no step
    is trained. transformers 5 checks max_steps only after a step, so it would train one past it, and the rerun
    would differ from the uninterrupted run. There, `training_loss` is the mean of the logged losses."""
    args = trainer.args
    plain = not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)  # those load only inside train()
    if resume is not None and args.max_steps > 0 and plain:
        state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        if state.global_step >= args.max_steps:
            logger.info("%s holds step %d of max_steps %d: loaded, nothing left to train.", resume,
                        state.global_step, args.max_steps)  # fmt: skip
            trainer._load_from_checkpoint(resume)
            trainer.state = state
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            loss = sum(losses) / len(losses) if losses else math.nan
            # the summary entry train() ends log_history with, as in the uninterrupted run
            summary = {"train_runtime": 0.0, "train_samples_per_second": 0.0, "train_steps_per_second": 0.0,
                       "total_flos": state.total_flos, "train_loss": loss}  # fmt: skip
            trainer.log(summary)
            return TrainOutput(state.global_step, loss, summary)
    return trainer.train(resume_from_checkpoint=resume)


def finish_stage(output_dir: str | os.PathLike, stage: str, cfg, push_to_hub: bool, **info: Any) -> dict[str, Any]:
    """On the main process, once the stage's files are saved: write align_stage.json last, with the resolved recipe
    (`push_to_hub` recorded as the user set it) and `info` (parent, data, metrics, ...; see `io.write_stage_info`),
    then push the finished stage when asked. Returns what was written."""
    if registry.find(stage) is None:  # our bug: every stage that writes align_stage.json has a record
        raise ValueError(f"unknown stage {stage!r}; expected one of {registry.names()}")
    cfg.push_to_hub = push_to_hub
    written = write_stage_info(output_dir, stage, recipe=recipe_dict(cfg), **info)
    push_finished(output_dir, cfg)
    return written


def push_finished(output_dir: str | os.PathLike, cfg) -> None:
    """Push a finished stage dir to `cfg.hub_model_id` (default: the dir's name) when `cfg.push_to_hub`."""
    if cfg.push_to_hub:
        push_after_stage(output_dir, cfg.hub_model_id, private=bool(cfg.hub_private_repo), revision=None)


def wait_for_everyone() -> None:
    """The barrier at a stage's end: the other processes of an `accelerate launch` wait for the main one's files."""
    PartialState().wait_for_everyone()
