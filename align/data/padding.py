"""Token-id lists -> padded `(N, T)` batches: right padding for the reward model and PPO-ptx, left padding for the
prompts PPO generates from (generation appends on the right)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_right(
    seqs: Sequence[Sequence[int]], pad_token_id: int, multiple: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both `(N, T)`, right-padded to the longest sequence (rounded up to `multiple`)."""
    length = max(len(s) for s in seqs)
    if multiple:
        length = -(-length // multiple) * multiple
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def pad_left(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both `(N, T)`, left-padded to the longest sequence."""
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            input_ids[i, length - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            attention_mask[i, length - len(s) :] = 1
    return input_ids, attention_mask
