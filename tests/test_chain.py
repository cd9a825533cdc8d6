"""`align run`: chain recipes resolve and wire stages; finished stages are skipped, changed ones rerun, a killed stage
resumes; the report agrees with each stage's align_stage.json."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from align.chain import load_chain
from align.errors import AlignError
from align.evaluation.gold import win_rate
from align.io import read_stage_info

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CHAIN_RECIPES = sorted((ROOT / "recipes").rglob("chain*.yaml"))

TINY_PRETRAIN = {
    "model_type": "llama",
    "model_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "tinyworld_stories": 300,
    "max_length": 64,
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "logging_steps": 2,
    "eval_strategy": "no",
    "save_strategy": "no",
    "num_samples": 0,
    "disable_tqdm": True,
}
TINY_SFT = {
    "dataset_name": "tinyworld",
    "tinyworld_demos": 96,
    "dataset_test_size": 16,
    "max_length": 64,
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "logging_steps": 2,
    "eval_strategy": "no",
    "save_strategy": "no",
    "gold_eval_prompts": 8,
    "gold_eval_max_new_tokens": 8,
    "disable_tqdm": True,
}


def write_chain(tmp_path: Path, sft: dict | None = None, **chain) -> Path:
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(TINY_PRETRAIN))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({**TINY_SFT, **(sft or {})}))
    data = {
        "output_root": str(tmp_path / "run"),
        "seed": 7,
        "report_to": "none",
        "stages": {"pretrain": str(tmp_path / "pretrain.yaml"), "sft": str(tmp_path / "sft.yaml")},
        "report": {"examples": 2},
        **chain,
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def align_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "align", "run", *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600
    )


def _line(log: str, needle: str) -> str:
    return next(line for line in log.splitlines() if needle in line)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("path", CHAIN_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_chain_recipes_resolve(path, monkeypatch):
    from align.stages import registry

    monkeypatch.chdir(ROOT)  # shipped recipes name their files from the repo root, as their commands are run

    raw = yaml.safe_load(path.read_text())["stages"]
    optional = [name for name, entry in raw.items() if isinstance(entry, dict) and entry.get("optional")]
    chain = load_chain(path, with_optional=optional)  # every stage's keys checked against its config
    names = [p.name for p in chain.stages]
    assert names == list(raw)  # every entry, the optional ones included, in the recipe's order
    if "ppo" in names:  # InstructGPT's three steps in order (the methods compared with PPO may follow them)
        main = [p.name for p in chain.stages if not p.variant]
        assert main.index("rank") < main.index("reward") < main.index("ppo")
    for plan in chain.stages:
        assert plan.recipe["output_dir"] == str(chain.output_root / plan.name)
        for key, parent in registry.get(plan.stage).parents.items():
            if parent in names:
                assert plan.recipe[key] == str(chain.output_root / parent), (plan.name, key)


def test_there_are_chain_recipes():
    assert {p.parent.name for p in CHAIN_RECIPES} >= {"tiny", "own-data", "gpt2-small"}


def test_shared_inline_and_command_line_keys_in_that_order(tmp_path):
    sft = {"recipe": str(tmp_path / "sft.yaml"), "max_steps": 3}
    stages = {"pretrain": str(tmp_path / "pretrain.yaml"), "sft": sft}
    path = write_chain(tmp_path, stages=stages)
    chain = load_chain(path, shared={"seed": 9}, per_stage={"sft": {"learning_rate": 1e-4}})
    sft = chain.plan("sft").recipe
    assert (sft["seed"], sft["max_steps"], sft["learning_rate"]) == (9, 3, 1e-4)
    assert sft["model_name_or_path"] == str(tmp_path / "run" / "pretrain")
    assert chain.plan("pretrain").recipe["seed"] == 9


def test_a_package_model_ref_resolves_in_the_chain(tmp_path, fake_package):
    from align.chain import fingerprint, resolved_recipe

    ref = "package:align_fake_models/tiny.gguf"
    stages = {"sft": {"recipe": str(tmp_path / "sft.yaml"), "model_name_or_path": ref, "model_hub_id": "acme/tiny"}}
    plan = load_chain(write_chain(tmp_path, stages=stages)).plan("sft")
    assert plan.recipe["model_name_or_path"] == ref  # the stage recipe written for a rerun keeps the reference
    resolved = resolved_recipe(plan)  # what the stage validates and records, before anything runs
    assert resolved["model_name_or_path"] == str((fake_package / "tiny.gguf").resolve())
    assert resolved["model_hub_id"] == "acme/tiny"
    assert fingerprint(plan, resolved) == fingerprint(plan, resolved_recipe(plan))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": {"pretrian": "pretrain.yaml"}}, "unknown stage 'pretrian'; did you mean 'pretrain'"),
        ({"stages": {"sft": "sft.yaml", "pretrain": "pretrain.yaml"}}, "Reorder them"),
        ({"stages": {"sft": {"recipe": "sft.yaml", "output_dir": "x"}}}, "sets 'output_dir'"),
        ({"stages": {"sft": {"recipe": "sft.yaml", "learning_rat": 1}}}, "did you mean 'learning_rate'"),
        ({"seeed": 1}, "shared key 'seeed' is not a key of any stage; did you mean 'seed'"),
        ({"report": {"exampels": 3}}, "unknown report key 'exampels'; did you mean 'examples'"),
        ({"output_root": ""}, "'output_root' is not set"),
    ],
)
def test_bad_chain_recipes_name_the_key(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)  # the relative stage recipes above: paths are relative to the working directory
    path = write_chain(tmp_path, **change)
    with pytest.raises(AlignError, match=message):
        load_chain(path)


LSTM_ENTRY = {"stage": "pretrain", "optional": True, "model_type": "lstm",
              "model_config": {"hidden_size": 24, "num_hidden_layers": 1}}  # fmt: skip


def test_a_variant_entry_runs_its_stage_beside_the_chain_only_when_asked(tmp_path):
    stages = {"pretrain": str(tmp_path / "pretrain.yaml"), "sft": str(tmp_path / "sft.yaml"),
              "pretrain_lstm": {"recipe": str(tmp_path / "pretrain.yaml"), **LSTM_ENTRY},
              "sft_long": {"recipe": str(tmp_path / "sft.yaml"), "stage": "sft", "max_steps": 9}}  # fmt: skip
    path = write_chain(tmp_path, stages=stages)
    chain = load_chain(path)
    assert [(p.name, p.stage) for p in chain.stages] == [("pretrain", "pretrain"), ("sft", "sft"), ("sft_long", "sft")]
    long = chain.plan("sft_long")
    # wired as its stage (to the chain's pretrain), written to its own dir
    assert long.recipe["model_name_or_path"] == str(chain.output_root / "pretrain") and long.parents == ["pretrain"]
    assert long.recipe["output_dir"] == str(chain.output_root / "sft_long") and long.recipe["max_steps"] == 9
    lstm = load_chain(path, with_optional=("pretrain_lstm",), per_stage={"pretrain_lstm": {"max_steps": 4}})
    plan = lstm.plan("pretrain_lstm")
    assert (plan.stage, plan.recipe["model_type"], plan.recipe["max_steps"]) == ("pretrain", "lstm", 4)
    assert plan.recipe["output_dir"] == str(lstm.output_root / "pretrain_lstm") and plan.parents == []
    with pytest.raises(AlignError, match="'pretrain_lstm' is not in .* It is optional: add --with pretrain_lstm"):
        load_chain(path, per_stage={"pretrain_lstm": {"max_steps": 4}})
    with pytest.raises(AlignError, match="--with pretrain_lsmt: not an entry of"):
        load_chain(path, with_optional=("pretrain_lsmt",))


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ({"baseline": {"recipe": "pretrain.yaml"}}, "unknown stage 'baseline'; the stages are pretrain, .* variant"),
        ({"pretrain": "pretrain.yaml", "big": {"stage": "pretrian"}}, "'stage: pretrian' of entry 'big'; did you"),
        ({"long": {"stage": "sft"}, "pretrain": "pretrain.yaml"}, "'long' is listed before its parent 'pretrain'"),
    ],
)
def test_bad_variant_entries_name_the_entry(tmp_path, monkeypatch, stages, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AlignError, match=message):
        load_chain(write_chain(tmp_path, stages=stages))


def test_a_variant_that_runs_invalidates_no_later_stage(tmp_path):
    stages = {"pretrain": str(tmp_path / "pretrain.yaml"),
              "pretrain_lstm": {"recipe": str(tmp_path / "pretrain.yaml"), **LSTM_ENTRY},
              "sft": str(tmp_path / "sft.yaml")}  # fmt: skip
    path = write_chain(tmp_path, stages=stages)
    run = tmp_path / "run"
    first = align_run(str(path), "--no_report")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (run / "pretrain_lstm").exists()  # optional, not asked
    stamp = (run / "sft" / "align_stage.json").stat().st_mtime_ns
    again = align_run(str(path), "--with", "pretrain_lstm")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "running (not run yet)" in _line(again.stderr, "[2/3] pretrain_lstm")
    assert "skipped (done, recipe unchanged)" in _line(again.stderr, "[3/3] sft")
    assert (run / "sft" / "align_stage.json").stat().st_mtime_ns == stamp
    info = read_stage_info(run / "pretrain_lstm")
    assert info["stage"] == "pretrain" and info["recipe"]["model_type"] == "lstm"
    report = json.loads((run / "report.json").read_text())
    lstm = report["headline"]["lstm_vs_transformer"]["lstm"]
    assert lstm["eval_loss"] == pytest.approx(info["metrics"]["eval_loss"])
    rerun = align_run(str(path), "--with", "pretrain_lstm", "--no_report")  # the variant is done: skipped too
    assert rerun.stderr.count(": skipped (done, recipe unchanged)") == 3, rerun.stderr[-3000:]


def test_bad_flags_exit_2_with_one_line(tmp_path):
    path = write_chain(tmp_path)
    for args, message in ((["--only", "ppo"], "--only ppo: not a stage"), (["--sfd.max_steps", "2"], "did you mean")):
        result = align_run(str(path), *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Running: pretrain -> sft on tiny models


def test_chain_runs_then_skips_then_reruns_what_changed(tmp_path):
    path = write_chain(tmp_path)
    run = tmp_path / "run"
    first = align_run(str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    pretrain, sft = read_stage_info(run / "pretrain"), read_stage_info(run / "sft")
    assert sft["parent"] == {"stage": "pretrain", "path": str((run / "pretrain").resolve())}
    assert pretrain["recipe"]["seed"] == sft["recipe"]["seed"] == 7

    # The report: the headline win-rate is the one the SFT stage's per-prompt gold scores give.
    report = json.loads((run / "report.json").read_text())
    expected = win_rate(sft["gold_scores"], sft["parent_gold_scores"])
    assert report["gold_win_rate_sft_vs_pretrain"] == pytest.approx(expected)
    assert report["headline"]["gold_score"] == {
        "pretrain": pytest.approx(sft["metrics"]["parent_gold_score"]),
        "sft": pytest.approx(sft["metrics"]["gold_score"]),
    }
    rows = {(r["stage"], r["metric"]): r["value"] for r in report["metrics"]}
    assert rows[("pretrain", "eval_loss")] == pytest.approx(pretrain["metrics"]["eval_loss"])
    assert [set(e["answers"]) for e in report["examples"]] == [{"pretrain", "sft"}] * 2
    assert all(0 <= a["gold_score"] <= 1 for e in report["examples"] for a in e["answers"].values())
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(report["plots"]) >= 2
    assert "SFT beats the pretrained model" in (run / "report.md").read_text()
    assert (run / "recipes" / "sft.yaml").is_file()

    # Unchanged: both skipped, nothing rewritten.
    stamp = (run / "sft" / "align_stage.json").stat().st_mtime_ns
    again = align_run(str(path), "--no_report")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(": skipped (done, recipe unchanged)") == 2
    assert (run / "sft" / "align_stage.json").stat().st_mtime_ns == stamp

    # A changed SFT key: pretrain skipped, sft reruns and says why.
    changed = align_run(str(path), "--sft.learning_rate", "0.001", "--no_report")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "skipped" in _line(changed.stderr, "[1/2] pretrain")
    assert "recipe changed (learning_rate: 0.003 -> 0.001)" in changed.stderr
    assert read_stage_info(run / "sft")["recipe"]["learning_rate"] == 0.001


def test_killed_chain_resumes_the_stage_and_skips_finished_ones(tmp_path):
    # SFT long enough to be killed after a checkpoint and before it finishes.
    path = write_chain(
        tmp_path, sft={"max_steps": 400, "save_strategy": "steps", "save_steps": 5, "save_total_limit": 2}
    )
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "align", "run", str(path), "--no_report"],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    from align.io import last_checkpoint

    deadline = time.monotonic() + 300
    while last_checkpoint(run / "sft") is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the chain and its stage process, as a Ctrl-C'd terminal or a lost node
    proc.wait()
    assert read_stage_info(run / "pretrain") is not None
    assert read_stage_info(run / "sft") is None, "sft finished before it could be killed; raise its max_steps"
    killed_at = int(last_checkpoint(run / "sft").name.split("-")[1])

    again = align_run(str(path), "--no_report")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _line(again.stderr, "[1/2] pretrain").endswith(": skipped (done, recipe unchanged)")
    assert _line(again.stderr, "[2/2] sft").endswith(": resuming (not finished)")
    assert "Resuming from" in again.stderr
    history = read_stage_info(run / "sft")["log_history"]
    assert history[-1]["step"] == 400 and killed_at < 400


# ---------------------------------------------------------------------------------------------------------------------
# The whole chain on tiny models

TINY_RANK = {"num_prompts": 24, "num_generations": 4, "max_new_tokens": 12, "labeler_noise": 0.1}
TINY_REWARD = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "dataset_test_size": 0.25,
    "max_length": 64,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
}
TINY_PPO = {
    "tinyworld_prompts": 32,
    "max_steps": 3,
    "per_device_train_batch_size": 4,
    "num_mini_batches": 2,
    "num_ppo_epochs": 1,
    "max_new_tokens": 8,
    "gold_eval_prompts": 8,
    "gold_eval_max_new_tokens": 8,
    "per_device_eval_batch_size": 8,
    "eval_strategy": "steps",
    "eval_steps": 2,
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
}


@pytest.mark.slow
def test_tiny_chain_end_to_end_report_matches_the_stages(tmp_path):
    for name, recipe in (("rank", TINY_RANK), ("reward", TINY_REWARD), ("ppo", TINY_PPO)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    stages = {s: str(tmp_path / f"{s}.yaml") for s in ("pretrain", "sft", "rank", "reward", "ppo")}
    path = write_chain(tmp_path, stages=stages, report={"examples": 3})
    result = align_run(str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    info = {s: read_stage_info(run / s) for s in stages}
    assert info["rank"]["parent"]["path"] == str((run / "sft").resolve())
    assert info["reward"]["parent"]["path"] == str((run / "sft").resolve())
    assert info["ppo"]["reward_model"]["path"] == str((run / "reward").resolve())

    report = json.loads((run / "report.json").read_text())
    # PPO and SFT answered the same 8 held-out prompts with the same decoding: PPO's parent scores are SFT's own.
    assert info["ppo"]["parent_gold_scores"] == info["sft"]["gold_scores"]
    assert report["gold_win_rate_ppo_vs_sft"] == pytest.approx(
        win_rate(info["ppo"]["gold_scores"], info["sft"]["gold_scores"])
    )
    assert report["gold_win_rate_sft_vs_pretrain"] == pytest.approx(
        win_rate(info["sft"]["gold_scores"], info["sft"]["parent_gold_scores"])
    )
    # sampled at temperature 1: the same reuse, and the report's sampled headline is the stages' numbers
    assert info["ppo"]["parent_gold_scores_sampled"] == info["sft"]["gold_scores_sampled"]
    assert report["gold_win_rate_ppo_vs_sft_sampled"] == pytest.approx(
        win_rate(info["ppo"]["gold_scores_sampled"], info["sft"]["gold_scores_sampled"])
    )
    assert report["headline"]["gold_score_sampled"] == {
        "sft": pytest.approx(info["sft"]["metrics"]["gold_score_sampled"]),
        "ppo": pytest.approx(info["ppo"]["metrics"]["gold_score_sampled"]),
    }
    assert report["headline"]["gold_score"]["ppo"] == pytest.approx(info["ppo"]["metrics"]["gold_score"])
    assert report["headline"]["ppo_kl"] == pytest.approx(info["ppo"]["metrics"]["kl"])
    for row in report["metrics"]:
        if row["metric"] != "train_runtime":
            assert row["value"] == pytest.approx(info[row["stage"]]["metrics"][row["metric"]]), row
    assert {("reward", "pair_accuracy"), ("ppo", "gold_score"), ("ppo", "kl")} <= {
        (r["stage"], r["metric"]) for r in report["metrics"]
    }
    assert set(report["plots"]) >= {"pretrain_loss", "sft_loss", "ppo_curves", "gold_scores"}
    for example in report["examples"]:
        assert set(example["answers"]) == {"pretrain", "sft", "ppo"}
        assert all({"gold_score", "reward"} <= set(a) for a in example["answers"].values())
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(report["plots"])
    assert "PPO beats SFT on" in (run / "report.md").read_text()
    assert "Sampled at temperature 1 (4 answers per prompt" in (run / "report.md").read_text()
    assert "PPO minus SFT, per prompt, sampled: " in (run / "report.md").read_text()
    diff, ppo_metrics = report["headline"]["gold_diff_ppo_vs_sft"], info["ppo"]["metrics"]
    assert diff["mean"] == pytest.approx(ppo_metrics["gold_score"] - ppo_metrics["parent_gold_score"])
    assert diff["low"] <= diff["mean"] <= diff["high"]


def test_accelerate_config_launches_every_stage_under_accelerate(tmp_path):
    from align.chain import stage_command

    config = ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
    chain = load_chain(write_chain(tmp_path, accelerate_config=str(config)))
    cmd = stage_command(chain, chain.plan("sft"), tmp_path / "sft.yaml")
    assert cmd[1:] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        "align",
        "sft",
        "--config",
        str(tmp_path / "sft.yaml"),
    ]
    plain = load_chain(write_chain(tmp_path))
    assert stage_command(plain, plain.plan("sft"), tmp_path / "x.yaml")[1:] == [
        "-m",
        "align",
        "sft",
        "--config",
        str(tmp_path / "x.yaml"),
    ]
    with pytest.raises(AlignError, match="accelerate_config .* does not exist"):
        load_chain(write_chain(tmp_path, accelerate_config="missing.yaml"))
