"""One decode loop for every sampling job: rank's K answers, PPO's rollouts, gold evaluation and best-of-n.

What it does that `model.generate` does not, each lever measured alone by `scripts/bench_generate.py`:
- the next token is one inverse-CDF draw per row (`align.generation.sampling`), not `torch.multinomial`;
- the prompts' common prefix (a chat template's system turn) is computed once per batch, and each prompt once for
  its K answers, then copied in the KV cache: `generate` computes every row's whole prompt;
- the KV cache is written in place into buffers sized for the answer (`BufferLayer`), not grown by `torch.cat`;
- prompts are sorted by length and batched, so a batch pads little (answers come back in the caller's order);
- a row that ends (EOS) leaves the batch and its KV cache once enough rows have ended, so it stops costing;
- no logits processors, stopping criteria or per-step output bookkeeping: one forward, one draw.

The model runs as given: a bf16 copy for speed is the caller's choice (PPO: `align.trainers.ppo_sampler.SamplerCopy`).
Attention masks with padding between the shared prefix and a prompt's own tokens are ordinary 2-D masks; position
ids count real tokens only, so each row sees the positions it would see alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from align.generation.attention import decode_attention_for
from align.generation.sampling import sample_next


@dataclass
class DecodeStats:
    """What `decode` computed: `new_tokens` kept (up to and including EOS), `prefill_tokens` prompt tokens run
    through the model (after sharing), `row_steps` rows x decode steps (the decode's cost), `compactions` times
    ended rows left the batch."""

    new_tokens: int = 0
    prefill_tokens: int = 0
    row_steps: int = 0
    compactions: int = 0


class BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers of `capacity` positions, written in place; `keys` and
    `values` are `(B, H, L, D)` views of the filled part. `DynamicLayer.update` concatenates, copying the whole cache
    at every step (a tenth of a SmolLM2 decode step at batch 64).

    Keys are stored transposed, `(B, H, D, capacity)`: the filled part, `[..., :L]`, is then a plain strided matrix
    per head that a matmul reads as it is, where a slice of `(B, H, capacity, D)` made it copy (0.39 against 0.65 ms
    per layer for SmolLM2's scores at batch 64, 150 positions, 2-core AMD EPYC)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def _views(self) -> None:
        self.keys = self.buf_kt[..., : self.length].transpose(-1, -2)
        self.values = self.buf_v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self.buf_kt = key_states.new_empty((b, h, d, self.capacity))
            self.buf_v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self.device, self.is_initialized = key_states.device, True
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"BufferLayer: {end} positions exceed the capacity of {self.capacity}")
        self.buf_kt[..., self.length : end] = key_states.transpose(-1, -2)
        self.buf_v[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def _rebuild(self, fn) -> None:
        if self.is_initialized:
            self.buf_kt, self.buf_v = fn(self.buf_kt), fn(self.buf_v)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda x: x.repeat_interleave(repeats, dim=0))

    def expand_batch(self, rows: int) -> None:
        """A one-row cache (the shared prefix) as `rows` rows."""
        self._rebuild(lambda x: x.expand(rows, -1, -1, -1).clone())


def buffer_cache(model, capacity: int) -> DynamicCache:
    """A `DynamicCache` of `BufferLayer`s when every layer of `model` is plain full attention; otherwise (sliding
    windows, linear attention) transformers' own `DynamicCache`, which `BufferLayer` does not replace."""
    cache = DynamicCache(config=model.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers) and cache.layers:
        cache.layers = [BufferLayer(capacity) for _ in cache.layers]
    return cache


def eos_list(eos_token_ids: int | Sequence[int] | None) -> list[int]:
    """EOS ids as a list, whether given as one id, several or None (as `align.rl.ppo.response_mask` reads them)."""
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    return [int(i) for i in eos_token_ids]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of `lengths` in batches of at most `batch_size`, longest first, so each batch holds prompts of about
    one length (a stable sort: equal lengths keep their order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (its last token's logits start the
    answer)."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(n, 0)


@torch.no_grad()
def decode(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    num_return_sequences: int = 1,
    batch_size: int = 64,
    compact_fraction: float = 0.125,
    share_prefix: bool = True,
    generator: torch.Generator | None = None,
    stats: DecodeStats | None = None,
    logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Answers to `prompt_ids`, `(N * num_return_sequences, T)` with `T <= max_new_tokens`: prompt i's answers are
    rows `i*K .. i*K + K-1` (as `generate` returns them), each ending at its first EOS (kept) and right-padded with
    `pad_token_id` after it.

    Args:
        model: a causal LM (transformers), in eval mode, on the device the tokens should live on.
        temperature: 0 = greedy. top_k, top_p: 0 and 1.0 = off. min_new_tokens: EOS cannot be drawn before.
        batch_size: rows (prompts x answers) per batch; prompts are batched by length.
        compact_fraction: ended rows leave the batch (and the KV cache) once they are this share of it; 0 = at
            every step where one ends.
        share_prefix: compute the prompts' common prefix once per batch, and each prompt once for its K answers.
        generator: the random stream of the draws (default: torch's global one).
        stats: filled with what was computed, when given.
        logprobs: also return the sampler's log-probability of each drawn token `(N * K, T)` (0 after EOS), from
            the logits at `temperature` before top-k/top-p, as PPO's learner computes them.
    """
    k = num_return_sequences
    if k < 1 or max_new_tokens < 1 or not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("decode: needs prompts of at least one token, max_new_tokens >= 1, num_return_sequences >= 1")
    device = next(model.parameters()).device
    eos = torch.tensor(eos_list(eos_token_ids), dtype=torch.long, device=device)
    stats = stats if stats is not None else DecodeStats()
    prefix = common_prefix_length(prompt_ids) if share_prefix else 0
    out = torch.full((len(prompt_ids) * k, max_new_tokens), pad_token_id, dtype=torch.long)
    out_lp = torch.zeros((len(prompt_ids) * k, max_new_tokens)) if logprobs else None
    width = 1
    per_batch = max(1, batch_size // k)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    with decode_attention_for(model), warnings.catch_warnings():
        # transformers 5.25 renames `past_key_values` to `cache` (5.40 drops it); earlier 5.x know only the former
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        for batch in length_batches([len(p) for p in prompt_ids], per_batch):
            prompts = [list(prompt_ids[i]) for i in batch]
            tokens, lp = _decode_batch(model, prompts, k, share_prefix, prefix, max_new_tokens, pad_token_id, device,
                                       eos, sampling, min_new_tokens, compact_fraction, stats, logprobs)
            rows = [i * k + j for i in batch for j in range(k)]
            out[rows, : tokens.shape[1]] = tokens
            if out_lp is not None:
                out_lp[rows, : lp.shape[1]] = lp
            width = max(width, tokens.shape[1])
    return (out[:, :width], out_lp[:, :width]) if out_lp is not None else out[:, :width]


def _decode_batch(model, prompts, k, share_prefix, prefix, max_new_tokens, pad_token_id, device, eos, sampling,
                  min_new_tokens, compact_fraction, stats, logprobs):  # fmt: skip
    """One length-batched chunk of prompts: their answers `(len(prompts) * k, steps)`, prompt-major, and their
    logprobs (or None)."""
    if not share_prefix:  # generate's way: every row computes its whole prompt
        prompts, k = [p for p in prompts for _ in range(k)], 1
    cache, logits, attn = _prefill(model, prompts, prefix, k, max_new_tokens, pad_token_id, device, stats)
    return _decode_steps(model, cache, logits, attn, max_new_tokens=max_new_tokens, eos=eos, pad=pad_token_id,
                         sampling=sampling, min_new_tokens=min_new_tokens, compact_fraction=compact_fraction,
                         stats=stats, logprobs=logprobs)  # fmt: skip


def _prefill(model, prompts, prefix, k, max_new_tokens, pad, device, stats):
    """The KV cache, last-position logits `(B * k, V)` and 2-D attention mask after the prompts: the `prefix`
    tokens they share once, then each prompt's own tokens left-padded, then each row repeated `k` times."""
    n = len(prompts)
    own = [p[prefix:] for p in prompts]
    width = max(len(p) for p in own)
    cache = buffer_cache(model, prefix + width + max_new_tokens)
    if prefix:
        model(input_ids=torch.tensor([prompts[0][:prefix]], device=device), past_key_values=cache, use_cache=True,
              logits_to_keep=1)  # fmt: skip
        stats.prefill_tokens += prefix
        for layer in cache.layers:
            if isinstance(layer, BufferLayer):
                layer.expand_batch(n)
            else:
                layer.keys, layer.values = (x.expand(n, -1, -1, -1).contiguous() for x in (layer.keys, layer.values))
    ids = torch.full((n, width), pad, dtype=torch.long)
    attn = torch.zeros((n, prefix + width), dtype=torch.long)
    attn[:, :prefix] = 1
    for r, p in enumerate(own):
        ids[r, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        attn[r, prefix + width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp_(min=0)[:, prefix:]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]  # fmt: skip
    stats.prefill_tokens += sum(len(p) for p in own)
    if k > 1:
        cache.batch_repeat_interleave(k)
        logits, attn = logits.repeat_interleave(k, dim=0), attn.repeat_interleave(k, dim=0)
    return cache, logits, attn


def _decode_steps(model, cache, logits, attn, *, max_new_tokens, eos, pad, sampling, min_new_tokens, compact_fraction,
                  stats, logprobs):  # fmt: skip
    """One token per step for the rows still going; `(B, steps)` tokens, pad after each row's EOS, and their
    logprobs `(B, steps)` (or None)."""
    n = logits.shape[0]
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=logits.device)
    lps = torch.zeros((n, max_new_tokens), device=logits.device) if logprobs else None
    temperature = sampling["temperature"] if sampling["temperature"] > 0 else 1.0
    rows = torch.arange(n, device=logits.device)  # the rows still in the cache, as indices into `tokens`
    ended = torch.zeros(n, dtype=torch.bool, device=logits.device)  # per row in the cache
    last = attn.sum(-1) - 1  # each row's last position
    steps = 0
    for t in range(max_new_tokens):
        if t < min_new_tokens and eos.numel():
            logits[:, eos] = float("-inf")
        nxt = sample_next(logits, **sampling)
        live = ~ended  # a row that ended but is still in the cache keeps computing; its draws are not kept
        tokens[rows[live], t] = nxt[live]
        if lps is not None:
            lp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
            lps[rows[live], t] = lp[live]
        stats.new_tokens += int(live.sum())
        stats.row_steps += rows.numel()
        steps = t + 1
        if eos.numel():
            ended |= torch.isin(nxt, eos)
        n_ended = int(ended.sum())
        if n_ended == rows.numel() or steps == max_new_tokens:
            break
        if n_ended and n_ended >= compact_fraction * rows.numel():
            keep = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, attn, last, nxt, ended = rows[keep], attn[keep], last[keep], nxt[keep], ended[keep]
            stats.compactions += 1
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        last = last + 1
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=last[:, None], past_key_values=cache,
                       use_cache=True).logits[:, -1]  # fmt: skip
    return tokens[:, :steps].cpu(), (lps[:, :steps].cpu() if lps is not None else None)
