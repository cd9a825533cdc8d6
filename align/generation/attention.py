"""Attention for one new token at a time: grouped matmuls instead of SDPA's CPU flash kernel.

For a single query (a decode step), `torch.nn.functional.scaled_dot_product_attention` on CPU runs its flash kernel,
built for blocks of queries: 6.5 ms for SmolLM2's shapes (batch 64, 9 query / 3 key-value heads, 150 positions,
bf16), against 0.95 ms for two batched matmuls over the query heads grouped by their key-value head (2-core AMD
EPYC, /tmp/att.py in the measurements' notes). Scores are computed in the model's dtype and the softmax in float32,
as transformers' eager attention does. Every other call (prefill, training, dropout, a mask per head) goes to
transformers' SDPA unchanged.

Registered with transformers as the attention implementation "align_decode" (its masks are SDPA's); `decode`
switches a model to it for the duration of a call.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "align_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query `(B, H, q, D)`, key/value `(B, H_kv, L, D)`, a boolean mask
    `(B, 1, q, L)` (True = attend) or None. Returns `((B, q, H, D), None)`."""
    b, h, q_len, d = query.shape
    kv_heads = key.shape[1]
    simple_mask = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1)
    if q_len != 1 or dropout or not simple_mask or h % kv_heads or kwargs.get("position_bias") is not None \
            or kwargs.get("softcap") is not None:  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    groups = h // kv_heads
    scores = torch.matmul(query.reshape(b, kv_heads, groups, d), key.transpose(-1, -2))  # (B, H_kv, G, L)
    scores = scores.float().mul_(d**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores.masked_fill_(~attention_mask.reshape(attention_mask.shape[0], 1, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1).to(value.dtype)
    length = value.shape[2]
    # bmm over (B * H_kv): a view for a contiguous cache and for BufferLayer's, where a 4-D matmul would copy
    out = torch.bmm(probs.reshape(b * kv_heads, groups, length), value.reshape(b * kv_heads, length, d))
    return out.reshape(b, 1, h, d), None  # (B, H_kv, G, D) holds the query heads in order


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def decode_attention_for(model):
    """`model` (and its submodules) on "align_decode" inside the block when it runs SDPA; unchanged otherwise."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        yield model
        return
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
