"""The LSTM baseline (issue 18): its loss on hand-checkable logits, tied weights and a save/load round trip through
AutoModelForCausalLM (and its own saved code), generation with left padding and its (h, c) cache, the pretrain stage
with `model_type: lstm` (pipeline-loadable, resumable), sizes at a parameter budget, and the copy-by-distance probe on
a hand-made text."""

import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.errors import AlignError
from align.inspect.copy_probe import copy_loss_by_distance, copy_positions
from align.models.modeling import wordlevel_tokenizer
from align.models.modeling_lstm import LSTMForCausalLM, LSTMLMConfig, lstm_parameters, lstm_sizes_for

torch.set_num_threads(1)
PAD, BOS, EOS = 0, 1, 2


def tiny(vocab: int = 12, hidden: int = 8, layers: int = 2, seed: int = 0) -> LSTMForCausalLM:
    """A small LSTM with weights drawn wide enough (N(0, 0.5)) that greedy generation picks varied tokens."""
    config = LSTMLMConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)  # fmt: skip
    torch.manual_seed(seed)
    model = LSTMForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def test_loss_is_the_shifted_cross_entropy_of_its_logits():
    model = tiny()
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 3, 4, 9, 2]])
    labels = ids.clone()
    labels[1, 3] = -100  # ignored, as HF causal LMs ignore -100
    out = model(input_ids=ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 12), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)  # fmt: skip
    torch.testing.assert_close(out.loss, manual)
    # Zero embeddings: the tied output projection gives logits 0 everywhere, so p = 1/V and the loss is log V.
    with torch.no_grad():
        model.embed_tokens.weight.zero_()
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, torch.zeros_like(out.logits))
    torch.testing.assert_close(out.loss, torch.tensor(math.log(12)))


def test_forget_gate_starts_at_one_and_the_head_is_the_embedding():
    config = LSTMLMConfig(vocab_size=12, hidden_size=8, num_hidden_layers=2)
    model = LSTMForCausalLM(config)
    for layer in range(2):
        bias = getattr(model.lstm, f"bias_ih_l{layer}")  # gates i, f, g, o
        torch.testing.assert_close(bias[8:16], torch.ones(8))
        torch.testing.assert_close(bias[:8], torch.zeros(8))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == lstm_parameters(8, 12, 2)


