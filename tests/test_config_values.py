"""Values are checked before any work (issue 19): each bad value is one `error:` line naming the key, the value and the
fix (exit 2), `report_to` names a missing package and its extra, `--config` is given once, and relative paths are
relative to the working directory for every key, chains included."""

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.config import VALUE_RULES, config_class, parse_config
from align.errors import AlignError

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "rank", "reward", "ppo", "dpo", "grpo", "rloo", "bon", "classify")
# The keys each stage needs before its values are looked at (paths are never opened by the config).
NEEDS = {
    "pretrain": [],
    "sft": [],
    "rank": [],
    "reward": ["--model_name_or_path", "m", "--dataset_name", "d"],
    "ppo": ["--model_name_or_path", "m", "--reward_model_path", "r"],
    "dpo": ["--model_name_or_path", "m", "--dataset_name", "d"],
    "bon": ["--model_name_or_path", "m", "--reward_model_path", "r"],
    "classify": ["--model_name_or_path", "m"],
    "grpo": ["--model_name_or_path", "m", "--reward_model_path", "r"],
    "rloo": ["--model_name_or_path", "m", "--reward_model_path", "r"],
}


def _error(capsys, stage: str, *args: str, out: Path) -> str:
    """Run `align STAGE ...` in-process; return its one error line (exit code 2, no traceback)."""
    code = main([stage, "--output_dir", str(out), *NEEDS[stage], *args])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_batch_size_zero_is_one_line_naming_the_key(capsys, tmp_path):
    # Before: pretraining data and model were built, then torch's DataLoader raised
    # `ValueError: batch_size should be a positive integer value, but got batch_size=0` in a traceback.
    line = _error(capsys, "pretrain", "--per_device_train_batch_size", "0", out=tmp_path)
    assert line == (
        "error: command line: per_device_train_batch_size 0 is too small (use >= 1: sequences per device per step, "
        "e.g. 8)."
    )


@pytest.mark.parametrize(
    ("stage", "key", "value", "message"),
    [
        # batch-like keys
        ("sft", "per_device_eval_batch_size", "0", "per_device_eval_batch_size 0 is too small (use >= 1"),
        ("reward", "gradient_accumulation_steps", "0", "gradient_accumulation_steps 0 is too small (use >= 1"),
        ("rank", "generation_batch_size", "0", "generation_batch_size 0 is too small (use >= 1"),
        ("rank", "labeler_batch_size", "-1", "labeler_batch_size -1 is too small (use >= 1"),
        ("ppo", "num_mini_batches", "0", "num_mini_batches 0 is too small (use >= 1"),
        ("ppo", "local_rollout_forward_batch_size", "0", "local_rollout_forward_batch_size 0 is too small"),
        ("ppo", "per_device_train_batch_size", "0", "per_device_train_batch_size 0 is too small"),
        # learning rate, fractions, warmup
        ("pretrain", "learning_rate", "0", "learning_rate 0.0 is too small (use > 0: e.g. 2e-5)"),
        ("sft", "learning_rate", "nan", "learning_rate nan is not a finite number"),
        ("sft", "warmup_steps", "1.5", "warmup_steps 1.5 is neither a fraction (< 1) nor a whole count"),
        ("sft", "warmup_steps", "-0.1", "warmup_steps -0.1 is negative"),
        ("sft", "dataset_test_size", "2.5", "dataset_test_size 2.5 is neither a fraction (< 1) nor a whole count"),
        ("pretrain", "lora_dropout", "1", "lora_dropout 1.0 is too large (use a value in [0, 1)"),
        ("sft", "adam_beta2", "1", "adam_beta2 1.0 is too large"),
        ("sft", "tinyworld_error_rate", "1.5", "tinyworld_error_rate 1.5 is too large (use a value in [0, 1]"),
        ("rank", "labeler_noise", "-0.1", "labeler_noise -0.1 is negative (use >= 0: a standard deviation"),
        ("rank", "top_p", "0", "top_p 0.0 is too small (use a value in (0, 1]: 1 = off)"),
        ("ppo", "top_p", "1.5", "top_p 1.5 is too large (use a value in (0, 1]"),
        ("ppo", "cliprange", "1.5", "cliprange 1.5 is too large (use a value in (0, 1)"),
        ("ppo", "gamma", "1.1", "gamma 1.1 is too large (use a value in [0, 1]"),
        ("ppo", "missing_eos_penalty", "-1", "missing_eos_penalty -1.0 is negative"),
        ("ppo", "num_train_epochs", "-1", "num_train_epochs -1.0 is negative"),
        ("ppo", "logging_steps", "0", "logging_steps 0.0 is too small"),
        # lengths
        ("reward", "max_length", "4", "max_length 4 is too small (use >= 8 or null: tokens, e.g. 512)"),
        ("sft", "max_length", "0", "max_length 0 is too small"),
        ("rank", "max_new_tokens", "0", "max_new_tokens 0 is too small (use >= 1: tokens per response"),
        ("ppo", "max_prompt_length", "0", "max_prompt_length 0 is too small (use >= 1 or null"),
        ("pretrain", "sample_max_new_tokens", "0", "sample_max_new_tokens 0 is too small"),
        ("sft", "gold_eval_max_new_tokens", "0", "gold_eval_max_new_tokens 0 is too small"),
        ("rank", "num_generations", "1", "num_generations 1 is too small (use >= 2: a ranking needs at least 2"),
        ("pretrain", "seed", "-1", "seed -1 is negative (use a value in [0, 4294967295]"),
    ],
)
def test_bad_value_is_one_line_naming_key_value_and_fix(capsys, tmp_path, stage, key, value, message):
    line = _error(capsys, stage, f"--{key}", value, out=tmp_path)
    assert line.startswith("error: command line: ") and message in line


