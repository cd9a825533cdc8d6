"""`align ppo`: the stage end to end on tiny in-test stage dirs (an "sft" policy and a "reward" model), auto-resume,
one-line config errors, and (slow) two real CPU ranks under `accelerate launch`."""

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
from align.io import read_stage_info

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = "tom amy is in the park shop kitchen where ? . has a new red lamp write one sentence about read : question"


# Per-prompt gold scores of the "SFT" parent on the 8 held-out prompts (mean 0.125), as `align sft` records them.
PARENT_GOLD = [0.0, 0.0, 0.25, 0.25, 0.5, 0.0, 0.0, 0.0]
# ... and its sampled scores (4 answers per prompt at temperature 1, each prompt scored by their mean).
PARENT_GOLD_SAMPLED = [0.0, 0.125, 0.25, 0.0, 0.5, 0.0, 0.0, 0.0625]


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama policy saved as an "sft" stage and a tiny llama reward model as a "reward" stage (same tokenizer,
    with align's chat template), both untrained: the stage must run, not learn, here."""

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
    return {"sft": sft, "reward": reward}


def recipe(stages, out: Path, **over) -> dict:
    base = {
        "model_name_or_path": str(stages["sft"]),
        "reward_model_path": str(stages["reward"]),
        "output_dir": str(out),
        "tinyworld_prompts": 64,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "num_mini_batches": 2,
        "num_ppo_epochs": 1,
        "max_new_tokens": 8,
        "learning_rate": 1e-3,
        "gold_eval_prompts": 8,
        "gold_eval_max_new_tokens": 8,
        "per_device_eval_batch_size": 8,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "num_sample_generations": 1,
        "seed": 3,
    }
    return {**base, **over}


def run_stage(stages, out: Path, **over) -> Path:
    from align.config import parse_config
    from align.stages.ppo import run

    return run(parse_config("ppo", [], overrides=recipe(stages, out, **over)))


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "ppo", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# End to end


def test_stage_writes_policy_value_model_and_lineage(tmp_path, stages):
    from transformers import AutoModelForSequenceClassification, pipeline

    out = run_stage(stages, tmp_path / "ppo")
    info = read_stage_info(out)
    assert info["stage"] == "ppo"
    assert info["parent"] == {"stage": "sft", "path": str(stages["sft"].resolve())}
    assert info["reward_model"] == {"stage": "reward", "path": str(stages["reward"].resolve())}
    for key in ("gold_score", "parent_gold_score", "reward", "kl"):
        assert isinstance(info["metrics"][key], float), key
    # the SFT stage's stored gold score is reused: same prompts (8), answer length (8), greedy decoding
    assert info["metrics"]["parent_gold_score"] == 0.125
    assert info["parent_gold_scores"] == PARENT_GOLD
    assert 0.0 <= info["metrics"]["gold_score"] <= 1.0
    assert info["metrics"]["gold_win_rate"] == win_rate(info["gold_scores"], PARENT_GOLD)
    # sampled (`gold_eval_samples` 4, the default of both stages): the SFT stage's scores reused, PPO's own computed
    assert info["parent_gold_scores_sampled"] == PARENT_GOLD_SAMPLED
    assert info["metrics"]["parent_gold_score_sampled"] == pytest.approx(0.1171875)
    assert len(info["gold_scores_sampled"]) == 8 and all(0.0 <= x <= 1.0 for x in info["gold_scores_sampled"])
    assert info["metrics"]["gold_score_sampled"] == pytest.approx(sum(info["gold_scores_sampled"]) / 8)
    assert info["metrics"]["gold_win_rate_sampled"] == win_rate(info["gold_scores_sampled"], PARENT_GOLD_SAMPLED)
    steps = [h["step"] for h in info["log_history"] if "ppo/score" in h]
    assert steps == [1, 2, 3]
    assert any("eval/gold_score" in h for h in info["log_history"])
    assert info["samples"] and info["num_processes"] == 1
    assert info["data"]["name"] == "tinyworld" and info["data"]["rows"] == 64
    assert info["recipe"]["max_steps"] == 3

    # a plain causal LM with the chat template, loadable by pipeline(); the value model beside it
    gen = pipeline("text-generation", model=str(out), device="cpu")
    reply = gen([{"role": "user", "content": "where is tom ?"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    value = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value.config.num_labels == 1
    assert not (out / "training_args.bin").exists()


def test_stage_resumes_from_output_dir(tmp_path, stages):
    # The trainer's own test (tests/test_ppo_trainer.py::test_resume_continues_step_count_and_kl_controller) checks
    # that a resumed run equals an uninterrupted one; here: the stage finds output_dir's checkpoint by itself.
    out = tmp_path / "ppo"
    run_stage(stages, out, max_steps=2)
    (out / "align_stage.json").unlink()  # as if killed after the checkpoint, before the stage finished
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    run_stage(stages, out, max_steps=4)
    steps = [h["step"] for h in read_stage_info(out)["log_history"] if "ppo/score" in h]
    assert steps == [1, 2, 3, 4]  # updates 1-2 come from the checkpoint's history, 3-4 from the resumed run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_own_prompt_file_and_parent_scored_when_settings_differ(tmp_path, stages):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"where is {n} ?"}]})
                              for n in ("tom", "amy") * 4) + "\n")  # fmt: skip
    out = run_stage(stages, tmp_path / "own", dataset_name=str(data), max_steps=1, eval_strategy="no",
                    save_strategy="no", dataset_test_size=2)  # fmt: skip
    info = read_stage_info(out)
    assert info["data"]["rows"] == 6 and info["data"]["eval_rows"] == 2
    assert "gold_score" not in info["metrics"]  # no gold labeler outside the tiny world
    assert any("eval/reward" in h for h in info["log_history"])  # held-out prompts scored by the reward model


# A checker for any data (`gold_labeler: length.py:score`): longer answers score higher; two constraint kinds.
LENGTH_LABELER = """
def score(prompt, response):
    return min(len(response.split()) / 8, 1.0)


def score_detail(prompt, response):
    n = len(response.split())
    return {"constraints": [{"kind": "nonempty", "passed": n > 0}, {"kind": "long", "passed": n >= 8}]}
"""


def test_any_checker_scores_parent_and_policy_and_the_report_shows_them(tmp_path, stages, monkeypatch):
    from align.evaluation.report import write_report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "length.py").write_text(LENGTH_LABELER)
    rows = [{"prompt": f"where is {n} ?"} for n in ("tom", "amy") * 4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "run"
    out = run_stage(stages, root / "ppo", dataset_name="train.jsonl", gold_labeler="length.py:score",
                    gold_eval_dataset="heldout.jsonl", max_steps=2, eval_steps=1, save_strategy="no",
                    gold_eval_samples=2)  # fmt: skip
    info = read_stage_info(out)
    assert info["gold_labeler"] == "length.py:score"
    # the SFT stage's stored scores are of the tiny world's labeler: the parent is scored again, with this one
    assert len(info["parent_gold_scores"]) == len(info["gold_scores"]) == 8
    assert info["parent_gold_scores"] != PARENT_GOLD
    assert info["metrics"]["gold_win_rate"] == win_rate(info["gold_scores"], info["parent_gold_scores"])
    assert info["metrics"]["gold_win_rate_sampled"] == win_rate(info["gold_scores_sampled"],
                                                                info["parent_gold_scores_sampled"])  # fmt: skip
    for key in ("gold_pass_rates", "parent_gold_pass_rates"):
        assert set(info[key]) == {"nonempty", "long"}, key
    assert [h["step"] for h in info["log_history"] if "eval/gold_score" in h] == [1, 2]

    (report_md, _, report_json) = write_report(root, {"examples": 2, "prompts_file": "heldout.jsonl"})
    top = json.loads(report_json.read_text())["headline"]
    assert top["gold_win_rate_ppo_vs_parent"] == info["metrics"]["gold_win_rate"]
    assert top["gold_score"] == {"parent": info["metrics"]["parent_gold_score"], "ppo": info["metrics"]["gold_score"]}
    assert top["gold_pass_rates"] == {"parent": info["parent_gold_pass_rates"], "ppo": info["gold_pass_rates"]}
    text = report_md.read_text()
    assert "PPO beats its parent (sft) on" in text and "checker length.py:score, ties count half" in text
    assert info["gold_pass_counts"] == {"nonempty": 8, "long": 8}  # each kind over the 8 held-out answers
    assert "| constraint | parent | PPO | answers |" in text and "| long |" in text and " | 8 |" in text
    assert "| prompt | parent | PPO |" in text  # the parent answers beside PPO, each with its checker score


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_gold_labeler_exits_2_with_one_line(tmp_path, stages):
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe(stages, tmp_path / "out", gold_labeler="no_such_checker.py:score")))
    result = cli("--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gold_labeler no_such_checker.py:score: cannot import")
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "align_stage.json").exists()


