"""`align inspect attention`: weights that are distributions and causal, entropy and Spearman on hand-computed
numbers, input x gradient against a finite difference, the PNG/HTML/JSON outputs, a reward model (plain and align's
LikelihoodRewardModel), and one-line errors."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main
from align.errors import AlignError
from align.inspect.attention import (
    attention_and_attribution,
    attention_entropy,
    default_output_dir,
    load,
    rankdata,
    spearman,
)
from align.io import write_stage_info

WORDS = ["tom", "eva", "has", "a", "red", "blue", "ball", "write", "story", "about", "."]
MAX_POSITIONS = 32
PROMPT, RESPONSE = "write a story about tom .", "tom has a red ball ."

torch.set_num_threads(1)


def _tokenizer():
    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(WORDS, model_max_length=MAX_POSITIONS)
    modeling.ensure_chat_template(tok)
    return tok


def _config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **kw,
    )


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny untrained llama (2 layers x 2 heads) saved as an "sft" stage: --prompt goes through the chat template."""
    from transformers import LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inspect") / "sft"
    LlamaForCausalLM(_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    write_stage_info(path, "sft", parent=None, recipe={}, data=None, metrics={})
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    tok = _tokenizer()
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("inspect") / "reward"
    LlamaForSequenceClassification(_config(tok, num_labels=1)).save_pretrained(path)
    tok.save_pretrained(path)
    write_stage_info(path, "reward", parent=None, recipe={}, data=None, metrics={})
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Math


def test_entropy_of_hand_made_rows():
    rows = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    # uniform over 4: -4 * 1/4 * ln(1/4) = ln 4; one-hot: 0 (0 ln 0 = 0); two halves: ln 2
    expected = torch.tensor([math.log(4), 0.0, math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(attention_entropy(rows), expected)
    # a head's entropy is the mean over its query rows: (ln 4 + 0 + ln 2) / 3 = (2 ln 2 + ln 2) / 3 = ln 2
    torch.testing.assert_close(attention_entropy(rows).mean(), torch.tensor(math.log(2), dtype=torch.float64))


def test_rankdata_averages_ties():
    # sorted: 5 (rank 1), 10 (2), 20, 20 (ranks 3 and 4 -> 3.5 each)
    torch.testing.assert_close(
        rankdata(torch.tensor([10.0, 20.0, 20.0, 5.0])), torch.tensor([2.0, 3.5, 3.5, 1.0], dtype=torch.float64)
    )


def test_spearman_with_a_tie():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4], both mean 2.5
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, .5, -.5, 1.5]; sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)   (scipy.stats.spearmanr gives 0.9486832980505138)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(
        math.sqrt(0.9)
    )
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) is None  # constant: undefined


# ---------------------------------------------------------------------------------------------------------------------
# Model


def test_weights_are_causal_distributions(lm_dir):
    model, tok, config, kind = load(str(lm_dir), device="cpu")
    assert kind == "causal_lm" and model.config._attn_implementation == "eager"
    ids = tok("tom has a red ball")["input_ids"]
    result = attention_and_attribution(model, tok, ids, kind=kind)
    n = len(ids)
    assert result.attentions.shape == (2, 2, n, n) and result.attribution.shape == (n,)
    torch.testing.assert_close(result.attentions.sum(-1), torch.ones(2, 2, n))  # every layer/head/query row
    assert torch.equal(torch.triu(result.attentions, diagonal=1), torch.zeros(2, 2, n, n))  # nothing above diagonal
    assert result.query == n - 1 and result.target["kind"] == "next_token_logit"


def test_attribution_is_input_times_gradient(lm_dir):
    """attribution[t] = e_t . dy/de_t = d/da y(embeddings with row t scaled by a) at a = 1: a central difference."""
    model, tok, _, kind = load(str(lm_dir), device="cpu")
    model = model.double()
    ids = tok("eva has a blue ball")["input_ids"]
    result = attention_and_attribution(model, tok, ids, kind=kind, target="ball")
    assert result.target["token"] == "ball"
    # eps not smaller: eager attention takes its softmax in float32 even in a float64 model (~1e-8 noise in y)
    target, t, eps = result.target["id"], 2, 1e-2

    def y(scale: float) -> float:
        def hook(module, args, output):
            output = output.clone()
            output[:, t] *= scale
            return output

        handle = model.get_input_embeddings().register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(model(input_ids=torch.tensor([ids])).logits[0, -1, target])
        finally:
            handle.remove()

    assert result.attribution[t].item() == pytest.approx((y(1 + eps) - y(1 - eps)) / (2 * eps), rel=1e-3, abs=1e-7)


def test_sdpa_model_without_weights_is_one_line_error(lm_dir):
    from transformers import LlamaForCausalLM

    tok = _tokenizer()
    model = LlamaForCausalLM.from_pretrained(lm_dir, attn_implementation="sdpa")
    with pytest.raises(AlignError, match=r"returned no attention weights \(attn_implementation='sdpa'"):
        attention_and_attribution(model, tok, tok("tom has")["input_ids"], kind="causal_lm", where="m")


# ---------------------------------------------------------------------------------------------------------------------
# Command


def _embedded(html: str) -> dict:
    blob = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


