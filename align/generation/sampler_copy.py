"""The sampler's own copy of a policy: bf16 weights (the fast matmuls on this kind of CPU), LoRA merged in.

A LoRA policy samples through its adapter at every layer (two extra small matmuls per projection) and, under
autocast, casts its fp32 weights at every call. The copy holds `W + scale * B @ A` once, in the sampling dtype, and
`sync` refreshes it from the policy before each rollout (a copy of the weights, no allocation). The policy itself
is never merged: merging and unmerging in place would leave float rounding in the reference model's weights.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from align.errors import AlignError


def _base(model):
    """The transformers model under a peft wrapper (the LoRA layers still injected), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_weight(module, name: str) -> torch.Tensor:
    """Parameter `name` ("weight"/"bias") of `module` as the policy's forward uses it: a LoRA layer's base weight
    plus the deltas of its active adapters (none while adapters are disabled or already merged)."""
    if not isinstance(module, LoraLayer):
        return getattr(module, name)
    value = getattr(module.get_base_layer(), name)
    if name != "weight" or module.disable_adapters or module.merged:
        return value
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    for adapter in adapters:
        value = value + module.get_delta_weight(adapter).to(value.dtype)
    return value


class SamplerCopy:
    """A plain causal LM of the policy's architecture in `dtype`, kept equal to the policy (adapters merged) by
    `sync()`. Build it once; call `sync()` after each optimizer step, before sampling."""

    def __init__(self, policy, dtype: torch.dtype = torch.bfloat16):
        base = _base(policy)
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
        """Copy the policy's current weights (LoRA merged) into the copy, cast to its dtype."""
        base = _base(self.policy)
        device = next(base.parameters()).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        for name, param in self.model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            param.copy_(merged_weight(base.get_submodule(module_name), leaf))