def test_bad_config_exits_2_with_one_line(tmp_path, stages):
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe(stages, tmp_path / "out", kl_coef=-0.1)))
    result = cli("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "kl_coef -0.1" in lines[0], result.stderr

    path.write_text(yaml.safe_dump(recipe(stages, tmp_path / "out", kl_coeff=0.1)))
    result = cli("--config", str(path))
    assert result.returncode == 2 and "did you mean 'kl_coef'" in result.stderr


def test_missing_reward_model_path_is_a_clear_error(tmp_path, stages):
    r = recipe(stages, tmp_path / "out")
    del r["reward_model_path"]
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(r))
    result = cli("--config", str(path))
    assert result.returncode == 2 and "reward_model_path is not set" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = cli("--config", str(path), "--reward_model_path", str(tmp_path / "nope"))
    assert result.returncode == 2 and "no such directory" in result.stderr, result.stderr


def test_reward_model_path_pointing_at_another_stage_is_an_error(tmp_path, stages):
    from align.errors import AlignError

    with pytest.raises(AlignError, match="not a reward model"):
        run_stage(stages, tmp_path / "out", reward_model_path=str(stages["sft"]))


def test_ptx_keys_must_agree():
    from align.config import parse_config
    from align.errors import AlignError

    base = {"model_name_or_path": "m", "reward_model_path": "r", "output_dir": "o"}
    with pytest.raises(AlignError, match="ptx_coef 0.5 > 0 but no ptx_dataset_name"):
        parse_config("ppo", [], overrides={**base, "ptx_coef": 0.5})
    with pytest.raises(AlignError, match="ptx_coef is 0"):
        parse_config("ppo", [], overrides={**base, "ptx_dataset_name": "tinyworld"})


