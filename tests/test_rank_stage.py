"""`align rank`: sampling + labelers end to end on a tiny in-test policy, the rankings format (JSONL, save_to_disk,
lineage), seeded labeler noise, user-function labelers, and the human export -> fill -> import round trip with one-line
errors for every bad sheet."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.cli import main as cli_main
from align.config import parse_config
from align.data.rankings import parse_ranking_row
from align.errors import AlignError
from align.io import read_stage_info, write_stage_info
from align.stages import rank

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
K = 3


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny untrained llama over the tiny-world words, saved as an "sft" stage with align's chat template."""
    from align.data import tinyworld
    from align.models import modeling

    sft = tmp_path_factory.mktemp("stages") / "sft"
    tok = modeling.wordlevel_tokenizer(tinyworld.vocabulary())
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    model = modeling.new_causal_lm("llama", sizes, tok, max_length=128)
    modeling.set_generation_defaults(model, tok)
    model.save_pretrained(sft)
    tok.save_pretrained(sft)
    write_stage_info(sft, "sft", parent=None, recipe={}, data=None, metrics={})
    return sft


def _argv(policy: Path, out: Path, **over) -> list[str]:
    keys = {
        "model_name_or_path": str(policy),
        "output_dir": str(out),
        "num_prompts": 12,
        "num_generations": K,
        "max_new_tokens": 8,
        "generation_batch_size": 8,
        "labeler_noise": 0.1,  # the untrained policy's samples mostly score 0 with gold: noise orders them
        "use_cpu": True,
        "seed": 3,
        **over,
    }
    return [f"--{k}={v}" for k, v in keys.items()]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / rank.RANKINGS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def gold_run(policy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rank") / "gold"
    rank.run(parse_config("rank", _argv(policy, out)))
    return out


def test_rankings_are_valid_and_match_scores(gold_run):
    rows = _rows(gold_run)
    assert 0 < len(rows) <= 12
    for n, row in enumerate(rows, 1):
        assert set(row) == {"prompt", "responses", "ranking", "scores"}
        prompt, responses, ranks, _ = parse_ranking_row(row, where=f"row {n}")  # valid for `align reward`
        assert len(responses) == len(row["scores"]) == K and all(r.strip() for r in responses)
        # best -> worst by score, equal scores in one block
        assert row["ranking"] == rank.ranking_from_scores(row["scores"])
        for i in range(K):
            for j in range(K):
                if row["scores"][i] > row["scores"][j]:
                    assert ranks[i] < ranks[j]
                if row["scores"][i] == row["scores"][j]:
                    assert ranks[i] == ranks[j]


def test_dataset_dir_and_jsonl_hold_the_same_rows(gold_run):
    import datasets

    from align.data.load import load_data

    rows = _rows(gold_run)
    assert datasets.load_from_disk(str(gold_run / rank.DATASET_DIR)).to_list() == rows
    assert load_data(str(gold_run / rank.RANKINGS_FILE), split="train").to_list() == rows


def test_stage_info_records_lineage_sampling_and_stats(gold_run, policy):
    info = read_stage_info(gold_run)
    assert info["stage"] == "rank"
    assert info["parent"] == {"stage": "sft", "path": str(policy.resolve())}
    assert info["data"]["name"] == "tinyworld" and info["data"]["rows"] == 12
    assert info["sampling"]["num_generations"] == K and info["sampling"]["max_new_tokens"] == 8
    assert info["labeler"] == {"name": "gold", "kind": "gold", "noise": 0.1}
    m = info["metrics"]
    assert m["num_groups"] == len(_rows(gold_run)) and m["k"] == K and m["num_prompts"] == 12
    assert m["num_groups"] + m["dropped_all_tied"] + m["dropped_empty"] == 12
    for key in ("tie_rate", "distinct_responses_mean", "response_tokens_mean", "finished_rate", "gold_score_mean"):
        assert math.isfinite(m[key])
    assert 0.0 <= m["gold_agreement"] <= 1.0 or math.isnan(m["gold_agreement"])
    assert info["samples"] and "prompt" in info["samples"][0]


def test_noise_is_seeded_and_identical_responses_stay_tied():
    groups = [["a", "b", "a", "c"]] * 20
    scores = [[0.5, 0.5, 0.5, 0.1]] * 20
    one = rank.add_noise(groups, scores, 0.1, seed=7)
    assert one == rank.add_noise(groups, scores, 0.1, seed=7)
    assert one != rank.add_noise(groups, scores, 0.1, seed=8)
    assert all(s[0] == s[2] for s in one)  # same text, same draw
    assert rank.add_noise(groups, scores, 0.0, seed=7) == scores


def test_same_seed_same_rankings(policy, gold_run, tmp_path):
    out = tmp_path / "again"
    rank.run(parse_config("rank", _argv(policy, out)))
    assert _rows(out) == _rows(gold_run)


def test_ranking_from_scores_hand_example():
    # 0.9 best; 0.5 (indices 0, 3) tie second; 0.2 last
    assert rank.ranking_from_scores([0.5, 0.2, 0.9, 0.5]) == [[2], [0, 3], [1]]
    assert rank.ranking_from_scores([1.0, 1.0]) == [[0, 1]]  # all tied: one block, dropped by build_rows
    rows, dropped = rank.build_rows(["p", "q", "r"], [["x", "y"], ["x", "x"], ["", "y"]],
                                    [[[0], [1]], [[0, 1]], [[1], [0]]], None)  # fmt: skip
    assert [r["prompt"] for r in rows] == ["p"] and dropped == {"dropped_all_tied": 1, "dropped_empty": 1}


def test_gold_agreement_hand_example():
    # gold orders pairs (0,1), (0,2); (1,2) tie in gold, skipped. Ranking: 0 > 1 agrees, 0 = 2 counts 1/2 -> 0.75
    assert rank.gold_agreement([[[0, 2], [1]]], [[0.9, 0.1, 0.1]]) == 0.75


def test_gold_labeler_ranks_by_tinyworld_score(tmp_path):
    from align.data import tinyworld

    demos = tinyworld.demonstrations(12, seed=1, error_rate=0.5).to_list()
    prompts = [d["prompt"] for d in demos]
    groups = [[d["completion"], tinyworld.gold_response(d["prompt"]), "the the .", d["completion"]] for d in demos]
    cfg = parse_config("rank", [f"--output_dir={tmp_path}", "--labeler=gold"])
    kind, labeler = rank.load_labeler(cfg)
    scores = rank.tie_identical(groups, labeler(prompts, groups))
    assert kind == "gold"
    for p, g, s in zip(prompts, groups, scores, strict=True):
        gold = [tinyworld.score(p, r) for r in g]
        assert s == gold
        ranking = rank.ranking_from_scores(s)
        flat = [i for block in ranking for i in block]
        assert [gold[i] for i in flat] == sorted(gold, reverse=True)
        assert any(0 in b and 3 in b for b in ranking)  # identical responses tie


LABELER_MODULE = """
def score(prompt, responses):
    return [float(len(set(r.split()))) for r in responses]

def wrong_count(prompt, responses):
    return [1.0]

def not_finite(prompt, responses):
    return [float("nan")] * len(responses)
"""


def test_function_labeler_end_to_end(policy, tmp_path, monkeypatch):
    (tmp_path / "my_labeler_mod.py").write_text(LABELER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "fn"
    rank.run(parse_config("rank", _argv(policy, out, labeler="my_labeler_mod:score", labeler_noise=0)))
    rows = _rows(out)
    assert rows
    for row in rows:
        assert row["scores"] == [float(len(set(r.split()))) for r in row["responses"]]
        assert row["ranking"] == rank.ranking_from_scores(row["scores"])
    assert read_stage_info(out)["labeler"]["kind"] == "function"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("wrong_count", "returned 1 scores for 2 responses"),
        ("not_finite", "finite number"),
        ("missing", "has no function 'missing'"),
    ],
)
def test_function_labeler_errors_name_the_function(tmp_path, monkeypatch, name, message):
    (tmp_path / "bad_labeler_mod.py").write_text(LABELER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_config("rank", [f"--output_dir={tmp_path}", f"--labeler=bad_labeler_mod:{name}"])
    with pytest.raises(AlignError, match=message) as e:
        rank.load_labeler(cfg)[1](["p"], [["a b", "c"]])
    assert f"bad_labeler_mod:{name}" in str(e.value)


def test_labeler_from_a_file_path(tmp_path):
    # The shipped example, by path: what recipes/own-data/rank.yaml uses.
    example = Path(__file__).resolve().parents[1] / "recipes" / "own-data" / "my_labeler.py"
    cfg = parse_config("rank", [f"--output_dir={tmp_path}", f"--labeler={example}:score"])
    kind, label = rank.load_labeler(cfg)
    twenty = " ".join(f"w{i}" for i in range(20))
    # 20 distinct words: 0; 3 words: -17; 20 words with 19 repeats: -2 * 19 = -38
    assert kind == "function"
    assert label(["p"], [[twenty, "a b c", " ".join(["x"] * 20)]]) == [[0.0, -17.0, -38.0]]
    cfg = parse_config("rank", [f"--output_dir={tmp_path}", f"--labeler={tmp_path / 'none.py'}:score"])
    with pytest.raises(AlignError, match="no such file"):
        rank.load_labeler(cfg)


def test_unimportable_function_labeler(tmp_path):
    cfg = parse_config("rank", [f"--output_dir={tmp_path}", "--labeler=no_such_module_xyz:score"])
    with pytest.raises(AlignError, match="cannot import module 'no_such_module_xyz'"):
        rank.load_labeler(cfg)


def test_reward_model_labeler_scores_like_load_scorer(policy, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from align.evaluation.score import load_scorer

    tok = AutoTokenizer.from_pretrained(policy)
    torch.manual_seed(1)
    sizes = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = LlamaConfig(vocab_size=len(tok), num_labels=1, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                         **sizes)  # fmt: skip
    rm_dir = tmp_path / "reward"
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    out = tmp_path / "rm"
    rank.run(parse_config("rank", _argv(policy, out, labeler=str(rm_dir), labeler_noise=0)))
    rows = _rows(out)
    assert rows and read_stage_info(out)["labeler"]["kind"] == "reward_model"
    scorer = load_scorer(str(rm_dir), device="cpu")
    for row in rows:
        want = scorer([row["prompt"]] * K, row["responses"])
        torch.testing.assert_close(torch.tensor(row["scores"]), torch.tensor(want), rtol=1e-4, atol=1e-5)
        assert row["ranking"] == rank.ranking_from_scores(row["scores"])


def test_prompts_file_with_messages_and_mapping(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"q": "hello there"}\n{"q": "second one"}\n{"q": "third"}\n')
    cfg = parse_config("rank", [f"--output_dir={tmp_path}", f"--dataset_name={data}", "--num_prompts=2",
                                '--dataset_column_mapping={"q": "prompt"}', "--labeler=m:f"])  # fmt: skip
    prompts, info = rank.load_prompts(cfg)
    assert prompts == ["hello there", "second one"] and info["rows"] == 2
    own = parse_config("rank", ["--config", str(ROOT / "recipes/own-data/rank.yaml")])
    prompts, _ = rank.load_prompts(own)
    assert len(prompts) == 5 and prompts[3] == "Give two tips for writing clear error messages."
    gold = parse_config("rank", [f"--output_dir={tmp_path}", f"--dataset_name={data}", "--model_name_or_path=x",
                                 '--dataset_column_mapping={"q": "prompt"}'])  # fmt: skip
    with pytest.raises(AlignError, match="not tiny-world instructions"):
        rank.run(gold)  # fails before loading any model


# ---------------------------------------------------------------------------------------------------------------------
# Humans: export -> fill -> import


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_export_fill_import_roundtrip(policy, tmp_path, suffix):
    sheet = tmp_path / f"sheet{suffix}"
    assert rank.main(["export", "--output", str(sheet), *_argv(policy, tmp_path / "unused", num_prompts=4)]) == 0
    meta = json.loads(Path(str(sheet) + ".align.json").read_text())
    assert meta["parent"]["stage"] == "sft" and meta["sampling"]["num_generations"] == K
    if suffix == ".csv":
        with sheet.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["id", "prompt", "response_0", "response_1", "response_2", "ranking"]
    else:
        rows = [json.loads(line) for line in sheet.read_text().splitlines()]
    assert len(rows) == 4 and all(r["ranking"] == "" for r in rows)
    # an annotator: strict orders, a tie, and a JSON list
    filled = ["2>0>1", "1=2>0", "0>1=2", "[1, [0, 2]]"]
    want = [[[2], [0], [1]], [[1, 2], [0]], [[0], [1, 2]], [[1], [0, 2]]]
    for row, r in zip(rows, filled, strict=True):
        for i in range(K):
            row[f"response_{i}"] = row[f"response_{i}"] or f"filler {i}"  # the untrained policy may say nothing
        row["ranking"] = r
    _write_sheet(sheet, rows)

    out = tmp_path / "human"
    assert cli_main(["rank", "import", str(sheet), "--output_dir", str(out)]) == 0
    got = _rows(out)
    assert [r["ranking"] for r in got] == want
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]
    assert all("scores" not in r for r in got)
    info = read_stage_info(out)
    assert info["labeler"]["kind"] == "human" and info["parent"]["stage"] == "sft"
    assert info["metrics"]["num_groups"] == 4 and info["metrics"]["tie_rate"] == pytest.approx(3 / 12)
    assert "gold_agreement" in info["metrics"]  # tiny-world prompts: humans are compared with the gold labeler


def _write_sheet(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


GOOD = {"id": "1", "prompt": "p", "response_0": "a", "response_1": "b", "response_2": "c", "ranking": "0>1>2"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ranking": "0>0>1"}, "lists response 0 twice"),
        ({"ranking": "0>1>5"}, "index 5 is out of range"),
        ({"ranking": "0>1"}, "covers 2 of 3 responses"),
        ({"response_1": "  "}, "'response_1' is empty"),
        ({"ranking": "0=1=2"}, "all 3 responses are tied"),
        ({"ranking": "0>b>2"}, "not response numbers"),
        ({"ranking": "[0, [1, 2"}, "not a valid JSON list"),
        ({"ranking": ""}, "'ranking' is empty"),
        ({"response_1": None, "response_2": None, "ranking": "0"}, "1 response(s); a ranking needs at least 2"),
    ],
)
def test_import_bad_rows_exit_2_naming_file_and_row(tmp_path, capsys, change, message):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    rows = [GOOD, bad] if set(bad) == set(GOOD) else None
    sheet = tmp_path / "sheet.csv"
    if rows is None:  # fewer response columns: a sheet of its own shape
        _write_sheet(sheet, [bad])
        where = f"{sheet}:1"
    else:
        _write_sheet(sheet, rows)
        where = f"{sheet}:2"
    assert cli_main(["rank", "import", str(sheet), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {where}:") and message in err, err
    assert not (tmp_path / "out" / "align_stage.json").exists()


def test_cli_help_and_a_bad_import_in_a_subprocess(tmp_path):
    out = subprocess.run([sys.executable, "-m", "align", "rank", "--help"], capture_output=True, text=True, env=ENV,
                         cwd=ROOT, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "--num_generations" in out.stdout and "align rank export" in out.stdout
    sheet = tmp_path / "sheet.csv"
    _write_sheet(sheet, [{**GOOD, "ranking": "2>2>1"}])
    out = subprocess.run([sys.executable, "-m", "align", "rank", "import", str(sheet), "--output_dir",
                          str(tmp_path / "o")], capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().startswith(f"error: {sheet}:1:"), out.stderr
