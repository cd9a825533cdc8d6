"""`generation_backend: vllm`: PPO rollouts sampled by a vLLM engine colocated on each training GPU.

The engine, the weight push and the sampling are TRL's (`trl.generation.vllm_generation.VLLMGeneration`, what its
GRPO runs with `vllm_mode="colocate"`): before each rollout the policy's weights, a LoRA adapter merged in, are
loaded into the engine; the engine samples the responses. align only turns its completions into the rollout's
tensors. The old logprobs still come from a forward of the policy, so the PPO ratio compares the policy with itself,
not with vLLM's kernels. Evaluation keeps transformers' `generate`.
"""

from __future__ import annotations

import torch
from trl import import_utils

from align.data.padding import pad_left
from align.errors import AlignError


def _cuda() -> bool:
    return torch.cuda.is_available()


def make_vllm_engine(policy, tokenizer, *, args, accelerator, eos_token_ids):
    """TRL's `VLLMGeneration` for `policy` with the rollout's sampling settings. AlignError, with the fix, when vLLM
    is missing, there is no GPU, or the model is sharded (FSDP)."""
    if not import_utils.is_vllm_available():
        raise AlignError(
            "ppo: generation_backend vllm needs vLLM (GPUs only): pip install 'vllm>=0.22,<=0.31' (the versions "
            "TRL 1.16 supports), or set generation_backend: transformers."
        )
    if not _cuda():
        raise AlignError("ppo: generation_backend vllm runs on CUDA GPUs only; set generation_backend: transformers.")
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise AlignError(
            f"ppo: generation_backend vllm is not supported under {accelerator.distributed_type.value} yet (its "
            "weight push would need the sharded parameters); run it on one process or under DDP, or set "
            "generation_backend: transformers."
        )
    from trl.generation.vllm_generation import VLLMGeneration  # vllm: an optional extra, imported only here

    # as align.rl.ppo.response_mask reads them: one id, several, or None (no EOS)
    stop = [] if eos_token_ids is None else [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    extra = {"stop_token_ids": stop}
    if args.min_new_tokens:
        extra["min_tokens"] = args.min_new_tokens
    return VLLMGeneration(
        policy,
        accelerator,
        tokenizer,
        mode="colocate",
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        temperature=args.temperature,
        top_p=args.top_p if args.top_p is not None else 1.0,
        top_k=args.top_k or 0,
        max_completion_length=args.max_new_tokens,
        logprobs=None,  # PPO's old logprobs come from the policy itself
        generation_kwargs=extra,
    )


def vllm_responses(engine, tokenizer, prompt_ids: list[list[int]], *, device):
    """`generate_responses`' tuple from the engine's completions: (query_responses `(B, P + T)`, prompt_mask
    `(B, P)`, responses `(B, T)` right-padded with the pad token after each one's end, None)."""
    _, completions, _, _ = engine.generate(prompt_ids, None, 1)
    if len(completions) != len(prompt_ids):
        raise AlignError(f"ppo: the vLLM engine returned {len(completions)} completions for {len(prompt_ids)} prompts")
    input_ids, prompt_mask = pad_left(prompt_ids, tokenizer.pad_token_id)
    width = max(1, max(len(c) for c in completions))
    responses = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)
    for row, ids in enumerate(completions):
        responses[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return (torch.cat([input_ids, responses], dim=1).to(device), prompt_mask.to(device), responses.to(device), None)