def test_cli_writes_heatmaps_page_and_correlation(lm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["inspect", "attention", str(lm_dir), "--prompt", PROMPT, "--response", RESPONSE, "--output_dir", str(out)]
    assert align_main(args) == 0
    stdout = capsys.readouterr().out
    for layer in (0, 1):
        assert (out / f"attention_layer_{layer:02d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "attention.json").read_text())
    n = len(report["tokens"])
    assert report["tokens"][:2] == ["<s>", "<|user|>"] and "<|assistant|>" in report["tokens"]  # the chat template
    assert report["query_position"] == n - 1 and len(report["attribution"]["signed"]) == n

    # the correlation, recomputed from the saved weights, is what the JSON and stdout report
    weights = load_file(out / "attention.safetensors")["attentions"]
    imp = torch.tensor(report["attribution"]["signed"]).abs()
    rho = [[spearman(weights[layer, h, n - 1], imp) for h in range(2)] for layer in range(2)]
    flat = [r for row in rho for r in row]
    assert [r for row in report["spearman"] for r in row] == pytest.approx(flat, abs=1e-4)
    mean = sum(flat) / 4
    assert report["summary"]["spearman_mean"] == pytest.approx(mean, abs=1e-4)
    assert report["summary"]["spearman_max"] == pytest.approx(max(flat), abs=1e-4)
    entropy = attention_entropy(weights).mean(-1).flatten().tolist()
    assert [e for row in report["entropy_nats"] for e in row] == pytest.approx(entropy, abs=1e-5)
    assert f"mean {mean:+.3f}" in stdout and "top-5 attended, best" in stdout and "not the explanation" in stdout

    page = (out / "attention.html").read_text()
    assert 'id="layer"' in page and 'id="head"' in page and "<script src" not in page and "http://" not in page
    data = _embedded(page)
    assert len(data["attentions"]) == 2 and len(data["attentions"][0]) == 2 and len(data["attentions"][0][0]) == n
    assert data["tokens"] == report["tokens"]


def test_skip_special_tokens_leaves_them_out_of_the_ranks(lm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        align_main(
            [
                "inspect",
                "attention",
                str(lm_dir),
                "--text",
                "tom has a red ball",
                "--skip_special_tokens",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "attention.json").read_text())
    assert report["tokens"][0] == "<s>" and report["summary"]["compared_positions"] == [1, 2, 3, 4, 5]
    assert "over 5 tokens" in capsys.readouterr().out


def test_reward_model_attributes_its_score(reward_dir, tmp_path, capsys):
    from align.evaluation.score import load_scorer

    out = tmp_path / "out"
    args = [
        "inspect",
        "attention",
        str(reward_dir),
        "--prompt",
        PROMPT,
        "--response",
        RESPONSE,
        "--output_dir",
        str(out),
    ]
    assert align_main(args) == 0
    report = json.loads((out / "attention.json").read_text())
    assert report["target"]["kind"] == "score" and report["tokens"][-1] == "</s>"  # scored at the closing EOS
    raw = load_scorer(str(reward_dir), raw=True, device="cpu")([PROMPT], [RESPONSE])[0]
    assert report["target"]["value"] == pytest.approx(raw, abs=1e-5)
    assert len(report["per_head"]) == 4 and "Spearman(attention from position" in capsys.readouterr().out
    page = (out / "attention.html").read_text()
    assert "<\\/s>" in page and _embedded(page)["tokens"][-1] == "</s>"  # escaped in the page, intact once parsed


def test_likelihood_reward_model_uses_its_base_models_weights(lm_dir, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from align.models.modeling import generation_marker
    from align.models.modeling_reward import LikelihoodRewardModel

    tok = _tokenizer()
    lm = LlamaForCausalLM.from_pretrained(lm_dir)
    path = tmp_path / "lrm"
    LikelihoodRewardModel.from_causal_lm(
        lm, features=["mean"], response_marker=generation_marker(tok)
    ).save_pretrained(path)
    tok.save_pretrained(path)
    out = tmp_path / "out"
    assert (
        align_main(
            ["inspect", "attention", str(path), "--prompt", PROMPT, "--response", RESPONSE, "--output_dir", str(out)]
        )
        == 0
    )
    assert "the weights are its base model's (LlamaModel)" in capsys.readouterr().out
    assert json.loads((out / "attention.json").read_text())["target"]["kind"] == "score"


def _one_line_error(capsys, args) -> str:
    assert align_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_errors_are_one_line(lm_dir, reward_dir, tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    assert "no such directory" in _one_line_error(
        capsys, ["inspect", "attention", str(tmp_path / "nope"), "--text", "tom", *out]
    )
    long = " ".join(["tom"] * MAX_POSITIONS)  # + BOS = 33 tokens
    msg = _one_line_error(capsys, ["inspect", "attention", str(lm_dir), "--text", long, *out])
    assert f"33 tokens, more than the model's {MAX_POSITIONS} positions" in msg
    assert "add --response" in _one_line_error(
        capsys, ["inspect", "attention", str(reward_dir), "--prompt", "tom", *out]
    )
    assert "not both" in _one_line_error(capsys, ["inspect", "attention", str(lm_dir), "--text", "a", "--prompt", "b"])
    assert "did you mean 'attention'" in _one_line_error(capsys, ["inspect", "atention"])
    assert not (tmp_path / "out").exists()


def test_help_exits_zero(capsys):
    assert align_main(["inspect", "--help"]) == 0
    assert "attention" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        align_main(["inspect", "attention", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: align inspect attention" in text and "not the explanation" in text and "attention.json" in text


def test_default_output_dir_is_outside_the_model():
    assert str(default_output_dir("runs/tiny/sft")) == "runs/inspect/runs--tiny--sft"
    assert str(default_output_dir("./runs/tiny/reward/")) == "runs/inspect/runs--tiny--reward"
    assert str(default_output_dir("HuggingFaceTB/SmolLM2-135M")) == "runs/inspect/HuggingFaceTB--SmolLM2-135M"
