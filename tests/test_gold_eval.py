"""Gold evaluation in `align ppo` with any checker (`gold_labeler: file.py:function` on `gold_eval_dataset`): the
parent and the policy answer the same held-out prompts, align_stage.json keeps what the tiny world keeps (per-prompt
scores, greedy and sampled, and the greedy answers), the report's headline shows the win-rate; a bad spec is one
line."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_stages import save_stage, tiny_policy, tiny_reward_model  # tests/ is on sys.path

from align.errors import AlignError
from align.evaluation.gold import win_rate
from align.io import read_stage_info

WORDS = "tom amy is in the park shop kitchen where ? . has a new red lamp write one sentence about read : question"
# The checker of the test: a tenth per answer word found in the prompt, up to 10 (answers here are 8 tokens long, so
# a plain word count would score every answer alike).
LABELER = """
def score(prompt, response):
    return min(sum(w in prompt.split() for w in response.split()), 10) / 10
"""
PROMPTS = [f"where is {name} ? write one sentence about the {place} ." for name in ("tom", "amy")
           for place in ("park", "shop", "kitchen", "lamp")]  # fmt: skip


def words_score(prompt: str, response: str) -> float:
    return min(sum(w in prompt.split() for w in response.split()), 10) / 10


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """As tests/test_ppo_stage.py: an untrained tiny llama policy saved as an "sft" stage (no gold scores stored, so
    the parent is scored here) and a tiny llama reward model as a "reward" stage, one word-level tokenizer."""

    from align.models import modeling

    root = tmp_path_factory.mktemp("stages")
    tok = modeling.wordlevel_tokenizer(WORDS.split() + [str(i) for i in range(10)])
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    policy = tiny_policy(tok, sizes)
    with torch.no_grad():  # larger weights: greedy answers differ from prompt to prompt (at init, all are one token)
        for p in policy.parameters():
            if p.dim() == 2:
                p.mul_(8)
    sft = save_stage(root / "sft", policy, tok, "sft")
    reward = save_stage(root / "reward", tiny_reward_model(tok, sizes), tok, "reward",
                        parent={"stage": "sft", "path": str(sft)})  # fmt: skip
    return {"sft": sft, "reward": reward}


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """Working dir with prompts.jsonl (8 prompts, train and held out) and words.py (the checker)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "words.py").write_text(LABELER)
    return tmp_path


def recipe(stages, out: Path, **over) -> dict:
    base = {
        "model_name_or_path": str(stages["sft"]),
        "reward_model_path": str(stages["reward"]),
        "output_dir": str(out),
        "dataset_name": "prompts.jsonl",
        "gold_labeler": "words.py:score",
        "gold_eval_dataset": "prompts.jsonl",
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "num_mini_batches": 2,
        "num_ppo_epochs": 1,
        "max_new_tokens": 8,
        "learning_rate": 1e-3,
        "gold_eval_prompts": 8,
        "gold_eval_max_new_tokens": 8,
        "gold_eval_samples": 2,
        "per_device_eval_batch_size": 8,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "num_sample_generations": 0,
        "seed": 3,
    }
    return {**base, **over}


def test_checker_scores_parent_and_policy_per_prompt_and_the_report_shows_the_win_rate(data, stages):
    from align.config import parse_config
    from align.evaluation.report import write_report
    from align.stages.ppo import run

    root = data / "run"
    out = run(parse_config("ppo", [], overrides=recipe(stages, root / "ppo")))
    info = read_stage_info(out)

    assert info["gold_labeler"] == "words.py:score"
    # Greedy: the stored scores are the checker's on the stored answers, prompt by prompt, for both models.
    for who in ("parent_gold", "gold"):
        answers = info[f"{who}_responses"]
        assert len(answers) == len(info[f"{who}_scores"]) == len(PROMPTS), who
        assert info[f"{who}_scores"] == [words_score(p, r) for p, r in zip(PROMPTS, answers, strict=True)], who
    assert len(set(info["parent_gold_scores"])) > 1  # the check above is not on eight empty answers
    assert info["metrics"]["parent_gold_score"] == pytest.approx(sum(info["parent_gold_scores"]) / 8)
    assert info["metrics"]["gold_score"] == pytest.approx(sum(info["gold_scores"]) / 8)
    assert info["metrics"]["gold_win_rate"] == win_rate(info["gold_scores"], info["parent_gold_scores"])
    # Sampled (2 answers per prompt at temperature 1, as on the tiny world): per-prompt means, in the checker's range.
    for key in ("parent_gold_scores_sampled", "gold_scores_sampled"):
        assert len(info[key]) == 8 and all(0.0 <= s <= 1.0 for s in info[key]), key
    assert info["metrics"]["gold_win_rate_sampled"] == win_rate(info["gold_scores_sampled"],
                                                                info["parent_gold_scores_sampled"])  # fmt: skip

    report_md, _, report_json = write_report(root, {"examples": 0})
    top = json.loads(report_json.read_text())["headline"]
    assert top["gold_win_rate_ppo_vs_parent"] == info["metrics"]["gold_win_rate"]
    assert top["gold_win_rate_ppo_vs_parent_sampled"] == info["metrics"]["gold_win_rate_sampled"]
    rate = info["metrics"]["gold_win_rate"]
    assert (f"PPO beats its parent (sft) on {rate:.1%} of 8 held-out prompts (checker words.py:score, ties count "
            "half)") in report_md.read_text()  # fmt: skip


