"""What `align.trainers.ppo.PPOTrainer` builds before its first update, one job per function, called by its
`__init__` in this order (the order is part of the numerics: the LoRA adapters and a fresh value head draw their
initial weights from the RNG `make_accelerator` seeded):

- `check_inputs`: the arguments a caller passes beside the config (tokenizer, reward, prompts, PPO-ptx data);
- `make_accelerator`: the Accelerator, the per-process seed, malloc's threshold;
- `build_ppo_models`: model surgery (LoRA, the value model, the reference, dropout off, fused GELU, gradient
  checkpointing, frozen roles) -> a typed `PPOModels` record;
- `encode_data`: prompts and PPO-ptx rows as token ids;
- `plan_memory`: the logged memory plan, checked against a GPU's free memory;
- `build_optimizer`: one optimizer over policy and value model, with its schedule;
- `build_engine`: what samples the rollouts when it is not the policy itself (align's sampler copy, or vLLM).

The config's keys are checked by the config classes (`align.trainers.ppo_config.PPOConfig`, and the stage's
`align.stages.ppo_config.PPOStageConfig`); what is checked here is what only the objects show (a policy without
LoRA, a value model given twice, tokenizers, the distributed setup).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification, Trainer, get_scheduler
from trl.trainer.utils import disable_dropout_in_model

from align.errors import AlignError
from align.models import memory_plan as mp
from align.models.memory_plan import set_malloc_mmap_threshold
from align.models.modeling import max_positions
from align.trainers.ppo_config import PPOConfig
from align.trainers.ppo_models import (
    PolicyAndValue,
    PolicyValueHead,
    SharedBaseCritic,
    fuse_gelu_new,
    plain_backbone_state,
)
from align.trainers.ppo_rollout import encode_prompts, encode_ptx
from align.trainers.ppo_sampler import SamplerCopy
from align.trainers.ppo_vllm import make_vllm_engine

with warnings.catch_warnings():  # TRL marks trl.experimental as unstable on import
    warnings.simplefilter("ignore")
    from trl.experimental.utils import create_reference_model

logger = logging.getLogger(__name__)


@dataclass
class PPOModels:
    """The four roles of a PPO run, built by `build_ppo_models`.

    policy: the causal LM being trained (a peft model when LoRA). ref_policy: its frozen copy, or None for a LoRA
    policy (the reference is the policy with its adapters disabled). value_model: a `*ForSequenceClassification`
    read per token, a `SharedBaseCritic` on the LoRA policy's base, or a `PolicyValueHead` on the policy's own last
    hidden state. reward_model: frozen, or None when a reward
    function scores. tokenizer: the policy's; reward_tokenizer: the reward model's (the policy's when it has none).
    """

    policy: nn.Module
    ref_policy: nn.Module | None
    value_model: nn.Module
    reward_model: nn.Module | None
    tokenizer: Any
    reward_tokenizer: Any
    eos_token_ids: int | list[int] | None
    is_peft: bool
    reward_offset: float = 0.0  # the reward model's `align_reward_offset`, subtracted from every score

    @property
    def shared_base(self) -> bool:
        """Whether the value model is the critic on the policy's own base (`value_model_init: policy_lora`)."""
        return isinstance(self.value_model, SharedBaseCritic)

    @property
    def value_in_policy(self) -> bool:
        """Whether the value model is a head on the policy's own trunk (`value_model_init: policy_head`)."""
        return isinstance(self.value_model, PolicyValueHead)

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.ref_policy, self.reward_model) if m is not None]


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and accelerator


def check_inputs(args, tokenizer, reward_model, reward_fn, train_dataset, ptx_dataset) -> None:
    """One-line errors for what the trainer is given beside its config."""
    if not isinstance(args, PPOConfig):
        raise TypeError(f"args must be a PPOConfig, got {type(args).__name__}")
    if tokenizer is None:
        raise ValueError("PPOTrainer needs processing_class (the policy's tokenizer)")
    if reward_model is None and reward_fn is None:
        raise AlignError("ppo: no reward_model and no reward_fn. Pass a reward model (the reward stage's output).")
    if train_dataset is None:
        raise AlignError("ppo: no train_dataset. Give prompts (a 'prompt' column).")
    if args.ptx_coef > 0 and ptx_dataset is None:
        raise AlignError(f"ppo: ptx_coef {args.ptx_coef} > 0 but no ptx_dataset. Give one, or set ptx_coef: 0.")
    if tokenizer.pad_token_id is None:
        raise AlignError("ppo: the policy tokenizer has no pad token. Set tokenizer.pad_token (e.g. to EOS).")


