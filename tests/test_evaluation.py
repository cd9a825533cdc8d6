"""Gold evaluation (`gold.gold_eval`): sampled answers are scored per prompt by their mean, sampling is
seeded without moving the caller's random state, and greedy decoding cannot be asked for several answers."""

import pytest
import torch

from align.data import tinyworld
from align.evaluation import gold


class _Model(torch.nn.Module):
    """Stands in for a causal LM: gold_eval only reads `training` (and `device` when present)."""


def _fake_generate(answers: dict[str, list[str]], calls: list[dict]):
    def generate(model, tokenizer, prompts, **kw):
        calls.append({**kw, "draw": torch.rand(1).item()})  # consumes the global RNG, as sampling does
        return [answers[p][: kw["num_return_sequences"]] for p in prompts]

    return generate


def test_sampled_gold_eval_scores_each_prompt_by_the_mean_of_its_answers(monkeypatch):
    prompts = gold.heldout_prompts(20)
    p0 = next(p for p in prompts if p.startswith("read :"))  # a question: its gold answer is known
    p1 = next(p for p in prompts if p != p0)
    good0 = tinyworld.gold_answer(tinyworld.parse_prompt(p0))
    answers = {p0: ["", good0], p1: ["", ""]}  # an empty answer scores 0 (the labeler's contract)
    calls: list[dict] = []
    monkeypatch.setattr("align.generation.generate.generate", _fake_generate(answers, calls))

    out = gold.gold_eval(_Model(), None, [p0, p1], temperature=1.0, samples_per_prompt=2)

    s = tinyworld.score(p0, good0)
    assert s > 0.9
    assert out["gold_scores"] == pytest.approx([s / 2, 0.0])
    assert out["gold_score"] == pytest.approx(s / 4)
    assert calls[0]["num_return_sequences"] == 2 and calls[0]["temperature"] == 1.0
    # pass rates are over all four answers; the examples show each prompt's first answer
    task = tinyworld.score_details(p0, good0)["task"]
    assert out["gold_pass_rates"]["task"] == pytest.approx(task / 4)
    assert [e["response"] for e in out["samples"]] == ["", ""]


def test_sampling_is_seeded_and_leaves_the_callers_random_state_alone(monkeypatch):
    (p,) = gold.heldout_prompts(1)
    calls: list[dict] = []
    monkeypatch.setattr("align.generation.generate.generate", _fake_generate({p: ["a .", "b ."]}, calls))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for seed in (5, 5, 6):
        gold.gold_eval(_Model(), None, [p], temperature=1.0, samples_per_prompt=2, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert calls[0]["draw"] == calls[1]["draw"] != calls[2]["draw"]


def test_several_greedy_answers_are_refused():
    with pytest.raises(ValueError, match="samples_per_prompt=2 at temperature=0"):
        gold.gold_eval(_Model(), None, ["x"], temperature=0.0, samples_per_prompt=2)


# ---------------------------------------------------------------------------------------------------------------------
# Any checker: `gold_labeler: module:function` (or file.py:function), pass rates per constraint kind from score_detail

LENGTH_LABELER = """
def score(prompt, response):
    return min(len(response.split()) / 4, 1.0)


def score_detail(prompt, response):
    n = len(response.split())
    return {"constraints": [{"kind": "nonempty", "passed": n > 0}, {"kind": "short", "passed": 0 < n <= 2}]}


def broken(prompt, response):
    return "high"
"""


def test_function_labeler_scores_and_pass_rates_per_constraint_kind(tmp_path, monkeypatch):
    (tmp_path / "length.py").write_text(LENGTH_LABELER)
    monkeypatch.chdir(tmp_path)
    labeler = gold.load_gold_labeler("length.py:score")
    answers = {"p0": ["a b", "a b c d e"], "p1": ["", "a"]}
    monkeypatch.setattr("align.generation.generate.generate", _fake_generate(answers, []))

    out = gold.gold_eval(_Model(), None, ["p0", "p1"], temperature=1.0, samples_per_prompt=2, labeler=labeler)

    # p0: (2/4 + 1) / 2 = .75; p1: (0 + 1/4) / 2 = .125
    assert out["gold_scores"] == pytest.approx([0.75, 0.125])
    # nonempty: 3 of 4 answers; short (1-2 words): "a b" and "a"
    assert out["gold_pass_rates"] == {"nonempty": 0.75, "short": 0.5}
    assert out["gold_pass_counts"] == {"nonempty": 4, "short": 4}  # 2 prompts x 2 answers, both kinds on each
    assert out["samples"][0] == {"prompt": "p0", "response": "a b", "gold_score": 0.5}


def test_verifiable_checker_reports_the_constraint_kinds_of_its_prompt():
    from align.data import verifiable

    labeler = gold.load_gold_labeler("align.data.verifiable:score")
    prompts = [r["prompt"] for r in verifiable.make_prompts(6, split="test", seed=1)]
    score, kinds = labeler.check(prompts[0], "Rain falls.")
    assert score == verifiable.score(prompts[0], "Rain falls.")
    assert set(kinds) == {c["kind"] for c in verifiable.score_detail(prompts[0], "Rain falls.")["constraints"]}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("length", r"expected 'gold' \(tiny world\), 'package.module:function'"),
        ("no_such_module_xyz:score", "gold_labeler no_such_module_xyz:score: cannot import module"),
        ("length.py:missing", "has no function 'missing'"),
        ("nope.py:score", "no such file nope.py"),
    ],
)
def test_bad_gold_labeler_is_one_align_error(tmp_path, monkeypatch, spec, message):
    from align.errors import AlignError

    (tmp_path / "length.py").write_text(LENGTH_LABELER)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AlignError, match=message):
        gold.load_gold_labeler(spec)


def test_a_labeler_returning_no_number_names_it(tmp_path, monkeypatch):
    from align.errors import AlignError

    (tmp_path / "length.py").write_text(LENGTH_LABELER)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AlignError, match=r"gold_labeler length.py:broken: returned 'high'"):
        gold.load_gold_labeler("length.py:broken").score("p", "r")


def test_labeler_and_prompts_come_together_off_the_tiny_world():
    from types import SimpleNamespace

    from align.errors import AlignError

    def cfg(**kw):
        base = {"gold_labeler": None, "gold_eval_dataset": None, "dataset_name": "data.jsonl"}
        return SimpleNamespace(**{**base, **kw})

    assert gold.resolved_gold_labeler(cfg(dataset_name="tinyworld")) == "gold"
    assert gold.resolved_gold_labeler(cfg()) is None  # own data, no checker: no gold eval
    assert gold.resolved_gold_labeler(cfg(gold_labeler="m:f", gold_eval_dataset="t.jsonl")) == "m:f"
    with pytest.raises(AlignError, match="no held-out prompts"):
        gold.resolved_gold_labeler(cfg(gold_labeler="m:f"))
    with pytest.raises(AlignError, match="no gold_labeler"):
        gold.resolved_gold_labeler(cfg(gold_eval_dataset="t.jsonl"))
