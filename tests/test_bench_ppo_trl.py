"""scripts/bench_ppo_trl.py in align's venv: the workload it gives TRL 1.12 is bench_ppo --model's, and --compare's
arithmetic. The TRL run itself needs TRL 1.12's own venv (make venv-trl112), so no test trains here."""

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from align.models.modeling import wordlevel_tokenizer
from align.trainers.ppo import PPOTrainer
from align.trainers.ppo_config import PPOConfig
from align.trainers.ppo_rollout import encode_prompt

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    """A script as a module; the os.environ defaults it sets on import stay out of the other tests."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trl_bench():
    return _load("bench_ppo_trl")


def test_workload_is_bench_ppo_model(trl_bench):
    bench = _load("bench_ppo")
    names = ("MODEL_UPDATES", "MODEL_PROMPTS", "MODEL_EPOCHS", "MODEL_NEW_TOKENS", "MODEL_LR", "MODEL_KL_COEF",
             "MODEL_LORA", "MODEL_PROMPT_FILE")  # fmt: skip
    assert {n: getattr(trl_bench, n) for n in names} == {n: getattr(bench, n) for n in names}
    # bench_ppo leaves temperature and seed at align's values; TRL's own temperature default (0.7) would differ
    assert trl_bench.TEMPERATURE == PPOConfig.temperature
    assert trl_bench.SEED == 0


def test_prompt_order_is_align_trainers(trl_bench):
    # align's PPOTrainer._batch_indices on a stand-in holding only what it reads: 64 prompts, 16 per update, 1 process
    fake = SimpleNamespace(train_prompts=([None] * 64,), args=SimpleNamespace(local_batch_size=16, seed=0),
                           world_size=1, accelerator=SimpleNamespace(process_index=0), _perm_cache={})  # fmt: skip
    order = trl_bench.prompt_order(64)
    assert sorted(order) == list(range(64))
    for step in range(4):
        assert PPOTrainer._batch_indices(fake, step) == order[step * 16 : (step + 1) * 16]


def test_encode_prompt_is_align_rollouts(trl_bench):
    tok = wordlevel_tokenizer(["could", "you", "write", "a", "poem", "?"])  # align's chat template
    text = "could you write a poem ?"
    assert trl_bench.encode_prompt(tok, text) == encode_prompt(tok, text)


def _files(tmp_path, trl: dict, align: dict) -> tuple[str, str]:
    trl_file, align_file = tmp_path / "trl.json", tmp_path / "align.json"
    trl_file.write_text(json.dumps(trl) + "\n")
    align_file.write_text("a log line\n" + json.dumps(align) + "\n")  # the last JSON line counts
    return str(trl_file), str(align_file)


WORKLOAD = {"prompts": 16, "ppo_epochs": 4, "new_tokens": 64, "lora_r": 16}


def test_compare_both_layouts(trl_bench, tmp_path, capsys):
    trl = {"bench": "ppo_model_trl", "median_s_per_update": 105.7, "peak_rss_mib": 13516.8, "workload": WORKLOAD}
    align = {
        "bench": "ppo_model_layouts",
        "default": {"layout": "shared", "median_s_per_update": 42.0, "peak_rss_mib": 2764.8, "workload": WORKLOAD},
        "baseline": {"layout": "separate", "median_s_per_update": 107.0, "peak_rss_mib": 15667.2,
                     "workload": {**WORKLOAD, "new_tokens": 32}},
    }  # fmt: skip
    trl_file, align_file = _files(tmp_path, trl, align)
    assert trl_bench.main(["--result", trl_file, "--compare", align_file]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    cmp = json.loads(out[0])["compare"]
    # 105.7 / 42.0 = 2.517; 13516.8 / 2764.8 = 4.889
    assert cmp["default"]["trl_over_align_s_per_update"] == 2.52
    assert cmp["default"]["trl_over_align_peak_rss"] == 4.89
    assert cmp["default"]["same_workload"] is True
    # 105.7 / 107.0 = 0.988; 13516.8 / 15667.2 = 0.863; 32 new tokens is not the same workload
    assert cmp["baseline"]["trl_over_align_s_per_update"] == 0.99
    assert cmp["baseline"]["trl_over_align_peak_rss"] == 0.86
    assert cmp["baseline"]["same_workload"] is False


def test_compare_one_layout(trl_bench, tmp_path, capsys):
    trl = {"bench": "ppo_model_trl", "median_s_per_update": 90.0, "peak_rss_mib": 12000.0, "workload": WORKLOAD}
    align = {"bench": "ppo_model", "layout": "shared", "median_s_per_update": 30.0, "peak_rss_mib": 3000.0,
             "workload": WORKLOAD}  # fmt: skip
    trl_file, align_file = _files(tmp_path, trl, align)
    assert trl_bench.main(["--result", trl_file, "--compare", align_file]) == 0
    cmp = json.loads(capsys.readouterr().out)["compare"]
    # 90 / 30 = 3; 12000 / 3000 = 4
    assert cmp == {"shared": {"layout": "shared", "precision": None, "median_s_per_update": 30.0,
                              "peak_rss_mib": 3000.0, "trl_over_align_s_per_update": 3.0,
                              "trl_over_align_peak_rss": 4.0, "same_workload": True}}  # fmt: skip


def test_compare_rejects_another_bench(trl_bench, tmp_path, capsys):
    trl_file, align_file = _files(tmp_path, {"median_s_per_update": 1.0, "peak_rss_mib": 1.0}, {"bench": "ppo"})
    assert trl_bench.main(["--result", trl_file, "--compare", align_file]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not bench_ppo.py --model's line" in err[0] and align_file in err[0]


def test_bad_arguments(trl_bench):
    for argv in (["--updates", "1"], ["--result", "x.json"], ["--micro-batch", "3"]):
        with pytest.raises(SystemExit) as e:
            trl_bench.parse_args(argv)
        assert e.value.code == 2


def test_smoke_settings(trl_bench):
    opts = trl_bench.parse_args(["--smoke"])
    assert (opts.prompts, opts.new_tokens, opts.ppo_epochs, opts.updates, opts.micro_batch) == (4, 8, 1, 2, 4)
    opts = trl_bench.parse_args([])
    assert (opts.prompts, opts.new_tokens, opts.ppo_epochs, opts.updates, opts.micro_batch) == (16, 64, 4, 4, 16)


@pytest.mark.skipif(importlib.util.find_spec("trl.experimental.ppo") is not None, reason="TRL with a PPOTrainer here")
def test_without_trl_112_one_line(trl_bench, capsys):
    assert trl_bench.main(["--smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make venv-trl112" in err[0]
