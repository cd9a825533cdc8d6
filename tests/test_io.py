"""Checkpoint lookup and atomic writes: what a resumed run trusts."""

import json
import os
import stat
import subprocess
import sys

import pytest

from align.errors import AlignError
from align.io import atomic_write_json, last_checkpoint, parent_of, read_stage_info, write_stage_info


def _checkpoint(root, step, state_text):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if state_text is not None:
        (d / "trainer_state.json").write_text(state_text)
    return d


def test_last_checkpoint_is_the_highest_step_not_the_latest_name(tmp_path):
    _checkpoint(tmp_path, 8, json.dumps({"global_step": 8}))
    ten = _checkpoint(tmp_path, 10, json.dumps({"global_step": 10}))
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == ten


@pytest.mark.parametrize("state_text", [None, "", '{"global_st', "[]"])
def test_a_checkpoint_interrupted_while_saving_is_skipped(tmp_path, state_text):
    # Trainer writes trainer_state.json last and not atomically: a kill mid-save leaves it missing or truncated.
    good = _checkpoint(tmp_path, 4, json.dumps({"global_step": 4}))
    _checkpoint(tmp_path, 8, state_text)
    assert last_checkpoint(tmp_path) == good


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    _checkpoint(tmp_path, 2, "")
    assert last_checkpoint(tmp_path) is None


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "align_stage.json"
    atomic_write_json(target, {"stage": "sft"})
    atomic_write_json(target, {"stage": "ppo"})
    assert json.loads(target.read_text()) == {"stage": "ppo"}
    assert [p.name for p in target.parent.iterdir()] == ["align_stage.json"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    # mkstemp makes 0600 files; a report or align_stage.json must stay readable like any file the user writes.
    old = os.umask(0o022)
    try:
        new = tmp_path / "report.md"
        atomic_write_json(new, {})
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        kept = tmp_path / "shared.json"
        kept.write_text("{}")
        kept.chmod(0o664)
        atomic_write_json(kept, {"a": 1})
        assert stat.S_IMODE(kept.stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_corrupt_stage_file_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "align_stage.json").write_text("{")
    with pytest.raises(AlignError, match=r"align_stage.json: not valid JSON .* Delete the file and rerun"):
        read_stage_info(tmp_path)


def test_win_rate_counts_ties_as_half():
    from align.evaluation.gold import win_rate

    # prompt 1: win, 2: tie (0.5), 3: loss, 4: tie (0.5) -> 2 / 4
    assert win_rate([0.9, 0.5, 0.1, 1.0], [0.2, 0.5, 0.3, 1.0]) == 0.5
    assert win_rate([1.0], [0.0]) == 1.0
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 0.0])


def test_paired_interval_by_hand():
    from align.evaluation.gold import paired_interval

    # differences 0.2, 0.4, 0.0, 0.2: mean 0.2, sample sd sqrt(0.08 / 3), half-width 1.96 * sd / 2
    out = paired_interval([0.7, 0.9, 0.5, 0.6], [0.5, 0.5, 0.5, 0.4])
    half = 1.96 * (0.08 / 3) ** 0.5 / 2
    assert out == pytest.approx({"mean": 0.2, "low": 0.2 - half, "high": 0.2 + half})
    assert paired_interval([1.0], [0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5}
    with pytest.raises(ValueError, match="equally long"):
        paired_interval([1.0], [])


def test_parent_of_records_the_hub_id_of_a_base_model_copy(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert parent_of(str(gguf), hub_id) == {"model": str(gguf.resolve()), "hub_id": hub_id}
    assert parent_of(str(gguf)) == {"model": str(gguf.resolve())}
    assert parent_of(hub_id) == {"model": hub_id}
    # An align stage's own align_stage.json names its base: the stage link is recorded as it is.
    write_stage_info(tmp_path / "sft", "sft", parent={"model": str(gguf)}, recipe={}, data=None, metrics={})
    assert parent_of(str(tmp_path / "sft"), hub_id) == {"stage": "sft", "path": str((tmp_path / "sft").resolve())}


def test_peak_rss_counts_memory_the_process_touched(tmp_path):
    """A fresh process that fills 300 MiB peaks above it, and its stage file records the figure."""
    code = (
        "import json, sys; from align.io import peak_rss_mib, write_stage_info\n"
        "before = peak_rss_mib(); block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096])\n"
        "info = write_stage_info(sys.argv[1], 'sft', parent=None, recipe={}, data=None, metrics={})\n"
        "print(json.dumps([before, info['peak_rss_mib']]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    before, peak = json.loads(out.stdout)
    assert 300 < peak < 300 + before + 64
    assert json.loads((tmp_path / "align_stage.json").read_text())["peak_rss_mib"] == peak
