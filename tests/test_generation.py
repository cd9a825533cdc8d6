"""align.generation: the sampler's draw, the filters, the decode loop against transformers' generate, the buffer
cache, the decode attention and the merged sampler copy. Tiny random Llama models, fp32, no downloads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from align.generation.attention import decode_attention
from align.generation.decode import DecodeStats, common_prefix_length, decode, length_batches
from align.generation.sampling import filter_logits, sample_next
from align.trainers.ppo_sampler import SamplerCopy


def tiny_llama(seed: int = 0, vocab: int = 40):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def hf_greedy(model, prompts, max_new_tokens, eos=None):
    """transformers' generate, greedy, left-padded: the reference the decode loop must match token for token."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)  # fmt: skip
    return out[:, width:]


# --- the draw ---------------------------------------------------------------------------------------------------


def test_sample_next_draws_from_the_softmax_chi_square():
    # 6 tokens, probabilities p = softmax(logits); 60,000 draws in rows of a batch. chi^2 with 5 degrees of freedom:
    # P(chi^2 > 20.5) = 0.001, so a correct sampler fails this 1 time in 1000 seeds; seed 0 is fixed.
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    logits = p.log().expand(60_000, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, generator=g)
    counts = torch.bincount(draws, minlength=6).double()
    expected = p.double() * 60_000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (chi2, counts)
    # and a wrong distribution (uniform) is rejected by the same statistic: it can fail
    uniform = torch.full((6,), 10_000.0, dtype=torch.double)
    assert float(((uniform - expected) ** 2 / expected).sum()) > 20.5


def test_sample_next_temperature_and_greedy():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [1/4, 3/4] at T=1; at T=2: [1, sqrt 3] / (1 + sqrt 3)
    g = torch.Generator().manual_seed(1)
    draws = sample_next(logits.expand(40_000, -1), temperature=2.0, generator=g)
    share = draws.float().mean().item()
    assert abs(share - math.sqrt(3) / (1 + math.sqrt(3))) < 0.01  # 0.634; the T=1 share, 0.75, is far outside
    assert sample_next(torch.tensor([[0.1, 2.0, -1.0]]), temperature=0).tolist() == [1]


def test_filtered_tokens_are_never_drawn():
    # top-k 2 keeps tokens 0 and 1 of [3, 2, 1, 0]; every other token has weight 0 and cannot be drawn
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(5000, -1)
    draws = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    kept = filter_logits(logits, top_k=2)
    assert torch.isinf(kept[0, 2:]).all() and torch.equal(kept[0, :2], logits[0, :2])
    # probabilities of [0., log .5, log .3, log .2] are [.0.. ] -> use exact ones: p = [.5, .3, .15, .05]
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # top_p 0.7: mass before each token = [0, .5, .8, .95]; kept while < 0.7 -> tokens 0, 1
    assert torch.isinf(filter_logits(p.log(), top_p=0.7)).tolist() == [[False, False, True, True]]
    # top_p 0.5: mass before token 1 is 0.5, not < 0.5 -> token 0 alone
    assert torch.isinf(filter_logits(p.log(), top_p=0.5)).tolist() == [[False, True, True, True]]
    # in another order, the same tokens by value
    assert torch.isinf(filter_logits(p.log()[:, [2, 0, 3, 1]], top_p=0.7)).tolist() == [[True, False, True, False]]


# --- helpers ----------------------------------------------------------------------------------------------------


def test_length_batches_and_common_prefix():
    assert length_batches([3, 5, 1, 5], 2) == [[1, 3], [0, 2]]  # longest first, stable among equals
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    # each prompt keeps one token of its own: identical prompts share all but their last
    assert common_prefix_length([[7, 8, 9], [7, 8, 9]]) == 2
    assert common_prefix_length([[1], [1, 2]]) == 0


# --- the decode loop against generate -----------------------------------------------------------------------------


PROMPTS = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11], [5, 6, 7, 12, 13, 14, 15, 16], [5, 6, 3]]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_decode_greedy_matches_generate(share_prefix):
    model = tiny_llama()
    ref = hf_greedy(model, PROMPTS, 12)
    stats = DecodeStats()
    got = decode(model, PROMPTS, max_new_tokens=12, eos_token_ids=None, pad_token_id=0, temperature=0,
                 batch_size=3, share_prefix=share_prefix, stats=stats)  # fmt: skip
    assert torch.equal(got, ref)
    # the prefix all 4 share, [5, 6], is computed once per batch (2 batches) instead of once per prompt:
    # 21 prompt tokens - 4 x 2 + 2 x 2 = 17
    assert stats.prefill_tokens == (17 if share_prefix else 21)