def test_best_of_n_keeps_the_reward_models_favourite_and_the_checker_scores_it(data, stages):
    from align.config import parse_config
    from align.evaluation.best_of_n import pick_best
    from align.evaluation.best_of_n import run as best_of_n
    from align.evaluation.report import write_report
    from align.evaluation.score import load_scorer
    from align.stages.ppo import run

    assert pick_best([[0.1, 0.3, 0.3], [-1.0, -2.0], [5.0]]) == [1, 0, 0]  # the first of tied maxima
    root = data / "run"
    out = run(parse_config("ppo", [], overrides=recipe(stages, root / "ppo", gold_eval_samples=0)))
    result = best_of_n(str(out), n=3, batch_size=8)
    assert json.loads((root / "best_of_3.json").read_text()) == result
    groups, rewards, picked = result["responses"], result["rewards"], result["picked"]
    assert [len(g) for g in groups] == [3] * 8 and len({r for g in groups for r in g}) > 8  # sampled, not greedy
    reward = load_scorer(str(stages["reward"]))
    for prompt, group, scores, i, gold in zip(PROMPTS, groups, rewards, picked, result["gold_scores_best_of_n"],
                                              strict=True):  # fmt: skip
        assert scores == pytest.approx(reward([prompt] * 3, group), abs=1e-5)
        assert scores[i] == max(scores) and gold == words_score(prompt, group[i])
    info = read_stage_info(out)
    assert result["win_rate_vs_parent_greedy"] == win_rate(result["gold_scores_best_of_n"], info["parent_gold_scores"])
    assert result["gold_score_sampled"] == pytest.approx(
        sum(words_score(p, r) for p, g in zip(PROMPTS, groups, strict=True) for r in g) / 24
    )
    with pytest.raises(AlignError, match="not a finished `align ppo` stage"):
        best_of_n(str(stages["reward"]))

    # PPO straight on a base model: the report names the parent by the Hub id the stage recorded (model_hub_id)
    stage_file = out / "align_stage.json"
    info["parent"] = {"model": str(data / "SmolLM2-135M-Instruct.Q4_1.gguf"), "hub_id": "org/instruct"}
    stage_file.write_text(json.dumps(info))
    report_md, _, report_json = write_report(root, {"examples": 0})
    assert "PPO beats its parent (org/instruct) on" in report_md.read_text()
    best = json.loads(report_json.read_text())["headline"]["best_of_n"]
    assert (best["n"], best["gold_score"]) == (3, result["gold_score_best_of_n"])
    assert (f"best-of-3 by the reward model from PPO's parent (no training, 3x the samples): mean score "
            f"{result['gold_score_best_of_n']:.3f}") in report_md.read_text()  # fmt: skip


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"gold_labeler": "no_such_checker.py:score"}, "error: gold_labeler no_such_checker.py:score: cannot import"),
        ({"gold_labeler": "words.py:missing"}, "error: gold_labeler words.py:missing: module 'words.py' has no "),
        ({"gold_labeler": "words"}, "error: gold_labeler 'words': expected 'gold' (tiny world)"),
        # a config error (PPOStageConfig.__post_init__), so it names the recipe file
        ({"gold_eval_dataset": None}, "error: {recipe}: ppo: gold_labeler 'words.py:score' needs held-out prompts"),
    ],
)
def test_bad_gold_labeler_is_one_line_and_exit_2(data, stages, capsys, over, message):
    from align.cli import main

    path = data / "ppo.yaml"
    path.write_text(yaml.safe_dump({**recipe(stages, data / "out"), **over}))
    capsys.readouterr()
    assert main(["ppo", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(recipe=path)), lines
    assert not (data / "out" / "align_stage.json").exists()
