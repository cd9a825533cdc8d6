"""`align grpo` and `align rloo`: the reward as TRL reward functions (align's reward model scored as `align ppo` scores
it, the likelihood head included; a user function called with what TRL passes; the gold labeler refused off a world
that has one), tiny GRPO and RLOO runs end to end on in-test stage dirs, resume, and one-line config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_stages import save_stage, tiny_policy, tiny_reward_model  # tests/ is on sys.path

from align.evaluation.gold import win_rate
from align.io import read_stage_info, write_stage_info

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = "tom amy is in the park shop kitchen where ? . has a new red lamp write one sentence about read : question"
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Per-prompt gold scores of the "SFT" parent on the 8 held-out prompts (mean 0.125), as `align sft` records them,
# and its sampled ones (4 answers per prompt, each prompt scored by their mean; mean 0.1171875).
PARENT_GOLD = [0.0, 0.0, 0.25, 0.25, 0.5, 0.0, 0.0, 0.0]
PARENT_GOLD_SAMPLED = [0.0, 0.125, 0.25, 0.0, 0.5, 0.0, 0.0, 0.0625]
REWARD_GROUPS = 96  # the ranked groups the in-test "reward" stage says it was trained on


def chat_tokenizer():
    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(WORDS.split() + [str(i) for i in range(10)])
    modeling.ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """An untrained tiny llama policy saved as an "sft" stage (with stored gold scores) and a tiny llama reward model
    as a "reward" stage trained on REWARD_GROUPS groups: the stages must run, not learn, here."""
    root = tmp_path_factory.mktemp("stages")
    tok = chat_tokenizer()
    torch.manual_seed(0)
    sft = save_stage(root / "sft", tiny_policy(tok, SIZES), tok, "sft",
                     recipe={"gold_eval_prompts": 8, "gold_eval_max_new_tokens": 8}, metrics={"gold_score": 0.125},
                     gold_scores=PARENT_GOLD, gold_scores_sampled=PARENT_GOLD_SAMPLED)  # fmt: skip
    reward = save_stage(root / "reward", tiny_reward_model(tok, SIZES), tok, "reward")
    write_stage_info(reward, "reward", parent={"stage": "sft", "path": str(sft)}, recipe={},
                     data={"name": "runs/tiny/rank", "rows": REWARD_GROUPS, "eval_rows": 8}, metrics={})  # fmt: skip
    return {"sft": sft, "reward": reward}


def recipe(stages, out: Path, **over) -> dict:
    base = {
        "model_name_or_path": str(stages["sft"]),
        "reward_model_path": str(stages["reward"]),
        "output_dir": str(out),
        "tinyworld_prompts": 16,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
        "beta": 0.1,
        "gold_eval_prompts": 8,
        "gold_eval_max_new_tokens": 8,
        "per_device_eval_batch_size": 8,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "bf16": False,
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 3,
    }
    return {**base, **over}


def run_stage(stage: str, stages, out: Path, **over) -> Path:
    import importlib

    from align.config import parse_config

    return importlib.import_module(f"align.stages.{stage}").run(
        parse_config(stage, [], overrides=recipe(stages, out, **over))
    )


def cli(stage: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", stage, *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)  # fmt: skip


def chat(prompts: list[str], responses: list[str]) -> tuple[list, list]:
    """What TRL passes a reward function in its conversational format."""
    return ([[{"role": "user", "content": p}] for p in prompts],
            [[{"role": "assistant", "content": r}] for r in responses])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The reward


PAIRS = (["where is tom ?", "write one sentence about amy ."], ["tom is in the park .", "amy has a new red lamp ."])


def one_by_one(model, tok, prompts, responses) -> list[float]:
    """Each pair's score by hand: the reward stage's token ids (`encode_for_reward`), one unpadded row at a time, the
    score head's output at the last token, minus the stored offset."""
    from align.data.rankings import encode_for_reward

    out = []
    for p, r in zip(prompts, responses, strict=True):
        ids = torch.tensor([encode_for_reward(tok, p, r)])
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0]) - model.config.align_reward_offset)
    return out


