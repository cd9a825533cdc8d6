"""The one sampling path: the decode loop (`decode`), its sampler (`sample_next`), its decode-step attention, and
the policy's bf16 sampler copy with LoRA merged (`SamplerCopy`). See docs/generation.md for what each lever buys."""
