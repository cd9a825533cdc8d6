"""Gold evaluation (`align.evaluation.gold_eval`): sampled answers are scored per prompt by their mean, sampling is
seeded without moving the caller's random state, and greedy decoding cannot be asked for several answers."""

import pytest
import torch

from align import evaluation
from align.data import tinyworld


class _Model(torch.nn.Module):
    """Stands in for a causal LM: gold_eval only reads `training` (and `device` when present)."""


def _fake_generate(answers: dict[str, list[str]], calls: list[dict]):
    def generate(model, tokenizer, prompts, **kw):
        calls.append({**kw, "draw": torch.rand(1).item()})  # consumes the global RNG, as sampling does
        return [answers[p][: kw["num_return_sequences"]] for p in prompts]

    return generate


def test_sampled_gold_eval_scores_each_prompt_by_the_mean_of_its_answers(monkeypatch):
    prompts = evaluation.heldout_prompts(20)
    p0 = next(p for p in prompts if p.startswith("read :"))  # a question: its gold answer is known
    p1 = next(p for p in prompts if p != p0)
    good0 = tinyworld.gold_answer(tinyworld.parse_prompt(p0))
    answers = {p0: ["", good0], p1: ["", ""]}  # an empty answer scores 0 (the labeler's contract)
    calls: list[dict] = []
    monkeypatch.setattr("align.generate.generate", _fake_generate(answers, calls))

    out = evaluation.gold_eval(_Model(), None, [p0, p1], temperature=1.0, samples_per_prompt=2)

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
    (p,) = evaluation.heldout_prompts(1)
    calls: list[dict] = []
    monkeypatch.setattr("align.generate.generate", _fake_generate({p: ["a .", "b ."]}, calls))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for seed in (5, 5, 6):
        evaluation.gold_eval(_Model(), None, [p], temperature=1.0, samples_per_prompt=2, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert calls[0]["draw"] == calls[1]["draw"] != calls[2]["draw"]


def test_several_greedy_answers_are_refused():
    with pytest.raises(ValueError, match="samples_per_prompt=2 at temperature=0"):
        evaluation.gold_eval(_Model(), None, ["x"], temperature=0.0, samples_per_prompt=2)
