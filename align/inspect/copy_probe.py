"""Copy loss by distance: how well a language model repeats an entity it read near vs far back in the same text.

The lecture's case against RNNs: a fact read d tokens ago reaches an LSTM only through d gated updates of its
memory cell, while attention looks it up directly at any distance. Tiny-world texts introduce entities and name them
again (`a red ball ... the red ball`, `in the park ... in the park`, the hero's and friends' names): a *copy* is a
token that repeats a content word (color, place, name) seen earlier in the same text, at distance d = its position
minus the word's last earlier position. `copy_loss_by_distance` is the model's mean loss on copies with d <= `near`
and on those with d >= `far`; the gap far - near is what distance costs the model.

Not every copy is fully predictable (a name may come back as a pronoun; `goes to the park` may revisit a place by
chance), but the same mixture is in both buckets and both models, so the comparison is fair; the counts say how
many tokens each mean covers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from align.data.tinyworld_grammar import COLORS, NAMES, PLACES

NEAR = 8  # measured on 2,000 tiny-world documents: 40% of the copies are within 8 tokens of their source,
FAR = 24  # 7% at 24 or more (texts are ~32 words, at most ~60): ~280 far copies in the tiny recipe's 1,000 eval texts


def copy_words() -> frozenset[str]:
    """The tiny world's content words a text copies: its colors, places and names."""
    return frozenset((*COLORS, *PLACES, *NAMES))


def copy_positions(ids: Sequence[int], content: set[int] | frozenset[int]) -> list[tuple[int, int]]:
    """`(position, distance)` of every token of `ids` that repeats an earlier `content` token; the distance is to the
    token's last earlier occurrence (the nearest source a model can copy from)."""
    last: dict[int, int] = {}
    out = []
    for i, t in enumerate(ids):
        if t in content:
            if t in last:
                out.append((i, i - last[t]))
            last[t] = i
    return out


def copy_loss_by_distance(
    model,
    tokenizer,
    texts: Iterable[str],
    *,
    near: int = NEAR,
    far: int = FAR,
    words: Iterable[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Mean loss (nats) of `model` on copied tokens at distance <= `near` and >= `far`, over `texts` read one by one
    as in pretraining (`BOS text`, each text alone, so a copy's source is always in view).

    Args:
        texts: documents, e.g. the tiny world's held-out pretraining texts.
        words: the content words whose repeats count as copies (default `copy_words()`); a token is one when it
            decodes to such a word (word-level and BPE tokenizers alike).
        max_length: texts are cut to their first `max_length` tokens (the model's context, e.g. the block size).
    Returns `{"near": nats, "far": nats, "n_near": tokens, "n_far": tokens}`; a mean over no token is NaN.
    """
    import torch  # start-up: stage_metrics (chain, cards, `align push`) reads FAR/NEAR from here without torch

    if not 0 < near < far:
        raise ValueError(f"copy_loss_by_distance: near {near}, far {far}; need 0 < near < far")
    words = frozenset(words) if words is not None else copy_words()
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [([bos] if bos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs = [s[:max_length] for s in seqs if len(s) > 1] if max_length else [s for s in seqs if len(s) > 1]
    decoded: dict[int, bool] = {}
    for s in seqs:
        for t in s:
            if t not in decoded:
                decoded[t] = tokenizer.decode([t]).strip() in words
    content = frozenset(t for t, ok in decoded.items() if ok)

    sums = {"near": 0.0, "far": 0.0}
    counts = {"near": 0, "far": 0}
    was_training = model.training
    model.eval()
    device = getattr(model, "device", torch.device("cpu"))
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start : start + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(batch):  # right padding: a causal model's real positions never see the pads
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for row, s in enumerate(batch):
                for i, d in copy_positions(s, content):
                    bucket = "near" if d <= near else "far" if d >= far else None
                    if bucket:
                        sums[bucket] -= float(logp[row, i - 1, s[i]])  # token i is predicted at position i - 1
                        counts[bucket] += 1
    if was_training:
        model.train()
    return {
        "near": sums["near"] / counts["near"] if counts["near"] else math.nan,
        "far": sums["far"] / counts["far"] if counts["far"] else math.nan,
        "n_near": counts["near"],
        "n_far": counts["far"],
    }
