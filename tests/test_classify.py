"""`align classify` (GPT-1 discriminative fine-tuning): input transformations as literal ids, the loss parts, row
errors naming file:line, the tiny-world tasks' labels, the stage end to end into pipeline("text-classification")."""

import json
from pathlib import Path

import pytest
import torch

from align.data.classification import ClassifyCollator, SpecialIds, build, label_maps
from align.trainers.classify import group_logits, lm_loss

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
IDS = SpecialIds(start=1, delim=2, extract=3)
TINY = {"tinyworld_examples": 48, "dataset_test_size": 16, "max_steps": 3, "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16, "logging_steps": 1, "max_length": 96, "learning_rate": 3e-3,
        "save_strategy": "no", "bf16": False, "report_to": "none", "dataloader_num_workers": 0}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts


def test_build_is_gpt1s_format_and_cuts_the_longer_part():
    assert build([7, 8], None, IDS, None) == ([1, 7, 8, 3], False)
    assert build([7, 8], [9], IDS, None) == ([1, 7, 8, 2, 9, 3], False)
    # room = 6 - 3 = 3 for 2 + 3 tokens: [9, 10, 11] is longer -> [9, 10]; a tie cuts the text -> [7]
    assert build([7, 8], [9, 10, 11], IDS, 6) == ([1, 7, 2, 9, 10, 3], True)
    assert build([5, 6, 7, 8], None, IDS, 4) == ([1, 5, 6, 3], True)


def test_group_logits_sums_similarity_orders_and_spreads_choices():
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5], [1.0, -1.0]])
    # similarity: rows (0, 1) and (2, 3) are the two orders of 2 examples: summed
    got = group_logits(logits, torch.tensor([2, 2]), "similarity", 1)
    torch.testing.assert_close(got, torch.tensor([[4.0, 6.0], [1.5, -0.5]]))
    # multiple choice: 3 choices then 1 (of width 3): one score each, -inf where a row has no choice
    scores = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    got = group_logits(scores, torch.tensor([3, 1]), "multiple_choice", 3)
    inf = float("-inf")
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.2, 0.3], [0.4, inf, inf]]))


def test_lm_loss_counts_text_targets_only():
    # vocab 4, H = 2; embeddings as the tied LM head. One sequence [1, 0, 3] + pad: targets 0 (text), 3 (extract,
    # skipped), pad (masked): the loss is the cross-entropy of predicting 0 from position 0 alone.
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    hidden = torch.tensor([[[2.0, 0.0], [5.0, 5.0], [9.0, 9.0], [9.0, 9.0]]])
    ids = torch.tensor([[1, 0, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits0 = hidden[0, 0] @ weight.T  # [2, 0, 2, 0]
    want = -torch.log_softmax(logits0, -1)[0]
    torch.testing.assert_close(lm_loss(hidden, weight, ids, mask, (3,)), want)


def test_collator_flattens_rows_and_counts_their_sequences():
    batch = ClassifyCollator(pad_token_id=0)([{"input_ids": [[5, 6, 7]], "labels": 1},
                                              {"input_ids": [[5, 8], [5, 9, 9, 9]], "labels": 0}])  # fmt: skip
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7, 0], [5, 8, 0, 0], [5, 9, 9, 9]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))
    torch.testing.assert_close(batch["num_seqs"], torch.tensor([1, 2]))
    torch.testing.assert_close(batch["labels"], torch.tensor([1, 0]))


def test_label_maps_sort_and_keep_integer_ids():
    assert label_maps([1, 0, 2, 1]) == ({0: "0", 1: "1", 2: "2"}, {"0": 0, "1": 1, "2": 2})
    assert label_maps(["pos", "neg"], ["neg"]) == ({0: "neg", 1: "pos"}, {"neg": 0, "pos": 1})


# ---------------------------------------------------------------------------------------------------------------------
# The tiny world's tasks