@pytest.mark.parametrize("head", ["plain", "likelihood"])
def test_reward_model_reward_scores_as_ppo_does(head):
    from accelerate import Accelerator

    from align.models.modeling import generation_marker
    from align.models.modeling_reward import LikelihoodRewardModel
    from align.trainers.ppo_rollout import reward_model_scores
    from align.trainers.rewards import RewardModelReward

    tok = chat_tokenizer()
    torch.manual_seed(1)
    if head == "plain":
        model = tiny_reward_model(tok, SIZES, offset=0.25)
    else:  # the likelihood_features head: mean/min log-prob of the response after the generation marker
        model = LikelihoodRewardModel.from_causal_lm(tiny_policy(tok, SIZES), features=("mean", "min"),
                                                     response_marker=generation_marker(tok))  # fmt: skip
        model.config.align_reward_offset = -1.5
    acc = Accelerator(cpu=True)
    reward = RewardModelReward(model, tok, batch_size=2, accelerator=acc)
    got = reward(*chat(*PAIRS), completion_ids=[[1], [2]], trainer_state=None)
    # the texts TRL hands over are the ones PPO scores; two rows of unequal length are padded together here
    ppo = reward_model_scores(model, tok, *PAIRS, format_fn=None, offset=model.config.align_reward_offset,
                              batch_size=2, accelerator=acc).tolist()  # fmt: skip
    assert got == ppo
    torch.testing.assert_close(torch.tensor(got), torch.tensor(one_by_one(model, tok, *PAIRS)))
    assert reward.__name__ == "reward_model"


def test_reward_model_reward_needs_the_trainers_accelerator():
    from align.trainers.rewards import RewardModelReward

    tok = chat_tokenizer()
    reward = RewardModelReward(tiny_reward_model(tok, SIZES), tok)
    with pytest.raises(ValueError, match="bind"):
        reward(*chat(*PAIRS))


def test_text_reward_reads_trl_formats():
    from align.trainers.rewards import TextReward, texts

    words = TextReward(lambda p, r: len(r.split()) - len(p.split()), name="words")
    # conversational: "tom is in the park ." (6 words) - "where is tom ?" (4) = 2; "amy has a new red lamp ." (7) -
    # "write one sentence about amy ." (6) = 1
    assert words(*chat(*PAIRS)) == [2.0, 1.0]
    assert words(prompts=["a b"], completions=["c"]) == [-1.0]  # TRL's standard format: plain strings
    # a multi-turn prompt: its last user message is the question
    turns = [
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
    ]
    assert texts(turns, [[{"role": "assistant", "content": "w"}]]) == (["z"], ["w"])


def test_gold_reward_is_the_gold_labelers_score():
    from align.config import parse_config
    from align.evaluation.gold import heldout_prompts, load_gold_labeler
    from align.stages.online import build_rewards

    cfg = parse_config("grpo", [], overrides={"model_name_or_path": "m", "output_dir": "o", "reward_funcs": ["gold"]})
    funcs, model_reward, rewarded_by = build_rewards(cfg)
    assert rewarded_by == "gold" and model_reward is None and funcs[0].__name__ == "gold"
    prompt = heldout_prompts(1)[0]
    answers = ["tom is in the park .", ""]
    labeler = load_gold_labeler("gold")
    assert funcs[0](*chat([prompt, prompt], answers)) == [labeler.score(prompt, r) for r in answers]


