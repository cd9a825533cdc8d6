"""The gold-evaluation cache: a fixed model's scores on the same prompts and settings are computed once across runs."""

import json
import os

from align.evaluation import gold


def test_computed_once_then_read_back(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    calls = []

    def compute():
        calls.append(1)
        return {"gold_scores": [0.5, 1.0], "responses": ["a", "b"]}

    key = {"model": gold.model_fingerprint(str(weights)), "prompts": ["p", "q"], "seed": 0}
    first, source1 = gold.cached_gold_eval(key, compute)
    second, source2 = gold.cached_gold_eval(dict(key), compute)
    assert calls == [1] and first == second == {"gold_scores": [0.5, 1.0], "responses": ["a", "b"]}
    assert source1 == "computed" and source2.startswith(os.environ["ALIGN_CACHE_DIR"])
    # other prompts, or the model file rewritten (its size or mtime changes), are another entry
    gold.cached_gold_eval({**key, "prompts": ["p"]}, compute)
    assert calls == [1, 1]
    weights.write_bytes(b"GGUF v2")
    gold.cached_gold_eval({**key, "model": gold.model_fingerprint(str(weights))}, compute)
    assert calls == [1, 1, 1]


def test_damaged_entry_is_recomputed_and_rewritten():
    calls = []
    key = {"model": {"path": "/m", "files": [["m.gguf", 4, 1]]}, "prompts": ["p"]}
    gold.cached_gold_eval(key, lambda: calls.append(1) or {"s": 1})
    (entry,) = list(gold.gold_eval_cache_dir().glob("*.json"))
    entry.write_text("{not json")
    result, source = gold.cached_gold_eval(key, lambda: calls.append(1) or {"s": 2})
    assert (result, source, calls) == ({"s": 2}, "computed", [1, 1])
    assert json.loads(entry.read_text())["result"] == {"s": 2}


def test_no_cache_without_a_fingerprint_or_when_turned_off(monkeypatch, tmp_path):
    calls = []
    for _ in range(2):
        gold.cached_gold_eval(None, lambda: calls.append(1) or {})
    assert calls == [1, 1]
    monkeypatch.setenv("ALIGN_GOLD_EVAL_CACHE", "0")
    key = {"model": {"path": "/m", "files": []}}
    for _ in range(2):
        gold.cached_gold_eval(key, lambda: calls.append(1) or {})
    assert calls == [1, 1, 1, 1] and not gold.gold_eval_cache_dir().exists()


def test_model_fingerprint(tmp_path):
    assert gold.model_fingerprint("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a Hub id: not cached
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3)
    (tmp_path / "config.json").write_text("{}")
    fp = gold.model_fingerprint(str(tmp_path))
    assert fp["path"] == str(tmp_path.resolve()) and [f[:2] for f in fp["files"]] == [["model.safetensors", 3]]
    assert gold.model_fingerprint(str(tmp_path / "empty")) is None
    assert gold.source_digest("align.data.verifiable:score") == gold.source_digest("align.data.verifiable")
    assert gold.source_digest("no_such_module_xyz:f") is None


def test_parent_key_leaves_out_the_training_data_when_prompts_and_labeler_are_named(tmp_path):
    from types import SimpleNamespace

    from align.evaluation.compare import GoldSettings, parent_cache_key

    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    labeler = SimpleNamespace(name="align.data.verifiable:score")
    settings = GoldSettings(labeler, ["p", "q"], max_new_tokens=8, temperature=0.0, samples=0, batch_size=64, seed=42,
                            generation_backend="align")  # fmt: skip
    model = SimpleNamespace(dtype="torch.float32")
    named = {"gold_eval_dataset": "test.jsonl", "gold_labeler": labeler.name, "tinyworld_seed": 0}

    def key(**recipe):
        return parent_cache_key(settings, model, str(weights), recipe)

    # PPO's prompts and DPO's rankings as the training data: one key, so one evaluation of the parent
    assert key(dataset_name="ppo_prompts.jsonl", **named) == key(dataset_name="runs/rank", **named)
    assert "dataset_name" not in key(dataset_name="ppo_prompts.jsonl", **named)["settings"]
    # without a prompts file the held-out prompts come from the training data: it stays in the key
    assert key(dataset_name="a", tinyworld_seed=0) != key(dataset_name="b", tinyworld_seed=0)
    # the decoding and the batch still part the keys; a Hub id has no key
    other = GoldSettings(labeler, ["p", "q"], max_new_tokens=8, temperature=0.0, samples=0, batch_size=16, seed=42,
                         generation_backend="align")  # fmt: skip
    assert parent_cache_key(other, model, str(weights), named) != key(**named)
    assert parent_cache_key(settings, model, "HuggingFaceTB/SmolLM2-135M-Instruct", named) is None