def test_null_for_a_key_that_takes_no_null(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "per_device_train_batch_size": None}))
    line = _error(capsys, "sft", "--config", str(recipe), out=tmp_path)
    assert f"error: {recipe}: per_device_train_batch_size is null (use >= 1" in line


def test_several_problems_share_one_line(capsys, tmp_path):
    line = _error(capsys, "ppo", "--kl_coef", "-0.1", "--num_ppo_epochs", "0", out=tmp_path)
    assert "num_ppo_epochs 0 is too small" in line and "kl_coef -0.1 is negative" in line


@pytest.mark.parametrize(
    ("stage", "args"),
    [
        ("sft", ["--warmup_steps", "0.03", "--dataset_test_size", "16", "--max_length", "8"]),
        ("sft", ["--warmup_steps", "100", "--dataset_test_size", "0"]),
        ("rank", ["--top_p", "1", "--top_k", "0", "--labeler_noise", "0"]),
        ("ppo", ["--num_train_epochs", "0", "--total_episodes", "64", "--gamma", "1", "--kl_coef", "0"]),
        ("reward", ["--max_length", "8"]),
        ("grpo", ["--beta", "0", "--top_entropy_quantile", "0", "--min_p", "1"]),
        ("rloo", ["--beta", "0", "--ref_model_mixup_alpha", "1"]),
    ],
)
def test_edge_values_are_accepted(tmp_path, stage, args):
    parse_config(stage, ["--output_dir", str(tmp_path), *NEEDS[stage], *args])


def test_nothing_to_train_is_an_error(capsys, tmp_path):
    line = _error(capsys, "pretrain", "--num_train_epochs", "0", out=tmp_path)
    assert "num_train_epochs 0.0 and max_steps -1: nothing to train" in line


def test_every_numeric_key_of_every_stage_has_a_range():
    """Each float key of each stage config declares its range in VALUE_RULES; every rule names a real key."""
    fields = {}
    for stage in STAGES:
        cls = config_class(stage)
        hints = typing.get_type_hints(cls)
        fields.update({f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init})
    floats = {k for k, t in fields.items() if float in (t, *typing.get_args(t)) and str not in typing.get_args(t)}
    assert len(floats) > 30
    assert sorted(floats - set(VALUE_RULES)) == []
    assert sorted(set(VALUE_RULES) - set(fields)) == []


