"""`align inspect embeddings`, the word2vec baseline and `align classify --averaged_embeddings`: neighbours, an
analogy, class agreement and purity on hand-made matrices (the arithmetic in comments), a subword's vector as the
mean of its pieces, the files (and the page in a headless browser when chromium is installed), one-line errors, the
baseline end to end into the report."""

import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from align.cli import main as align_main
from align.inspect.embeddings import EmbeddingSpace, load_space, tinyworld_classes
from align.inspect.embeddings_math import (
    analogy,
    chance_nn_agreement,
    class_grouping,
    kmeans,
    knn_class_agreement,
    nearest,
    pca_2d,
    purity,
    silhouette,
)
from align.io import write_stage_info

torch.set_num_threads(1)

# Hand-made space: man = e1, woman = e2, king = (e1 + e3) / sqrt 2, queen = (e2 + e3) / sqrt 2, apple = -e3
WORDS = ["man", "woman", "king", "queen", "apple"]
R = 1 / math.sqrt(2)
VECTORS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [R, 0, R], [0, R, R], [0, 0, -1.0]])
CLASS_DIMS = {"name": 0, "color": 1, "place": 2, "object": 3, "feeling": 4}


def _one_line_error(capsys, args) -> str:
    capsys.readouterr()  # what fixtures printed before (e.g. save_pretrained's progress bars)
    assert align_main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]  # no progress bars
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    from align.models import word2vec

    path = tmp_path_factory.mktemp("emb") / "w2v"
    word2vec.save(path, WORDS, VECTORS, {"corpus": {"name": "by hand"}, "settings": {}})
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 1-layer llama on the tiny world's vocabulary saved as a pretrain stage of a 300-story corpus; each classed
    word's embedding is its class's axis plus 1% noise, every other row random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.data import tinyworld
    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(tinyworld.vocabulary(), model_max_length=128)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        for word, cls in tinyworld_classes().items():
            row = torch.zeros(16)
            row[CLASS_DIMS[cls]] = 1.0
            weight[tok.convert_tokens_to_ids(word)] = row + 0.01 * torch.randn(16)
    root = tmp_path_factory.mktemp("run")
    path = root / "pretrain"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_stage_info(path, "pretrain", parent=None, recipe={"dataset_test_size": 0.05},
                     data={"name": "tinyworld", "stories": 300, "seed": 0}, metrics={})  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Math


def test_nearest_by_cosine():
    # king = (1, 0, 1)/sqrt 2: cos with man = 1/sqrt 2, queen = 1/2, woman = 0, apple = -1/sqrt 2
    top = nearest(VECTORS[2], VECTORS, WORDS, k=4, exclude={"king"})
    assert [w for w, _ in top] == ["man", "queen", "woman", "apple"]
    assert [s for _, s in top] == pytest.approx([R, 0.5, 0.0, -R])


def test_analogy_and_its_rank():
    # king - man + woman = (R - 1, 1, R); |t|^2 = (R - 1)^2 + 1 + 1/2 = 3 - sqrt 2
    # cos(t, queen) = (R + R^2) / sqrt(3 - sqrt 2) = (R + 1/2) / sqrt(3 - sqrt 2) = 0.9586; cos(t, apple) = -R / |t|
    res = analogy(VECTORS[2], VECTORS[0], VECTORS[1], VECTORS, WORDS, exclude={"king", "man", "woman"},
                  expected="queen")  # fmt: skip
    norm = math.sqrt(3 - math.sqrt(2))
    assert res["rank"] == 1 and res["candidates"] == 2
    assert res["top"] == [("queen", pytest.approx((R + 0.5) / norm)), ("apple", pytest.approx(-R / norm))]
    assert analogy(VECTORS[2], VECTORS[0], VECTORS[1], VECTORS, WORDS, exclude={"king", "man", "woman"},
                   expected="apple")["rank"] == 2  # fmt: skip


def test_class_agreement_and_purity_by_hand():
    # p1 = (1, 0) A, p2 = (.9, .1) A, p3 = (0, 1) B, p4 = (.5, .5) B. Nearest by cosine: p1 -> p2 (.994), p2 -> p1,
    # p3 -> p4 (.707 against p2's .110), p4 -> p2 (.781 against .707 for p1 and p3): 3 of 4 agree.
    points = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    assert knn_class_agreement(points, ["A", "A", "B", "B"]) == pytest.approx(0.75)
    # chance: (2 * 1 + 2 * 1) / (4 * 3) = 1/3
    assert chance_nn_agreement(["A", "A", "B", "B"]) == pytest.approx(1 / 3)
    # clusters {x, x}, {x, y, y}, {z}: majorities 2 + 2 + 1 of 6
    assert purity(["x", "x", "x", "y", "y", "z"], [0, 0, 1, 1, 1, 2]) == pytest.approx(5 / 6)