def test_gold_reward_refused_off_a_world_with_a_gold_labeler(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    path = tmp_path / "grpo.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "m",
                "output_dir": str(tmp_path / "out"),
                "dataset_name": str(tmp_path / "prompts.jsonl"),
                "reward_funcs": ["gold"],
            }
        )
    )
    result = cli("grpo", "--config", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "reward_funcs 'gold'" in lines[0], result.stderr
    assert "has none" in lines[0] and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# End to end


def check_stage(out: Path, stage: str, stages) -> dict:
    from transformers import pipeline

    info = read_stage_info(out)
    assert info["stage"] == stage
    assert info["parent"] == {"stage": "sft", "path": str(stages["sft"].resolve())}
    assert info["reward"] == "reward_model"
    assert info["reward_model"] == {"stage": "reward", "path": str(stages["reward"].resolve())}
    m = info["metrics"]
    # the SFT stage's stored gold scores are reused (same prompts, answer length, greedy decoding)
    assert m["parent_gold_score"] == 0.125 and info["parent_gold_scores"] == PARENT_GOLD
    assert m["parent_gold_score_sampled"] == pytest.approx(0.1171875)
    assert m["gold_win_rate"] == win_rate(info["gold_scores"], PARENT_GOLD)
    assert m["gold_win_rate_sampled"] == win_rate(info["gold_scores_sampled"], PARENT_GOLD_SAMPLED)
    assert m["kl_to_parent_low"] <= m["kl_to_parent"] <= m["kl_to_parent_high"]
    assert m["labels_used"] == REWARD_GROUPS
    assert m["train_runtime"] > 0 and isinstance(m["reward"], float)
    assert [h["step"] for h in info["log_history"] if "reward" in h] == [1, 2]
    assert info["data"]["name"] == "tinyworld" and info["data"]["rows"] == 16
    gen = pipeline("text-generation", model=str(out), device="cpu")
    reply = gen([{"role": "user", "content": "where is tom ?"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    return info


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_tiny_run_writes_policy_and_stage_info(tmp_path, stages, stage):
    out = run_stage(stage, stages, tmp_path / stage)
    info = check_stage(out, stage, stages)
    assert info["metrics"]["kl"] >= 0.0  # TRL's own KL estimate (beta 0.1 > 0), logged beside ours
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


def test_user_function_is_called_with_what_trl_passes(tmp_path, stages):
    calls = tmp_path / "calls.jsonl"
    (tmp_path / "my_rewards.py").write_text(
        "import json\n"
        "def length(prompts, completions, completion_ids, trainer_state, **kwargs):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'prompts': prompts, 'completions': completions, 'ids': completion_ids,\n"
        "                            'step': trainer_state.global_step, 'kwargs': sorted(kwargs)}) + '\\n')\n"
        "    return [float(len(c[0]['content'].split())) for c in completions]\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        out = run_stage("grpo", stages, tmp_path / "grpo", reward_model_path=None, reward_funcs=["my_rewards:length"],
                        gold_eval_prompts=0, max_steps=1)  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
    rows = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 0
    row = rows[0]
    # 4 completions: 2 prompts x num_generations 2, each prompt repeated beside its completions
    assert len(row["prompts"]) == len(row["completions"]) == len(row["ids"]) == 4
    assert row["prompts"][0] == row["prompts"][1] and row["prompts"][0][0]["role"] == "user"
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in row["completions"])
    assert all(isinstance(i, list) and len(i) <= 8 for i in row["ids"])
    info = read_stage_info(out)
    assert info["reward"] == "my_rewards:length" and "labels_used" not in info["metrics"]
    assert "gold_score" not in info["metrics"]  # gold_eval_prompts 0: no gold evaluation, no KL


def test_stage_resumes_from_output_dir(tmp_path, stages):
    out = tmp_path / "grpo"
    run_stage("grpo", stages, out, save_steps=1, max_steps=1, gold_eval_prompts=0)
    (out / "align_stage.json").unlink()  # as if killed after the checkpoint, before the stage finished
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    run_stage("grpo", stages, out, save_steps=1, max_steps=2, gold_eval_prompts=0)
    assert [h["step"] for h in read_stage_info(out)["log_history"] if "reward" in h] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Recipes, help, errors


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_recipe_loads_with_ppos_gold_settings(stage):
    from align.config import parse_config

    cfg = parse_config(stage, ["--config", str(ROOT / "recipes" / "tiny" / f"{stage}.yaml")])
    ppo = yaml.safe_load((ROOT / "recipes" / "tiny" / "ppo.yaml").read_text())
    for key in ("gold_eval_prompts", "gold_eval_max_new_tokens", "eval_temperature", "gold_eval_samples", "seed"):
        assert getattr(cfg, key) == ppo[key], key
    assert cfg.model_name_or_path.endswith("runs/tiny/sft") and cfg.reward_model_path.endswith("runs/tiny/reward")


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_help_exits_0(stage):
    result = cli(stage, "--help")
    assert result.returncode == 0 and "--reward_funcs" in result.stdout and "--num_generations" in result.stdout


def test_bad_config_exits_2_with_one_line(tmp_path, stages):
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe(stages, tmp_path / "out", beta=-0.1)))
    result = cli("grpo", "--config", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "beta -0.1" in lines[0], result.stderr

    path.write_text(yaml.safe_dump(recipe(stages, tmp_path / "out", reward_model_path=None)))
    result = cli("rloo", "--config", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "rloo: no reward" in lines[0], result.stderr


def test_reward_keys_are_checked():
    from align.config import parse_config
    from align.errors import AlignError

    base = {"model_name_or_path": "m", "output_dir": "o", "reward_model_path": "r"}
    with pytest.raises(AlignError, match="reward_funcs 'length': expected 'package.module:function'"):
        parse_config("grpo", [], overrides={**base, "reward_funcs": ["length"]})
    with pytest.raises(AlignError, match="reward_weights has 1 weights for 2 rewards"):
        parse_config("grpo", [], overrides={**base, "reward_funcs": ["gold"], "reward_weights": [1.0]})
    with pytest.raises(AlignError, match="reward_funcs nope:f: cannot import"):
        from align.stages.online import build_rewards

        build_rewards(parse_config("grpo", [], overrides={**base, "reward_model_path": None,
                                                           "reward_funcs": ["nope:f"]}))  # fmt: skip
