"""Checkpoints of align's PPOTrainer: policy, value model, optimizer, scheduler, KL controller, RNG states and step,
saved so that a resumed run continues exactly (`tests/test_ppo_trainer.py`). Plain functions: the trainer passes its
models, optimizer and state, and applies what `load_checkpoint` returns. With the shared base (`value_model_init:
policy_lora`) the checkpoint holds the policy's adapter at its top and the critic's adapter + value head in
`value_model/`, in the same `checkpoint-N.tmp` rename as everything else; with the value head on the policy's trunk
(`value_model_init: policy_head`) `value_model/` holds that head alone."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import load_checkpoint_in_model
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import TrainerState

from align.errors import AlignError
from align.io import atomic_write_json, atomic_write_text, fsync_tree, no_space_error, no_space_left
from align.trainers.ppo_models import PolicyValueHead, SharedBaseCritic
from align.trainers.sharding import (
    full_trainable_and_optimizer_state,
    is_sharded,
    load_full_trainable_and_optimizer_state,
    state_dict_kwargs,
)

logger = logging.getLogger(__name__)

PPO_STATE = "ppo_state.json"  # step, episodes, KL controller: what TrainerState has no field for
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint (align.io)
VALUE_DIR = "value_model"
SHARDED_STATE = "fsdp_trainable.safetensors"  # FSDP2 runs: the trainable parameters by wrapper name, for resuming
TMP_SUFFIX = ".tmp"  # checkpoint-N.tmp: a checkpoint being written (align.io.last_checkpoint never picks it)


def save_checkpoint(
    output_dir: str | os.PathLike,
    state,
    ppo_state: dict[str, Any],
    *,
    accelerator,
    policy,
    value_model,
    optimizer,
    lr_scheduler,
    save_total_limit: int | None,
    model=None,
) -> Path:
    """`output_dir/checkpoint-N/` (N = `state.global_step`): policy (HF format, or adapter), value model, optimizer,
    scheduler, RNG per process, `ppo_state` (what `TrainerState` has no field for: episodes, KL controller, ...) and
    `state` (a `TrainerState`). Written in `checkpoint-N.tmp/` (`trainer_state.json` last), fsynced, then renamed: a
    kill or a full disk mid-save leaves no `checkpoint-N` at all, and the previous checkpoints stand. Keeps the
    newest `save_total_limit` complete checkpoints. Call it on every process.

    `model`: the policy + value wrapper; when FSDP2 shards it (call inside `sharding.full_parameters`), the HF files
    are read off the gathered parameters, and the trainable parameters and the optimizer are saved as full state dicts
    (`torch.distributed.checkpoint.state_dict`, keyed by parameter name: `SHARDED_STATE`, `optimizer.pt`) that
    `load_checkpoint` spreads back over the ranks."""
    tmp = Path(output_dir) / f"checkpoint-{state.global_step}{TMP_SUFFIX}"
    try:
        return _write_checkpoint(
            tmp, state, ppo_state, accelerator, policy, value_model, optimizer, lr_scheduler, save_total_limit, model
        )
    except Exception as e:
        if isinstance(e, AlignError) or not no_space_left(e, output_dir):
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give its space back
        raise no_space_error(e, output_dir) from e


def _write_checkpoint(
    tmp: Path, state, ppo_state, acc, policy, value_model, optimizer, lr_scheduler, save_total_limit, model
) -> Path:
    final = tmp.with_name(f"checkpoint-{state.global_step}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save: never mix two saves
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    sharded = model is not None and is_sharded(model)
    if acc.is_main_process:
        if isinstance(value_model, SharedBaseCritic):  # the policy's peft model holds both adapters: save its own
            policy.save_pretrained(tmp, selected_adapters=[value_model.policy_adapter],
                                   **state_dict_kwargs(policy, sharded))  # fmt: skip
            value_model.save_pretrained(tmp / VALUE_DIR)  # reads the gathered parameters itself
        elif isinstance(value_model, PolicyValueHead):  # the head alone: its trunk is the policy saved above
            policy.save_pretrained(tmp, **state_dict_kwargs(policy, sharded))
            value_model.save_pretrained(tmp / VALUE_DIR)
        else:
            policy.save_pretrained(tmp, **state_dict_kwargs(policy, sharded))
            value_model.save_pretrained(tmp / VALUE_DIR, **state_dict_kwargs(value_model, sharded))
    if sharded:
        # After the HF files: these state dicts reshard the parameters (FSDP2's state-dict hook). Collectives: every
        # rank gathers, the main one keeps the full tensors (on the CPU) and writes them.
        trainable, optimizer_state = full_trainable_and_optimizer_state(model, optimizer)
    if acc.is_main_process:
        if sharded:
            save_file({k: t.contiguous() for k, t in trainable.items()}, tmp / SHARDED_STATE)
        torch.save(optimizer_state if sharded else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        atomic_write_json(tmp / PPO_STATE, ppo_state)
    torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pth")
    acc.wait_for_everyone()
    if acc.is_main_process:
        saved = dataclasses.asdict(state)
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(saved, indent=2, sort_keys=True, default=str) + "\n")
        fsync_tree(tmp)
        _replace_dir(tmp, final)
        _rotate_checkpoints(tmp.parent, save_total_limit)
        logger.info("ppo: saved %s", final)
    acc.wait_for_everyone()
    return final


def _rotate_checkpoints(root: Path, limit: int | None) -> None:
    if not limit:
        return
    done = sorted(
        (int(p.name.split("-")[1]), p)
        for p in root.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / TRAINER_STATE).is_file()
    )
    for _, path in done[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    ckpt: Path,
    *,
    accelerator,
    policy,
    value_model,
    optimizer,
    lr_scheduler,
    is_peft: bool,
    world_size: int,
    model=None,
) -> tuple[dict[str, Any], Any]:
    """Load what `save_checkpoint` wrote in `ckpt` into the models, optimizer and scheduler, and this process's RNG
    states (when the checkpoint had `world_size` processes; else a warning: sampling will not replay exactly).
    Returns (`ppo_state` as saved, the saved `TrainerState`). AlignError for an incomplete checkpoint. `model`: the
    policy + value wrapper; sharded by FSDP2, it takes the full trainable state and optimizer state. Call it on every
    process."""
    if not (ckpt / TRAINER_STATE).is_file() or not (ckpt / PPO_STATE).is_file():
        raise AlignError(
            f"{ckpt}: not a complete PPO checkpoint (no {TRAINER_STATE} or {PPO_STATE}). "
            "Resume from another checkpoint-N, or start over."
        )
    if model is not None and is_sharded(model):
        if not (ckpt / SHARDED_STATE).is_file():
            raise AlignError(
                f"{ckpt}: no {SHARDED_STATE}; it was saved without FSDP. Resume it without FSDP, or start over."
            )
        trainable, optimizer_state = {}, {}
        if accelerator.is_main_process:  # the others receive their shards from it
            trainable = load_file(ckpt / SHARDED_STATE)
            optimizer_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        load_full_trainable_and_optimizer_state(model, optimizer, trainable, optimizer_state)
    else:
        _load_models(ckpt, policy, value_model, is_peft)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    ppo_state = json.loads((ckpt / PPO_STATE).read_text())
    saved = TrainerState.load_from_json(str(ckpt / TRAINER_STATE))
    rng = ckpt / f"rng_state_{accelerator.process_index}.pth"
    if rng.is_file() and ppo_state.get("world_size") == world_size:
        _set_rng_state(torch.load(rng, weights_only=False))  # our own file: python/numpy states are not tensors
    else:
        logger.warning(
            "ppo: %s was saved with %s processes, now %d; sampling will not replay exactly.",
            ckpt,
            ppo_state.get("world_size"),
            world_size,
        )
    return ppo_state, saved


def _load_models(ckpt: Path, policy, value_model, is_peft: bool) -> None:
    if is_peft:
        set_peft_model_state_dict(policy, load_file(ckpt / "adapter_model.safetensors"))
    else:
        load_checkpoint_in_model(policy, ckpt, strict=True)
    if isinstance(value_model, (SharedBaseCritic, PolicyValueHead)):
        value_model.load_pretrained(ckpt / VALUE_DIR)
    else:
        load_checkpoint_in_model(value_model, ckpt / VALUE_DIR, strict=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished `src` to `dst`; an existing `dst` (a run resumed from an earlier checkpoint reaching the same
    step again) is moved aside first and removed only once `src` is in place."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