def test_help_shows_each_range_and_the_path_rule(capsys):
    with pytest.raises(SystemExit):
        main(["rank", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[a value in (0, 1]]" in out and "[>= 2]" in out  # top_p, num_generations
    for command in ("sft", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "Relative paths, in a recipe or on the command line, are relative to the working directory" in out


# ---------------------------------------------------------------------------------------------------------------------
# report_to


def test_missing_tensorboard_names_the_package_and_the_extra(capsys, monkeypatch):
    # Before: `RuntimeError: TensorBoardCallback requires tensorboard to be installed...` once the Trainer was built.
    monkeypatch.setattr("align.config.integration_available", lambda name: name != "tensorboard")
    recipe = ROOT / "recipes" / "smollm2-135m" / "sft_lora.yaml"
    code = main(["sft", "--config", str(recipe), "--use_cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip() == (
        f"error: {recipe}: report_to 'tensorboard' needs the tensorboard package, which is not installed: "
        'pip install -e ".[tensorboard]" (align\'s extra) or pip install tensorboard; or set report_to: none.'
    )


def test_installed_integration_passes(monkeypatch, tmp_path):
    monkeypatch.setattr("align.config.integration_available", lambda name: True)
    cfg = parse_config("sft", ["--output_dir", str(tmp_path), "--report_to", "tensorboard"])
    assert cfg.report_to == ["tensorboard"]


@pytest.mark.parametrize(
    ("stage", "value", "message"),
    [
        ("pretrain", "wandb", "report_to 'wandb' needs the wandb package, which is not installed: pip install wandb"),
        ("reward", "trackio", "report_to 'trackio' needs the trackio package"),
        ("sft", "tensorbord", "report_to 'tensorbord' is not supported (did you mean 'tensorboard'?"),
        # the PPO loop logs through accelerate's trackers, which have no neptune
        ("ppo", "neptune", "report_to 'neptune' is not supported"),
    ],
)
def test_report_to_errors(capsys, monkeypatch, tmp_path, stage, value, message):
    monkeypatch.setattr("align.config.integration_available", lambda name: False)
    assert message in _error(capsys, stage, "--report_to", value, out=tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# --config once


def test_repeated_config_names_both_files(capsys, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for path, lr in ((a, 1e-3), (b, 1e-4)):
        path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "learning_rate": lr}))
    line = _error(capsys, "pretrain", "--config", str(a), f"--config={b}", out=tmp_path)
    assert line == (
        f"error: command line: --config is given 2 times ({a}, {b}); pass one recipe and override its keys with "
        "--key value."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Paths: relative to the working directory, for every key

LABELER = "def score(prompt, responses):\n    return [float(i) for i in range(len(responses))]\n"


def _project(tmp_path: Path, policy: str = "proj/model") -> Path:
    """A project outside the repo: the chain, its stage recipe, a labeler and prompts, all relative to `tmp_path`."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "labeler.py").write_text(LABELER)
    (proj / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"tell a story {i}"}) + "\n" for i in range(4)))
    rank = {"model_name_or_path": policy, "dataset_name": "proj/prompts.jsonl", "labeler": "proj/labeler.py:score",
            "num_generations": 3, "max_new_tokens": 6, "generation_batch_size": 4, "use_cpu": True}  # fmt: skip
    (proj / "rank.yaml").write_text(yaml.safe_dump(rank))
    chain = {"output_root": "runs/proj", "stages": {"rank": "proj/rank.yaml"}}
    (proj / "chain.yaml").write_text(yaml.safe_dump(chain))
    return proj / "chain.yaml"


def test_chain_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    from align.chain import load_chain, resolved_recipe
    from align.stages import rank

    _project(tmp_path)
    monkeypatch.chdir(tmp_path)  # not the repo, not the chain's folder
    chain = load_chain("proj/chain.yaml")
    plan = chain.plan("rank")
    assert plan.source == "proj/rank.yaml" and plan.recipe["output_dir"] == "runs/proj/rank"
    cfg = parse_config("rank", [], overrides=plan.recipe)
    assert resolved_recipe(plan)["labeler"] == "proj/labeler.py:score"
    kind, label = rank.load_labeler(cfg)  # the labeler file, found from the working directory
    assert kind == "function" and label(["p"], [["a", "b"]]) == [[0.0, 1.0]]


def test_chain_path_written_relative_to_the_chain_file_gets_the_fix(tmp_path, monkeypatch):
    from align.chain import load_chain

    path = _project(tmp_path)
    path.write_text(yaml.safe_dump({"output_root": "runs/proj", "stages": {"rank": "rank.yaml"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AlignError) as e:
        load_chain("proj/chain.yaml")
    assert str(e.value) == (
        f"proj/chain.yaml: stages.rank: recipe rank.yaml not found (relative paths are relative to the working "
        f"directory, {tmp_path}); write proj/rank.yaml."
    )


def test_chain_checks_every_stage_before_running_one(tmp_path, monkeypatch, capsys):
    # Before: sft ran (here: failed on its missing model) and the bad ppo value came up only after it.
    chain = {"output_root": "runs/x", "stages": {"sft": {"model_name_or_path": "no/such-model"},
                                                 "ppo": {"reward_model_path": "no-rm"}}}  # fmt: skip
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(chain, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "chain.yaml", "--ppo.num_mini_batches", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: chain.yaml (stages.ppo) (stage ppo): num_mini_batches 0 is too small"), err
    assert not (tmp_path / "runs" / "x" / "sft").exists()  # no stage started


def test_align_run_from_another_directory(tmp_path):
    """`align run proj/chain.yaml` from a project folder: the rank stage finds its policy, prompts and labeler."""
    import torch

    from align.data import tinyworld
    from align.io import read_stage_info, write_stage_info
    from align.models import modeling

    path = _project(tmp_path)
    policy = tmp_path / "proj" / "model"
    tok = modeling.wordlevel_tokenizer(tinyworld.vocabulary())
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    model = modeling.new_causal_lm("llama", sizes, tok, max_length=64)
    modeling.set_generation_defaults(model, tok)
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    write_stage_info(policy, "sft", parent=None, recipe={}, data=None, metrics={})

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "align", "run", str(path.relative_to(tmp_path)), "--no_report"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    info = read_stage_info(tmp_path / "runs" / "proj" / "rank")
    assert info["labeler"]["name"] == "proj/labeler.py:score" and info["labeler"]["kind"] == "function"
    assert (tmp_path / "runs" / "proj" / "recipes" / "rank.yaml").is_file()