def test_tinyworld_tasks_are_balanced_unique_and_labelled_from_the_world():
    from collections import Counter

    from align.data import tinyworld_classify as tc

    happy = tc.examples("happy", 40, seed=1)
    assert Counter(r["label"] for r in happy) == {"yes": 20, "no": 20}
    for r in happy:  # the last `feels` sentence decides
        words = r["text"].split()
        last_mood = words[len(words) - 1 - words[::-1].index("feels") + 1]
        assert r["label"] == ("yes" if last_mood == "happy" else "no")
    where = tc.examples("where", 40, seed=1)
    assert len({json.dumps(r, sort_keys=True) for r in where}) == 40
    for r in where:
        hero, loc, _ = tc.final_state(r["text"].removesuffix(f" where is {r['text'].split()[0]} ?"))[0:3]
        assert r["choices"][r["label"]] == f"{hero} is in the {loc} ."
    entail = tc.examples("entail", 20, seed=1)
    for r in entail:
        _, loc, _ = tc.final_state(r["text"])
        assert (r["text_pair"].split()[-2] == loc) == (r["label"] == "entailment")
    assert tc.examples("same_place", 10, seed=1) == tc.examples("same_place", 10, seed=1)


def test_heldout_places_never_reach_training_and_are_all_the_held_out_rows_ask_about():
    from align.data import tinyworld_classify as tc

    held = set(tc.HELDOUT_PLACES)
    assert len(held) == tc.NUM_CHOICES and held < set(tc.PLACES)
    for task in ("where", "entail", "same_place"):
        parts = tc.split_by_place(task, 40, 20, seed=3)
        for row in parts["train"]:
            words = " ".join([row["text"], row.get("text_pair") or "", *(row.get("choices") or [])]).split()
            assert not held & set(words), (task, row)
        for row in parts["test"]:
            story = row["text"].removesuffix(f" where is {row['text'].split()[0]} ?")
            assert tc.final_state(story)[1] in held, (task, row)
            if task == "where":  # the 4 choices are the 4 held-out places, the true one the hero's
                assert {c.split()[-2] for c in row["choices"]} == held
                assert row["choices"][row["label"]].split()[-2] == tc.final_state(story)[1]
            if task == "entail":
                assert row["text_pair"].split()[-2] in held
                assert (row["text_pair"].split()[-2] == tc.final_state(story)[1]) == (row["label"] == "entailment")
            if task == "same_place":
                assert tc.final_state(row["text_pair"])[1] in held
    # the unrestricted rows are the ones every earlier run used
    assert tc.examples("where", 5, seed=1) == tc.examples("where", 5, seed=1, places=None)
    with pytest.raises(ValueError, match="happy` asks about moods"):
        tc.examples("happy", 4, places=tc.HELDOUT_PLACES)


# ---------------------------------------------------------------------------------------------------------------------
# Data errors (no model is loaded: data is checked first)


