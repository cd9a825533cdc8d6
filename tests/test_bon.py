"""`align bon`: the pick on hand-written rewards (ties: the first), the KL bound by hand, the oracle and random picks,
resumable sampling, a tiny stage run that writes align_stage.json and shows up in the report, and one-line errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_stages import save_stage, tiny_policy, tiny_reward_model  # tests/ is on sys.path

from align.errors import AlignError
from align.evaluation import best_of_n
from align.evaluation.best_of_n import Choices, choose, kl_bound, pick_best
from align.evaluation.gold import GoldLabeler, win_rate
from align.io import read_stage_info

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = "tom amy is in the park shop kitchen where ? . has a new red lamp write one sentence about read : question"
# The SFT parent's per-prompt gold scores on the 8 held-out prompts, greedy and sampled, as `align sft` stores them.
PARENT_GOLD = [0.0, 0.0, 0.25, 0.25, 0.5, 0.0, 0.0, 0.0]
PARENT_GOLD_SAMPLED = [0.0, 0.125, 0.25, 0.0, 0.5, 0.0, 0.0, 0.0625]


# ---------------------------------------------------------------------------------------------------------------------
# The math, by hand


def test_pick_best_keeps_the_highest_reward_and_the_first_of_ties():
    # [.1, .3, .3]: .3 at 1 and 2, the first wins; [-1, -2]: -1 at 0; one answer: itself; all tied: the first
    assert pick_best([[0.1, 0.3, 0.3], [-1.0, -2.0], [5.0], [2.0, 2.0, 2.0, 2.0]]) == [1, 0, 0, 0]


@pytest.mark.parametrize(
    ("n", "bound"),
    [
        (1, 0.0),  # log 1 - 0/1 = 0: one sample is the policy itself
        (2, 0.1931471805599453),  # log 2 - 1/2 = 0.693147 - 0.5
        (4, 0.6362943611198906),  # log 4 - 3/4 = 1.386294 - 0.75
    ],
)
def test_kl_bound_by_hand(n, bound):
    assert kl_bound(n) == pytest.approx(bound, abs=1e-12)


def test_kl_to_parent_is_the_bound_only_for_the_policy_itself():
    from align.stages.bon import kl_metrics

    # n = 4: log 4 - 3/4 = 0.636294; at temperature 0.7 the answers come from another distribution than the policy's
    assert kl_metrics(4, 1.0) == {"kl_bound": kl_bound(4), "kl_to_parent": kl_bound(4)}
    assert kl_metrics(4, 0.7) == {"kl_bound": pytest.approx(0.6362943611198906)}


def test_kl_bound_refuses_n_below_one():
    with pytest.raises(ValueError, match="n >= 1"):
        kl_bound(0)


def test_choices_pick_oracle_and_random_on_hand_written_scores():
    # Two prompts, n = 2, two draws each: answers [a0 a1 | a2 a3].
    prompts = ["p", "q"]
    answers = [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]]
    rewards = {"a0": 0.5, "a1": 0.2, "a2": 1.0, "a3": 1.0, "b0": -1.0, "b1": 0.0, "b2": 3.0, "b3": 2.0}
    gold = {"a0": 0.0, "a1": 1.0, "a2": 0.5, "a3": 0.25, "b0": 1.0, "b1": 0.5, "b2": 0.0, "b3": 0.75}

    def reward(ps, rs):
        assert ps == ["p"] * 4 + ["q"] * 4  # each answer with its own prompt
        return [rewards[r] for r in rs]

    found = choose(prompts, answers, n=2, reward=reward, labeler=GoldLabeler("hand", lambda p, r: (gold[r], {})))
    # p: draw 1 picks a0 (.5 > .2), draw 2 a2 (1.0 = 1.0, the first); q: b1 (0 > -1), b2 (3 > 2)
    assert found.picks == [[0, 2], [1, 2]]
    # picked gold: p (0 + .5) / 2 = .25; q (.5 + 0) / 2 = .25
    assert found.picked() == [0.25, 0.25]
    # oracle: p (max(0, 1) + max(.5, .25)) / 2 = .75; q (max(1, .5) + max(0, .75)) / 2 = .875
    assert found.oracle() == [0.75, 0.875]
    # random: the mean of the four; p (0 + 1 + .5 + .25) / 4 = .4375; q (1 + .5 + 0 + .75) / 4 = .5625
    assert found.random() == [0.4375, 0.5625]
    # rewards of the picks: p (.5 + 1) / 2 = .75; q (0 + 3) / 2 = 1.5; mean rewards p 2.7 / 4, q 4 / 4
    assert found.picked_reward() == [0.75, 1.5]
    assert found.mean_reward() == pytest.approx([0.675, 1.0])
    # the same answers as best-of-4 once: p picks a2 (1.0 = 1.0 at 2 and 3, the first), gold .5; q picks b2, gold 0
    four = Choices.pick(4, found.rewards, found.gold)
    assert four.picks == [[2], [2]] and four.picked() == [0.5, 0.0] and four.oracle() == [1.0, 1.0]
    assert four.random() == found.random()  # a random pick does not depend on n
    with pytest.raises(ValueError, match="multiple of n=3"):
        Choices.pick(3, found.rewards, found.gold)


def test_choose_needs_a_multiple_of_n_answers():
    with pytest.raises(ValueError, match="multiple of n=2"):
        choose(["p"], [["a", "b", "c"]], n=2, reward=lambda p, r: [0.0] * len(r), labeler=GoldLabeler("x", None))


def test_compare_puts_the_picks_beside_the_parent():
    from align.evaluation.compare import ParentScores
    from align.stages.bon import compare

    # one draw of n = 2 per prompt; picks: prompt 0 answer 1 (gold 1), prompt 1 answer 0 (gold 0)
    found = Choices(n=2, picks=[[1], [0]], rewards=[[0.0, 1.0], [2.0, 1.0]], gold=[[0.5, 1.0], [0.0, 1.0]])
    parent = ParentScores(scores=[1.0, 0.0], sampled=[0.5, 0.5])
    metrics, extra = compare(found, parent)
    assert metrics["gold_score"] == 0.5 and metrics["parent_gold_score"] == 0.5  # (1 + 0) / 2 both
    assert metrics["gold_win_rate"] == 0.5  # 1 = 1 tie (half), 0 = 0 tie (half): (0.5 + 0.5) / 2
    assert metrics["gold_win_rate_sampled"] == 0.5  # 1 > .5 win, 0 < .5 loss
    assert metrics["gold_score_random"] == 0.625  # (.75 + .5) / 2
    assert metrics["gold_score_oracle"] == 1.0
    assert metrics["oracle_gap_closed"] == pytest.approx(-1 / 3)  # (.5 - .625) / (1 - .625): worse than chance
    assert extra["gold_scores"] == extra["gold_scores_sampled"] == [1.0, 0.0]
    assert extra["parent_gold_scores_sampled"] == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------------------
# Tiny stages


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """As tests/test_ppo_stage.py: an untrained tiny llama policy saved as an "sft" stage with its gold scores on the
    8 held-out prompts, and a tiny llama reward model saved as a "reward" stage trained on 12 ranked groups."""
    from align.models import modeling

    root = tmp_path_factory.mktemp("stages")
    tok = modeling.wordlevel_tokenizer(WORDS.split() + [str(i) for i in range(10)])
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    sft = save_stage(root / "sft", tiny_policy(tok, sizes), tok, "sft",
                     recipe={"gold_eval_prompts": 8, "gold_eval_max_new_tokens": 8}, metrics={"gold_score": 0.125},
                     gold_scores=PARENT_GOLD, gold_scores_sampled=PARENT_GOLD_SAMPLED)  # fmt: skip
    reward = save_stage(root / "reward", tiny_reward_model(tok, sizes), tok, "reward",
                        parent={"stage": "sft", "path": str(sft)})  # fmt: skip
    info = read_stage_info(reward)
    info["data"] = {"name": "rank", "rows": 12, "eval_rows": 2}
    (reward / "align_stage.json").write_text(json.dumps(info))
    return {"sft": sft, "reward": reward, "tok": tok}


def recipe(stages, out: Path, **over) -> dict:
    base = {
        "model_name_or_path": str(stages["sft"]),
        "reward_model_path": str(stages["reward"]),
        "output_dir": str(out),
        "best_of_n": 3,
        "generation_batch_size": 3,
        "gold_eval_prompts": 8,
        "gold_eval_max_new_tokens": 8,
        "gold_eval_samples": 4,
        "per_device_eval_batch_size": 8,
        "use_cpu": True,
        "seed": 3,
    }
    return {**base, **over}


def run_stage(stages, out: Path, **over) -> Path:
    from align.config import parse_config
    from align.stages.bon import run

    return run(parse_config("bon", [], overrides=recipe(stages, out, **over)))


def test_stage_writes_the_picks_lineage_and_a_loadable_policy_and_the_report_shows_it(tmp_path, stages):
    from transformers import AutoModelForCausalLM, pipeline

    from align.data.tinyworld import score as gold
    from align.evaluation.report import metrics_table, write_report

    out = run_stage(stages, tmp_path / "bon")
    info = read_stage_info(out)
    m = info["metrics"]
    assert info["stage"] == "bon" and info["parent"] == {"stage": "sft", "path": str(stages["sft"].resolve())}
    assert info["reward_model"] == {"stage": "reward", "path": str(stages["reward"].resolve()),
                                    "data": {"name": "rank", "rows": 12, "eval_rows": 2}}  # fmt: skip
    # the SFT stage's stored scores are reused: same prompts (8), answer length (8), greedy and 4 samples
    assert info["parent_gold_scores"] == PARENT_GOLD and info["parent_gold_scores_sampled"] == PARENT_GOLD_SAMPLED
    assert m["parent_gold_score"] == 0.125 and m["parent_gold_score_sampled"] == pytest.approx(0.1171875)
    # the figures agree with the answers kept: 4 draws of 3 per prompt, the reward model's pick of each draw
    rows = [json.loads(line) for line in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["answers"]) == 12 and len(r["picks"]) == 4 for r in rows)
    for r in rows:
        assert r["gold_scores"] == [gold(r["prompt"], a) for a in r["answers"]]
        for d, pick in enumerate(r["picks"]):
            assert pick == 3 * d + pick_best([r["rewards"][3 * d : 3 * d + 3]])[0]
    picked = [sum(r["gold_scores"][i] for i in r["picks"]) / 4 for r in rows]
    assert info["gold_scores"] == info["gold_scores_sampled"] == pytest.approx(picked)
    assert m["gold_score"] == m["gold_score_sampled"] == pytest.approx(sum(picked) / 8)
    assert m["gold_win_rate"] == win_rate(info["gold_scores"], PARENT_GOLD)
    assert m["gold_win_rate_sampled"] == win_rate(info["gold_scores"], PARENT_GOLD_SAMPLED)
    assert m["gold_score_random"] <= m["gold_score_oracle"] and m["gold_score"] <= m["gold_score_oracle"]
    assert m["gold_score_random"] == pytest.approx(sum(sum(r["gold_scores"]) / 12 for r in rows) / 8)
    assert m["kl_to_parent"] == m["kl_bound"] == pytest.approx(math.log(3) - 2 / 3)
    assert m["labels_used"] == 12 and m["best_of_n"] == 3 and m["train_runtime"] == 0.0 and m["runtime"] > 0
    assert not (out / "best_of_n.partial.jsonl").exists()
    assert json.loads((out / "bon_config.json").read_text())["best_of_n"] == 3
    # the dir loads in pipeline() as the policy; the reward model is referenced, not copied
    assert not (out / "README.md").exists() and (out / "model.safetensors").is_file()
    loaded = pipeline("text-generation", model=str(out), device="cpu").model.state_dict()
    policy = AutoModelForCausalLM.from_pretrained(stages["sft"]).state_dict()
    assert loaded.keys() == policy.keys() and all(torch.equal(loaded[k], policy[k]) for k in policy)
    # the report: the record's rows in its metrics table
    shown = {r["metric"]: r["value"] for r in metrics_table({"bon": info})}
    for key in ("gold_score", "gold_score_oracle", "gold_score_random", "kl_to_parent", "labels_used"):
        assert shown[key] == pytest.approx(m[key]), key
    assert shown["train_runtime"] == m["runtime"]  # the report's time row falls back to `runtime` when 0 s trained
    report_md = write_report(tmp_path, {"examples": 0})[0].read_text()
    assert "gold score of the gold-best of the n (upper bound)" in report_md
    assert f"{m['gold_score_oracle']:.4g}" in report_md


def test_sampling_resumes_from_the_saved_calls_and_restarts_on_other_settings(tmp_path, stages):
    from align.models.modeling import load_causal_lm, load_tokenizer

    policy, tok = load_causal_lm(str(stages["sft"])), load_tokenizer(str(stages["sft"]))
    prompts = ["where is tom ?", "where is amy ?", "write one sentence about the park .", "read : tom is in a shop ."]
    args = dict(n=3, max_new_tokens=6, seed=5, batch_size=2)
    whole = best_of_n.sample_answers(policy, tok, prompts, **args)
    checkpoint, key = tmp_path / "partial.jsonl", {"n": 3}
    assert best_of_n.sample_answers(policy, tok, prompts, **args, checkpoint=checkpoint, key=key) == whole
    lines = checkpoint.read_text().splitlines()
    assert len(lines) == 3  # the key, then one line per generate call of 2 prompts
    # killed during the second call: its line half written. The rerun keeps call 0 and samples call 1 as before.
    checkpoint.write_text("\n".join([lines[0], lines[1], lines[2][:20]]) + "\n")
    torch.manual_seed(123)  # the caller's RNG state plays no part
    assert best_of_n.sample_answers(policy, tok, prompts, **args, checkpoint=checkpoint, key=key) == whole
    # a checkpoint of other settings is not read: its answers are replaced
    fake = [[["x"] * 3, ["x"] * 3]]
    checkpoint.write_text(json.dumps({"key": {"n": 4}}) + "\n" + json.dumps({"call": 0, "answers": fake[0]}) + "\n")
    assert best_of_n.sample_answers(policy, tok, prompts, **args, checkpoint=checkpoint, key=key) == whole
    # the same key: what it holds is taken as sampled
    checkpoint.write_text(json.dumps({"key": key}) + "\n" + json.dumps({"call": 0, "answers": fake[0]}) + "\n")
    resumed = best_of_n.sample_answers(policy, tok, prompts, **args, checkpoint=checkpoint, key=key)
    assert resumed == fake[0] + whole[2:]


# ---------------------------------------------------------------------------------------------------------------------
# The command, the recipe and bad input


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "bon", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)  # fmt: skip


def test_help():
    result = cli("--help")
    assert result.returncode == 0 and "--best_of_n" in result.stdout


def test_recipe_loads_with_the_gold_settings_of_ppo():
    import yaml

    from align.config import parse_config

    cfg = parse_config("bon", ["--config", str(ROOT / "recipes" / "tiny" / "bon.yaml")])
    ppo = yaml.safe_load((ROOT / "recipes" / "tiny" / "ppo.yaml").read_text())
    for key in ("gold_eval_prompts", "gold_eval_max_new_tokens", "gold_eval_samples"):
        assert getattr(cfg, key) == ppo[key], key
    assert cfg.model_name_or_path == "runs/tiny/sft" and cfg.reward_model_path == "runs/tiny/reward"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--best_of_n", "0"], "best_of_n 0 is too small (use >= 1"),
        (["--reward_model_path", ""], "reward_model_path is not set"),
        (["--gold_eval_prompts", "0"], "gold_eval_prompts is 0"),
        (["--gold_labeler", "words.py:score"], "no held-out prompts to answer"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, args, message):
    result = cli("--model_name_or_path", "sft", "--reward_model_path", "rm", "--output_dir", str(tmp_path / "o"),
                 "--dataset_name", "prompts.jsonl" if "--gold_labeler" in args else "tinyworld", *args)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_reward_model_path_that_is_another_stage_fails_before_sampling(tmp_path, stages):
    with pytest.raises(AlignError, match="an align 'sft' stage, not a reward model"):
        run_stage(stages, tmp_path / "bon", reward_model_path=str(stages["sft"]))
    assert not (tmp_path / "bon").exists()
