"""`LikelihoodRewardModel`: the response's mean/min token log-probability on hand-computed logits, where the response
starts (one- and two-token markers, left padding, no marker), the score = head + weighted features, a save/load
round trip through AutoModelForSequenceClassification, the plain head model PPO's value model starts from, and the
generation marker read from a chat template."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from align.errors import AlignError
from align.models.modeling import generation_marker
from align.models.modeling_reward import LikelihoodRewardModel

torch.set_num_threads(1)
PAD, MARK = 0, 3


def tiny(marker=(MARK,), features=("mean", "min"), tied=True) -> LikelihoodRewardModel:
    """vocab 4 = hidden 4, embeddings = identity: the LM logits at a position are its hidden state (when tied)."""
    config = LlamaConfig(vocab_size=4, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=1, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    model = LikelihoodRewardModel.from_causal_lm(LlamaForCausalLM(config), features=features, response_marker=marker)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.eye(4))
    return model.eval()


def hidden_for(rows: list[dict[int, list[float]]], length: int) -> torch.Tensor:
    """(B, T, 4) hidden states, zero except the given positions' vectors."""
    h = torch.zeros(len(rows), length, 4)
    for b, row in enumerate(rows):
        for t, vec in row.items():
            h[b, t] = torch.tensor(vec)
    return h


def test_features_on_hand_computed_logits():
    model = tiny()
    # [bos, marker, 2, 1(eos), pad]: the response is tokens 2 and 1, predicted at positions 1 and 2
    ids = torch.tensor([[1, MARK, 2, 1, PAD]])
    # position 1: logits (0, 0, ln 3, 0) -> p(2) = 3/6; position 2: (0, ln 2, 0, 0) -> p(1) = 2/5
    h = hidden_for([{1: [0, 0, math.log(3), 0], 2: [0, math.log(2), 0, 0]}], 5)
    feats = model.features(ids, h, last=torch.tensor([3]))
    expected = [(math.log(0.5) + math.log(0.4)) / 2, math.log(0.4)]
    torch.testing.assert_close(feats, torch.tensor([expected]))


def test_response_span_markers_padding_and_absence():
    model = tiny(marker=(MARK, 2))
    ids = torch.tensor(
        [
            [1, MARK, 2, 1, 2, 1, PAD],  # two-token marker at 1-2: response = positions 3..5
            [PAD, PAD, 1, MARK, 2, 2, 1],  # left padding: marker at 3-4, response 5..6
            [1, MARK, 2, MARK, 2, 1, 1],  # the last marker counts: response 5..6
            [1, MARK, 1, 2, 1, PAD, PAD],  # no full marker: no response, features 0
        ]
    )
    last = torch.tensor([5, 6, 6, 4])
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(model.response_mask(ids, last), expected)
    feats = model.features(ids, torch.randn(4, 7, 4), last)
    assert torch.equal(feats[3], torch.zeros(2)) and (feats[:3] < 0).all()


def test_score_is_head_plus_weighted_features_and_survives_save_load(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.likelihood_weights.copy_(torch.tensor([0.3, -0.7]))
    ids = torch.tensor([[1, 2, MARK, 2, 1, PAD], [1, MARK, 1, 2, 2, 1]])
    with torch.no_grad():
        out = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids).last_hidden_state
        last = torch.tensor([4, 5])  # the last non-pad token
        head = model.score(hidden[torch.arange(2), last])
        feats = model.features(ids, hidden, last)
    torch.testing.assert_close(out, head + (feats * torch.tensor([0.3, -0.7])).sum(-1, keepdim=True))

    model.config.align_reward_offset = 0.25
    model.save_pretrained(tmp_path)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(back, LikelihoodRewardModel) and back.config.align_reward_offset == 0.25
    assert back.config.likelihood_features == ["mean", "min"] and back.config.response_marker == [MARK]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, out)

    # the plain head model (PPO's value model starts from it): the same body and head, no likelihood terms
    plain = model.to_sequence_classifier().eval()
    assert type(plain).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, head)


def test_saved_dir_loads_with_its_own_code_where_align_is_not_imported(tmp_path):
    """save_pretrained copies modeling_reward.py beside the weights (auto_map); a fresh process that never imports
    align loads the model from that copy with trust_remote_code=True and scores the same."""
    import json
    import subprocess
    import sys

    model = tiny()
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_reward.LikelihoodRewardModel"
    assert (tmp_path / "modeling_reward.py").is_file()
    ids = [[1, MARK, 2, 1, PAD], [1, 2, MARK, 1, 1]]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits[:, 0].tolist()
    code = f"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification
m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert not any(name == "align" or name.startswith("align.") for name in sys.modules)
with torch.no_grad():
    print(json.dumps([type(m).__module__, m(input_ids=torch.tensor({ids})).logits[:, 0].tolist()]))
"""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    module, scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules.") and module.endswith("modeling_reward")
    assert scores == pytest.approx(expected, abs=1e-5)


def test_untied_lm_head_is_kept():
    model = tiny(tied=False)
    assert model.lm_head is not None
    with torch.no_grad():
        model.lm_head.weight.copy_(2 * torch.eye(4))  # logits = 2 h
    ids = torch.tensor([[1, MARK, 2, 1]])
    h = hidden_for([{1: [0, 0, math.log(3) / 2, 0], 2: [0, math.log(2) / 2, 0, 0]}], 4)
    feats = model.features(ids, h, last=torch.tensor([3]))
    torch.testing.assert_close(feats[0, 1], torch.tensor(math.log(0.4)))


def test_bad_features_are_refused():
    with pytest.raises(ValueError, match="likelihood_features"):
        tiny(features=("mean", "max"))
    with pytest.raises(ValueError, match="likelihood_features"):
        tiny(features=())


def test_generation_marker_from_the_chat_template():
    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(["a", "b"])
    modeling.ensure_chat_template(tok)  # align's template: the generation prompt is `<|assistant|> `
    assert tok.convert_ids_to_tokens(generation_marker(tok)) == ["<|assistant|>"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # no generation prompt
    with pytest.raises(AlignError, match="adds no generation prompt"):
        generation_marker(tok)


def test_hub_card_usage_imports_the_registering_module(tmp_path):
    from align.hub.card import is_likelihood_reward, usage_markdown

    tiny().save_pretrained(tmp_path)
    assert is_likelihood_reward(tmp_path) and not is_likelihood_reward(tmp_path / "missing")
    usage = usage_markdown("reward", "me/tiny-reward", adapter=False, has_chat_template=True, likelihood=True)
    load = usage.index("AutoModelForSequenceClassification.from_pretrained")
    assert usage.index("import align.models.modeling_reward") < load
    assert "import align" not in usage_markdown("reward", "me/tiny-reward", adapter=False, has_chat_template=True)
