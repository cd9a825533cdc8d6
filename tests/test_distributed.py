"""pretrain, sft and rank under `accelerate launch` with two real CPU ranks (a gloo group), not two lone rank-0s."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_sft import TINY_PRETRAIN, TINY_SFT

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"


def launch(stage: str, recipe: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "-m", "align", stage, "--config", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_pretrain_sft_rank_on_two_cpu_ranks(tmp_path):
    pre = tmp_path / "pretrain"
    result = launch("pretrain", {**TINY_PRETRAIN, "output_dir": str(pre), "max_steps": 4}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((pre / "align_stage.json").read_text())
    assert info["num_processes"] == 2  # the Trainer saw a 2-rank group
    assert "x 2 processes" in result.stderr  # the stage summary says so too
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["pretrain"]  # one output, not two

    sft = tmp_path / "sft"
    recipe = {**TINY_SFT, "model_name_or_path": str(pre), "output_dir": str(sft), "max_steps": 3}
    result = launch("sft", recipe, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((sft / "align_stage.json").read_text())
    assert info["num_processes"] == 2 and info["parent"]["stage"] == "pretrain"
    assert "gold_score" in info["metrics"]

    # rank: each process samples its share of 9 prompts (5 + 4); the main process gathers them in order and writes.
    rank = tmp_path / "rank"
    recipe = {"model_name_or_path": str(sft), "output_dir": str(rank), "num_prompts": 9, "max_new_tokens": 8,
              "labeler_noise": 0.1}  # untrained answers all score 0: noise breaks the ties  # fmt: skip
    result = launch("rank", recipe, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((rank / "align_stage.json").read_text())
    assert info["num_processes"] == 2
    from align.data import tinyworld

    expected = tinyworld.instruction_prompts(9, seed=0, split="train")["prompt"]
    rows = [json.loads(line) for line in (rank / "rankings.jsonl").read_text().splitlines()]
    kept = [r["prompt"] for r in rows]
    assert kept == [p for p in expected if p in kept]  # gathered back in prompt order
    assert len(rows) + info["metrics"]["dropped_all_tied"] + info["metrics"]["dropped_empty"] == 9
