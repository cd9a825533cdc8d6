"""Checkpoints of align's PPOTrainer: policy, value model, optimizer, scheduler, KL controller, RNG states and step,
saved so that a resumed run continues exactly (`tests/test_ppo_trainer.py`); and the final save of the policy."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from align.errors import AlignError
from align.io import atomic_write_json, atomic_write_text, fsync_tree, no_space_error, no_space_left

logger = logging.getLogger(__name__)

PPO_STATE = "ppo_state.json"  # step, episodes, KL controller: what TrainerState has no field for
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint (align.io)
VALUE_DIR = "value_model"
TMP_SUFFIX = ".tmp"  # checkpoint-N.tmp: a checkpoint being written (align.io.last_checkpoint never picks it)


class PPOCheckpointMixin:
    """Checkpoint methods of `PPOTrainer` (they use its accelerator, models, optimizer, scheduler and state)."""

    def _save_checkpoint(self) -> Path:
        """`output_dir/checkpoint-N/`: policy (HF format, or adapter), value model, optimizer, scheduler, RNG per
        process, KL controller. Written in `checkpoint-N.tmp/` (`trainer_state.json` last), fsynced, then renamed:
        a kill or a full disk mid-save leaves no `checkpoint-N` at all, and the previous checkpoints stand."""
        step = self.state.global_step
        tmp = Path(self.args.output_dir) / f"checkpoint-{step}{TMP_SUFFIX}"
        try:
            return self._write_checkpoint(tmp)
        except Exception as e:
            if isinstance(e, AlignError) or not no_space_left(e, self.args.output_dir):
                raise
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # give its space back
            raise no_space_error(e, self.args.output_dir) from e

    def _write_checkpoint(self, tmp: Path) -> Path:
        acc = self.accelerator
        step = self.state.global_step
        final = tmp.with_name(f"checkpoint-{step}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save: never mix two saves
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.policy.save_pretrained(tmp)
            self.value_model.save_pretrained(tmp / VALUE_DIR)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            atomic_write_json(
                tmp / PPO_STATE,
                {
                    "global_step": step,
                    "episodes": self.episodes,
                    "kl_controller": self.kl_ctl.state_dict(),
                    "world_size": self.world_size,
                    # what the next log averages and the samples so far: a resumed run logs and records the same
                    "log_window": self._log_window,
                    "samples": self.samples,
                },
            )
        torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pth")
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = dataclasses.asdict(self.state)
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
            fsync_tree(tmp)
            _replace_dir(tmp, final)
            self._rotate_checkpoints()
            logger.info("ppo: saved %s", final)
        acc.wait_for_everyone()
        self._callback("on_save")
        return final

    def _evaluated_at(self, step: int) -> bool:
        """Whether log_history holds an eval of update `step`: the loop's, or the one a run resumed from its final
        checkpoint restored (evaluating again would log it twice)."""
        return any(h.get("step") == step and any(k.startswith("eval/") for k in h) for h in self.state.log_history)

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        root = Path(self.args.output_dir)
        done = sorted(
            (int(p.name.split("-")[1]), p)
            for p in root.glob("checkpoint-*")
            if p.name.split("-")[1].isdigit() and (p / TRAINER_STATE).is_file()
        )
        for _, path in done[:-limit]:
            shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, ckpt: Path) -> None:
        from accelerate.utils import load_checkpoint_in_model
        from transformers import TrainerState

        if not (ckpt / TRAINER_STATE).is_file() or not (ckpt / PPO_STATE).is_file():
            raise AlignError(
                f"{ckpt}: not a complete PPO checkpoint (no {TRAINER_STATE} or {PPO_STATE}). "
                "Resume from another checkpoint-N, or start over."
            )
        if self.is_peft:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.policy, load_file(ckpt / "adapter_model.safetensors"))
        else:
            load_checkpoint_in_model(self.policy, ckpt, strict=True)
        load_checkpoint_in_model(self.value_model, ckpt / VALUE_DIR, strict=True)
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        ppo_state = json.loads((ckpt / PPO_STATE).read_text())
        self.kl_ctl.load_state_dict(ppo_state["kl_controller"])
        self.episodes = int(ppo_state["episodes"])
        self.samples = list(ppo_state.get("samples", []))
        self._log_window.clear()
        self._log_window.update({k: list(v) for k, v in ppo_state.get("log_window", {}).items()})
        saved = TrainerState.load_from_json(str(ckpt / TRAINER_STATE))
        self.state.global_step = saved.global_step
        self.state.epoch = saved.epoch
        self.state.log_history = saved.log_history
        rng = ckpt / f"rng_state_{self.accelerator.process_index}.pth"
        if rng.is_file() and ppo_state.get("world_size") == self.world_size:
            _set_rng_state(torch.load(rng, weights_only=False))  # our own file: python/numpy states are not tensors
        else:
            logger.warning(
                "ppo: %s was saved with %s processes, now %d; sampling will not replay exactly.",
                ckpt,
                ppo_state.get("world_size"),
                self.world_size,
            )
        logger.info("ppo: resumed from %s at update %d (kl_coef %.4g)", ckpt, saved.global_step, self.kl_ctl.value)

    def save_model(self, output_dir: str | os.PathLike | None = None, merge_adapter: bool | None = None) -> None:
        """Save the policy as a plain HF causal LM (pipeline-loadable) with tokenizer and a generation config that
        stops at EOS; a LoRA policy is merged when `merge_adapter` (default: `args.merge_adapter` if the config has
        it), else saved as an adapter. The value model goes to `output_dir/value_model/`."""
        acc = self.accelerator
        out = Path(output_dir or self.args.output_dir)
        merge = merge_adapter if merge_adapter is not None else bool(getattr(self.args, "merge_adapter", False))
        acc.wait_for_everyone()
        if acc.is_main_process:
            tok = self.processing_class
            policy = self.policy
            if self.is_peft and merge:
                policy = copy.deepcopy(policy).merge_and_unload()
            gc = policy.generation_config
            gc.eos_token_id, gc.pad_token_id = self.eos_token_ids, tok.pad_token_id
            if tok.bos_token_id is not None:
                gc.bos_token_id = tok.bos_token_id
            policy.save_pretrained(out)
            tok.save_pretrained(out)
            self.value_model.save_pretrained(out / VALUE_DIR)
            tok.save_pretrained(out / VALUE_DIR)
        acc.wait_for_everyone()


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
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
