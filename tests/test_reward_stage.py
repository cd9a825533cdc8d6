"""`align reward`: the stage end to end on a tiny in-test "sft" stage and rankings made in code (the more "red" a
response says, the better), lineage with both parents, a reward model with its own tokenizer, pairs as K=2, the
pairs-only comparison mode, one-line errors for every bad ranking, and (slow) two real CPU ranks."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.errors import AlignError
from align.io import read_stage_info, write_stage_info

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "rate", "this", "list", ":"] + [f"q{i}" for i in range(8)]
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

torch.set_num_threads(1)


def _tokenizer(words):
    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(words)
    modeling.ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """A tiny untrained llama causal LM saved as an "sft" stage (align's chat template)."""
    from align.models import modeling

    path = tmp_path_factory.mktemp("stages") / "sft"
    tok = _tokenizer(WORDS)
    torch.manual_seed(0)
    model = modeling.new_causal_lm("llama", SIZES, tok, max_length=64)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_stage_info(path, "sft", parent=None, recipe={}, data=None, metrics={})
    return path


def red_rows(n: int, k: int = 4, seed: int = 0) -> list[dict]:
    """n groups of k five-word responses; the gold order: more "red" is better (no ties)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        counts = rng.sample(range(6), k)
        responses = []
        for c in counts:
            words = ["red"] * c + [rng.choice(["blue", "green", "cat", "dog", "sun"]) for _ in range(5 - c)]
            rng.shuffle(words)
            responses.append(" ".join(words))
        ranking = sorted(range(k), key=lambda j: -counts[j])
        rows.append({"prompt": f"rate this list : q{i % 8}", "responses": responses, "ranking": ranking})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rank_dir(tmp_path_factory) -> Path:
    """An `align rank`-shaped output: rankings.jsonl + dataset/ (save_to_disk) + align_stage.json (stage "rank")."""
    from datasets import Dataset

    path = tmp_path_factory.mktemp("rank") / "rank"
    path.mkdir()
    rows = red_rows(96)
    write_jsonl(path / "rankings.jsonl", rows)
    Dataset.from_list(rows).save_to_disk(str(path / "dataset"))
    write_stage_info(path, "rank", parent=None, recipe={}, data=None, metrics={"gold_agreement": 0.75})
    return path


def recipe(sft: Path, data, out: Path, **over) -> dict:
    base = {
        "model_name_or_path": str(sft),
        "dataset_name": str(data),
        "output_dir": str(out),
        "dataset_test_size": 0.25,
        "max_length": 32,
        "num_train_epochs": 6,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "learning_rate": 3e-3,
        "logging_steps": 5,
        "save_strategy": "no",
        "bf16": False,
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    return {**base, **over}


def run_stage(sft: Path, data, out: Path, **over) -> Path:
    from align.config import parse_config
    from align.stages.reward import run

    return run(parse_config("reward", [], overrides=recipe(sft, data, out, **over)))


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "reward", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def trained(sft, rank_dir, tmp_path_factory) -> Path:
    return run_stage(sft, rank_dir, tmp_path_factory.mktemp("reward") / "reward")


def test_stage_learns_rankings_and_writes_lineage(trained, sft, rank_dir):
    info = read_stage_info(trained)
    assert info["stage"] == "reward"
    assert info["parent"] == {"stage": "sft", "path": str(sft.resolve())}  # the model's parent
    assert info["data_parent"] == {"stage": "rank", "path": str(rank_dir.resolve())}  # the data's parent
    assert info["data"]["rows"] == 72 and info["data"]["eval_rows"] == 24 and info["data"]["pairs"] == 96 * 6
    assert info["num_processes"] == 1
    m = info["metrics"]
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    # an easy, learnable order: held-out pair accuracy well above chance (0.5)
    assert m["pair_accuracy"] > 0.75 and m["eval_pair_accuracy"] == m["pair_accuracy"]
    for key in ("top1_accuracy", "kendall_tau", "reward_offset", "eval_loss"):
        assert isinstance(m[key], float)
    assert m["labeler_gold_agreement"] == 0.75  # the rank stage's own number, carried along
    assert "gold_agreement" not in m  # not tiny-world prompts
    assert not (trained / "training_args.bin").exists()
    assert (trained / "model.safetensors").is_file()


def test_output_loads_and_scores_are_centered(trained, rank_dir):
    from transformers import AutoModelForSequenceClassification

    from align.data.load import load_data, train_test
    from align.evaluation.score import load_scorer
    from align.trainers.reward import score

    model = AutoModelForSequenceClassification.from_pretrained(trained)
    assert model.config.num_labels == 1 and model.config.align_reward_max_length == 32
    offset = read_stage_info(trained)["metrics"]["reward_offset"]
    assert model.config.align_reward_offset == pytest.approx(offset)

    # the same held-out groups the stage normalized on (same split seed), every response
    _, test = train_test(load_data(str(rank_dir / "dataset")), test_size=0.25, seed=0)
    prompts = [r["prompt"] for r in test for _ in r["responses"]]
    responses = [x for r in test for x in r["responses"]]
    scores = load_scorer(str(trained), device="cpu")(prompts, responses)
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-4)
    raw = load_scorer(str(trained), device="cpu", raw=True)(prompts, responses)
    assert raw[0] - scores[0] == pytest.approx(offset, abs=1e-5)
    # `load_scorer` is `score` with the saved offset and max_length
    from align.models.modeling import load_tokenizer

    direct = score(model, load_tokenizer(str(trained)), prompts[:8], responses[:8], max_length=32)
    torch.testing.assert_close(torch.tensor(scores[:8]), direct, atol=1e-5, rtol=1e-5)


def test_reward_model_with_its_own_tokenizer_on_pairs(sft, tmp_path):
    """A base model whose tokenizer differs from the policy's (other ids, more words), trained on a pairs file."""
    from transformers import AutoTokenizer

    from align.models import modeling

    own_words = list(reversed(WORDS)) + ["extra", "words"]
    tok = _tokenizer(own_words)
    base = tmp_path / "base"
    torch.manual_seed(1)
    modeling.new_causal_lm("llama", SIZES, tok, max_length=64).save_pretrained(base)
    tok.save_pretrained(base)

    pairs = [{"prompt": r["prompt"], "chosen": r["responses"][r["ranking"][0]],
              "rejected": r["responses"][r["ranking"][-1]]} for r in red_rows(64, seed=1)]  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = run_stage(sft, data, tmp_path / "reward", model_name_or_path=str(base), num_train_epochs=3)

    info = read_stage_info(out)
    assert info["parent"] == {"model": str(base.resolve())} and "data_parent" not in info
    assert info["data"]["pairs"] == 64  # K = 2: one pair per row
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.get_vocab() == tok.get_vocab() != AutoTokenizer.from_pretrained(sft).get_vocab()
    assert saved.chat_template == tok.chat_template
    assert info["metrics"]["pair_accuracy"] > 0.5


def test_lora_reward_model_is_saved_merged_with_its_adapter(sft, rank_dir, tmp_path):
    """use_peft: adapters + the new score head train, base weights stay; the dir loads as a plain reward model whose
    scores equal the adapter's on the base model (the merge kept the trained head)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = run_stage(sft, rank_dir, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, num_train_epochs=2)
    info = read_stage_info(out)
    assert info["peft"] == {"adapter": True, "merged": True}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert sorted(p.name for p in out.glob("**/training_args.bin")) == []  # no pickles in the finished stage

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.align_reward_offset == pytest.approx(info["metrics"]["reward_offset"])
    base = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    base.config.pad_token_id = merged.config.pad_token_id
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()

    sft_weights = load_file(sft / "model.safetensors")
    merged_weights = merged.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"  # a LoRA target: merged weight = base + B @ A
    assert not torch.allclose(merged_weights[name], sft_weights[name])
    name = "model.embed_tokens.weight"  # not a target: unchanged
    torch.testing.assert_close(merged_weights[name], sft_weights[name])

    ids = torch.tensor([[3, 5, 7, 9, 11, 1], [4, 6, 8, 10, 12, 1]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert info["metrics"]["pair_accuracy"] > 0.5


def test_likelihood_features_train_save_and_score(sft, rank_dir, trained, tmp_path):
    """likelihood_features: the SFT LM becomes a LikelihoodRewardModel; its feature weights learn; the dir loads
    through AutoModelForSequenceClassification and `align score`; an existing head-only reward model is refused."""
    from transformers import AutoModelForSequenceClassification

    from align.evaluation.score import load_scorer
    from align.models.modeling_reward import LikelihoodRewardModel

    out = run_stage(sft, rank_dir, tmp_path / "lk", likelihood_features=["mean", "min"], num_train_epochs=2)
    info = read_stage_info(out)
    assert info["recipe"]["likelihood_features"] == ["mean", "min"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(model, LikelihoodRewardModel)
    assert model.config.align_reward_offset == pytest.approx(info["metrics"]["reward_offset"])
    assert not torch.allclose(model.likelihood_weights, torch.ones(2))  # trained from their start of 1.0
    assert info["metrics"]["pair_accuracy"] > 0.75
    scorer = load_scorer(str(out), device="cpu", raw=True)
    scores = scorer(["rate this list : q1"] * 2, ["red red red", "blue cat dog"])
    assert scores[0] > scores[1]

    with pytest.raises(AlignError, match="likelihood_features need a causal LM"):
        run_stage(trained, rank_dir, tmp_path / "again", likelihood_features=["mean"])


def test_likelihood_features_config_errors(tmp_path):
    from align.config import parse_config

    over = {"output_dir": str(tmp_path), "model_name_or_path": "x", "dataset_name": "y"}
    with pytest.raises(AlignError, match=r"likelihood_features \['max'\]: list mean and/or min"):
        parse_config("reward", [], overrides={**over, "likelihood_features": ["max"]})
    with pytest.raises(AlignError, match="likelihood_features with use_peft"):
        parse_config("reward", [], overrides={**over, "likelihood_features": ["mean"], "use_peft": True})
    with pytest.raises(AlignError, match="likelihood_features with model_init_kwargs"):
        parse_config("reward", [], overrides={**over, "likelihood_features": ["mean"],
                                              "model_init_kwargs": {"num_hidden_layers": 1}})  # fmt: skip


def test_model_init_kwargs_keep_the_first_layers(sft, rank_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    layers = AutoConfig.from_pretrained(sft).num_hidden_layers
    assert layers > 1
    out = run_stage(sft, rank_dir, tmp_path / "reward", model_init_kwargs={"num_hidden_layers": 1}, max_steps=2)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1


def test_lora_needs_the_seq_cls_task_type(tmp_path):
    from align.config import parse_config

    over = {"output_dir": str(tmp_path), "model_name_or_path": "x", "dataset_name": "y", "use_peft": True}
    assert parse_config("reward", [], overrides=over).lora_task_type == "SEQ_CLS"  # the changed default
    with pytest.raises(AlignError, match="lora_task_type 'CAUSAL_LM': a LoRA reward model needs SEQ_CLS"):
        parse_config("reward", [], overrides={**over, "lora_task_type": "CAUSAL_LM"})


def test_trainer_refuses_a_causal_lm_lora_config_and_a_peft_model_twice(sft, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from align.trainers.reward import RankingRewardTrainer
    from align.trainers.reward_config import RankingRewardConfig

    args = RankingRewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    tok = _tokenizer(WORDS)
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    with pytest.raises(AlignError, match="task_type is 'CAUSAL_LM'; a reward model needs 'SEQ_CLS'"):
        RankingRewardTrainer(model, args, processing_class=tok, peft_config=LoraConfig(task_type="CAUSAL_LM", r=2))
    wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2))
    with pytest.raises(AlignError, match="got a PeftModel and a peft_config"):
        RankingRewardTrainer(wrapped, args, processing_class=tok, peft_config=LoraConfig(task_type="SEQ_CLS", r=2))


def test_ranking_as_pairs_reports_the_same_metrics(sft, tmp_path):
    data = write_jsonl(tmp_path / "rankings.jsonl", red_rows(24, k=3))
    out = run_stage(sft, data, tmp_path / "pairs", ranking_as_pairs=True, num_train_epochs=1, dataset_test_size=8)
    info = read_stage_info(out)
    assert info["data"]["rows"] == 16 and info["data"]["train_pairs_as_rows"] == 16 * 3  # C(3, 2) per group
    keys = {"pair_accuracy", "top1_accuracy", "kendall_tau", "eval_pair_accuracy", "reward_offset", "eval_loss"}
    assert keys <= set(info["metrics"])
    assert info["recipe"]["ranking_as_pairs"] is True


def test_ranking_as_pairs_expands_non_tied_pairs():
    from datasets import Dataset

    from align.data.rankings import ranking_pairs

    ds = Dataset.from_list([{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [[2], [0, 3], [1]]}])
    pairs = ranking_pairs(ds, "all").to_list()
    # 2 beats 0, 3 and 1; 0 and 3 beat 1; the tie 0 ~ 3 is no pair: 5 of C(4, 2) = 6
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("c", "a"), ("c", "d"), ("c", "b"), ("a", "b"), ("d", "b")} and len(pairs) == 5


def test_gold_ranks_and_gold_agreement_on_tinyworld_prompts(sft):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.data import tinyworld
    from align.stages.reward import gold_ranks, heldout_metrics

    # scores [.9, .2, .9, nan] -> ranks [0, 2, 0, -1]: the two .9 tie at the top, the absent one is -1
    ranks = gold_ranks(torch.tensor([[0.9, 0.2, 0.9, float("nan")]]))
    assert ranks.tolist() == [[0, 2, 0, -1]]

    prompts = list(tinyworld.instruction_prompts(4, seed=0, split="train")["prompt"])
    groups = [{"prompt": p, "responses": [tinyworld.gold_response(p), "the the", "a ."], "ranking": [0, [1, 2]]}
              for p in prompts]  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    metrics, extra = heldout_metrics(model, AutoTokenizer.from_pretrained(sft), groups, gold=None, batch_size=8,
                                     max_length=None)  # fmt: skip
    assert 0.0 <= metrics["gold_agreement"] <= 1.0 and extra["gold_pairs"] > 0
    assert extra["reward_offset_samples"] == 12


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming file:row


def _bad(row: dict) -> list[dict]:
    rows = red_rows(4)
    rows[2] = {**rows[2], **row}
    return rows


BAD_ROWS = {
    "duplicate index": ({"ranking": [0, 1, 1, 2]}, "lists response 1 twice"),
    "out of range": ({"ranking": [0, 1, 2, 4]}, "index 4 is out of range"),
    "k < 2": ({"responses": ["red red"], "ranking": [0]}, "1 response(s)"),
    "length mismatch": ({"ranking": [0, 1, 2]}, "covers 3 of 4 responses"),
    "empty response": ({"responses": ["red", "", "blue", "cat"]}, "'responses[1]' is empty"),
    "all tied": ({"ranking": [[0, 1, 2, 3]]}, "all 4 responses are tied"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS), ids=list(BAD_ROWS))
def test_bad_rankings_name_file_and_row(case, sft, tmp_path):
    row, message = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "bad.jsonl", _bad(row))
    with pytest.raises(AlignError, match=f"bad.jsonl:3: .*{re.escape(message)}") as e:
        run_stage(sft, data, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # validated before any work


def test_cli_bad_row_and_missing_dataset_exit_2(sft, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", _bad({"ranking": [0, 1, 1, 2]}))
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe(sft, data, tmp_path / "out")))
    result = cli("--config", str(path))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{data}:3:" in last and "twice" in last

    result = cli("--config", str(path), "--dataset_name", str(sft))  # a stage dir that is not rankings
    assert result.returncode == 2 and "not rankings" in result.stderr.strip().splitlines()[-1]


def test_help_exits_0(capsys):
    # in-process (tests/test_cli.py runs every command's --help in a subprocess)
    from align.cli import main

    with pytest.raises(SystemExit) as e:
        main(["reward", "--help"])
    assert e.value.code in (0, None) and "ranking_as_pairs" in capsys.readouterr().out


def test_missing_keys_are_one_line_errors(tmp_path):
    from align.config import parse_config

    with pytest.raises(AlignError, match="dataset_name is not set"):
        parse_config("reward", [], overrides={"output_dir": str(tmp_path), "model_name_or_path": "x"})


# ---------------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_cpu_ranks(sft, rank_dir, tmp_path, lora):
    path = tmp_path / "reward.yaml"
    out = tmp_path / "reward"
    path.write_text(yaml.safe_dump(recipe(sft, rank_dir, out, num_train_epochs=1, use_peft=lora, lora_r=4)))
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "-m", "align", "reward", "--config", str(path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = read_stage_info(out)
    assert info["num_processes"] == 2 and "x 2 processes" in result.stderr
    assert "pair_accuracy" in info["metrics"] and "reward_offset" in info["metrics"]
    assert info["peft"] == {"adapter": lora, "merged": lora}
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == lora
