"""`align dpo`: pairs from a hand-written ranking with ties under each `ranking_pairs` mode, TRL's conversational
preference rows, the reference (a frozen copy, or LoRA's adapters off with no second model), TRL's loss keys passed
through, the stage end to end on tiny in-test "sft" and "rank" stages, resume, and one-line config errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from tiny_stages import save_stage, tiny_policy  # tests/ is on sys.path

from align.data.rankings import PAIR_MODES, ranking_pairs
from align.evaluation.gold import win_rate
from align.io import read_stage_info, write_stage_info

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = "tom amy is in the park shop kitchen where ? . has a new red lamp write one sentence about read : question"
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Per-prompt gold scores of the "SFT" parent on the 8 held-out prompts, greedy and sampled, as `align sft` stores them
PARENT_GOLD = [0.0, 0.0, 0.25, 0.25, 0.5, 0.0, 0.0, 0.0]
PARENT_GOLD_SAMPLED = [0.0, 0.125, 0.25, 0.0, 0.5, 0.0, 0.0, 0.0625]

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# Pairs from rankings (align.data.rankings.ranking_pairs)

# Group 0: responses a b c d ranked 2 > 0 = 3 > 1, i.e. c best, a and d tied second, b last (ranks [1, 2, 0, 1]).
# Group 1: the best two tied: x = y > z (ranks [0, 0, 1]).
# Group 2: a pair row, chosen p over rejected q.
RANKED = [
    {"prompt": "p0", "responses": ["a", "b", "c", "d"], "ranking": [[2], [0, 3], [1]]},
    {"prompt": "p1", "responses": ["x", "y", "z"], "ranking": [[0, 1], [2]]},
    {"prompt": "p2", "chosen": "p", "rejected": "q"},
]
# (group, chosen, rejected), in group order, then chosen index, then rejected index
EXPECTED = {
    # every strict preference: group 0 has C(4,2) = 6 pairs less the tie a ~ d = 5; group 1 has 3 less x ~ y = 2
    "all": [(0, "a", "b"), (0, "c", "a"), (0, "c", "b"), (0, "c", "d"), (0, "d", "b"),
            (1, "x", "z"), (1, "y", "z"), (2, "p", "q")],
    # the best against every lower one: c over a, b, d (the tie a = d is rejected against c only); both tied best of
    # group 1 against z
    "best_vs_rest": [(0, "c", "a"), (0, "c", "b"), (0, "c", "d"), (1, "x", "z"), (1, "y", "z"), (2, "p", "q")],
    # each against the next lower rank: c over the tie {a, d}, each of a, d over b; c over b skips a rank: no pair
    "adjacent": [(0, "a", "b"), (0, "c", "a"), (0, "c", "d"), (0, "d", "b"), (1, "x", "z"), (1, "y", "z"),
                 (2, "p", "q")],
}  # fmt: skip


def _ranked_ds() -> Dataset:
    rows = [{"prompt": r["prompt"], "responses": r.get("responses"), "ranking": r.get("ranking"),
             "chosen": r.get("chosen"), "rejected": r.get("rejected")} for r in RANKED]  # fmt: skip
    return Dataset.from_list(rows)


@pytest.mark.parametrize("mode", PAIR_MODES)
def test_ranking_pairs_each_mode_on_a_ranking_with_ties(mode):
    rows = ranking_pairs(_ranked_ds(), mode).to_list()
    assert [(r["group"], r["chosen"], r["rejected"]) for r in rows] == EXPECTED[mode]
    assert [r["prompt"] for r in rows] == [f"p{g}" for g, _, _ in EXPECTED[mode]]


@pytest.mark.parametrize("mode", PAIR_MODES)
@pytest.mark.parametrize("per_group", [1, 2])
def test_pairs_per_group_keeps_a_seeded_subset_of_each_groups_pairs(mode, per_group):
    full = [(g, c, r) for g, c, r in EXPECTED[mode]]
    rows = ranking_pairs(_ranked_ds(), mode, per_group=per_group, seed=3).to_list()
    got = [(r["group"], r["chosen"], r["rejected"]) for r in rows]
    for g in (0, 1, 2):
        mine = [p for p in got if p[0] == g]
        theirs = [p for p in full if p[0] == g]
        assert len(mine) == min(per_group, len(theirs))
        # a subset of the mode's pairs, in the mode's order, with no pair twice
        assert mine == [p for p in theirs if p in mine] and len(set(mine)) == len(mine)
    assert got == [(r["group"], r["chosen"], r["rejected"])
                   for r in ranking_pairs(_ranked_ds(), mode, per_group=per_group, seed=3).to_list()]  # fmt: skip


def test_pairs_per_group_draws_differ_by_seed_and_cover_the_group():
    # group 0 under "all" has 5 pairs; one pair per group over many seeds reaches every one of them
    drawn = {tuple(r.values()) for s in range(60)
             for r in ranking_pairs(_ranked_ds(), "all", per_group=1, seed=s).select_columns(["chosen", "rejected"])
             .to_list()[:1]}  # fmt: skip
    assert drawn == {(c, r) for g, c, r in EXPECTED["all"] if g == 0}
    assert ranking_pairs(_ranked_ds(), "all", per_group=10).to_list() == ranking_pairs(_ranked_ds(), "all").to_list()
    with pytest.raises(ValueError, match="per_group 0"):
        ranking_pairs(_ranked_ds(), "all", per_group=0)


def test_ranking_pairs_keeps_margins_and_rejects_an_unknown_mode():
    ds = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.0}])
    assert ranking_pairs(ds, "all").to_list() == [{"prompt": "p", "chosen": "a", "rejected": "b", "group": 0,
                                                   "margin": 2.0}]  # fmt: skip
    with pytest.raises(ValueError, match="mode 'best'"):
        ranking_pairs(ds, "best")


def test_pairs_become_trl_conversational_preference_rows():
    from trl.data_utils import is_conversational

    from align.stages.dpo import conversational

    rows = conversational(ranking_pairs(_ranked_ds(), "best_vs_rest")).to_list()
    assert rows[0] == {"prompt": [{"role": "user", "content": "p0"}],
                       "chosen": [{"role": "assistant", "content": "c"}],
                       "rejected": [{"role": "assistant", "content": "a"}]}  # fmt: skip
    assert is_conversational(rows[0])


def test_the_loss_types_are_dpotrainers():
    from trl import DPOConfig

    from align.stages.dpo_config import DPO_LOSS_TYPES

    help_text = next(f for f in DPOConfig.__dataclass_fields__.values() if f.name == "loss_type").metadata["help"]
    assert set(DPO_LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", help_text))


# ---------------------------------------------------------------------------------------------------------------------
# Tiny stages


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """An untrained tiny llama saved as an "sft" stage (with stored gold scores on 8 prompts) and an "rank" stage of
    16 tiny-world groups of K = 3 (the gold answer, then two word salads, one group with a tie)."""
    from align.data import tinyworld
    from align.models import modeling

    root = tmp_path_factory.mktemp("stages")
    tok = modeling.wordlevel_tokenizer(WORDS.split() + [str(i) for i in range(10)])
    modeling.ensure_chat_template(tok)
    torch.manual_seed(0)
    sft = save_stage(root / "sft", tiny_policy(tok, SIZES), tok, "sft",
                     recipe={"gold_eval_prompts": 8, "gold_eval_max_new_tokens": 8}, metrics={"gold_score": 0.125},
                     gold_scores=PARENT_GOLD, gold_scores_sampled=PARENT_GOLD_SAMPLED)  # fmt: skip
    rank = root / "rank"
    rank.mkdir()
    prompts = tinyworld.instruction_prompts(16, seed=0, split="train")["prompt"]
    with open(rank / "rankings.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            ranking = [[0], [1, 2]] if i == 0 else [[0], [1], [2]]
            row = {"prompt": p, "responses": [tinyworld.gold_response(p), "tom is in the park .", "red red lamp"],
                   "ranking": ranking}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    write_stage_info(rank, "rank", parent={"stage": "sft", "path": str(sft)}, recipe={},
                     data={"name": "tinyworld", "rows": 16}, metrics={})  # fmt: skip
    return {"sft": sft, "rank": rank}


def recipe(stages, out: Path, **over) -> dict:
    base = {
        "model_name_or_path": str(stages["sft"]),
        "dataset_name": str(stages["rank"]),
        "dataset_test_size": 4,
        "output_dir": str(out),
        "max_length": 64,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
        "gold_eval_prompts": 8,
        "gold_eval_max_new_tokens": 8,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        "seed": 3,
    }
    return {**base, **over}


def config(stages, out: Path, **over):
    from align.config import parse_config

    return parse_config("dpo", [], overrides=recipe(stages, out, **over))


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "dpo", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)  # fmt: skip


def _trainer(stages, out: Path, **over):
    from align.models import modeling
    from align.stages.dpo import build_trainer, load_pairs

    cfg = config(stages, out, **over)
    train, held, _, _ = load_pairs(cfg)
    model, tok = modeling.load_model_and_tokenizer(cfg)
    return build_trainer(cfg, model, tok, train, held), model


# ---------------------------------------------------------------------------------------------------------------------
# The reference and TRL's keys


def test_lora_reference_is_the_model_with_adapters_off_and_no_second_model(stages, tmp_path, monkeypatch):
    from peft import PeftModel

    def no_load(*args, **kwargs):
        raise AssertionError("a second model was loaded")

    monkeypatch.setattr("trl.trainer.dpo_trainer.create_model_from_path", no_load)
    monkeypatch.setattr("align.stages.dpo.frozen_copy", no_load)
    lora = {"use_peft": True, "lora_r": 2, "lora_alpha": 4, "lora_target_modules": ["q_proj", "v_proj"]}
    trainer, _ = _trainer(stages, tmp_path, **lora)
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)


def test_full_fine_tuning_reference_is_a_frozen_copy(stages, tmp_path):
    trainer, model = _trainer(stages, tmp_path)
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert not any(p.requires_grad for p in ref.parameters())
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name


def test_loss_type_weights_and_beta_reach_the_trainer_untouched(stages, tmp_path):
    trainer, _ = _trainer(stages, tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.3,
                          ranking_pairs="adjacent")  # fmt: skip
    assert trainer.loss_types == ["sigmoid", "sft"] and trainer.loss_weights == [1.0, 0.5] and trainer.beta == 0.3
    # 12 train groups (16 less 4 held out), K = 3: adjacent gives 2 pairs a group (the tie group: 0 over 1 and 2)
    assert len(trainer.train_dataset) == 24


# ---------------------------------------------------------------------------------------------------------------------
# End to end


def test_stage_writes_model_metrics_and_lineage(stages, tmp_path):
    from transformers import pipeline

    from align.stages.dpo import run

    out = run(config(stages, tmp_path / "dpo", ranking_pairs="best_vs_rest"))
    info = read_stage_info(out)
    assert info["stage"] == "dpo"
    assert info["parent"] == {"stage": "sft", "path": str(stages["sft"].resolve())}
    assert info["data_parent"] == {"stage": "rank", "path": str(stages["rank"].resolve())}
    m = info["metrics"]
    # 12 train groups (16 less 4 held out); best_vs_rest: K-1 = 2 pairs each (the tie group's best against both)
    assert m["labels_used"] == 12 and m["pairs_used"] == 24 and m["pairs_seen"] == 2 * 4  # max_steps x batch
    assert info["data"]["ranking_pairs"] == "best_vs_rest" and info["data"]["eval_pairs"] in (11, 12)
    # the SFT stage's stored scores reused (same 8 tiny-world prompts, 8 tokens, greedy and 4 samples)
    assert m["parent_gold_score"] == 0.125 and info["parent_gold_scores"] == PARENT_GOLD
    assert info["parent_gold_scores_sampled"] == PARENT_GOLD_SAMPLED
    assert m["gold_win_rate"] == win_rate(info["gold_scores"], PARENT_GOLD)
    assert m["gold_win_rate_sampled"] == win_rate(info["gold_scores_sampled"], PARENT_GOLD_SAMPLED)
    assert m["kl_to_parent_low"] <= m["kl_to_parent"] <= m["kl_to_parent_high"]
    for key in ("train_runtime", "train_loss", "eval_loss", "eval_rewards/accuracies", "gold_score_sampled"):
        assert isinstance(m[key], float), key
    assert info["reference"] == "a frozen copy of the parent" and info["recipe"]["ranking_pairs"] == "best_vs_rest"
    assert any("rewards/accuracies" in h for h in info["log_history"])
    generate = pipeline("text-generation", model=str(out), tokenizer=str(out))
    assert isinstance(generate("tom is", max_new_tokens=2)[0]["generated_text"], str)


def test_stage_resumes_a_finished_checkpoint_without_training(stages, tmp_path):
    from align.stages.dpo import run

    over = {"save_strategy": "steps", "save_steps": 2, "gold_eval_prompts": 0, "dataset_test_size": 0}
    out = run(config(stages, tmp_path / "dpo", **over))
    first = read_stage_info(out)
    (out / "align_stage.json").unlink()  # killed after its last checkpoint, before it finished
    second = read_stage_info(run(config(stages, tmp_path / "dpo", **over)))
    assert [h["loss"] for h in second["log_history"] if "loss" in h] == [
        h["loss"] for h in first["log_history"] if "loss" in h
    ]
    assert any(h.get("train_runtime") == 0.0 for h in second["log_history"])  # loaded, nothing trained


# ---------------------------------------------------------------------------------------------------------------------
# Command line and errors


def test_help_lists_the_stage_keys():
    result = cli("--help")
    assert result.returncode == 0 and "--ranking_pairs" in result.stdout and "--loss_type" in result.stdout


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"ranking_pairs": "best"}, "'ranking_pairs' is 'best'; choose one of all, best_vs_rest, adjacent"),
        ({"loss_type": ["sigmod"]}, "loss_type 'sigmod' is not a DPOTrainer loss"),
        ({"beta": 0.0}, "beta 0.0 must be > 0"),
        ({"merge_adapter": True}, "merge_adapter: true needs use_peft: true"),
    ],
)
def test_bad_config_is_one_line_exit_2(stages, tmp_path, over, message):
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe(stages, tmp_path / "out", **over)))
    result = cli("--config", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_rankings_that_are_not_a_rank_stage_is_one_line(stages, tmp_path):
    from align.errors import AlignError
    from align.stages.dpo import run

    with pytest.raises(AlignError, match=r"an align 'sft' stage, not rankings"):
        run(config(stages, tmp_path / "out", dataset_name=str(stages["sft"])))
