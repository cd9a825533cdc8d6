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
from align.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

PPO_STATE = "ppo_state.json"  # step, episodes, KL controller: what TrainerState has no field for
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint (align.io)
VALUE_DIR = "value_model"


class PPOCheckpointMixin:
    """Checkpoint methods of `PPOTrainer` (they use its accelerator, models, optimizer, scheduler and state)."""

    def _save_checkpoint(self) -> Path:
        """`output_dir/checkpoint-N/`: policy (HF format, or adapter), value model, optimizer, scheduler, RNG per
        process, KL controller; `trainer_state.json` written last, so a crash mid-save leaves a dir that
        `align.io.last_checkpoint` skips."""
        acc = self.accelerator
        step = self.state.global_step
        ckpt = Path(self.args.output_dir) / f"checkpoint-{step}"
        if acc.is_main_process:
            if ckpt.exists():  # a leftover of a crashed save (or a re-run): never mix two saves
                shutil.rmtree(ckpt)
            ckpt.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.policy.save_pretrained(ckpt)
            self.value_model.save_pretrained(ckpt / VALUE_DIR)
            torch.save(self.optimizer.state_dict(), ckpt / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), ckpt / "scheduler.pt")
            atomic_write_json(
                ckpt / PPO_STATE,
                {
                    "global_step": step,
                    "episodes": self.episodes,
                    "kl_controller": self.kl_ctl.state_dict(),
                    "world_size": self.world_size,
                },
            )
        torch.save(_rng_state(), ckpt / f"rng_state_{acc.process_index}.pth")
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = dataclasses.asdict(self.state)
            atomic_write_text(ckpt / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
            self._rotate_checkpoints()
            logger.info("ppo: saved %s", ckpt)
        acc.wait_for_everyone()
        self._callback("on_save")
        return ckpt

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
