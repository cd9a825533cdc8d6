"""Faults (issue 19): one writer per output dir (`.align.lock`); kill -9 at a random moment of every stage and of the
chain, after which the rerun resumes exactly or restarts cleanly and a half-written dir never reads as done; a full
disk while a checkpoint is written (the previous one stands, one line names the file and the fix); NaN from a real
reward model (PPO stops naming the update and the metric).

A kill test runs the stage as `python -m align <stage>` and SIGKILLs its process group a delay after the stage took
its lock, drawn by `random.Random(seed)` from the time an uninterrupted run of the same recipe took (in-process); the
rerun (in-process) must then equal that run. By default one stage is killed at one point; `-m slow` kills every stage
at several points, and the whole tiny chain mid-stage and mid-report.
"""

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from tiny_stages import save_stage, tiny_policy, tiny_reward_model  # tests/ is on sys.path

from align.cli import main as cli_main
from align.config import parse_config
from align.errors import AlignError
from align.io import (
    LOCK_FILE,
    STAGE_FILE,
    last_checkpoint,
    output_lock,
    read_stage_info,
    stage_lifecycle,
    write_stage_info,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

torch.set_num_threads(1)  # in-process runs compute as the OMP_NUM_THREADS=1 subprocesses do, to the last bit

PRETRAIN = {
    "model_type": "llama",
    "model_config": SIZES,
    "tinyworld_stories": 300,
    "dataset_test_size": 0.1,
    "max_length": 64,
    "max_steps": 200,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 20,
    "eval_strategy": "no",
    "num_samples": 2,
    "sample_max_new_tokens": 4,
    "dataloader_num_workers": 0,
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}


def ppo_recipe(tiny: dict[str, Path], **over) -> dict:
    return {
        "model_name_or_path": str(tiny["sft"]),
        "reward_model_path": str(tiny["reward"]),
        "tinyworld_prompts": 64,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "num_mini_batches": 2,
        "num_ppo_epochs": 1,
        "max_new_tokens": 8,
        "learning_rate": 1e-3,
        "gold_eval_prompts": 0,
        "eval_strategy": "no",
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "num_sample_generations": 1,
        "seed": 3,
        **over,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def run_stage(stage: str, recipe: dict, out: Path) -> dict:
    """`align <stage>` in-process on `recipe` with `output_dir` `out`; returns its align_stage.json."""
    import importlib

    module = importlib.import_module(f"align.stages.{stage}")
    module.run(parse_config(stage, [], overrides={**recipe, "output_dir": str(out)}))
    return read_stage_info(out)


def timed(stage: str, recipe: dict, out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    info = run_stage(stage, recipe, out)
    return info, time.perf_counter() - start


def write_recipe(path: Path, recipe: dict, out: Path) -> Path:
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(out)}))
    return path