def make_accelerator(args: PPOConfig) -> Accelerator:
    """The run's Accelerator, then `set_seed(args.seed, device_specific=True)`: each process samples its own
    responses. AlignError under DeepSpeed ZeRO-3; sets malloc's mmap threshold when `malloc_mmap_threshold` asks."""
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=bool(args.ddp_find_unused_parameters))]
    acc = Accelerator(
        cpu=args.use_cpu,
        mixed_precision="bf16" if args.bf16 else ("fp16" if args.fp16 else "no"),
        log_with=args.report_to or None,
        project_dir=args.output_dir,
        kwargs_handlers=kwargs,
    )
    set_seed(args.seed, device_specific=True)
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        raise AlignError(
            "ppo: DeepSpeed ZeRO-3 is not supported by align's PPO yet (its rollout would need the partitioned "
            "parameters gathered). Use FSDP2 (recipes/accelerate_configs/fsdp.yaml), which shards the same way, "
            "or ZeRO-2 (recipes/accelerate_configs/deepspeed_zero2.yaml)."
        )
    if args.malloc_mmap_threshold is not None:
        if set_malloc_mmap_threshold(args.malloc_mmap_threshold):
            logger.info(
                "ppo: malloc maps blocks of %d bytes or more on their own pages (malloc_mmap_threshold): a "
                "lower CPU peak, slower steps.",
                args.malloc_mmap_threshold,
            )
        else:
            logger.warning("ppo: malloc_mmap_threshold is set but this C library has no glibc mallopt; ignored.")
    return acc


# ---------------------------------------------------------------------------------------------------------------------
# Models


# The value_model_init values whose value head starts from nothing (value_head_std redraws it).
FRESH_HEAD_INITS = ("policy", "policy_lora", "policy_head")


def build_ppo_models(args: PPOConfig, policy, *, tokenizer, ref_policy=None, reward_model=None, value_model=None,
                     reward_tokenizer=None, peft_config=None) -> PPOModels:  # fmt: skip
    """The policy wrapped with `peft_config` (LoRA), the value model (given, or built per `value_model_init`), the
    reference (given, a frozen copy, or none for a LoRA policy), with dropout off in all four, GPT-2's GELU fused
    (`fast_activations`), gradient checkpointing on the policy and the reference and reward model frozen. On the
    CPU still: `PPOModels.move_frozen` and the optimizer's `accelerator.prepare` place them."""
    eos = policy.generation_config.eos_token_id
    is_peft = peft_config is not None or is_peft_model(policy)
    if peft_config is not None and not is_peft_model(policy):
        policy = get_peft_model(policy, peft_config)
    fresh_head = value_model is None and args.value_model_init in FRESH_HEAD_INITS
    value_model = make_value_model(args, policy, value_model, reward_model, tokenizer, reward_tokenizer, is_peft)
    if fresh_head and args.value_head_std is not None:
        nn.init.normal_(value_model.score.weight, std=args.value_head_std)  # std 0: zeros
    if is_peft:
        if ref_policy is not None:
            logger.info("ppo: ref_policy given with a peft policy; using it rather than the disabled adapter.")
    elif ref_policy is None:
        ref_policy = create_reference_model(policy)
    check_vocab(tokenizer, value_model)
    models = PPOModels(policy, ref_policy, value_model, reward_model, tokenizer, reward_tokenizer or tokenizer,
                       eos if eos is not None else tokenizer.eos_token_id, is_peft)  # fmt: skip
    prepare_for_ppo(models, args)
    if reward_model is not None:
        text = reward_model.config.get_text_config()
        if text.pad_token_id is None:  # sequence classification reads the last non-pad token
            text.pad_token_id = models.reward_tokenizer.pad_token_id
        models.reward_offset = float(getattr(reward_model.config, "align_reward_offset", 0.0) or 0.0)
    return models


