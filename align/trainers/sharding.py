"""PPO under FSDP2 (`torch.distributed.fsdp.fully_shard`, as accelerate's `fsdp_version: 2` applies it).

accelerate shards the trainer's policy + value wrapper. Its forward (the PPO loss) all-gathers each unit's parameters
in its hooks, but generation, the reference and value passes of the rollout, the reward and the saving call the
policy and critic directly, below the root unit, where they would meet sharded `DTensor`s. `full_parameters` gathers
every unit of the wrapper for such a block, the way `summon_full_params` did for FSDP1 and TRL's
`unwrap_model_for_generation` does for ZeRO-3: generation then runs without one collective per token, so ranks whose
responses end at different lengths cannot hang. Parameters are restored to their shards after the block; what is
written to the gathered copies inside it is lost: `load_full_trainable_and_optimizer_state` loads into the shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP2
    FSDPModule = None


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that `fully_shard` was applied to (empty when it is not sharded)."""
    if FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(model: nn.Module, reshard_after_forward: bool | int = True) -> Iterator[None]:
    """All-gather every FSDP2 unit of `model` for the block and keep them gathered through any forward inside it;
    reshard after it, restoring `reshard_after_forward` (the value the units were sharded with). Collective: every
    rank enters it. No-op for a model that is not sharded."""
    units = fsdp_units(model)
    if not units:
        yield
        return
    # The outermost unit must be FSDP's root before a unit inside it runs: FSDP picks as root the first unit to run
    # forward, and here that would be a decoder layer of the policy (torch has no public call for this).
    units[0]._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_units(model))


def state_dict_kwargs(module: nn.Module, sharded: bool) -> dict:
    """`save_pretrained` keywords for `module`: inside `full_parameters` of a sharded model its `plain_state_dict`
    (save_pretrained's own state_dict() would reshard the parameters), else none."""
    return {"state_dict": plain_state_dict(module)} if sharded else {}


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` (same keys: tied parameters under every name, persistent buffers) read straight off the
    modules, without state-dict hooks: inside `full_parameters` FSDP2's hook would swap the gathered parameters back
    to their shards. Detached tensors, not copies."""
    out = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in m._parameters.items():
            if p is not None:
                out[dot + name] = p.detach()
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out[dot + name] = b.detach()
    return out


def full_trainable_and_optimizer_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The full (unsharded) trainable parameters of the FSDP2-sharded `model`, by name, and the optimizer's full state
    dict keyed by parameter name, both on the CPU of the main process (empty elsewhere). Collective."""
    # FSDP2 only: torch.distributed.checkpoint is absent from torch builds without distributed support
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    return {k: t for k, t in state.items() if k in trainable}, optimizer_state


def load_full_trainable_and_optimizer_state(
    model: nn.Module, optimizer, trainable: dict[str, torch.Tensor], optimizer_state: dict
) -> None:
    """Spread what `full_trainable_and_optimizer_state` returned (read on the main process; empty dicts elsewhere)
    over the ranks' shards. Collective."""
    # FSDP2 only: torch.distributed.checkpoint is absent from torch builds without distributed support
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, trainable, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
