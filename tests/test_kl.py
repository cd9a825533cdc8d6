"""align.evaluation.kl: the KL every method's row of a comparison reports."""

import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from align.evaluation.kl import answer_logprobs, sampled_kl, trim_answers
from align.models import modeling

# A "model" whose next-token distribution depends only on the previous token: row = previous token.
PROBS = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(PROBS.log())

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])


def test_answer_logprobs_by_hand():
    # prompt [0], answer [1, 2]: log p(1|0) + log p(2|1) = log .3 + log .25
    # prompt [2, 2, 0], answer [2]: log p(2|0) = log .5 (the first row is left-padded by one: the offsets must hold)
    got = answer_logprobs(Bigram(), [[0], [2, 2, 0]], [[1, 2], [2]], pad_token_id=1)
    assert got == pytest.approx([math.log(0.3) + math.log(0.25), math.log(0.5)])
    # batches of one give the same (no padding at all)
    assert answer_logprobs(Bigram(), [[0], [2, 2, 0]], [[1, 2], [2]], pad_token_id=1, batch_size=1) == (
        pytest.approx(got)
    )


def test_trim_answers_keeps_the_first_eos():
    tokens = torch.tensor([[5, 1, 9, 9], [5, 5, 5, 5], [7, 4, 1, 1]])
    assert trim_answers(tokens, 1) == [[5, 1], [5, 5, 5, 5], [7, 4, 1]]
    assert trim_answers(tokens, [1, 7]) == [[5, 1], [5, 5, 5, 5], [7]]


def _tiny():
    torch.manual_seed(0)
    tok = modeling.wordlevel_tokenizer("a b c d e f".split())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return tok, LlamaForCausalLM(cfg)


PROMPTS = ["a b", "c d e", "f", "b b a c"]


def test_kl_to_itself_is_zero():
    tok, model = _tiny()
    out = sampled_kl(model, tok, PROMPTS, reference=model, max_new_tokens=6, chat=False, seed=3)
    assert out["kl_per_prompt"] == [0.0] * len(PROMPTS)
    assert out["answer_tokens"] >= 1


def test_adapters_off_is_the_reference():
    tok, model = _tiny()
    base = LlamaForCausalLM(model.config)
    base.load_state_dict(model.state_dict())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    via_adapters = sampled_kl(peft_model, tok, PROMPTS, max_new_tokens=6, chat=False, seed=3)
    via_copy = sampled_kl(peft_model, tok, PROMPTS, reference=base, max_new_tokens=6, chat=False, seed=3)
    assert via_adapters["kl_per_prompt"] == pytest.approx(via_copy["kl_per_prompt"], abs=1e-5)
    assert any(abs(k) > 1e-3 for k in via_adapters["kl_per_prompt"])  # the adapters moved the model
    assert via_adapters["kl_low"] <= via_adapters["kl"] <= via_adapters["kl_high"]


def test_no_reference_needs_a_peft_model():
    tok, model = _tiny()
    with pytest.raises(ValueError, match="peft model"):
        sampled_kl(model, tok, PROMPTS, max_new_tokens=2, chat=False)
