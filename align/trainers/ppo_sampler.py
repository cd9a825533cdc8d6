"""`generation_backend: align`: the sampler's own copy of the policy, bf16 weights (the fast matmuls on this kind of
CPU) with LoRA merged in, which `align.generation.decode` samples PPO's rollouts from.

A LoRA policy samples through its adapter at every layer (two extra small matmuls per projection) and, under
autocast, casts its fp32 weights at every call. The copy holds `W + scale * B @ A` once, in the sampling dtype, and
`sync` refreshes it from the policy before each rollout: the merged weights under plain names, as the vLLM backend
pushes them (`plain_model_state`), copied into the copy's parameters. The policy itself is never merged: merging and
unmerging in place would leave float rounding in the reference model's weights.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from align.errors import AlignError
from align.trainers.ppo_models import plain_model_state
from align.trainers.sharding import plain_state_dict


class SamplerCopy:
    """A plain causal LM of the policy's architecture in `dtype`, kept equal to the policy (its active adapter
    merged) by `sync()`. Build it once; call `sync()` after each optimizer step, before sampling."""

    def __init__(self, policy, dtype: torch.dtype = torch.bfloat16):
        self.peft = hasattr(policy, "get_base_model")
        base = policy.get_base_model() if self.peft else policy
        for module in base.modules():
            if isinstance(module, LoraLayer) and (
                not isinstance(module, LoraLinear) or any(module.use_dora.get(a) for a in module.active_adapters)
            ):
                raise AlignError(
                    f"sampler copy: {type(module).__name__} layers (DoRA, or LoRA on a non-linear layer) cannot be "
                    "merged into a copy; set generation_backend: transformers."
                )
        self.policy = policy
        self.model = AutoModelForCausalLM.from_config(base.config, dtype=dtype, attn_implementation="sdpa")
        self.model.eval().requires_grad_(False)
        self.model.generation_config = base.generation_config
        self.dtype = dtype
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current weights (its active adapter merged) into the copy, cast to its dtype."""
        policy = self.policy
        state = plain_model_state(policy, policy.active_adapter) if self.peft else plain_state_dict(policy)
        device = next(iter(state.values())).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        self.model.load_state_dict(state, strict=True)
