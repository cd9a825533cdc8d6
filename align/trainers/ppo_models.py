"""The model pieces of align's PPO: value and policy forwards over a rollout, the policy+value wrapper that one DDP
module trains, the critic that shares the LoRA policy's base (`value_model_init: policy_lora`), the value head on the
policy's own last hidden state (`value_model_init: policy_head`), GPT-2's fused GELU (used by
`align.trainers.ppo.PPOTrainer`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.activations import NewGELUActivation

from align.errors import AlignError
from align.trainers.sharding import plain_state_dict

CRITIC_ADAPTER = "critic"  # not "value": BERT-like models have modules named `value`, and peft names params by both
VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_HEAD = "policy_head"  # the value_model_init of `PolicyValueHead`, stored in its file's metadata


def value_head_forward(model, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
    """Per-token values `(B, T)` of a `*ForSequenceClassification` model (or a `SharedBaseCritic`, a
    `PolicyValueHead`): backbone, then its `score` head on the hidden state before each of the last `response_length`
    tokens (the state the token was sampled from)."""
    if isinstance(model, (SharedBaseCritic, PolicyValueHead)):
        return model(input_ids, attention_mask, position_ids, response_length)
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


class PolicyValueHead(nn.Module):
    """The value model of `value_model_init: policy_head`: a scalar head, `Linear(hidden, 1)` without bias, initialized
    as transformers initializes a `*ForSequenceClassification` head (normal, std `initializer_range`), on the policy's
    own last hidden state (after its LoRA, if any: the input of its LM head). One forward and one backward of the
    policy then serve both losses, and `vf_coef` weighs the value loss's gradient in the shared trunk, as TRL's
    `AutoModelForCausalLMWithValueHead` (TRL <= 0.11) did. This module's only parameter is the head's; it keeps the
    policy outside its submodules (as `SharedBaseCritic`), so the policy+value wrapper holds the policy's weights once.
    """

    def __init__(self, policy):
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        base = policy.get_base_model() if isinstance(policy, PeftModel) else policy
        text = base.config.get_text_config()
        self.score = nn.Linear(text.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=getattr(text, "initializer_range", 0.02))

    @property
    def policy(self):
        return self._policy

    def logits_and_values(self, input_ids, attention_mask, position_ids, response_length: int):
        """(logits `(B, T, V)` as `policy_logits`, values `(B, T)` float32) from ONE policy forward: the values read
        what the LM head reads, captured by a hook on its input, which `logits_to_keep` has already cut to the last
        `response_length + 1` positions (no full-sequence hidden states or logits are kept)."""
        seen: list[torch.Tensor] = []
        hook = self._policy.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            logits = policy_logits(self._policy, input_ids, attention_mask, position_ids, response_length)
        finally:
            hook.remove()
        if len(seen) != 1 or seen[0].shape[1] != response_length + 1:  # a model that ignores logits_to_keep
            raise RuntimeError(
                f"policy_head: the LM head read {[tuple(t.shape) for t in seen]}, expected one (B, "
                f"{response_length + 1}, hidden) input"
            )
        return logits, self._values(seen[0][:, :-1])

    def forward(self, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
        """Values alone `(B, T)` (float32), as `value_head_forward`: the policy's backbone (its `last_hidden_state`
        is the LM head's input) without the LM head, for a rollout whose old logprobs came from generate."""
        base = self._policy.get_base_model() if isinstance(self._policy, PeftModel) else self._policy
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self._values(hidden[:, -response_length - 1 : -1])

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, path: str | Path) -> None:
        """The head alone, `path/value_head.safetensors` (its metadata names the layout): the trunk is the policy's,
        saved as the policy."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.score.weight.detach().cpu().contiguous()}, path / VALUE_HEAD_FILE,
                  metadata={"value_model_init": POLICY_HEAD})  # fmt: skip

    def load_pretrained(self, path: str | Path) -> None:
        """Load what `save_pretrained` wrote; AlignError for a file of another layout (a policy_lora critic's head
        read another trunk) or none."""
        file = Path(path) / VALUE_HEAD_FILE
        layout = None
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                layout = (f.metadata() or {}).get("value_model_init")
        if layout != POLICY_HEAD:
            raise AlignError(
                f"{path}: no value head written with value_model_init '{POLICY_HEAD}' ({VALUE_HEAD_FILE}). Resume "
                "with the value_model_init the checkpoint was saved with, or start over."
            )
        self.score.load_state_dict(load_file(file, device=str(self.score.weight.device)))


class SharedBaseCritic(nn.Module):
    """The value model of `value_model_init: policy_lora`: the LoRA policy's frozen base under a second LoRA adapter
    (`CRITIC_ADAPTER`, the policy's LoRA settings, B = 0 at start) and a fresh scalar `score` head on its hidden
    states. One base then serves policy (its adapter + LM head), reference (adapters off) and value model; only the
    two adapters and the head train.

    The adapter is added to the policy's peft model, so its parameters are the policy's (`adapter_parameters()`
    lists them); this module's own parameters are the head's. The policy's adapter stays the active one: the critic
    switches to its own only inside `forward` (`use_adapter`), and gradient checkpointing must recompute each block
    with the adapter its forward used (`checkpoint_context`, passed as `context_fn`).
    """

    def __init__(self, policy, adapter_name: str = CRITIC_ADAPTER):
        super().__init__()
        policy_adapter = policy.active_adapter
        lora = policy.peft_config[policy_adapter]
        if not isinstance(lora, LoraConfig) or getattr(lora, "use_dora", False):
            what = type(lora).__name__ + (" with DoRA" if getattr(lora, "use_dora", False) else "")
            raise AlignError(
                f"ppo: value_model_init 'policy_lora' adds a LoRA critic adapter beside the policy's; the policy's "
                f"adapter is {what}. Use plain LoRA (use_peft: true, use_dora: false), or value_model_init: policy."
            )
        config = copy.deepcopy(lora)
        config.modules_to_save = None  # the critic reads hidden states: no LM head or embedding copies of its own
        config.inference_mode = False
        policy.add_adapter(adapter_name, config)  # peft leaves a new, inactive adapter frozen
        # object.__setattr__: the policy is not a submodule, else its weights would be this module's too (twice in
        # the policy+value wrapper, the optimizer and every state dict).
        object.__setattr__(self, "_policy", policy)
        self.adapter_name, self.policy_adapter = adapter_name, policy_adapter
        self._layers = _tuner_layers(policy)
        for p in self.adapter_parameters():
            p.requires_grad_(True)
        text = policy.get_base_model().config.get_text_config()
        self.score = nn.Linear(text.hidden_size, 1, bias=False)
        # as transformers initializes a `*ForSequenceClassification` head (value_model_init: policy does the same)
        nn.init.normal_(self.score.weight, std=getattr(text, "initializer_range", 0.02))

    @property
    def policy(self):
        return self._policy

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The critic adapter's parameters, found through peft's layers (never by matching parameter names)."""
        out = []
        for m in self._layers:
            for name in m.adapter_layer_names:
                container = getattr(m, name)
                if self.adapter_name in container:
                    out.extend(container[self.adapter_name].parameters())
        return out

    def forward(self, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
        """Per-token values `(B, T)` (float32) of the last `response_length` tokens, as `value_head_forward`."""
        base = self._policy.get_base_model()
        backbone = getattr(base, base.base_model_prefix)
        with use_adapter(self._layers, self.adapter_name):
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        hidden = hidden[:, -response_length - 1 : -1]
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()

    def checkpoint_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """`context_fn` of `torch.utils.checkpoint` (non-reentrant): each checkpointed block is recomputed in backward
        with the adapter state its forward saw. Without it the recompute uses whichever adapter is active at backward
        time, and the policy's gradients are computed through the critic's adapter (or the reverse): measured on a
        tiny llama, gradients off by up to 4.9 instead of 0 (tests/test_ppo_shared_base.py)."""
        state = [(m._active_adapter, m._disable_adapters) for m in self._layers]
        return contextlib.nullcontext(), _adapter_state(self._layers, state)

    # ---------------------------------------------------------------- saving

    def save_pretrained(self, path: str | Path) -> None:
        """The critic adapter (peft's adapter files, loadable over the policy's base) and the head, in `path`: what a
        PPO checkpoint keeps to resume exactly."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self._policy, plain_state_dict(self._policy), adapter_name=self.adapter_name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path / "adapter_model.safetensors")
        self._policy.peft_config[self.adapter_name].save_pretrained(path)
        save_file({"weight": self.score.weight.detach().cpu().contiguous()}, path / VALUE_HEAD_FILE)

    def load_pretrained(self, path: str | Path) -> None:
        """Load what `save_pretrained` wrote; AlignError when the files do not match this critic."""
        path = Path(path)
        files = [path / "adapter_model.safetensors", path / VALUE_HEAD_FILE]
        if not all(f.is_file() for f in files):
            raise AlignError(
                f"{path}: no critic adapter and value head ({', '.join(f.name for f in files)}): the checkpoint was "
                "not written with value_model_init 'policy_lora'. Resume with the value_model_init it was saved "
                "with, or start over."
            )
        result = set_peft_model_state_dict(self._policy, load_file(files[0]), adapter_name=self.adapter_name)
        if result.unexpected_keys:
            raise AlignError(
                f"{files[0]}: {len(result.unexpected_keys)} tensors this critic has no place for (e.g. "
                f"{result.unexpected_keys[0]}). Resume with the LoRA settings it was saved with."
            )
        self.score.load_state_dict(load_file(files[1], device=str(self.score.weight.device)))

    def to_sequence_classifier(self):
        """A plain `*ForSequenceClassification` (num_labels=1) holding this critic: the base with the critic adapter
        merged, and the head. What `value_model/` holds, as with a separate value model, so a later run can start
        from it (`value_model_path`). Built on the CPU from the weights, without copying the policy."""
        base = self._policy.get_base_model()
        with torch.no_grad():
            state = {k: t.cpu() for k, t in plain_backbone_state(self._policy, self.adapter_name).items()}
            config = copy.deepcopy(base.config)
            config.num_labels = 1
            value = AutoModelForSequenceClassification.from_config(config, dtype=next(iter(state.values())).dtype)
            getattr(value, value.base_model_prefix).load_state_dict(state, strict=True)
            value.score.weight.copy_(self.score.weight.detach().cpu())
        return value


def plain_backbone_state(peft_model, merge_adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a peft model's backbone under plain transformers names (no `base_layer`, no adapter
    tensors): the base's weights, plus adapter `merge_adapter`'s LoRA delta where it has one (None: the base alone)."""
    base = peft_model.get_base_model()
    return _plain_merged_state(getattr(base, base.base_model_prefix), merge_adapter)


def plain_model_state(peft_model, merge_adapter: str | None = None) -> dict[str, torch.Tensor]:
    """`plain_backbone_state` of the whole base model (its head included): what `merge_and_unload()` would save, read
    off the parameters without copying the model (an FSDP2 model cannot be deep-copied)."""
    return _plain_merged_state(peft_model.get_base_model(), merge_adapter)


def _plain_merged_state(module: nn.Module, merge_adapter: str | None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        deltas = {}
        if merge_adapter is not None:
            deltas = {f"{name}.base_layer.weight": m.get_delta_weight(merge_adapter)
                      for name, m in module.named_modules()
                      if isinstance(m, LoraLayer) and merge_adapter in m.lora_A}  # fmt: skip
        state = {}
        for key, t in plain_state_dict(module).items():  # not state_dict(): it would reshard an FSDP2 model
            if ".lora_" in key or ".modules_to_save." in key:
                continue
            plain = key.replace(".base_layer.", ".").replace(".original_module.", ".")
            state[plain] = t + deltas[key].to(t.dtype) if key in deltas else t
    return state


def _tuner_layers(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def _adapter_state(layers: list[nn.Module], state: list[tuple]) -> Iterator[None]:
    """Set each peft layer's (active adapters, disabled) to `state`, and back afterwards. Writes the attributes peft's
    `set_adapter` writes but leaves `requires_grad` alone (`set_adapter` freezes the inactive adapter; both train)."""
    old = [(m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m, (active, disabled) in zip(layers, state, strict=True):
            m._active_adapter, m._disable_adapters = active, disabled
        yield
    finally:
        for m, (active, disabled) in zip(layers, old, strict=True):
            m._active_adapter, m._disable_adapters = active, disabled


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """peft's `model.disable_adapter()` (the reference: the base alone), keeping every parameter's `requires_grad`. On
    exit peft re-enables grads for the active adapter only, which would freeze a second one for good (the shared
    critic's: it then silently stopped training after the first rollout)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def use_adapter(layers: list[nn.Module], name: str) -> contextlib.AbstractContextManager:
    """Run the peft `layers` with adapter `name` alone, enabled."""
    return _adapter_state(layers, [([name], False)] * len(layers))


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so DDP syncs both in one pass and one optimizer steps both (as TRL). With
    a `PolicyValueHead` one policy forward gives logits and values."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def _no_split_modules(self) -> list[str]:
        """The decoder-layer classes of both models: what FSDP's transformer-based wrap shards one by one (accelerate
        reads it off the module it prepares)."""
        names: list[str] = []
        for model in (self.policy, self.value_model):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            names += [n for n in getattr(base, "_no_split_modules", None) or [] if n not in names]
        return names

    def forward(self, input_ids, attention_mask, position_ids, response_length: int, ptx=None):
        if isinstance(self.value_model, PolicyValueHead):  # one policy forward gives both
            logits, values = self.value_model.logits_and_values(input_ids, attention_mask, position_ids,
                                                                response_length)  # fmt: skip
        else:
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
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]  # fmt: skip
    for parent, name in targets:
        setattr(parent, name, nn.GELU(approximate="tanh"))
    return len(targets)