def test_help_exits_0():
    result = cli("--help")
    assert result.returncode == 0 and "--reward_model_path" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Distributed


@pytest.mark.slow
def test_stage_on_two_cpu_ranks(tmp_path, stages):
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe(stages, tmp_path / "ppo", max_steps=2, save_steps=1)))
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "-m", "align", "ppo", "--config", str(path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = read_stage_info(tmp_path / "ppo")
    assert info["num_processes"] == 2  # a real 2-rank group, not two lone rank-0 processes
    assert "(8 per process x 2)" in result.stderr  # the trainer's summary: 8 prompts per rollout on each rank
    assert [h["step"] for h in info["log_history"] if "ppo/score" in h] == [1, 2]
    assert "gold_score" in info["metrics"]


def test_stage_with_one_shared_base_saves_plain_models(tmp_path, stages, caplog):
    """use_peft + value_model_init policy_lora + gradient checkpointing through the stage: a merged policy that
    pipeline() loads, its adapter alone in adapter/, a plain value model, and the memory plan in the log."""
    import logging

    from transformers import AutoModelForSequenceClassification, pipeline

    with caplog.at_level(logging.INFO, logger="align.models.memory_plan"):
        out = run_stage(stages, tmp_path / "ppo", use_peft=True, lora_r=4, lora_alpha=8,
                        lora_target_modules=["q_proj", "v_proj"], value_model_init="policy_lora",
                        gradient_checkpointing=True, merge_adapter=True, max_steps=2, eval_strategy="no",
                        gold_eval_samples=0)  # fmt: skip
    info = read_stage_info(out)
    assert info["value_model"]["init"] == "policy_lora" and info["peft"] == {"adapter": True, "merged": True}
    # eval_strategy "no" with a gold labeler: the stage's own gold eval, no second one by the trainer at the end
    assert "gold_score" in info["metrics"] and not any("eval/gold_score" in h for h in info["log_history"])
    gen = pipeline("text-generation", model=str(out), device="cpu")
    assert gen("where is tom ?", max_new_tokens=2, do_sample=False)[0]["generated_text"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "adapter" / "critic").exists()
    assert AutoModelForSequenceClassification.from_pretrained(out / "value_model").config.num_labels == 1
    ckpt = out / "checkpoint-2"
    assert (ckpt / "value_model" / "value_head.safetensors").is_file()
    plan = [r.getMessage() for r in caplog.records if r.name == "align.models.memory_plan"]
    assert [line.split()[2] for line in plan[:4]] == ["policy", "reference", "value", "reward"]
    # the frozen reward model in bf16 when the stage runs in bf16 (auto: where the CPU computes bf16 natively)
    from align.models.modeling import cpu_has_native_bf16

    assert ("bfloat16" if cpu_has_native_bf16() else "float32") in plan[3]


def test_stage_with_the_value_head_on_the_policy_writes_the_head_beside_it(tmp_path, stages):
    """value_model_init policy_head (no LoRA: the whole policy is the shared trunk) through the stage: align_stage.json
    records where the head went, the output loads in pipeline(), the head sits beside it and in each checkpoint."""
    from safetensors import safe_open
    from transformers import pipeline

    out = run_stage(stages, tmp_path / "ppo", value_model_init="policy_head", max_steps=2, eval_strategy="no",
                    gold_eval_samples=0)  # fmt: skip
    info = read_stage_info(out)
    assert info["value_model"] == {"init": "policy_head", "path": None, "saved": "value_head.safetensors"}
    assert isinstance(info["metrics"]["gold_score"], float)
    gen = pipeline("text-generation", model=str(out), device="cpu")
    assert gen("where is tom ?", max_new_tokens=2, do_sample=False)[0]["generated_text"]
    assert not (out / "value_model").exists()
    for head in (out / "value_head.safetensors", out / "checkpoint-2" / "value_model" / "value_head.safetensors"):
        with safe_open(str(head), framework="pt") as f:
            assert f.metadata() == {"value_model_init": "policy_head"} and list(f.keys()) == ["weight"]