def test_silhouette_by_hand():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # classes on their own axes: a = 0 (same direction), b = 1 - cos 90 deg = 1: s = (1 - 0) / 1 = 1 for every word
    assert silhouette(torch.tensor([e1, e1, e2, e2]), ["A", "A", "B", "B"]) == pytest.approx(1.0)
    # each class holds one of each axis: a = 1, b = mean(0, 1) = 0.5: s = (0.5 - 1) / 1 = -0.5 for every word
    assert silhouette(torch.tensor([e1, e2, e1, e2]), ["A", "A", "B", "B"]) == pytest.approx(-0.5)


def test_kmeans_and_grouping_find_separated_classes():
    torch.manual_seed(0)
    axes = torch.eye(3).repeat_interleave(4, 0)  # 3 classes of 4 points on the axes
    points = axes + 0.05 * torch.randn(12, 3)
    labels = [c for c in "abc" for _ in range(4)]
    clusters = kmeans(points, 3, seed=1)
    assert purity(labels, clusters) == 1.0 and len(set(clusters)) == 3
    scores = class_grouping(points, labels, seed=1)
    assert scores["nn_agreement"] == 1.0 and scores["knn5_agreement"] < 1.0  # only 3 same-class neighbours exist
    # 5-NN: the 3 others of its class, then 2 of another: 3/5
    assert scores["knn5_agreement"] == pytest.approx(0.6)
    assert scores["kmeans_purity_chance"] < 0.75


def test_pca_by_hand():
    # centered x = (-.75, 2.25, -.75, -.75), y = (0, 0, 1, -1): variances 6.75 and 2 of 8.75
    coords, share = pca_2d(torch.tensor([[0.0, 0, 0], [3, 0, 0], [0, 1, 0], [0, -1, 0]]))
    torch.testing.assert_close(torch.tensor(coords), torch.tensor([[-0.75, 0], [2.25, 0], [-0.75, 1], [-0.75, -1]]))
    assert share == pytest.approx([6.75 / 8.75, 2 / 8.75])


# ---------------------------------------------------------------------------------------------------------------------
# Command