def test_decode_k_answers_are_prompt_major_and_equal_when_greedy():
    model = tiny_llama()
    ref = hf_greedy(model, PROMPTS, 8)
    got = decode(model, PROMPTS, max_new_tokens=8, eos_token_ids=None, pad_token_id=0, temperature=0,
                 num_return_sequences=3, batch_size=6)  # fmt: skip
    assert got.shape == (12, 8)
    for j in range(3):
        assert torch.equal(got[j::3], ref)


def test_decode_stops_rows_at_eos_and_pads_after():
    model = tiny_llama()
    free = hf_greedy(model, PROMPTS, 12)
    eos = int(free[0, 3])  # the 4th greedy token of prompt 0 becomes an end token
    ref = hf_greedy(model, PROMPTS, 12, eos=eos)
    stats = DecodeStats()
    got = decode(model, PROMPTS, max_new_tokens=12, eos_token_ids=[eos], pad_token_id=0, temperature=0,
                 compact_fraction=0.0, stats=stats)  # fmt: skip
    # generate pads with pad_token_id after EOS as well; decode's width is the longest answer's
    assert torch.equal(got, ref[:, : got.shape[1]])
    first = int((free[0] == eos).nonzero()[0])  # where row 0 first draws it (index 3 or before)
    assert got[0, first] == eos and (got[0, first + 1 :] == 0).all()
    assert stats.compactions >= 1
    assert stats.row_steps < 4 * got.shape[1]  # the ended rows stopped costing


def test_decode_logprobs_are_the_models():
    model = tiny_llama()
    tokens, lps = decode(model, PROMPTS[:2], max_new_tokens=5, eos_token_ids=None, pad_token_id=0, temperature=0.7,
                         logprobs=True, generator=torch.Generator().manual_seed(0))  # fmt: skip
    for r, prompt in enumerate(PROMPTS[:2]):
        seq = torch.tensor([prompt + tokens[r].tolist()])
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1 : -1] / 0.7
        expect = torch.log_softmax(logits, -1).gather(-1, tokens[r][:, None]).squeeze(-1)
        torch.testing.assert_close(lps[r], expect, rtol=1e-4, atol=1e-4)


def test_decode_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, :, :, :3] = False  # left padding in row 1

    class Attn(torch.nn.Module):
        num_key_value_groups = 3

    out, _ = decode_attention(Attn(), q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_sampler_copy_merged_adapter_gives_the_policys_greedy_tokens():
    model = tiny_llama(seed=1)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                              init_lora_weights=False))  # fmt: skip
    copy = SamplerCopy(policy, dtype=torch.float32)
    kw = dict(max_new_tokens=10, eos_token_ids=None, pad_token_id=0, temperature=0)
    assert torch.equal(decode(copy.model, PROMPTS, **kw), decode(policy, PROMPTS, **kw))
    # the adapter matters (the copy is not simply the base model) ...
    with policy.disable_adapter():
        base_tokens = decode(policy, PROMPTS, **kw)
    assert not torch.equal(base_tokens, decode(copy.model, PROMPTS, **kw))
    # ... and sync follows a changed adapter
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)
    copy.sync()
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        torch.testing.assert_close(copy.model(x).logits, policy(x).logits)


@pytest.mark.parametrize(
    "model_type,sizes",
    [("llama", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}),
     ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2})],
)  # fmt: skip
def test_generate_backends_agree_when_greedy(model_type, sizes):
    # align.generation.generate, the path of rank, gold evaluation and best-of-n: both backends, the same answers
    from align.generation.generate import generate
    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(["good", "bad", "a", "b", "c", "d"])
    torch.manual_seed(0)
    model = modeling.new_causal_lm(model_type, sizes, tok, max_length=64).eval()
    modeling.set_generation_defaults(model, tok)
    prompts = ["a b c", "good", "d d a b"]
    kw = dict(chat=False, max_new_tokens=7, temperature=0.0, batch_size=2)
    ours = generate(model, tok, prompts, backend="align", **kw)
    assert ours == generate(model, tok, prompts, backend="transformers", **kw)
    assert len(ours) == 3 and all(len(g) == 1 and g[0] for g in ours)
    # K greedy answers per prompt (generate refuses them; align's loop returns K copies of the one answer)
    assert generate(model, tok, prompts, backend="align", num_return_sequences=2, **kw) == [g * 2 for g in ours]


def test_sampler_copy_of_a_full_policy_is_the_policy():
    # no adapter (full fine-tuning): the copy holds the policy's own weights, tied embeddings included
    model = tiny_llama(seed=2)
    copy = SamplerCopy(model, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)
    copy.sync()
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(copy.model(x).logits, model(x).logits)