def make_value_model(args, policy, value_model, reward_model, tokenizer, reward_tokenizer, is_peft: bool):
    """The value model: `value_model` as given (a LikelihoodRewardModel's body and head), or built per
    `args.value_model_init` ('policy_lora': a `SharedBaseCritic` on the LoRA policy's base; 'policy_head': a
    `PolicyValueHead` on the policy's own last hidden state, LoRA or not)."""
    if args.value_model_init == "policy_head":
        if value_model is not None:  # the stage's config rejects this too
            raise AlignError(
                "ppo: value_model_init 'policy_head' puts a value head on the policy's own trunk, and a value model "
                "was given too (value_model_path). Drop one."
            )
        return PolicyValueHead(policy)
    if args.value_model_init == "policy_lora":
        # The stage's config rejects these settings; a caller that builds the trainer itself gets the same news here.
        if not is_peft:
            raise AlignError(
                "ppo: value_model_init 'policy_lora' puts the value model on the LoRA policy's base, but the "
                "policy is not LoRA. Set use_peft: true, or value_model_init: policy."
            )
        if value_model is not None:
            raise AlignError(
                "ppo: value_model_init 'policy_lora' builds the value model on the policy's base, and a value "
                "model was given too (value_model_path). Drop one."
            )
        return SharedBaseCritic(policy)
    if value_model is not None:
        if hasattr(value_model, "to_sequence_classifier"):  # a LikelihoodRewardModel: its body and head
            return value_model.to_sequence_classifier()
        return value_model
    if (
        args.value_model_init == "reward"
        and reward_tokenizer is not None
        and (reward_tokenizer.get_vocab() != tokenizer.get_vocab())
    ):
        raise AlignError(
            "ppo: value_model_init 'reward' but the reward model has its own tokenizer; the value model reads "
            "the policy's tokens. Set value_model_init: policy (or pass a value_model)."
        )
    return init_value_model(args.value_model_init, policy, reward_model)


def init_value_model(value_model_init: str, policy, reward_model):
    """A new value model: a copy of the reward model ('reward'), or the policy's backbone with a fresh scalar head."""
    if value_model_init == "reward":
        if reward_model is None:
            raise AlignError(
                "ppo: value_model_init 'reward' but no reward_model (reward_fn given). Set value_model_init: "
                "policy, or pass a value_model."
            )
        # A LikelihoodRewardModel's value copy keeps its body and head only: values are read per token.
        plain = getattr(reward_model, "to_sequence_classifier", None)
        value = plain() if plain is not None else copy.deepcopy(reward_model)
        # The value model trains: in the dtype of the policy's trainable weights, also when the frozen reward
        # model was loaded in bf16 to save memory (align ppo does so under bf16).
        dtype = next((p.dtype for p in policy.parameters() if p.requires_grad), None)
        if dtype is not None and dtype.is_floating_point:
            value.to(dtype=dtype)
    else:
        base = policy.get_base_model() if is_peft_model(policy) else policy
        config = copy.deepcopy(base.config)
        config.num_labels = 1
        value = AutoModelForSequenceClassification.from_config(config)
        if is_peft_model(policy):  # the base's weights under plain names (LoRA B = 0: the policy's too)
            state = plain_backbone_state(policy)
        else:
            state = getattr(base, base.base_model_prefix).state_dict()
        getattr(value, value.base_model_prefix).load_state_dict(state)
    value.requires_grad_(True)
    return value


