"""align.data.sources: the tiny world is one more source; other names get None (load their files or Hub ids)."""

from __future__ import annotations

from align.data import sources, tinyworld


def test_other_sources_get_none():
    name = "data/prompts.jsonl"
    assert sources.pretrain_text(name, stories=10, seed=0, test_size=0.1) is None
    assert sources.demonstrations(name, n=10, seed=0, error_rate=0.3, habit_rate=0.0) is None
    assert sources.instruction_prompts(name, n=10, seed=0, prompt_only=True) is None
    assert sources.ptx_text(name, seed=0) is None
    assert sources.vocabulary(name) is None
    assert sources.entropy_floor(name, None) is None
    assert not sources.has_gold(name) and not sources.has_gold(None)
    assert sources.text_column(name, "body") == "body" and sources.tokenizer_kind(name) == "bpe"
    assert sources.task_label(name, "place") == name


def test_tiny_world_data_and_lineage():
    name = sources.DEFAULT_DATASET
    assert sources.has_gold(name) and sources.text_column(name, "body") == "text"
    assert sources.tokenizer_kind(name) == "wordlevel" and sources.task_label(name, "place") == "place"
    train, test, info = sources.pretrain_text(name, stories=40, seed=3, test_size=4)
    assert info == {"name": name, "stories": 40, "seed": 3} and (len(train), len(test)) == (36, 4)
    assert sources.rebuilds_pretrain_text(info)
    assert sources.rebuilt_pretrain_train(info, 4)["text"] == train["text"]
    ds, info = sources.instruction_prompts(name, n=8, seed=1, prompt_only=True)
    assert ds.column_names == ["prompt"] and list(info) == ["name", "seed", "fingerprint", "rows"]
    assert ds["prompt"] == tinyworld.instruction_prompts(8, seed=1)["prompt"]
    assert sources.gold_prompts(ds["prompt"]) and not sources.gold_prompts([])
    dd, info = sources.demonstrations(name, n=6, seed=2, error_rate=0.5, habit_rate=0.0)
    assert dd["train"].column_names == ["prompt", "completion"]
    assert list(info) == ["name", "seed", "flawed_rows", "habit_rows"]
