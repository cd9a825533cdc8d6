"""A memory plan before training: per model (policy, reference, value, reward) its parameters, dtype, weight and
optimizer bytes and its own transient peak (activations, full-vocabulary logits, KV cache) for the configured batch
and lengths; their sum is the run's estimated peak, checked against the free GPU memory before any work.

The arithmetic is pure functions of sizes (`tests/test_memory_plan.py` checks them on hand-computed numbers, and the
whole estimate against measured peaks of tiny runs). What each term counts, and why:

- weights: parameters x element size, shared storage once (a LoRA reference, a shared-base critic add ~nothing; a
  value head on the policy's own trunk adds one hidden-size vector and no activations).
- AdamW: `exp_avg` and `exp_avg_sq` per trainable element, in the parameter's dtype (torch's AdamW); gradients the
  same again, alive from the backward to `zero_grad(set_to_none=True)`. The backward frees activations as it
  allocates gradients, so its peak is the activations plus the first gradient made, the output layer's (V x hidden);
  all gradients together count in the optimizer step, when the activations are gone.
- training activations, per token per layer: `8 * hidden + 4 * intermediate` elements for a gated MLP (llama: the
  norms' inputs and outputs, q/k/v, the attention output, gate, up, act(gate), act(gate) * up), `8 * hidden +
  2 * intermediate` for a plain one (GPT-2: fc output and its activation). Korthikanti et al. 2022
  (https://arxiv.org/abs/2205.05198) count the same tensors (34 s b h bytes at 16 bits with a 4h MLP, plus
  dropout masks we do not have). With gradient checkpointing: one hidden state per layer plus one layer's worth.
- logits: `(B, T, V)` at the activation dtype plus float32 copies, as the code makes them (see `ppo_plan`).
- KV cache: `2 * layers * B * (P + T) * kv_heads * head_dim` at the activation dtype.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import sys
from collections.abc import Iterable

import torch

from align.errors import AlignError

logger = logging.getLogger(__name__)

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the activation terms read from a model's config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    gated_mlp: bool


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """One line of the plan. Bytes per process; `peak_bytes` is the model's own transient peak (its phase of the
    step), on top of the weights and optimizer states that stay allocated."""

    role: str
    params: int
    trainable: int
    dtype: str
    weight_bytes: int
    optimizer_bytes: int
    peak_bytes: int
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Terms (pure arithmetic)


def kv_cache_bytes(shape: ModelShape, batch: int, seq_len: int, act_bytes: int) -> int:
    """Keys and values of every layer for `batch` sequences of `seq_len` tokens."""
    head_dim = shape.hidden // shape.heads
    return 2 * shape.layers * batch * seq_len * shape.kv_heads * head_dim * act_bytes


def logits_bytes(batch: int, tokens: int, vocab: int, nbytes: int) -> int:
    """One `(batch, tokens, vocab)` tensor."""
    return batch * tokens * vocab * nbytes


def saved_activation_bytes(shape: ModelShape, batch: int, seq_len: int, act_bytes: int, checkpointing: bool) -> int:
    """What a forward with grad keeps for its backward (module docstring), without the logits."""
    per_layer = 8 * shape.hidden + (4 if shape.gated_mlp else 2) * shape.intermediate
    tokens = batch * seq_len
    if checkpointing:  # each layer's input, and one layer recomputed in backward
        return tokens * (shape.layers * shape.hidden + per_layer) * act_bytes
    return tokens * shape.layers * per_layer * act_bytes


def no_grad_activation_bytes(shape: ModelShape, batch: int, seq_len: int, act_bytes: int) -> int:
    """A forward without grad: only one layer's tensors live at a time (residual, normed input, q/k/v, MLP)."""
    return batch * seq_len * (6 * shape.hidden + 2 * shape.intermediate) * act_bytes


def adamw_state_bytes(trainable: int, param_bytes: int) -> int:
    """AdamW's exp_avg and exp_avg_sq."""
    return 2 * trainable * param_bytes