def _holder_pid(lock_dir: Path) -> int | None:
    try:
        return json.loads((lock_dir / LOCK_FILE).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def run_and_kill(args: list[str], lock_dir: Path, delay: float, log: Path, ready=None) -> bool:
    """`python -m align *args`, SIGKILLed with its children `delay` seconds after it took the lock of `lock_dir` (and
    `ready()` holds, when given). Returns True when it finished before (it must have succeeded then)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "align", *args], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while proc.poll() is None and not (_holder_pid(lock_dir) == proc.pid and (ready is None or ready())):
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.01)
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False
    assert rc == 0, log.read_text()[-3000:]
    return True


def kill_point(mode: str, out: Path, ref: dict, seconds: float, save_steps: int, rng: random.Random):
    """(ready, delay) for `run_and_kill`, from the uninterrupted run `ref` (which took `seconds`):
    "start": anywhere from the stage's start; "ckpt": after a checkpoint drawn at random, before the next one is
    complete (mid-step or mid-save); "end": after the last checkpoint, while it evaluates, samples or saves."""
    if mode == "start":
        return None, rng.uniform(0.1, 0.9) * seconds
    steps = max(h["step"] for h in ref["log_history"])
    training = ref["metrics"]["train_runtime"]
    if mode == "ckpt":
        at = rng.choice(range(save_steps, steps, save_steps))
        delay = rng.uniform(0.0, 1.0) * training * save_steps / steps
    else:
        at, delay = steps, rng.uniform(0.0, 1.0) * max(seconds - training, 0.5)
    return (out / f"checkpoint-{at}" / "trainer_state.json").is_file, delay


def _what(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if k not in ("output_dir", "logging_dir")}


def assert_killed_dir(out: Path, ref: dict) -> None:
    """What a kill left reads as unfinished (no align_stage.json), or as done by this very run (it was killed after
    writing align_stage.json, while it exited: same recipe as `ref`), never as an earlier run's."""
    info = read_stage_info(out)
    if info is not None:
        assert _what(info["recipe"]) == _what(ref["recipe"]), "a killed run's dir reads as done"


def _unstable(key: str) -> bool:
    # Timings differ between any two runs (Trainer's evaluate() also times the model's preparation when train() did
    # not prepare it). Trainer's train_loss averages the steps this process ran (transformers 5: a run resumed at
    # step k reports the mean of steps k+1..N), so it is not a property of the result.
    # TRL's SFTTrainer counts num_tokens in memory only: a resumed run counts from 0 (a log counter, not a result).
    unstable = ("runtime", "per_second", "seconds", "time/", "preparation_time", "train_loss", "num_tokens")
    return any(s in key for s in unstable)


def _stable(d: dict) -> dict:
    return {k: v for k, v in d.items() if not _unstable(k)}


def assert_same_run(got: dict, want: dict, paths: tuple[str, ...] = ()) -> None:
    """Two align_stage.json: same recipe (but `paths`), equal metrics and log history (timings aside), samples."""
    assert got is not None, "the rerun did not finish"
    assert {k: v for k, v in _what(got["recipe"]).items() if k not in paths} == {
        k: v for k, v in _what(want["recipe"]).items() if k not in paths
    }
    assert _stable(got["metrics"]) == pytest.approx(_stable(want["metrics"]), rel=1e-5, abs=1e-6, nan_ok=True)
    got_h, want_h = [_stable(h) for h in got.get("log_history", [])], [_stable(h) for h in want.get("log_history", [])]
    assert [sorted(h) for h in got_h] == [sorted(h) for h in want_h]
    for g, w in zip(got_h, want_h, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-6, nan_ok=True)
    for key in ("samples", "gold_scores", "gold_scores_sampled"):
        assert got.get(key) == want.get(key), key


def assert_same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    from safetensors.torch import load_file

    x, y = load_file(a / name), load_file(b / name)
    assert sorted(x) == sorted(y)
    for key in x:
        torch.testing.assert_close(x[key], y[key], msg=key)


HOLD = """import sys, time
from align.io import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


@contextlib.contextmanager
def held_elsewhere(path: Path):
    """`path` locked by another (light) process for the duration."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=ENV,
                            cwd=ROOT)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------------------------------