def test_cli_on_a_hand_made_space(w2v_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["inspect", "embeddings", str(w2v_dir), "--words", "king", "--analogy", "king - man + woman = queen",
            "--top_k", "2", "--output_dir", str(out)]  # fmt: skip
    assert align_main(args) == 0
    assert "king - man + woman = queen? rank 1" in capsys.readouterr().out
    report = json.loads((out / "embeddings.json").read_text())
    (space,) = report["spaces"]
    assert space["kind"] == "word2vec" and space["class_grouping"] is None  # not the tiny world's words
    assert space["neighbours"]["king"]["top"] == [["man", pytest.approx(R, abs=1e-4)], ["queen", 0.5]]
    assert space["analogies"][0]["rank"] == 1 and space["analogies"][0]["top"][0][0] == "queen"
    assert len(space["map"]["points"]) == 5
    assert (out / "embeddings_word2vec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "embeddings.html").read_text()
    assert page.count("<circle") == 5 and "<title>king (other)</title>" in page
    assert "<script src" not in page and "<link" not in page and "http" not in page  # no outside assets


def test_tiny_world_model_groups_its_classes(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert align_main(["inspect", "embeddings", str(tiny_dir), "--random_init", "--output_dir", str(out)]) == 0
    report = json.loads((out / "embeddings.json").read_text())
    pretrain, random = report["spaces"]
    assert report["classes"] == "tinyworld" and report["words"][:2] == ["tom", "anna"]
    g = pretrain["class_grouping"]
    assert g["words"] == 69 and g["classes"] == {"color": 10, "feeling": 5, "name": 20, "object": 20, "place": 14}
    # every classed word sits on its class's axis: each nearest word is of its class, k-means finds the classes
    assert g["nn_agreement"] == 1.0 and g["kmeans_purity"] == 1.0 and g["silhouette"] > 0.9
    # chance: (20*19 + 10*9 + 14*13 + 20*19 + 5*4) / (69*68)
    assert g["nn_agreement_chance"] == pytest.approx((380 + 90 + 182 + 380 + 20) / (69 * 68))
    names = {w for w, c in tinyworld_classes().items() if c == "name"}
    assert {w for w, _ in pretrain["neighbours"]["tom"]["top"][:5]} <= names
    assert random["kind"] == "random_init" and random["class_grouping"]["nn_agreement"] < 0.6
    assert "1-NN agreement 1.000" in capsys.readouterr().out
    assert len(pretrain["map"]["points"]) > 100  # the whole word-level vocabulary


def test_word2vec_trains_on_the_stage_corpus_once(tiny_dir, tmp_path, capsys):
    pytest.importorskip("gensim")
    out = tmp_path / "out"
    args = ["inspect", "embeddings", str(tiny_dir), "--word2vec", "--words", "tom", "--output_dir", str(out)]
    assert align_main(args) == 0
    info = json.loads((out / "word2vec" / "align_word2vec.json").read_text())
    assert info["corpus"]["documents"] == 285  # 300 stories less the 5% the pretrain stage held out
    assert info["settings"]["vector_size"] == 16 and info["settings"]["seed"] == 42
    vectors = (out / "word2vec" / "vectors.safetensors").stat().st_mtime_ns
    report = json.loads((out / "embeddings.json").read_text())
    assert [s["name"] for s in report["spaces"]] == ["pretrain", "word2vec"]
    assert report["spaces"][1]["class_grouping"]["words"] == 69
    assert align_main(args) == 0  # the same corpus and settings: reused, not retrained
    assert (out / "word2vec" / "vectors.safetensors").stat().st_mtime_ns == vectors


def test_a_subword_word_is_the_mean_of_its_pieces(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models import modeling

    texts = ["the cat sat in the kitchen", "a dog ran to the garden", "the kitten and the king"] * 20
    tok = modeling.bpe_tokenizer(iter(texts), vocab_size=300, model_max_length=32)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    space = load_space(str(tmp_path / "m"))
    assert space.subword
    word = "kitchenware"  # not a token: several pieces, read as after a space
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(space.pieces(word)) > 1 and space.pieces(word) == ids
    torch.testing.assert_close(space.vector(word), space.matrix[ids].double().mean(0))
    words, _ = space.candidates([word])
    assert word in words and all(w.isalpha() for w in words)  # whole words only, no fragments or punctuation


def test_a_reward_model_is_read_through_its_classifier_class(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(WORDS, model_max_length=16)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, num_labels=1, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / "reward")
    tok.save_pretrained(tmp_path / "reward")
    write_stage_info(tmp_path / "reward", "reward", parent=None, recipe={}, data=None, metrics={})
    space = load_space(str(tmp_path / "reward"))
    assert space.name == "reward" and not space.subword
    torch.testing.assert_close(space.matrix, model.get_input_embeddings().weight.detach())
    torch.testing.assert_close(space.vector("king"), space.matrix[tok.convert_tokens_to_ids("king")].double())


def test_errors_are_one_line(tiny_dir, w2v_dir, tmp_path, capsys, monkeypatch):
    out = ["--output_dir", str(tmp_path / "out")]
    msg = _one_line_error(capsys, ["inspect", "embeddings", str(tiny_dir), "--words", "tomm", *out])
    assert f"{tiny_dir}: the word 'tomm' is not in its vocabulary" in msg and "did you mean 'tom'" in msg
    msg = _one_line_error(capsys, ["inspect", "embeddings", str(w2v_dir), "--analogy", "king - man = queen", *out])
    assert "write it as 'a - b + c'" in msg
    msg = _one_line_error(capsys, ["inspect", "embeddings", str(w2v_dir), "--random_init", *out])
    assert "a word2vec dir; --random_init and --word2vec need a model" in msg
    msg = _one_line_error(capsys, ["inspect", "embeddings", str(tmp_path / "nope"), *out])
    assert "nope" in msg
    import transformers

    def no_table(self):
        raise NotImplementedError

    monkeypatch.setattr(transformers.LlamaForCausalLM, "get_input_embeddings", no_table)
    msg = _one_line_error(capsys, ["inspect", "embeddings", str(tiny_dir), *out])
    assert "LlamaForCausalLM has no input embedding matrix" in msg and "word2vec dir" in msg
    assert not (tmp_path / "out").exists()


def test_word2vec_needs_a_tiny_world_stage(w2v_dir, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models import modeling

    tok = modeling.wordlevel_tokenizer(WORDS, model_max_length=16)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16)).save_pretrained(tmp_path / "m")  # fmt: skip
    tok.save_pretrained(tmp_path / "m")
    args = ["inspect", "embeddings", str(tmp_path / "m"), "--word2vec", "--words", "king", "--analogy",
            "king - man + woman", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    msg = _one_line_error(capsys, args)
    assert "no align_stage.json; --word2vec rebuilds the tiny world's pretraining corpus" in msg


def test_help_exits_zero(capsys):
    assert align_main(["inspect", "--help"]) == 0
    assert "embeddings" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        align_main(["inspect", "embeddings", "--help"])
    assert e.value.code == 0
    assert "mean of its pieces" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Classification by averaged embeddings


def test_features_and_a_separable_fit_by_hand():
    from align.stages.classify_embeddings import features, fit_logistic, pair_features, predict

    space = EmbeddingSpace("w", "w", "word2vec", VECTORS, vocab=WORDS)
    # "man king" -> (e1 + (e1 + e3)/sqrt 2) / 2 = ((1 + R)/2, 0, R/2); "pear" is unknown and left out
    x, mask = features(space, {"text": ["man king pear"]}, "single")
    torch.testing.assert_close(x, torch.tensor([[(1 + R) / 2, 0, R / 2]], dtype=torch.float64))
    u, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    torch.testing.assert_close(pair_features(u, v, "pair"), torch.tensor([[1.0, 2, 3, -1, 3, -2]]))
    torch.testing.assert_close(pair_features(u, v, "similarity"), torch.tensor([[4.0, 1, 2, 3, 3, -2]]))
    # multiple choice: the context "king" matches the choice "queen" on e3 only through u * v
    x, mask = features(space, {"text": ["king", "apple"], "choices": [["queen", "man"], ["apple", "woman"]]},
                       "multiple_choice")  # fmt: skip
    assert x.shape == (2, 2, 9) and mask.all()
    fit = fit_logistic(x, [0, 0], 2, mask)
    assert predict(fit, x, mask).argmax(-1).tolist() == [0, 0] and fit["iterations"] > 0


def _color_place_rows(path, n=40):
    """Rows labelled by whether they name a color or a place, among filler words: decidable from the mean vector."""
    import random

    from align.data.tinyworld_grammar import COLORS, PLACES

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            label = "color" if i % 2 else "place"
            word = rng.choice(COLORS if label == "color" else PLACES)
            text = " ".join(rng.sample(["then", "the", "is", "in", "a"], 3) + [word])
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def test_classify_averaged_embeddings_end_to_end_and_in_the_report(tiny_dir, tmp_path):
    from align.evaluation.report import write_report

    data = tmp_path / "rows.jsonl"
    _color_place_rows(data)
    root = tiny_dir.parent
    out = root / "classify_avg"
    args = ["classify", "--model_name_or_path", str(tiny_dir), "--averaged_embeddings", "true", "--dataset_name",
            str(data), "--dataset_test_size", "10", "--output_dir", str(out), "--report_to", "none"]  # fmt: skip
    assert align_main(args) == 0
    info = json.loads((out / "align_stage.json").read_text())
    assert info["stage"] == "classify" and info["recipe"]["averaged_embeddings"] is True
    # colors lie on one axis, places on another: the mean vector separates them on held-out rows
    assert info["metrics"]["accuracy"] == 1.0 and info["averaged_embeddings"]["features"] == 16
    assert (out / "classifier.safetensors").is_file()

    assert align_main(["inspect", "embeddings", str(tiny_dir), "--output_dir", str(root / "embeddings")]) == 0
    write_report(root, {"examples": 0})
    md = (root / "report.md").read_text()
    assert "## What the input embeddings learned" in md and "| pretrain | 1.000 (" in md
    assert "logistic regression on averaged embeddings (model)" in md
    assert (root / "report_files" / "embeddings_pretrain.png").is_file()
    assert "data:image/png;base64" in (root / "report.html").read_text()


def test_averaged_embeddings_config_errors(capsys, tiny_dir, tmp_path):
    msg = _one_line_error(capsys, ["classify", "--model_name_or_path", str(tiny_dir), "--embeddings_from", "x",
                                   "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert "embeddings_from is read only with averaged_embeddings true" in msg


# ---------------------------------------------------------------------------------------------------------------------
# The page in a browser


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_renders_in_headless_chromium(w2v_dir, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "out"
    assert align_main(["inspect", "embeddings", str(w2v_dir), "--words", "king", "--analogy",
                       "king - man + woman = queen", "--output_dir", str(out)]) == 0  # fmt: skip
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,800", (out / "embeddings.html").as_uri()], check=True, timeout=60,
                   capture_output=True, env={**os.environ, "HOME": str(tmp_path)})  # fmt: skip
    pixels = imread(shot)[..., :3]
    gray = torch.tensor((abs(pixels - 0xB0 / 255) < 0.02).all(-1))  # the words' dots (class "other")
    assert gray.sum() > 5 * 20  # 5 dots of ~50 pixels each