def test_save_load_round_trip_keeps_logits_and_tied_storage(tmp_path):
    from safetensors import safe_open

    model = tiny()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()  # tied: stored once
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "align_lstm"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lstm.LSTMForCausalLM"
    assert (tmp_path / "modeling_lstm.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LSTMForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 6, 7, 8, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_saved_dir_loads_with_its_own_code_where_align_is_not_imported(tmp_path):
    """A fresh process that never imports align loads the model from the copied modeling_lstm.py."""
    import subprocess
    import sys

    model = tiny()
    model.save_pretrained(tmp_path)
    ids = [[1, 5, 6, 7]]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits[0, -1].tolist()
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert not any(name == "align" or name.startswith("align.") for name in sys.modules)
with torch.no_grad():
    print(json.dumps([type(m).__module__, m(input_ids=torch.tensor({ids})).logits[0, -1].tolist()]))
"""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    module, logits = json.loads(out.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules.") and module.endswith("modeling_lstm")
    assert logits == pytest.approx(expected, abs=1e-5)


def test_padding_never_enters_the_state():
    model = tiny()
    row = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        alone = model(input_ids=row).logits
        left = model(input_ids=torch.tensor([[0, 0, 1, 5, 6, 7]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
        right = model(input_ids=torch.tensor([[1, 5, 6, 7, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(left.logits[:, 2:], alone)
    torch.testing.assert_close(right.logits[:, :4], alone)
    for a, b in zip(left.cache, right.cache, strict=True):  # the state after the last real token, either way
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="contiguous"):
        model(input_ids=torch.tensor([[1, 0, 5]]), attention_mask=torch.tensor([[1, 0, 1]]))


def test_generate_with_left_padding_matches_each_row_alone():
    model = tiny()
    rows = [[1, 5, 6, 7, 3], [1, 9, 4]]
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}
    batch = torch.tensor([rows[0], [PAD, PAD, *rows[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    with torch.no_grad():
        together = model.generate(input_ids=batch, attention_mask=mask, **kw)
        recomputed = model.generate(input_ids=batch, attention_mask=mask, use_cache=False, **kw)
        for i, row in enumerate(rows):
            alone = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row)), **kw)
            assert together[i, -8:].tolist() == alone[0, -8:].tolist()
    assert torch.equal(together, recomputed)  # carrying (h, c) = rereading the whole text at every step
    assert len(set(together[0, -8:].tolist())) > 1  # a real test: greedy does not repeat one token
    # With a state, only the new token is fed.
    state = model(input_ids=batch, attention_mask=mask).cache
    step = model.prepare_inputs_for_generation(together[:, :6], attention_mask=torch.ones(2, 6), cache=state)
    assert step["input_ids"].tolist() == together[:, 5:6].tolist() and step["cache"] is state


def test_beam_search_reorders_the_state_and_runs_without_a_cache():
    # Beam search keeps the best beams each step: their (h, c) must follow them (`_reorder_cache`), so the cached
    # result equals rereading each beam's whole text; with use_cache=False there is no state to reorder (was a crash).
    model = tiny()
    batch, mask = torch.tensor([[1, 5, 6, 7], [0, 1, 9, 4]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}
    with torch.no_grad():
        cached = model.generate(input_ids=batch, attention_mask=mask, **kw)
        recomputed = model.generate(input_ids=batch, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


def test_sizes_for_a_parameter_budget():
    # the tiny Transformer (recipes/tiny/pretrain.yaml): 869,632 parameters over a 129-token vocabulary
    for params, vocab, layers in [(869_632, 129, 2), (869_632, 129, 1), (5_000_000, 8192, 2), (30_000, 50, 3)]:
        sizes = lstm_sizes_for(params, vocab, layers)
        assert sizes["num_hidden_layers"] == layers
        assert lstm_parameters(sizes["hidden_size"], vocab, layers) == pytest.approx(params, rel=0.05)
    assert lstm_sizes_for(869_632, 129, 2) == {"hidden_size": 229, "num_hidden_layers": 2}
    with pytest.raises(ValueError):
        lstm_sizes_for(0, 129)


def test_new_causal_lm_refuses_a_transformer_key():
    from align.models.modeling import new_causal_lm

    tok = wordlevel_tokenizer(["a", "b"])
    model = new_causal_lm("lstm", {"hidden_size": 16, "num_hidden_layers": 1}, tok, 32)
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    with pytest.raises(AlignError, match="did you mean 'num_hidden_layers'"):
        new_causal_lm("lstm", {"num_hidden_layer": 2}, tok, 32)


def test_copy_positions_and_distances():
    # a b a c b a: a repeats at 2 (from 0) and 5 (from 2, its last occurrence); b at 4 (from 1)
    assert copy_positions([7, 8, 7, 9, 8, 7], {7, 8}) == [(2, 2), (4, 3), (5, 3)]


class _StubLM(torch.nn.Module):
    """Logits 0 everywhere (p = 1/V), except after `the`, where `red` gets log(V - 1):
    p(red) = (V-1) / ((V-1) + (V-1) * e^0) = 1/2."""

    def __init__(self, vocab: int, the: int, red: int):
        super().__init__()
        self.vocab, self.the, self.red = vocab, the, red
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.red] += (input_ids == self.the).float() * math.log(self.vocab - 1)
        return type("Out", (), {"logits": logits})


def test_copy_loss_by_distance_on_a_hand_made_text():
    tok = wordlevel_tokenizer(["red", "tom", "has", "a", "ball", "the", "."])
    v = len(tok)
    model = _StubLM(v, tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("red"))
    # <s>0 red1 tom2 has3 a4 ball5 .6 tom7 has8 the9 red10 ball11 .12: tom@7 copies tom@2 (d 5), red@10 red@1 (d 9).
    # <s>0 tom1 tom2 .3: tom@2, d 1. Near (d <= 5): tom@7 and tom@2, each at p 1/V; far (d >= 9): red@10 at p 1/2.
    texts = ["red tom has a ball . tom has the red ball .", "tom tom ."]
    out = copy_loss_by_distance(model, tok, texts, near=5, far=9, batch_size=2)  # one batch: the second row padded
    assert out == {"near": pytest.approx(math.log(v)), "far": pytest.approx(math.log(2)), "n_near": 2, "n_far": 1}
    # between near and far: neither bucket
    out = copy_loss_by_distance(model, tok, texts, near=4, far=10, batch_size=1)
    assert (out["n_near"], out["n_far"]) == (1, 0) and math.isnan(out["far"])


# ---------------------------------------------------------------------------------------------------------------------
# The pretrain stage

TINY = {
    "model_type": "lstm",
    "model_config": {"hidden_size": 24, "num_hidden_layers": 2, "dropout": 0.1},
    "tinyworld_stories": 200,
    "dataset_test_size": 0.1,
    "max_length": 64,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 2,
    "eval_strategy": "no",
    "num_samples": 2,
    "sample_max_new_tokens": 8,
    "dataloader_num_workers": 0,
}


def _run(tmp_path, **over):
    import yaml

    from align.config import parse_config
    from align.stages.pretrain import run

    recipe = tmp_path / "pretrain_lstm.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out"), **over}))
    return run(parse_config("pretrain", ["--config", str(recipe)]))


def test_pretrain_stage_trains_an_lstm_that_loads_in_a_pipeline_and_resumes(tmp_path, caplog):
    from transformers import pipeline

    out = _run(tmp_path, max_steps=4)
    first = json.loads((out / "align_stage.json").read_text())
    assert first["model"]["type"] == "align_lstm"
    m = first["metrics"]
    assert 0 < m["entropy_floor"] < m["eval_loss"] and m["copy_tokens_near"] > 0 and m["copy_loss_near"] > 0
    assert (out / "model.safetensors").is_file() and (out / "modeling_lstm.py").is_file()
    gen = pipeline("text-generation", model=str(out))  # align.models.modeling_lstm is imported: the type is registered
    assert gen("tom", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("tom")

    with caplog.at_level(logging.INFO, logger="align.io"):
        out = _run(tmp_path, max_steps=6)
    assert f"Resuming from {out / 'checkpoint-4'}" in caplog.text
    info = json.loads((out / "align_stage.json").read_text())
    steps = [h["step"] for h in info["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # the step count continued from the checkpoint
    before = [h for h in first["log_history"] if "loss" in h]
    assert [h for h in info["log_history"] if "loss" in h][:4] == before  # steps 1-4 come from the checkpoint


def test_report_shows_the_lstm_beside_the_transformer(tmp_path):
    from align.evaluation.report import headline, headline_lines, load_stages, metrics_table

    for stage, loss, far in (("pretrain", 0.95, 0.63), ("pretrain_lstm", 0.96, 1.50)):
        (tmp_path / stage).mkdir()
        metrics = {"eval_loss": loss, "entropy_floor": 0.86, "copy_loss_near": 0.5, "copy_loss_far": far}
        info = {"stage": "pretrain", "metrics": metrics, "model": {"parameters": 870_000}}
        (tmp_path / stage / "align_stage.json").write_text(json.dumps(info))
    stages = load_stages(tmp_path)
    assert list(stages) == ["pretrain", "pretrain_lstm"]
    rows = {(r["stage"], r["metric"]): r["value"] for r in metrics_table(stages)}
    assert rows[("pretrain_lstm", "copy_loss_far")] == 1.50 and rows[("pretrain", "eval_loss")] == 0.95
    lines = headline_lines(headline(tmp_path, stages))
    assert lines == [
        "Transformer: held-out loss 0.9500 (floor 0.8600), 0.87M parameters; copy loss near 0.500, far 0.630 nats.",
        "LSTM baseline: held-out loss 0.9600 (floor 0.8600), 0.87M parameters; copy loss near 0.500, far 1.500 nats.",
    ]