def _error(capsys, *args) -> str:
    from align.cli import main

    code = main(["classify", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_row_errors_name_file_line_and_field(tmp_path, capsys, isolated_datasets_cache):
    base = ["--model_name_or_path", str(tmp_path / "m"), "--output_dir", str(tmp_path / "out")]
    mixed = tmp_path / "mixed.jsonl"
    # line 3 is blank; the string "1" beside ints must stay a string (pandas would make it 1)
    mixed.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n\n{"text": "c", "label": "1"}\n')
    line = _error(capsys, "--dataset_name", str(mixed), "--dataset_test_size", "0", *base)
    assert line.startswith(f"error: {mixed}:4: 'label' is str '1', but earlier rows' labels are ints.")
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text('{"text": "a", "y": 0}\n')
    line = _error(capsys, "--dataset_name", str(nolabel), *base)
    assert "missing column 'label'; the columns are text, y" in line
    mc = tmp_path / "mc.jsonl"
    row = '{"text": "q", "choices": ["x", "y"], "label": %d}\n'
    mc.write_text(row % 1 + row % 2)
    line = _error(capsys, "--dataset_name", str(mc), "--dataset_test_size", "0", *base)
    assert line.startswith(f"error: {mc}:2: 'label' is 2; for multiple choice it is the 0-based index")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\nhello,pos\n,neg\n")
    line = _error(capsys, "--dataset_name", str(empty), "--dataset_test_size", "0", *base)
    assert line.startswith(f"error: {empty}:2: 'text' is missing or null, expected a non-empty string.")


# ---------------------------------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """An untrained tiny llama causal LM saved as a finished pretrain stage, with align's word-level tokenizer."""
    from tiny_stages import save_stage, tiny_policy

    from align.data.tinyworld_grammar import vocabulary
    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(vocabulary())
    return save_stage(tmp_path_factory.mktemp("pretrain") / "out", tiny_policy(tok, SIZES), tok, "pretrain")


def _cfg(pretrained: Path, out: Path, **over):
    from align.config import parse_config

    return parse_config("classify", [], overrides={**TINY, "model_name_or_path": str(pretrained),
                                                   "output_dir": str(out), **over})  # fmt: skip


def test_stage_single_text_into_pipeline(pretrained, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer, pipeline

    from align.hub.card import build_model_card
    from align.stages.classify import run

    out = run(_cfg(pretrained, tmp_path / "classify", tinyworld_task="happy", eval_strategy="steps", eval_steps=3))
    info = json.loads((out / "align_stage.json").read_text())
    assert info["stage"] == "classify" and info["parent"]["stage"] == "pretrain"
    assert info["input_format"] == "single" and info["id2label"] == {"0": "no", "1": "yes"}
    assert {"accuracy", "f1", "matthews_correlation", "eval_loss", "majority_accuracy"} <= set(info["metrics"])
    assert info["data"]["label_counts"] == {"no": 16, "yes": 16} or sum(info["data"]["label_counts"].values()) == 32
    logged = [h for h in info["log_history"] if "loss" in h]
    assert logged and all("cls_loss" in h and "lm_loss" in h for h in logged)
    assert not (out / "training_args.bin").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "score.weight" in keys and not any("align_lm_head" in k for k in keys)
    # The saved tokenizer alone builds GPT-1's sequence: <s> text <|extract|>
    tok = AutoTokenizer.from_pretrained(out)
    text = "tom is in the park . he feels happy ."
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<s>", "<|extract|>"]
    assert ids[1:-1] == tok(text, add_special_tokens=False)["input_ids"]
    got = pipeline("text-classification", model=str(out))(text)
    assert got[0]["label"] in ("yes", "no")
    card = build_model_card(out, repo_id="me/tiny-classify", endpoint="https://hf.test")
    assert card.data.pipeline_tag == "text-classification" and 'pipeline("text-classification"' in card.text


def test_csv_question_answer_pairs_with_string_labels_into_pipeline(pretrained, tmp_path, capsys):
    """A user's CSV: `text` a question, `text_pair` an answer, `label` match / mismatch (strings); the classifier
    built from it takes (question, answer) pairs in pipeline("text-classification")."""
    import csv

    from transformers import pipeline

    from align.cli import main

    rows = []
    for i, (hero, place) in enumerate([("tom", "park"), ("sue", "farm"), ("dan", "zoo"), ("amy", "shop")] * 6):
        other = ["park", "farm", "zoo", "shop"][(i + 1) % 4]
        answer, label = (place, "match") if i % 2 == 0 else (other, "mismatch")
        rows.append({"text": f"{hero} goes to the {place} . where is {hero} ?",
                     "text_pair": f"{hero} is in the {answer} .", "label": label})  # fmt: skip
    data = tmp_path / "qa.csv"
    with data.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "text_pair", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "qa"
    args = ["--model_name_or_path", str(pretrained), "--dataset_name", str(data), "--dataset_test_size", "8",
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
            "--bf16", "false", "--output_dir", str(out)]  # fmt: skip
    assert main(["classify", *args]) == 0, capsys.readouterr().err
    info = json.loads((out / "align_stage.json").read_text())
    assert info["input_format"] == "pair" and info["id2label"] == {"0": "match", "1": "mismatch"}
    assert info["data"]["rows"] == 16 and info["data"]["eval_rows"] == 8
    assert {"accuracy", "f1", "matthews_correlation"} <= set(info["metrics"])
    clf = pipeline("text-classification", model=str(out), device="cpu")
    q, a = "tom goes to the park . where is tom ?", "tom is in the park ."
    tokens = clf.tokenizer.convert_ids_to_tokens(clf.tokenizer(q, a)["input_ids"])  # what pipeline() feeds the model
    assert tokens == ["<s>", *q.split(), "<|delim|>", *a.split(), "<|extract|>"]
    got = clf({"text": q, "text_pair": a}, top_k=None)
    assert sorted(g["label"] for g in got) == ["match", "mismatch"]
    assert abs(sum(g["score"] for g in got) - 1) < 1e-5


def test_heldout_places_are_the_stage_held_out_split(pretrained, tmp_path, capsys):
    from align.data.tinyworld_classify import HELDOUT_PLACES
    from align.stages.classify import load_classify_data

    data = load_classify_data(_cfg(pretrained, tmp_path / "out", tinyworld_task="entail", tinyworld_examples=60,
                                   dataset_test_size=20, tinyworld_heldout_places=True))  # fmt: skip
    assert (len(data["train"]), len(data["eval"])) == (40, 20)
    assert data["info"]["heldout_places"] == list(HELDOUT_PLACES)
    assert all(row["text_pair"].split()[-2] in HELDOUT_PLACES for row in data["eval"])
    args = ["--dataset_name", "tinyworld", "--tinyworld_task", "happy", "--tinyworld_heldout_places", "true"]
    line = _error(capsys, "--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path / "o"), *args)
    assert "tinyworld_heldout_places with tinyworld_task happy: happy asks about moods" in line
    args = ["--dataset_name", "tinyworld", "--tinyworld_task", "where", "--tinyworld_heldout_places", "true",
            "--tinyworld_examples", "100", "--dataset_test_size", "100"]  # fmt: skip
    line = _error(capsys, "--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path / "o"), *args)
    assert line == ("error: tinyworld (where): dataset_test_size 100 holds out 100 of tinyworld_examples 100, leaving "
                    "0 training rows. Hold out 1 to 99 rows (e.g. 10) or raise tinyworld_examples.")  # fmt: skip


def test_stage_multiple_choice_with_lora_is_saved_merged(pretrained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from align.stages.classify import run

    out = run(_cfg(pretrained, tmp_path / "mc", tinyworld_task="where", lm_aux_coef=0.0, use_peft=True, lora_r=4,
                   lora_alpha=8, lora_target_modules=["q_proj", "v_proj"]))  # fmt: skip
    info = json.loads((out / "align_stage.json").read_text())
    assert info["input_format"] == "multiple_choice" and info["peft"] == {"adapter": True, "merged": True}
    assert set(info["metrics"]) >= {"accuracy", "f1", "majority_accuracy"}
    assert "matthews_correlation" not in info["metrics"]  # binary only; positions are 4 classes
    assert all("lm_loss" not in h for h in info["log_history"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.align_num_choices == 4


def test_random_init_and_an_untied_lm_head(tmp_path):
    from tiny_stages import save_stage

    from align.data.tinyworld_grammar import vocabulary
    from align.models import modeling
    from align.stages.classify import load_classifier

    tok = modeling.wordlevel_tokenizer(vocabulary())
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, max_position_embeddings=64,
                                      **SIZES, **ids))  # fmt: skip
    path = save_stage(tmp_path / "untied", lm, tok, "pretrain")
    labels = ({0: "no", 1: "yes"}, {"no": 0, "yes": 1})
    model, tok2, ids = load_classifier(_cfg(path, tmp_path / "o"), 2, *labels)
    old = lm.get_output_embeddings().weight
    head = model.align_lm_head.weight
    assert head.shape[0] == len(tok2) == old.shape[0] + 2  # + <|delim|>, <|extract|>; <s> is the start token
    torch.testing.assert_close(head[: old.shape[0]], old)
    torch.testing.assert_close(model.model.embed_tokens.weight[:10], lm.model.embed_tokens.weight[:10])
    rand, _, _ = load_classifier(_cfg(path, tmp_path / "o", random_init=True), 2, *labels)
    assert not torch.allclose(rand.model.embed_tokens.weight[:10], lm.model.embed_tokens.weight[:10])


def test_chain_wires_classify_to_pretrain(tmp_path):
    from align.chain import load_chain

    chain = tmp_path / "chain.yaml"
    chain.write_text(f"output_root: {tmp_path}/run\nstages:\n  pretrain: {{}}\n  classify: {{max_steps: 2}}\n")
    plan = load_chain(chain).plan("classify")
    assert plan.recipe["model_name_or_path"] == str(tmp_path / "run" / "pretrain") and plan.parents == ["pretrain"]


def test_report_table_and_chain_summary_show_classify(tmp_path):
    from align.evaluation.report import load_stages, metrics_table
    from align.evaluation.stage_metrics import summary_line
    from align.io import write_stage_info

    metrics = {"accuracy": 0.9, "f1": 0.88, "matthews_correlation": 0.8, "majority_accuracy": 0.5}
    write_stage_info(tmp_path / "classify", "classify", parent=None, recipe={}, data=None, metrics=metrics)
    rows = metrics_table(load_stages(tmp_path))
    assert {(r["stage"], r["metric"]) for r in rows} >= {("classify", "accuracy"), ("classify", "majority_accuracy")}
    assert summary_line("classify", metrics) == "accuracy 0.9, f1 0.88, matthews_correlation 0.8"


def test_report_sets_the_classifier_variants_side_by_side(tmp_path):
    from align.evaluation.report import headline, headline_lines, load_stages, metrics_table
    from align.io import write_stage_info

    base = {"dataset_name": "tinyworld", "tinyworld_task": "where", "max_steps": 150, "seed": 42, "lm_aux_coef": 0.5}
    for name, recipe, acc in (("classify", {}, 0.9), ("classify_random", {"random_init": True}, 0.4),
                              ("classify_noaux", {"lm_aux_coef": 0.0}, 0.85)):  # fmt: skip
        metrics = {"accuracy": acc, "f1": acc - 0.01, "matthews_correlation": 0.5}
        recipe = {**base, **recipe}
        write_stage_info(tmp_path / name, "classify", parent=None, recipe=recipe, data=None, metrics=metrics)
    (tmp_path / "notes").mkdir()  # a dir that is not a stage is not one
    stages = load_stages(tmp_path)
    assert list(stages) == ["classify", "classify_noaux", "classify_random"]
    rows = {(r["stage"], r["metric"]): r["value"] for r in metrics_table(stages)}
    assert rows[("classify_random", "accuracy")] == 0.4
    lines = headline_lines(headline(tmp_path, stages))
    assert lines == [
        "Classifier classify (where, pretrained init, lm_aux_coef 0.5, 150 steps): held-out accuracy 0.900, F1 0.890.",
        "Classifier classify_noaux (where, pretrained init, lm_aux_coef 0.0, 150 steps): held-out accuracy 0.850, F1 "
        "0.840.",
        "Classifier classify_random (where, random init, lm_aux_coef 0.5, 150 steps): held-out accuracy 0.400, F1 "
        "0.390.",
    ]
