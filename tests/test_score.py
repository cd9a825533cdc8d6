"""`align score` and `load_scorer`: the gold labeler, a saved reward dir (its own tokenizer, offset subtracted unless
--raw), files, and one-line CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.cli import main as align_main
from align.data import tinyworld
from align.errors import AlignError
from align.evaluation.score import load_scorer
from align.io import write_stage_info

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = ["red", "blue", "cat", "dog", "rate", "this", ":"]
OFFSET = 0.25

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    """An untrained tiny llama reward model saved as a "reward" stage, with an offset and align's chat template."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(WORDS)
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64, num_labels=1,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    model.config.align_reward_offset = OFFSET
    path = tmp_path_factory.mktemp("score") / "reward"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_stage_info(path, "reward", parent=None, recipe={}, data=None, metrics={"reward_offset": OFFSET})
    return path


PROMPTS = ["rate this : red", "rate this : blue", "rate this : cat"]
RESPONSES = ["red red", "blue cat dog", "dog"]


def test_gold_equals_tinyworld_score():
    prompts = list(tinyworld.instruction_prompts(3, seed=0, split="train")["prompt"])
    responses = [tinyworld.gold_response(p) for p in prompts[:2]] + ["the the ."]
    got = load_scorer("gold")(prompts, responses)
    assert got == [tinyworld.score(p, r) for p, r in zip(prompts, responses, strict=True)]


def test_reward_dir_scores_are_score_minus_offset(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.trainers.reward import score

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    tok = AutoTokenizer.from_pretrained(reward_dir)
    raw = score(model, tok, PROMPTS, RESPONSES, offset=0.0)
    centered = load_scorer(str(reward_dir), device="cpu")(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(centered), raw - OFFSET)
    torch.testing.assert_close(torch.tensor(load_scorer(str(reward_dir), raw=True, device="cpu")(PROMPTS, RESPONSES)),
                               raw)  # fmt: skip
    # `score` reads the offset from the config by itself
    torch.testing.assert_close(score(model, tok, PROMPTS, RESPONSES), raw - OFFSET)


def test_cli_prompt_response_and_raw(reward_dir, capsys):
    scorer = load_scorer(str(reward_dir), device="cpu")
    expected = scorer([PROMPTS[0]] * 2, RESPONSES[:2])
    args = ["score", str(reward_dir), "--prompt", PROMPTS[0], "--response", RESPONSES[0], "--response", RESPONSES[1]]
    assert align_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [float(line.split("\t")[0]) for line in lines] == pytest.approx(expected, abs=1e-4)
    assert [line.split("\t")[1] for line in lines] == RESPONSES[:2]

    assert align_main([*args, "--raw"]) == 0
    raw = [float(line.split("\t")[0]) for line in capsys.readouterr().out.strip().splitlines()]
    assert raw == pytest.approx([e + OFFSET for e in expected], abs=1e-4)


def test_cli_file_rows_with_response_or_responses(reward_dir, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    rows = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    one.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert align_main(["score", str(reward_dir), "--file", str(one)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    expected = load_scorer(str(reward_dir), device="cpu")(PROMPTS, RESPONSES)
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-5)

    many = tmp_path / "many.jsonl"
    many.write_text(json.dumps({"prompt": PROMPTS[0], "responses": RESPONSES}) + "\n")
    assert align_main(["score", str(reward_dir), "--file", str(many)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(row["scores"]) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "p"], "nothing to score"),
        (["--prompt", "p", "--prompt", "q", "--response", "r"], "2 --prompt but 1 --response"),
        (["--file", "x.jsonl", "--prompt", "p"], "not both"),
        (["--bogus"], "unrecognized arguments"),
    ],
    ids=["no response", "count mismatch", "file and prompt", "unknown flag"],
)
def test_cli_usage_errors_exit_2_with_one_line(reward_dir, args, message, capsys):
    assert align_main(["score", str(reward_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: align score") and message in err[0]


def test_cli_not_a_reward_model_and_bad_file(reward_dir, tmp_path, capsys):
    sft = tmp_path / "sft"
    sft.mkdir()
    write_stage_info(sft, "sft", parent=None, recipe={}, data=None, metrics={})
    assert align_main(["score", str(sft), "--prompt", "p", "--response", "r"]) == 2
    assert "not a reward model" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p", "response": 3}))
    assert align_main(["score", str(reward_dir), "--file", str(bad)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1 and f"{bad}:2:" in err[0]  # above it only datasets' progress bar

    with pytest.raises(AlignError, match="not a tiny-world instruction"):
        load_scorer("gold")(["hello"], ["world"])


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        align_main(["score", "--help"])
    assert e.value.code == 0 and "--raw" in capsys.readouterr().out


def test_cli_subprocess_missing_model_exits_2(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run([sys.executable, "-m", "align", "score", str(missing), "--prompt", "p", "--response", "r"],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)  # fmt: skip
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and str(missing) in err[-1]
