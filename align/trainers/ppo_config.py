"""Configuration of `align.trainers.ppo.PPOTrainer`: `TrainingArguments` plus PPO's keys, named as in TRL 1.12's
`PPOConfig`/`OnPolicyConfig` (TRL removed its PPOTrainer in 1.13), so a TRL PPO recipe ports key for key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from accelerate.utils import LoggerType
from transformers import TrainingArguments

from align.config import (
    check_values,
    resolve_auto_bf16,
)
from align.rl.ppo import KL_ESTIMATORS

VALUE_MODEL_INITS = ("reward", "policy", "policy_lora", "policy_head")
GENERATION_BACKENDS = ("transformers", "align", "vllm")


@dataclass
class PPOConfig(TrainingArguments):
    """`TrainingArguments` for PPO on a language model (InstructGPT step 3).

    Batch sizes, as TRL's OnPolicyConfig (so TRL recipes keep their meaning):
    - `per_device_train_batch_size`: sequences per forward/backward pass (the micro-batch), as in every Trainer.
    - mini-batch (one optimizer step) = `per_device_train_batch_size * gradient_accumulation_steps` per device.
    - rollout (prompts per device per PPO update) = mini-batch * `num_mini_batches`; over all processes times the
      world size. `max_steps` counts PPO updates (each = 1 rollout + `num_ppo_epochs * num_mini_batches` optimizer
      steps); alternatively `total_episodes` (responses) or `num_train_epochs` over the prompts sets it.

    Defaults changed from `TrainingArguments`, each for a reason given in its help: `learning_rate` 3e-6,
    `logging_steps` 1, `save_steps` 50, `bf16` None (auto). `use_cpu: true` runs on the CPU even when a GPU is present
    (Trainer's key; accelerate's `cpu`). Checkpoints: `save_strategy` "steps" (every `save_steps` updates and at the
    end) or "no"; `save_total_limit` keeps the newest N. Evaluation (`eval_fn` on `eval_dataset`): every `eval_steps`
    with `eval_strategy: steps`, and at the end.
    """

    # Trainer keys with PPO defaults
    learning_rate: float = field(
        default=3e-6,
        metadata={
            "help": "AdamW learning rate for policy and value model. 3e-6 as TRL's PPO: RL fine-tuning moves a "
            "trained SFT model, and larger steps quickly over-optimize the reward model."
        },
    )
    logging_steps: float = field(
        default=1,
        metadata={
            "help": "Log every N PPO updates. 1: an update is a whole rollout plus several optimizer steps, "
            "worth a line each (Trainer's 500 would log almost never)."
        },
    )
    save_steps: float = field(
        default=50,
        metadata={
            "help": "Save a checkpoint every N PPO updates (and at the end). 50 bounds the work lost to a "
            "crash to minutes on small models while keeping checkpoint I/O rare."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast. None (default, auto): on for a CUDA GPU with bf16 and for CPUs with AMX or "
            "avx512_bf16, off elsewhere (emulated bf16 is far slower than float32; docs/memory.md)."
        },
    )

    # Rollout
    num_mini_batches: int = field(
        default=1,
        metadata={
            "help": "Mini-batches (optimizer steps) per rollout per PPO epoch. 1 as TRL: each epoch is one "
            "large-batch step, the most stable choice for small rollouts."
        },
    )
    total_episodes: int | None = field(
        default=None,
        metadata={
            "help": "Responses to train on; sets the number of updates (ceil(total_episodes / rollout "
            "size)). None: `max_steps` if > 0, else `num_train_epochs` passes over the prompts."
        },
    )
    local_rollout_forward_batch_size: int = field(
        default=64,
        metadata={
            "help": "Sequences per no-grad pass in the rollout (generation, reference, value, reward). 64 as "
            "TRL; lower it if rollouts run out of memory."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Keep the last N prompt tokens (a warning counts the cut prompts). None: no cut; a prompt "
            "that leaves no room for max_new_tokens in the model's context is an error."
        },
    )
    max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "Response length limit (TRL: response_length). 64 as `align generate`'s default; "
            "responses that hit it without EOS can be penalized with missing_eos_penalty."
        },
    )
    min_new_tokens: int = field(
        default=0,
        metadata={
            "help": "Suppress EOS for the first N tokens. 0: the policy decides; the benchmark sets it to "
            "max_new_tokens for a fixed workload. Note that the logprobs PPO uses ignore this constraint."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature; logits are divided by it when computing logprobs too. 1.0 as "
            "InstructGPT (TRL used 0.7): PPO then optimizes, and the KL penalty measures, the distribution "
            "the saved model samples from."
        },
    )
    top_k: int = field(
        default=0,
        metadata={
            "help": "Top-k filtering while sampling; 0 = off. Keep 0: filtered samples come from a different "
            "distribution than the logprobs PPO computes."
        },
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling; 1.0 = off, for the same reason as top_k."},
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Subtracted from the score of responses that end without EOS (cut at max_new_tokens). "
            "None: no penalty (TRL's default). A positive value, e.g. 1.0, discourages rambling."
        },
    )
    reward_clip: float | None = field(
        default=None,
        metadata={
            "help": "Clip scores to [-reward_clip, reward_clip] before the KL penalty. None: no clip "
            "(InstructGPT normalizes the reward model instead: its offset centers SFT samples at 0)."
        },
    )

    # KL penalty
    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "beta of the per-token KL penalty to the reference (initial value when adaptive_kl). 0.05 "
            "as TRL; InstructGPT used 0.02. Must be >= 0 (0 disables the penalty)."
        },
    )
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "Per-token KL estimator: 'k1' (log p - log p_ref, TRL's default) or 'k3' (non-negative, "
            "lower variance). http://joschu.net/blog/kl-approx.html",
            "choices": list(KL_ESTIMATORS),
        },
    )
    adaptive_kl: bool = field(
        default=False,
        metadata={
            "help": "Adapt kl_coef toward kl_target (Ziegler et al. 2019). False as TRL's PPOv2 and "
            "InstructGPT, which used a fixed beta."
        },
    )
    kl_target: float = field(
        default=6.0,
        metadata={"help": "Target KL (nats per response) for adaptive_kl; 6.0 as Ziegler et al. 2019 / TRL."},
    )
    kl_horizon: float = field(
        default=10000,
        metadata={"help": "Horizon (responses) of the adaptive controller; 10000 as Ziegler et al. 2019 / TRL."},
    )

    # PPO
    num_ppo_epochs: int = field(
        default=4,
        metadata={"help": "Passes over each rollout. 4 as TRL and OpenAI's summarize-from-feedback."},
    )
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon; 0.2 as the PPO paper."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Value clip around the rollout's values; 0.2 as TRL / PPO2."}
    )
    vf_coef: float = field(
        default=0.1,
        metadata={
            "help": "Value loss weight. 0.1 as TRL: policy and value share one optimizer, and the value "
            "loss is in squared reward units, often much larger than the policy loss. With value_model_init "
            "'policy_head' it also weighs the value loss's gradient against the policy loss's in the shared trunk."
        },
    )
    critic_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "The first N PPO updates train the value model alone: the policy's gradients are dropped before "
            "each optimizer step, so it samples every warm-up rollout unchanged (OpenRLHF's freezing_actor_steps). "
            "For a critic that starts from nothing (value_model_init 'policy', 'policy_lora' or 'policy_head': a "
            "fresh head), whose first estimates make the policy's advantages noise. With 'policy_head' the trunk is "
            "the policy's, so a warm-up trains the head alone on the policy's features. 0 = none."
        },
    )
    value_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "The value model's own learning rate (its parameter group; the scheduler scales it as the "
            "policy's). Empty: learning_rate, as TRL. A fresh head at a policy's rate learns slowly (with "
            "'policy_head' at 2e-5, its values stayed near 0 over 20 tiny-world updates: docs/measurements.md), so "
            "a critic that starts from nothing may want e.g. 10x the policy's rate (OpenRLHF's critic_learning_rate)."
        },
    )
    value_head_std: float | None = field(
        default=None,
        metadata={
            "help": "Std of a fresh value head's normal draw (value_model_init 'policy', 'policy_lora', "
            "'policy_head'). Empty: the model's initializer_range, as transformers' score heads. 0: zeros, so the "
            "critic's first values are 0 and the first advantages are the returns themselves rather than returns "
            "minus a random function of the hidden state (on a model whose hidden state is large, such a head's "
            "values vary from token to token by more than the rewards do). A head trained from a reward model "
            "(value_model_init 'reward') keeps its weights."
        },
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "Discount. 1.0 as TRL: the score arrives at the last token and must reach the first."},
    )
    lam: float = field(default=0.95, metadata={"help": "GAE lambda; 0.95 as TRL."})
    whiten_rewards: bool = field(
        default=False,
        metadata={"help": "Scale per-token rewards by their std (mean kept) before GAE. False as TRL."},
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={
            "help": "Entropy bonus weight; 0 as TRL and InstructGPT: the KL penalty already keeps the policy "
            "from collapsing. Entropy is logged (ppo/entropy) either way."
        },
    )
    ptx_coef: float = field(
        default=0.0,
        metadata={
            "help": "PPO-ptx (InstructGPT Eq. 2, gamma): weight of a language-modelling loss on ptx_dataset, "
            "to limit regressions on the pretraining distribution. 0 = plain PPO."
        },
    )
    value_model_init: str = field(
        default="reward",
        metadata={
            "help": "Where the value model comes from when none is given: 'reward' (InstructGPT: a copy of "
            "the reward model; needs the policy's tokenizer), 'policy' (a copy of the policy's backbone, fresh "
            "scalar head) or 'policy_lora' (LoRA policies only: no copy; the policy's frozen base with a second "
            "LoRA adapter, 'critic', and a fresh scalar head, so one base serves policy, reference and value and "
            "only the two adapters and the head train; saved as a plain value model all the same) or 'policy_head' (a "
            "scalar head on the policy's own last hidden state, LoRA or not: one forward and one backward serve both "
            "losses, vf_coef weighs them in the shared trunk, as TRL's AutoModelForCausalLMWithValueHead; the head "
            "is saved as value_head.safetensors beside the policy).",
            "choices": list(VALUE_MODEL_INITS),
        },
    )

    fast_activations: bool = field(
        default=True,
        metadata={
            "help": "Compute GPT-2's gelu_new with PyTorch's fused tanh-GELU kernel (nn.GELU(approximate='tanh'): "
            "the same function, equal up to float rounding) in all four models: one kernel instead of eight in "
            "forward and backward, so training is faster. Saved models are unchanged."
        },
    )

    malloc_mmap_threshold: int | None = field(
        default=None,
        metadata={
            "help": "CPU memory: bytes from which glibc's malloc maps each block on its own pages, returned to the "
            "OS when freed (mallopt M_MMAP_THRESHOLD, at most 32 MiB; Linux only), e.g. 4194304. None keeps glibc's "
            "default, whose rising threshold lets a small model's activations fragment the heap far past what is "
            "live. Set it below one hidden-state tensor (micro-batch x sequence length x hidden size x 4 bytes); "
            "`align ppo` then turns on PyTorch's huge pages (THP_MEM_ALLOC_ENABLE=1) unless the environment sets "
            "them. Figures: docs/memory.md."
        },
    )

    # Generation engine
    generation_backend: str = field(
        default="transformers",
        metadata={
            "help": "What samples the rollouts: 'transformers' (the policy's generate); 'align' (align's decode "
            "loop on a copy of the policy with LoRA merged, in bf16 when training in bf16: docs/generation.md); "
            "or 'vllm' (GPUs: a vLLM engine colocated on each training GPU through TRL's VLLMGeneration; needs "
            "`pip install vllm`, 0.22 to 0.31 for TRL 1.16: docs/distributed.md). Evaluation during training "
            "samples as the rollouts do, except with vllm (transformers).",
            "choices": list(GENERATION_BACKENDS),
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={
            "help": "generation_backend vllm: the share of each GPU's memory vLLM reserves for the weights and "
            "its KV cache; the rest is left to training (TRL's GRPO colocated default is 0.3 too)."
        },
    )

    # Samples and evaluation
    num_sample_generations: int = field(
        default=10,
        metadata={
            "help": "Times during training that a few (prompt, response, score) samples are logged, evenly "
            "spaced (TRL's key). 0 = never."
        },
    )
    eval_temperature: float = field(
        default=0.0,
        metadata={
            "help": "Decoding for eval_dataset responses scored by eval_fn; 0 = greedy, deterministic and "
            "comparable across runs."
        },
    )

    # `report_to` names the PPO loop accepts: accelerate's trackers (Trainer's callbacks are not used here).
    report_to_choices: ClassVar[tuple[str, ...]] = tuple(t.value for t in LoggerType if t.value != "all")

    def __post_init__(self):
        # Ranges (kl_coef >= 0, 0 < top_p <= 1, batch keys >= 1, ...) are declared in align.config.VALUE_RULES.
        check_values(self)
        resolve_auto_bf16(self)
        super().__post_init__()
        errors = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        need(
            self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens {self.min_new_tokens} must be in [0, max_new_tokens={self.max_new_tokens}]",
        )
        need(
            self.kl_estimator in KL_ESTIMATORS,
            f"kl_estimator {self.kl_estimator!r} is unknown; use one of {', '.join(KL_ESTIMATORS)}",
        )
        need(
            self.generation_backend in GENERATION_BACKENDS,
            f"generation_backend {self.generation_backend!r} is unknown; use one of {', '.join(GENERATION_BACKENDS)}",
        )
        need(
            self.value_model_init in VALUE_MODEL_INITS,
            f"value_model_init {self.value_model_init!r} is unknown; use one of {', '.join(VALUE_MODEL_INITS)}",
        )
        need(
            not (self.total_episodes is not None and self.max_steps > 0),
            f"max_steps {self.max_steps} and total_episodes {self.total_episodes} both set the run length; keep one",
        )
        reentrant = self.gradient_checkpointing and (self.gradient_checkpointing_kwargs or {}).get("use_reentrant")
        need(
            not (reentrant and self.value_model_init == "policy_lora"),
            "gradient_checkpointing_kwargs use_reentrant: true with value_model_init 'policy_lora': policy and critic "
            "share checkpointed blocks, and only non-reentrant checkpointing can recompute each with its own adapter. "
            "Drop use_reentrant (or set it false)",
        )
        for name in ("save_strategy", "eval_strategy"):
            value = str(getattr(getattr(self, name), "value", getattr(self, name)))
            need(value in ("steps", "no"), f"{name} {value!r} is not supported (a PPO run counts updates, not "
                 "epochs); use 'steps' or 'no'")  # fmt: skip
        if errors:
            raise ValueError("ppo: " + "; ".join(errors) + ".")

    @property
    def local_mini_batch_size(self) -> int:
        """Sequences per optimizer step per device."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def local_batch_size(self) -> int:
        """Prompts per rollout per device."""
        return self.local_mini_batch_size * self.num_mini_batches

    def num_updates(self, num_prompts: int, world_size: int) -> int:
        """PPO updates of the run: `max_steps` if > 0, else from `total_episodes`, else `num_train_epochs` passes."""
        if self.max_steps > 0:
            return int(self.max_steps)
        batch = self.local_batch_size * world_size
        episodes = self.total_episodes if self.total_episodes is not None else self.num_train_epochs * num_prompts
        return max(1, math.ceil(episodes / batch))