# Tiny stage dirs: a policy ("sft"), a reward model, one whose score head is NaN, rankings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from datasets import Dataset

    from align.data import tinyworld
    from align.models import modeling

    root = tmp_path_factory.mktemp("tiny")
    words = tinyworld.vocabulary()
    tok = modeling.wordlevel_tokenizer(words)
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    sft = save_stage(root / "sft", tiny_policy(tok, SIZES), tok, "sft")
    rm = tiny_reward_model(tok, SIZES)
    out = {"sft": sft}
    for name in ("reward", "nan_reward"):
        if name == "nan_reward":
            with torch.no_grad():
                rm.score.weight.fill_(float("nan"))  # a real model that scores every text nan
        out[name] = save_stage(root / name, rm, tok, "reward", parent={"stage": "sft", "path": str(sft)})

    rng = random.Random(0)
    prompts = list(tinyworld.instruction_prompts(32, seed=0, split="train")["prompt"])
    plain = [w for w in words if w.isalpha()]
    rows = []
    for p in prompts:
        responses = [" ".join(rng.choice(plain) for _ in range(rng.randint(2, 6))) for _ in range(3)]
        rows.append({"prompt": p, "responses": responses, "ranking": rng.sample(range(3), 3)})
    rank = root / "rank"
    rank.mkdir()
    (rank / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Dataset.from_list(rows).save_to_disk(str(rank / "dataset"))
    write_stage_info(rank, "rank", parent=None, recipe={}, data=None, metrics={})
    out["rank"] = rank
    return out


@pytest.fixture(scope="module")
def pretrain_ref(tmp_path_factory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("ref") / "pretrain"
    info, seconds = timed("pretrain", PRETRAIN, out)
    return out, info, seconds


# ---------------------------------------------------------------------------------------------------------------------
# One writer per output dir


def test_second_writer_refuses_naming_the_holder_then_a_stale_lock_is_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with held_elsewhere(out) as holder:
        with pytest.raises(AlignError) as e, output_lock(out):
            pass
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"{out}: in use by pid {holder.pid} on {socket.gethostname()} (python -c ")
        assert " since 20" in msg and f"(lock file {out / LOCK_FILE})" in msg

        # `align run` on the same root refuses the same way: one line, exit 2 (in-process: no interpreter start).
        chain = tmp_path / "chain.yaml"
        chain.write_text(yaml.safe_dump({"output_root": str(out), "stages": {"pretrain": {"max_steps": 1}}}))
        assert cli_main(["run", str(chain)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: in use by pid {holder.pid} on ")
    # The holder died without releasing (kill): its lock file stays; the next writer takes it over and says so.
    assert (out / LOCK_FILE).is_file()
    with caplog.at_level(logging.WARNING, logger="align.io"), output_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with output_lock(out):  # re-entrant in one process: a stage run by code that holds its dir
            pass
    assert f"taking over the lock left by pid {holder.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released


def test_cli_stage_on_a_locked_dir_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "pretrain.yaml", {**PRETRAIN, "max_steps": 1}, out)
    with held_elsewhere(out) as holder:
        result = subprocess.run([sys.executable, "-m", "align", "pretrain", "--config", str(recipe)], env=ENV,
                                cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"error: {out}: in use by pid {holder.pid} on ")
    assert not (out / "model.safetensors").exists()


def test_stale_lock_of_a_dead_pid_is_taken_over_and_one_from_another_host_is_refused(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    body = {"pid": dead_pid(), "host": socket.gethostname(), "command": "align sft --config x", "since": "then"}
    (out / LOCK_FILE).write_text(json.dumps(body))
    with caplog.at_level(logging.WARNING, logger="align.io"), output_lock(out):
        pass
    assert f"taking over the lock left by pid {body['pid']} on {body['host']} (align sft --config x)" in caplog.text

    (out / LOCK_FILE).write_text(json.dumps({**body, "host": "elsewhere"}))
    with pytest.raises(AlignError, match=f"another host, .* If that run is over .* delete {out / LOCK_FILE}"):
        with output_lock(out):
            pass


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ran = []
    stage = stage_lifecycle(lambda cfg: ran.append(cfg.output_dir) or Path(cfg.output_dir))
    cfg = SimpleNamespace(output_dir=str(out))
    with held_elsewhere(out):
        monkeypatch.setenv("RANK", "1")  # a second process of `accelerate launch`: runs, never refuses
        stage(cfg)
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(AlignError, match="in use by pid"):
            stage(cfg)
    assert ran == [str(out)]


# ---------------------------------------------------------------------------------------------------------------------
# A stage's start: an earlier run's marker is set aside, and back if nothing was written; unfinished inputs refused


def test_rerun_sets_the_old_marker_aside_and_restores_it_only_when_nothing_was_written(tmp_path):
    out = tmp_path / "out"
    write_stage_info(out, "sft", parent=None, recipe={"run": 1}, data=None, metrics={})
    cfg = SimpleNamespace(output_dir=str(out))

    def fails_early(cfg):
        assert read_stage_info(cfg.output_dir) is None  # a kill from here on leaves an unfinished dir
        raise AlignError("data.jsonl:3: bad row")

    with pytest.raises(AlignError, match="bad row"):
        stage_lifecycle(fails_early)(cfg)
    assert read_stage_info(out)["recipe"] == {"run": 1}  # nothing written: the earlier run stands

    def fails_after_writing(cfg):
        (Path(cfg.output_dir) / "model.safetensors").write_bytes(b"half")
        raise AlignError("ppo: update 3: ppo/kl is nan or inf")

    with pytest.raises(AlignError, match="nan"):
        stage_lifecycle(fails_after_writing)(cfg)
    assert read_stage_info(out) is None  # new bytes beside the old: unfinished, never done

    def finishes(cfg):
        write_stage_info(cfg.output_dir, "sft", parent=None, recipe={"run": 2}, data=None, metrics={})
        return Path(cfg.output_dir)

    stage_lifecycle(finishes)(cfg)
    assert read_stage_info(out)["recipe"] == {"run": 2}
    assert sorted(p.name for p in out.iterdir()) == [STAGE_FILE, "model.safetensors"]  # no lock, nothing aside


def test_an_input_that_is_an_unfinished_stage_is_refused(tmp_path):
    parent = tmp_path / "pretrain"
    parent.mkdir()
    body = {"pid": dead_pid(), "host": socket.gethostname(), "command": "align pretrain", "since": "then"}
    (parent / LOCK_FILE).write_text(json.dumps(body))  # killed: its lock stays, no align_stage.json
    (parent / "model.safetensors").write_bytes(b"half")
    stage = stage_lifecycle(lambda cfg: Path(cfg.output_dir))
    cfg = SimpleNamespace(output_dir=str(tmp_path / "sft"), model_name_or_path=str(parent))
    with pytest.raises(AlignError) as e:
        stage(cfg)
    assert str(e.value).startswith(f"model_name_or_path {parent}: that stage is still running or was interrupted")
    assert f"pid {body['pid']}" in str(e.value) and "rerun it to the end" in str(e.value)
    write_stage_info(parent, "pretrain", parent=None, recipe={}, data=None, metrics={})  # finished after all
    assert stage(cfg) == tmp_path / "sft"


# ---------------------------------------------------------------------------------------------------------------------
# kill -9


def test_pretrain_killed_at_a_random_moment_resumes_exactly(pretrain_ref, tmp_path, caplog):
    ref_dir, ref, seconds = pretrain_ref
    out = tmp_path / "pretrain"
    # An earlier, different run finished here: a killed rerun must not leave its marker beside half-new weights.
    write_stage_info(out, "pretrain", parent=None, recipe={"max_steps": 1}, data=None, metrics={})
    recipe = write_recipe(tmp_path / "pretrain.yaml", PRETRAIN, out)
    # Mid-training, between two checkpoints (`-m slow` also kills it from the start and after the last one).
    ready, delay = kill_point("ckpt", out, ref, seconds, PRETRAIN["save_steps"], random.Random(0))
    run_and_kill(["pretrain", "--config", str(recipe)], out, delay, tmp_path / "killed.log", ready=ready)
    assert_killed_dir(out, ref)
    unfinished = read_stage_info(out) is None
    with caplog.at_level(logging.INFO):
        got = run_stage("pretrain", PRETRAIN, out)
    assert not unfinished or "taking over the lock left by pid" in caplog.text
    assert_same_run(got, ref)
    assert_same_weights(out, ref_dir)


# ---------------------------------------------------------------------------------------------------------------------
# A full disk while a checkpoint is written


def _enospc(filename) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))


def test_full_disk_during_a_trainer_checkpoint_keeps_the_previous_one(pretrain_ref, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    ref_dir, ref, _ = pretrain_ref
    out = tmp_path / "pretrain"
    real, calls = mu.safe_save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # checkpoint-40: half a file, then no space
            Path(filename).write_bytes(b"\0" * 64)
            raise _enospc(filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    with pytest.raises(AlignError) as e:
        run_stage("pretrain", PRETRAIN, out)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{out / 'checkpoint-40' / 'model.safetensors'}: no space left on device. {out} is not "
                          "marked done; the last complete checkpoint (checkpoint-20) is intact; the partial "
                          "checkpoint-40 was removed. Free space")  # fmt: skip
    assert last_checkpoint(out) == out / "checkpoint-20" and not (out / "checkpoint-40").exists()
    assert read_stage_info(out) is None and not (out / LOCK_FILE).exists()

    monkeypatch.setattr(mu, "safe_save_file", real)  # space freed: the rerun resumes from checkpoint-20
    assert_same_run(run_stage("pretrain", PRETRAIN, out), ref)
    assert_same_weights(out, ref_dir)


def test_full_disk_during_a_ppo_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    ref = run_stage("ppo", ppo_recipe(tiny), tmp_path / "ref")
    out = tmp_path / "ppo"
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-2.tmp/optimizer.pt"):
            Path(f).write_bytes(b"\0" * 64)
            raise _enospc(f)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(AlignError) as e:
        run_stage("ppo", ppo_recipe(tiny), out)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{out / 'checkpoint-2.tmp' / 'optimizer.pt'}: no space left on device. {out} is not "
                          "marked done; the last complete checkpoint (checkpoint-1) is intact. Free space")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert last_checkpoint(out) == out / "checkpoint-1" and read_stage_info(out) is None

    monkeypatch.setattr(torch, "save", real)
    got = run_stage("ppo", ppo_recipe(tiny), out)
    assert_same_run(got, ref)
    assert_same_weights(out, tmp_path / "ref")


# ---------------------------------------------------------------------------------------------------------------------
# NaN from a real reward model


def test_nan_from_a_real_reward_model_stops_ppo_naming_update_and_metric(tiny, tmp_path, capsys):
    out = tmp_path / "ppo"
    recipe = write_recipe(tmp_path / "ppo.yaml", ppo_recipe(tiny, reward_model_path=str(tiny["nan_reward"]),
                                                            max_steps=1), out)  # fmt: skip
    assert cli_main(["ppo", "--config", str(recipe)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1
    assert err[0].startswith("error: ppo: update 1: ppo/score is nan or inf; stopped (no checkpoint was written yet).")
    assert "check the reward model's outputs" in err[0]
    assert read_stage_info(out) is None


# ---------------------------------------------------------------------------------------------------------------------
# Slow: every stage killed at several points; the whole tiny chain mid-stage and mid-report

SFT = {
    "dataset_name": "tinyworld",
    "tinyworld_demos": 96,
    "dataset_test_size": 16,
    "max_length": 64,
    "max_steps": 24,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 4,
    "gold_eval_prompts": 8,
    "gold_eval_max_new_tokens": 8,
    "gold_eval_samples": 2,
    "report_to": "none",
    "disable_tqdm": True,
    "use_cpu": True,
}
RANK = {"num_prompts": 64, "num_generations": 3, "max_new_tokens": 8, "generation_batch_size": 8,
        "labeler_noise": 0.1, "use_cpu": True, "seed": 3}  # fmt: skip
REWARD = {
    "dataset_test_size": 0.25,
    "max_length": 48,
    "num_train_epochs": 4,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 16,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 5,
    "bf16": False,
    "use_cpu": True,
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}


def _recipes(tiny) -> dict[str, tuple[str, dict]]:
    """kind -> (stage, recipe) of each slow kill case."""
    policy = {"model_name_or_path": str(tiny["sft"])}
    return {
        "pretrain": ("pretrain", PRETRAIN),
        "sft": ("sft", {**SFT, **policy}),
        "rank": ("rank", {**RANK, **policy}),
        "reward": ("reward", {**REWARD, **policy, "dataset_name": str(tiny["rank"])}),
        "reward_no_save": ("reward", {**REWARD, **policy, "dataset_name": str(tiny["rank"]), "save_strategy": "no"}),
        # with gold evals, and the last checkpoint (6) written after the final eval
        "ppo": ("ppo", ppo_recipe(tiny, max_steps=6, save_steps=4, gold_eval_prompts=8, gold_eval_max_new_tokens=8,
                                  eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=8)),  # fmt: skip
    }


@pytest.fixture(scope="module")
def references(tiny, tmp_path_factory):
    cache: dict[str, tuple[Path, dict, float]] = {}

    def get(kind: str) -> tuple[Path, dict, float]:
        if kind not in cache:
            stage, recipe = _recipes(tiny)[kind]
            out = tmp_path_factory.mktemp(f"ref_{kind}") / stage
            info, seconds = timed(stage, recipe, out)
            cache[kind] = (out, info, seconds)
        return cache[kind]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "mode", "seed"),
    [("pretrain", "start", 1), ("pretrain", "ckpt", 2), ("pretrain", "end", 3), ("sft", "ckpt", 0),
     ("sft", "end", 1), ("rank", "start", 0), ("rank", "start", 1), ("reward", "start", 0), ("reward", "ckpt", 1),
     ("reward_no_save", "start", 0), ("ppo", "start", 0), ("ppo", "ckpt", 1), ("ppo", "end", 2)],
)  # fmt: skip
def test_every_stage_killed_at_a_random_moment_reruns_to_the_same_result(kind, mode, seed, tiny, references,
                                                                          tmp_path):  # fmt: skip
    ref_dir, ref, seconds = references(kind)
    stage, recipe = _recipes(tiny)[kind]
    out = tmp_path / stage
    ready, delay = kill_point(mode, out, ref, seconds, recipe.get("save_steps", 0), random.Random(seed))
    args = [stage, "--config", str(write_recipe(tmp_path / f"{stage}.yaml", recipe, out))]
    write_stage_info(out, stage, parent=None, recipe={"an": "earlier run"}, data=None, metrics={})
    run_and_kill(args, out, delay, tmp_path / "killed.log", ready=ready)
    assert_killed_dir(out, ref)
    got = run_stage(stage, recipe, out)
    assert_same_run(got, ref)
    if stage == "rank":
        assert (out / "rankings.jsonl").read_text() == (ref_dir / "rankings.jsonl").read_text()
        assert not (out / "dataset.tmp").exists()
    else:
        assert_same_weights(out, ref_dir)


CHAIN_STAGES = {
    "pretrain": {**PRETRAIN, "max_steps": 12, "save_strategy": "no", "num_samples": 0},
    "sft": {**SFT, "max_steps": 12, "save_strategy": "no"},
    "rank": {"num_prompts": 24, "num_generations": 4, "max_new_tokens": 8, "labeler_noise": 0.1},
    "reward": {**REWARD, "num_train_epochs": 1, "save_strategy": "no"},
    "ppo": {"tinyworld_prompts": 32, "max_steps": 3, "per_device_train_batch_size": 4, "num_mini_batches": 2,
            "num_ppo_epochs": 1, "max_new_tokens": 8, "gold_eval_prompts": 8, "gold_eval_max_new_tokens": 8,
            "per_device_eval_batch_size": 8, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no",
            "logging_steps": 1, "disable_tqdm": True},  # fmt: skip
}


WIRED = ("model_name_or_path", "reward_model_path", "dataset_name")  # the chain points them at its own root


def _chain(tmp_path: Path, name: str) -> Path:
    stages = {}
    for stage, recipe in CHAIN_STAGES.items():
        recipe = {k: v for k, v in recipe.items() if k not in ("seed", "report_to", "output_dir", "use_cpu")}
        stages[stage] = recipe
    path = tmp_path / f"{name}.yaml"
    data = {"output_root": str(tmp_path / name), "seed": 7, "report_to": "none", "stages": stages,
            "report": {"examples": 2}}  # fmt: skip
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _align_run(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "run", str(path)], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def _report(root: Path) -> dict:
    report = json.loads((root / "report.json").read_text())
    report.pop("output_root")
    report.pop("stages")  # dirs and recipe hashes name the root
    report["metrics"] = [r for r in report["metrics"] if not _unstable(r["metric"])]
    return report


@pytest.mark.slow
def test_chain_killed_mid_stage_and_mid_report_reruns_to_the_same_report(tmp_path):
    ref_path = _chain(tmp_path, "ref")
    done = _align_run(ref_path)
    assert done.returncode == 0, done.stderr[-3000:]

    path = _chain(tmp_path, "run")
    root = tmp_path / "run"
    rng = random.Random(0)
    # Mid-stage: in a stage drawn at random, once it runs (the stage subprocess dies with the chain: its process
    # group is killed, as by a Ctrl-C'd terminal or a lost node).
    stage = rng.choice(list(CHAIN_STAGES))
    finished = run_and_kill(["run", str(path)], root, rng.uniform(0.0, 1.0), tmp_path / "k1.log",
                            ready=(root / stage / LOCK_FILE).is_file)  # fmt: skip
    assert not finished and not (root / "report.json").exists(), f"the chain got past {stage} before the kill"
    # Mid-report: after the last stage wrote its align_stage.json.
    finished = run_and_kill(["run", str(path)], root, rng.uniform(0.0, 3.0), tmp_path / "k2.log",
                            ready=lambda: (root / "ppo" / STAGE_FILE).is_file())  # fmt: skip
    again = _align_run(path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(": skipped (done, recipe unchanged)") == 5
    for stage in CHAIN_STAGES:
        assert_same_run(read_stage_info(root / stage), read_stage_info(tmp_path / "ref" / stage), paths=WIRED)
    assert _report(root) == _report(tmp_path / "ref")
    assert not (root / LOCK_FILE).exists() and not list(root.glob("*/" + LOCK_FILE))
    shutil.rmtree(tmp_path / "ref")
