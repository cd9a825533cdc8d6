"""`align pretrain` end to end on a tiny model: outputs, lineage, pipeline loading, kill-and-resume, bad data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = {
    "model_type": "llama",
    "model_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "tinyworld_stories": 400,
    "dataset_test_size": 0.1,
    "max_length": 64,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "steps",
    "eval_strategy": "no",
    "num_samples": 2,
    "sample_max_new_tokens": 8,
    "dataloader_num_workers": 0,
}


def _recipe(tmp_path: Path, **over) -> Path:
    import yaml

    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out"), **over}))
    return path


def _align(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, env=env, **kw)


def test_pretrain_tiny_world_writes_a_loadable_stage(tmp_path):
    from transformers import pipeline

    from align.config import parse_config
    from align.stages.pretrain import run

    cfg = parse_config("pretrain", ["--config", str(_recipe(tmp_path, max_steps=12, save_steps=100)),
                                    "--eval_strategy", "steps", "--eval_steps", "12"])
    out = run(cfg)
    info = json.loads((out / "align_stage.json").read_text())
    assert info["stage"] == "pretrain" and info["parent"] is None
    m = info["metrics"]
    # The loss fell from ~log(V) and the floor is a real, smaller number in the same unit.
    assert 0 < m["entropy_floor"] < m["eval_loss"]
    first = next(h["loss"] for h in info["log_history"] if "loss" in h)
    assert m["eval_loss"] < first
    assert m["perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"], rel=1e-6)
    assert info["data"]["name"] == "tinyworld" and info["data"]["rows"] > 0 and info["data"]["fingerprint"]
    assert info["recipe"]["max_steps"] == 12 and len(info["recipe_sha256"]) == 64
    assert len(info["samples"]) == 2
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    gen = pipeline("text-generation", model=str(out))
    text = gen("tom", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("tom")


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    recipe = _recipe(tmp_path, max_steps=5000, save_steps=2, tinyworld_stories=2000)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "align", "pretrain", "--config", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})

    def saved_steps() -> list[int]:  # save_total_limit=2 rotates old ones away, so look for any
        return [int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json")]

    deadline = time.time() + 240
    while time.time() < deadline and max(saved_steps(), default=0) < 4:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(saved_steps(), default=0) >= 4, "no checkpoint was written before the kill"
    assert not (out / "align_stage.json").exists()  # killed: the stage is not marked done
    done = max(saved_steps())

    result = _align("pretrain", "--config", str(recipe), "--max_steps", str(done + 3), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resuming from {out / f'checkpoint-{done}'}" in result.stderr
    info = json.loads((out / "align_stage.json").read_text())
    steps = [h["step"] for h in info["log_history"] if "loss" in h]
    assert steps[-1] == done + 3  # the step count continued from the checkpoint


def test_bad_data_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "a b c"}\n{"text": "d e f"\n')
    result = _align("pretrain", "--config", str(_recipe(tmp_path, max_steps=1)), "--dataset_name", str(bad))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "corpus.jsonl" in last and ":2" in last
    assert "Traceback" not in result.stderr


def test_missing_text_column_lists_columns(tmp_path):
    data = tmp_path / "corpus.csv"
    data.write_text("story,id\nonce upon a time,1\n")
    result = _align("pretrain", "--config", str(_recipe(tmp_path, max_steps=1)), "--dataset_name", str(data))
    assert result.returncode == 2
    assert "story" in result.stderr.strip().splitlines()[-1]