def ppo_plan(
    shapes: dict[str, ModelShape | None],
    stats: dict[str, tuple[int, int, str, int, int]],
    *,
    rollout_batch: int,
    micro_batch: int,
    prompt_length: int,
    max_new_tokens: int,
    act_bytes: int,
    gen_logits: bool,
    checkpointing: bool,
    value_in_policy: bool = False,
) -> tuple[list[ModelMemory], int]:
    """The plan of one PPO update per process, and its estimated peak in bytes.

    Args:
        shapes: role -> `ModelShape` for "policy", "reference", "value", "reward" (None: no such model, or one that
            runs through another's layers: the reference as the LoRA policy with adapters off).
        stats: role -> (params, trainable, dtype name, weight bytes, trainable bytes), unique storage per role (a
            shared-base critic: its adapter and head only).
        rollout_batch: sequences per no-grad chunk (`local_rollout_forward_batch_size`, at most the rollout).
        micro_batch: sequences per forward/backward (`per_device_train_batch_size`).
        prompt_length, max_new_tokens: P and T; sequences are P + T tokens.
        act_bytes: activation element size (2 under bf16/fp16 autocast, else 4).
        gen_logits: old logprobs from generate's logits (`gen_logits_fit`), else a policy forward.
        checkpointing: gradient checkpointing of the policy (and of a shared-base critic, which runs its layers).
        value_in_policy: the value model is a head on the policy's last hidden state (`value_model_init:
            policy_head`): no forward and no activations of its own (its `(B, T)` values are noise beside the
            policy's logits).
    The peak: weights + optimizer states + the largest phase, where the rollout phases (generation, each no-grad
    forward) run one at a time, the backward holds policy and value activations, the training logits and the output
    layer's gradient, and the optimizer step all gradients.
    """
    b, m, P, T = rollout_batch, micro_batch, prompt_length, max_new_tokens
    L = P + T
    policy = shapes["policy"]
    V = policy.vocab
    # A no-grad policy forward over the rollout: logits (B, T + 1, V) at the activation dtype, their float32 copy
    # (when not float32 already) and one row of log-softmax temporaries (TRL's selective_log_softmax loops rows).
    fp32_copy = 0 if act_bytes == 4 else logits_bytes(b, T, V, 4)
    logprob_fwd = logits_bytes(b, T + 1, V, act_bytes) + fp32_copy + logits_bytes(1, T, V, 4)
    # generate: the KV cache; with output_logits T float32 (B, V) tensors, then stacked into one (B, T, V)
    generation = kv_cache_bytes(policy, b, L, act_bytes) + (2 * logits_bytes(b, T, V, 4) if gen_logits else 0)
    # training: the loss keeps float32 logits (B, T, V) for backward, plus one more float32 copy at a time (the
    # entropy's scaled logits in forward, the logits' gradient in backward), plus the lm_head output when bf16.
    train_logits = 2 * logits_bytes(m, T, V, 4) + (0 if act_bytes == 4 else logits_bytes(m, T + 1, V, act_bytes))
    # bf16 autocast caches a bf16 copy of each trainable float32 weight for the step (torch.autocast weight cache)
    cache = {r: (s[1] * 2 if act_bytes == 2 and s[4] == 4 * s[1] else 0) for r, s in stats.items() if s}

    lines = []
    phases = {}
    for role in ("policy", "reference", "value", "reward"):
        st = stats.get(role)
        if st is None:
            continue
        params, trainable, dtype, weight_bytes, trainable_bytes = st
        shape = shapes.get(role)
        grads = trainable_bytes
        optimizer = 2 * trainable_bytes
        note = ""
        if role == "policy":
            peak = max(generation, logprob_fwd)
            phases["generation"] = generation
            phases["policy forward"] = logprob_fwd
            head_grad = min(trainable_bytes, V * policy.hidden * (trainable_bytes // max(trainable, 1)))
            train = saved_activation_bytes(policy, m, L, act_bytes, checkpointing) + train_logits + head_grad
        elif role == "reference":
            peak = logprob_fwd
            phases["reference forward"] = logprob_fwd
            note = "the policy with its adapter off: no weights of its own" if shape is None else ""
            train = 0
        elif role == "value" and value_in_policy:
            peak = train = 0
            note = "a head on the policy's last hidden state: no forward of its own"
        elif role == "value":
            vshape = shape or policy
            peak = no_grad_activation_bytes(vshape, b, L, act_bytes)
            phases["value forward"] = peak
            train = saved_activation_bytes(vshape, m, L, act_bytes, checkpointing and shape is None)
            note = "a critic adapter + head on the policy's base" if shape is None else ""
        else:
            peak = no_grad_activation_bytes(shape, b, L, act_bytes)
            phases["reward forward"] = peak
            train = 0
        phases["backward"] = phases.get("backward", 0) + train + cache.get(role, 0)
        phases["optimizer step"] = phases.get("optimizer step", 0) + grads
        lines.append(ModelMemory(role, params, trainable, dtype, weight_bytes, optimizer, max(peak, train), note))
    static = sum(x.weight_bytes + x.optimizer_bytes for x in lines)
    return lines, static + max(phases.values())


def reward_plan(
    shape: ModelShape,
    stat: tuple[int, int, str, int, int],
    *,
    sequences: int,
    seq_len: int,
    act_bytes: int,
    checkpointing: bool,
) -> tuple[list[ModelMemory], int]:
    """The plan of one reward-model training step per process: `sequences` (groups x responses per micro-batch) of
    `seq_len` tokens; scores are one number per token, so no vocabulary-wide logits. Returns (lines, peak bytes)."""
    params, trainable, dtype, weight_bytes, trainable_bytes = stat
    acts = saved_activation_bytes(shape, sequences, seq_len, act_bytes, checkpointing)
    cache = trainable * 2 if act_bytes == 2 and trainable_bytes == 4 * trainable else 0
    line = ModelMemory("reward", params, trainable, dtype, weight_bytes, 2 * trainable_bytes, acts)
    return [line], weight_bytes + 2 * trainable_bytes + max(acts + cache, trainable_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# Reading models, logging, the check


def model_shape(model) -> ModelShape:
    """The `ModelShape` of a transformers model (or peft model) from its text config; keys it lacks (an LSTM, remote
    code) fall back to the embedding width and one layer, one head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config

    def first(*keys, default):
        return next((v for k in keys if isinstance(v := getattr(cfg, k, None), int) and v > 0), default)

    emb = base.get_input_embeddings()
    hidden = first("hidden_size", "n_embd", "d_model", default=emb.weight.shape[1] if emb is not None else 1)
    heads = first("num_attention_heads", "n_head", default=1)
    return ModelShape(
        layers=first("num_hidden_layers", "n_layer", "num_layers", default=1),
        hidden=hidden,
        intermediate=first("intermediate_size", "n_inner", default=4 * hidden),
        heads=heads,
        kv_heads=first("num_key_value_heads", default=heads),
        vocab=first("vocab_size", default=emb.weight.shape[0] if emb is not None else 1),
        gated_mlp=any(n.endswith(("gate_proj", "gate_up_proj", "w3")) for n, _ in base.named_modules()),
    )


def param_stats(params: Iterable, seen: set[int] | None = None) -> tuple[int, int, str, int, int]:
    """(elements, trainable elements, dtype name(s), bytes, trainable bytes) of `params`, each storage once; `seen`
    (ids) skips storage already counted for another model and is updated."""
    seen = set() if seen is None else seen
    total = trainable = nbytes = tbytes = 0
    dtypes = []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = p.numel() * p.element_size()
        total += p.numel()
        nbytes += size
        if p.requires_grad:
            trainable += p.numel()
            tbytes += size
        name = str(p.dtype).removeprefix("torch.")
        if name not in dtypes:
            dtypes.append(name)
    return total, trainable, "+".join(dtypes) or "-", nbytes, tbytes


def log_plan(stage: str, lines: list[ModelMemory], peak: int, what: str) -> None:
    for x in lines:
        logger.info(
            "%s memory: %-9s %8.2fM params (%.2fM trainable), %s, weights %s, optimizer %s, peak %s%s",
            stage, x.role, x.params / 1e6, x.trainable / 1e6, x.dtype, _fmt(x.weight_bytes),
            _fmt(x.optimizer_bytes), _fmt(x.peak_bytes), f" ({x.note})" if x.note else "",
        )  # fmt: skip
    logger.info("%s memory: estimated peak %s per process (%s)", stage, _fmt(peak), what)


def check_fits(stage: str, peak: int, device, resident: int, fixes: str) -> None:
    """On CUDA, AlignError when `peak` minus what is already on the device (`resident` bytes) exceeds its free
    memory; elsewhere nothing (a CPU has no reliable free figure to refuse on)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    need = peak - resident
    if need > free:
        raise AlignError(
            f"{stage}: the memory plan estimates {_fmt(peak)} per process, {_fmt(need)} more than is on "
            f"{device} now, and it has {_fmt(free)} free of {_fmt(total)}. {fixes}"
        )


def resident_bytes(params: Iterable, device) -> int:
    """Bytes of `params` already on `device` (counted in the plan, no longer in the free memory)."""
    device = torch.device(device)
    seen: set[int] = set()
    out = 0
    for p in params:
        if id(p) not in seen and p.device.type == device.type:
            seen.add(id(p))
            out += p.numel() * p.element_size()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The CPU heap

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@functools.cache
def _mallopt():
    """glibc's `mallopt`, or None (not Linux, or a libc without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def set_malloc_mmap_threshold(nbytes: int) -> bool:
    """Have glibc's malloc map every block of `nbytes` or more on its own pages, given back to the OS when freed
    (`mallopt(M_MMAP_THRESHOLD)`, which also stops the threshold's own rise). False where there is no such call, or
    glibc refused the value (its maximum is 32 MiB on 64-bit).

    Why: by default the threshold rises by itself to 32 MiB as large blocks are freed, so nearly every activation of
    a small model comes from the heap, and a forward/backward's mix of kept and freed blocks of many sizes leaves
    holes that later blocks do not fit: the heap grows far past what is live. Mapped blocks are faulted in and
    zeroed afresh, which costs time; PyTorch's huge pages (THP_MEM_ALLOC_ENABLE=1, set before torch loads) make that
    cheap. The measurements on SmolLM2-135M PPO are in docs/memory.md and docs/measurements.md."""
    fn = _mallopt()
    if fn is None:
        return False
    return bool(fn(M_MMAP_THRESHOLD, int(nbytes)))


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"
