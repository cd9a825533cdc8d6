"""The short verifiable task (`make_prompts(task="short")`): the 9 kinds a response settles early, balanced, brief
requests, held-out topics."""

import json
from collections import Counter

import pytest

from align.data import verifiable as v
from align.errors import AlignError


@pytest.mark.parametrize("split", ["train", "test"])
def test_short_prompts_hold_one_or_two_compatible_short_kinds_balanced(split):
    rows = v.make_prompts(300, split=split, seed=3, task="short")
    counts = Counter(c["kind"] for r in rows for c in r["constraints"])
    assert set(counts) == set(v.SHORT_KINDS)
    # The least used kind goes first, so the counts stay within a few of each other (300 prompts, ~450 constraints).
    assert max(counts.values()) - min(counts.values()) <= 3, counts
    sizes = Counter(len(r["constraints"]) for r in rows)
    assert set(sizes) == {1, 2} and min(sizes.values()) > 100, sizes
    for r in rows:
        constraints = [v.from_dict(c) for c in r["constraints"]]
        assert v.compatible(constraints)
        # the checker reads back exactly what was rendered
        assert [c.to_dict() for c in v.parse_constraints(r["prompt"])] == r["constraints"]
        assert "," not in r["prompt"].split(constraints[0].instruction())[0]  # the request holds no comma


def test_short_test_split_holds_out_topics_and_has_25_per_kind_in_200():
    test = v.make_prompts(200, split="test", seed=0, task="short")
    train = v.make_prompts(1000, split="train", seed=1, task="short")
    assert not {r["topic"] for r in test} & {r["topic"] for r in train}
    assert min(Counter(c["kind"] for r in test for c in r["constraints"]).values()) >= 25


def test_short_task_is_seeded_and_leaves_the_full_task_alone():
    assert v.make_prompts(30, seed=2, task="short") == v.make_prompts(30, seed=2, task="short")
    assert v.make_prompts(30, seed=2, task="short") != v.make_prompts(30, seed=3, task="short")
    assert v.make_prompts(30, seed=2) == v.make_prompts(30, seed=2, task="full")
    assert v.make_prompts(30, seed=2) != v.make_prompts(30, seed=2, task="short")
    with pytest.raises(AlignError, match="unknown task 'tiny'"):
        v.make_prompts(3, task="tiny")


def test_main_writes_the_short_task(tmp_path):
    out = tmp_path / "short.jsonl"
    assert v.main(["--task", "short", "--split", "test", "--n", "12", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == v.make_prompts(12, split="test", task="short")
    assert all(c["kind"] in v.SHORT_KINDS for r in rows for c in r["constraints"])