def check_vocab(tokenizer, value_model) -> None:
    """AlignError when the value model cannot read the policy's tokens (no backbone + `score`, too few embeddings)."""
    if isinstance(value_model, (SharedBaseCritic, PolicyValueHead)):  # reads the policy's own embeddings
        return
    if not hasattr(value_model, "score") or not hasattr(value_model, value_model.base_model_prefix):
        raise AlignError(
            f"ppo: value model {type(value_model).__name__} has no backbone + `score` head. Use an "
            "AutoModelForSequenceClassification (num_labels=1)."
        )
    n_vocab = len(tokenizer)
    rows = value_model.get_input_embeddings().weight.shape[0]
    if rows < n_vocab:
        raise AlignError(
            f"ppo: the value model has {rows} embedding rows but the policy tokenizer has {n_vocab} tokens; the "
            "value model reads policy tokens. Pass a value model built for the policy's tokenizer, or set "
            "value_model_init: policy."
        )


def prepare_for_ppo(models: PPOModels, args: PPOConfig) -> None:
    """Dropout off in all four models (it would make the old and new logprobs of the same weights differ, biasing
    the ratio; TRL does so too), GPT-2's GELU fused (`fast_activations`), gradient checkpointing on the policy, and
    the reference and reward model frozen in eval mode."""
    swapped = 0
    for m in (models.policy, models.ref_policy, models.reward_model, models.value_model):
        if m is not None:
            disable_dropout_in_model(m)
            swapped += fuse_gelu_new(m) if args.fast_activations else 0
    if swapped:
        logger.info("ppo: %d gelu_new activations computed by the fused tanh-GELU kernel (fast_activations).", swapped)
    if args.gradient_checkpointing:
        kwargs = checkpointing_kwargs(args.gradient_checkpointing_kwargs, models.value_model)
        models.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for frozen in models.frozen():
        frozen.requires_grad_(False)
        frozen.eval()


def checkpointing_kwargs(kwargs: dict[str, Any] | None, value_model) -> dict[str, Any] | None:
    """`gradient_checkpointing_kwargs` for the policy; with the shared base, non-reentrant checkpointing that
    recomputes each block under the adapter its forward used (`SharedBaseCritic.checkpoint_context`). PPOConfig
    rejects `use_reentrant: true` with `value_model_init: policy_lora`."""
    if not isinstance(value_model, SharedBaseCritic):
        return kwargs
    return {**(kwargs or {}), "use_reentrant": False, "context_fn": value_model.checkpoint_context}


# ---------------------------------------------------------------------------------------------------------------------
# Data, memory, optimizer, engine


def encode_data(args: PPOConfig, tokenizer, policy, accelerator, train_dataset, eval_dataset, ptx_dataset):
    """(train prompts, eval prompts or None, PPO-ptx rows or None): prompts as (token ids, texts)
    (`encode_prompts`), ptx rows as token ids cut to the policy's positions."""
    encode = dict(max_prompt_length=args.max_prompt_length, accelerator=accelerator)
    train = encode_prompts(train_dataset, tokenizer, "train_dataset", **encode)
    evals = encode_prompts(eval_dataset, tokenizer, "eval_dataset", **encode) if eval_dataset is not None else None
    ptx = encode_ptx(ptx_dataset, tokenizer, max_positions(policy.config)) if args.ptx_coef > 0 else None
    return train, evals, ptx


