"""The one sampling path: the decode loop (`decode`), its sampler (`sample_next`) and its decode-step attention. PPO's
bf16 sampler copy with LoRA merged is `align.trainers.ppo_sampler.SamplerCopy`. See docs/generation.md for what each
lever buys."""
