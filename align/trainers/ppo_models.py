"""The model pieces of align's PPO: value and policy forwards over a rollout, the policy+value wrapper that one DDP
module trains, GPT-2's fused GELU (used by `align.trainers.ppo.PPOTrainer`)."""

from __future__ import annotations

import torch
from torch import nn


def value_head_forward(model, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
    """Per-token values `(B, T)` of a `*ForSequenceClassification` model: backbone, then its `score` head on the
    hidden state before each of the last `response_length` tokens (the state the token was sampled from)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return model.score(hidden[:, -response_length - 1 : -1]).squeeze(-1).float()


def policy_logits(model, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
    """Logits `(B, T, V)` that predicted the last `response_length` tokens (no LM-head work on prompt positions)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so DDP syncs both in one pass and one optimizer steps both (as TRL)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, position_ids, response_length: int, ptx=None):
        logits = policy_logits(self.policy, input_ids, attention_mask, position_ids, response_length)
        values = value_head_forward(self.value_model, input_ids, attention_mask, position_ids, response_length)
        ptx_loss = None
        if ptx is not None:  # in the same forward call: DDP must see every parameter used once per backward
            labels = ptx["input_ids"].masked_fill(ptx["attention_mask"] == 0, -100)
            ptx_loss = self.policy(**ptx, labels=labels, use_cache=False).loss
        return logits, values, ptx_loss


def fuse_gelu_new(model: nn.Module) -> int:
    """Replace GPT-2's `gelu_new` modules (8 elementwise ops, each its own kernel in forward and backward) by
    `nn.GELU(approximate="tanh")`: the same function in one fused PyTorch kernel, equal up to float rounding (what
    transformers' `gelu_pytorch_tanh` uses). Returns the number replaced. Saved models are unchanged (their config
    still says gelu_new)."""
    from transformers.activations import NewGELUActivation

    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]  # fmt: skip
    for parent, name in targets:
        setattr(parent, name, nn.GELU(approximate="tanh"))
    return len(targets)