def plan_memory(models: PPOModels, args: PPOConfig, acc, *, prompt_length: int, gen_logits: bool):
    """Log one line per model and the estimated peak (`align.models.memory_plan`); on CUDA, AlignError when it does
    not fit the free memory. Returns (lines, peak bytes)."""
    policy, ref, value_model, reward_model = models.policy, models.ref_policy, models.value_model, models.reward_model
    shared, in_policy = models.shared_base, models.value_in_policy
    seen: set[int] = set()
    stats, shapes = {}, {}
    if shared:  # the critic's adapter is counted as the value model's, not the policy's
        stats["value"] = mp.param_stats([*value_model.adapter_parameters(), *value_model.parameters()], seen)
    if in_policy:  # the head alone
        stats["value"] = mp.param_stats(value_model.parameters(), seen)
    for role, model in (("policy", policy), ("reference", ref), ("value", value_model), ("reward", reward_model)):
        if role == "value" and (shared or in_policy):
            shapes[role] = None  # runs the policy's layers
        elif model is not None:
            stats[role], shapes[role] = mp.param_stats(model.parameters(), seen), mp.model_shape(model)
        elif role == "reference":  # the LoRA policy with its adapter off
            stats[role], shapes[role] = mp.param_stats([], seen), None
    half = acc.mixed_precision != "no" or next(policy.parameters()).element_size() == 2
    P = prompt_length
    b = min(args.local_rollout_forward_batch_size, args.local_batch_size)
    lines, peak = mp.ppo_plan(
        shapes, stats, rollout_batch=b, micro_batch=args.per_device_train_batch_size, prompt_length=P,
        max_new_tokens=args.max_new_tokens, act_bytes=2 if half else 4, gen_logits=gen_logits,
        checkpointing=bool(args.gradient_checkpointing), value_in_policy=in_policy,
    )  # fmt: skip
    if acc.is_main_process:
        T, micro = args.max_new_tokens, args.per_device_train_batch_size
        mp.log_plan("ppo", lines, peak, f"rollout chunks of {b} x ({P} + {T}) tokens, micro-batch {micro}")
    fixes = ["lower local_rollout_forward_batch_size, per_device_train_batch_size (raising "
             "gradient_accumulation_steps) or max_new_tokens"]  # fmt: skip
    if not in_policy:
        fixes.append("read values off the policy's own forward with value_model_init: policy_head")
    if not models.is_peft:
        fixes.append("train LoRA (use_peft: true) with value_model_init: policy_lora")
    elif not shared and not in_policy:
        fixes.append("share the policy's base with value_model_init: policy_lora")
    if not half:
        fixes.append("set bf16: true")
    if not args.gradient_checkpointing:
        fixes.append("set gradient_checkpointing: true")
    in_memory = [m for m in (policy, value_model, ref, reward_model) if m is not None]
    resident = mp.resident_bytes((p for m in in_memory for p in m.parameters()), acc.device)
    mp.check_fits("ppo", peak, acc.device, resident, "To fit: " + "; or ".join(fixes) + ".")
    return lines, peak


def build_optimizer(models: PPOModels, args: PPOConfig, optimizer_steps: int):
    """(policy + value wrapper, optimizer, scheduler): one optimizer for both models in two parameter groups, the
    policy's first (`critic_warmup_steps` drops the gradients of group 0: with `value_model_init: policy_head` the
    policy's trunk is group 0 too, so a warm-up trains the head alone), the value group at `value_learning_rate`
    when set, with Trainer's mapping of `optim`
    (default adamw_torch_fused: one kernel per step instead of ~10 ops per tensor). The scheduler is stepped by the
    trainer, not by accelerate, which would step it once per process."""
    policy, value_model = models.policy, models.value_model
    wrapper = PolicyAndValue(policy, value_model)
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    if isinstance(value_model, SharedBaseCritic):  # the critic's adapter lives in the policy's peft model
        value_params = value_model.adapter_parameters() + value_params
    in_value = {id(p) for p in value_params}
    groups = [
        {"params": [p for p in policy.parameters() if p.requires_grad and id(p) not in in_value]},
        {"params": value_params},
    ]
    if args.value_learning_rate is not None:
        groups[1]["lr"] = args.value_learning_rate  # the scheduler scales each group's own rate
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, policy)
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(optimizer_steps),
        num_training_steps=optimizer_steps,
    )
    return wrapper, optimizer, scheduler


def build_engine(args: PPOConfig, acc, policy, tokenizer, eos_token_ids):
    """(sampler, vllm): generation_backend align: the policy's merged copy align's decode samples from, synced before
    each rollout; vllm: TRL's colocated engine, weights pushed before each rollout; transformers: neither."""
    if args.generation_backend == "align":
        if acc.distributed_type.value in ("FSDP", "DEEPSPEED"):
            raise AlignError(
                f"ppo: generation_backend align needs the whole policy on each process, not "
                f"{acc.distributed_type.value}'s shards; set generation_backend: transformers."
            )
        return SamplerCopy(policy, dtype=torch.bfloat16 if args.bf16 else torch.float32), None
    if args.generation_backend == "vllm":
        return None, make_vllm_engine(policy, tokenizer, args=args, accelerator=acc, eos_token_ids=eos_token_ids)
    return None, None
