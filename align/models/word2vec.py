"""A word2vec baseline (Mikolov et al. 2013, https://arxiv.org/abs/1301.3781) on a pretraining stage's own corpus,
trained with gensim, saved as plain files so that reading it needs neither gensim nor pickle.

    align inspect embeddings runs/tiny/pretrain --word2vec    # trains it on the stage's corpus, inspects both

A word2vec dir holds `vectors.safetensors` (`vectors`, (V, D) float32), `vocab.json` (the V words, row order) and
`align_word2vec.json` (corpus, settings, gensim version), written last: its presence means "done". Only training
imports gensim (`pip install 'align[embeddings]'`). Words are the corpus's whitespace-separated words, which in the
tiny world are exactly the word-level tokenizer's tokens, so the two spaces hold the same words.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from align.data import sources
from align.errors import AlignError
from align.io import atomic_write_bytes, atomic_write_json, read_stage_info

logger = logging.getLogger(__name__)

INFO_FILE = "align_word2vec.json"
VECTORS_FILE = "vectors.safetensors"
VOCAB_FILE = "vocab.json"
INSTALL = "pip install 'align[embeddings]' (gensim >= 4.3)"
# gensim's defaults except where said: skip-gram (sg=1) as the paper's best semantic/syntactic model; min_count 1
# because the tiny world's rarest words (a mood, a place) are the ones asked about; one worker, so a seed gives
# the same vectors every time (gensim's own advice for reproducible runs).
DEFAULTS: dict[str, Any] = {"sg": 1, "window": 5, "negative": 5, "min_count": 1, "epochs": 5, "workers": 1}


def is_word2vec_dir(path: str | Path) -> bool:
    return (Path(path) / INFO_FILE).is_file()


def _crc32(text: str) -> int:
    # gensim seeds per-word vectors with hashfxn(word + seed); Python's str hash changes per process
    return zlib.crc32(text.encode("utf-8"))


def check_stage(model: str) -> dict[str, Any]:
    """`model`'s align_stage.json when it is a stage trained on the tiny world (whose corpus word2vec can rebuild);
    AlignError otherwise."""
    info = read_stage_info(model) if Path(model).is_dir() else None
    data = (info or {}).get("data") or {}
    if not info or not sources.rebuilds_pretrain_text(data):
        what = "no align_stage.json" if not info else f"a {info.get('stage')} stage on {data.get('name')!r}"
        raise AlignError(
            f"{model}: {what}; --word2vec rebuilds the tiny world's pretraining corpus from a tiny-world pretrain "
            "stage. Point it at one (e.g. runs/tiny/pretrain), or pass a trained word2vec dir with --compare."
        )
    return info


def stage_corpus(model: str) -> tuple[list[list[str]], dict[str, Any]]:
    """The training texts of the pretraining stage `model` (its align_stage.json names the data), split into words,
    and the corpus entry to record. The tiny world is rebuilt from its (stories, seed) and split as `align pretrain`
    splits it, so word2vec reads the documents the Transformer trained on and none of its held-out ones."""
    info = check_stage(model)
    data = info["data"]

    recipe = info.get("recipe") or {}
    stories, seed = int(data["stories"]), int(data.get("seed") or 0)
    test_size = recipe.get("dataset_test_size", 0.05)
    train = sources.rebuilt_pretrain_train(data, test_size)
    sentences = [text.split() for text in train["text"]]
    corpus = {"name": data["name"], "stories": stories, "seed": seed,
              "dataset_test_size": test_size, "documents": len(sentences),
              "words": sum(map(len, sentences)), "from_stage": str(model)}  # fmt: skip
    return sentences, corpus


def train(sentences: list[list[str]], *, vector_size: int, seed: int, **overrides: Any):
    """(words, vectors `(V, vector_size)` float32 numpy, settings) of gensim's Word2Vec on `sentences`."""
    try:
        import gensim.models  # optional extra: align[embeddings]; reading saved vectors needs no gensim
    except ImportError:
        raise AlignError(f"word2vec: gensim is not installed. {INSTALL}.") from None

    settings = {**DEFAULTS, **overrides, "vector_size": vector_size, "seed": seed}
    model = gensim.models.Word2Vec(sentences=sentences, hashfxn=_crc32, **settings)
    settings["gensim"] = gensim.__version__
    return list(model.wv.index_to_key), model.wv.vectors.copy(), settings


def save(output_dir: str | Path, words: list[str], vectors, info: dict[str, Any]) -> Path:
    """Write the vectors, the vocabulary, then align_word2vec.json (last: the dir is complete once it exists)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)
    tensor = torch.as_tensor(vectors, dtype=torch.float32).contiguous()
    atomic_write_bytes(out / VECTORS_FILE, safetensors.torch.save({"vectors": tensor}))
    atomic_write_json(out / VOCAB_FILE, words)
    atomic_write_json(out / INFO_FILE, {**info, "vocab_size": len(words), "vector_size": int(tensor.shape[1])})
    return out


def load(path: str | Path) -> tuple[list[str], Any, dict[str, Any]]:
    """(words, vectors `(V, D)` float32 tensor, info) of a word2vec dir; AlignError naming the file when broken."""
    path = Path(path)
    if not is_word2vec_dir(path):
        raise AlignError(f"{path}: no {INFO_FILE}; not a finished word2vec dir. Train one with --word2vec.")
    try:
        info = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
        words = json.loads((path / VOCAB_FILE).read_text(encoding="utf-8"))
        vectors = safetensors.torch.load_file(path / VECTORS_FILE)["vectors"]
    except (OSError, ValueError, KeyError) as e:
        raise AlignError(f"{path}: cannot read the word2vec files ({e}). Train it again with --word2vec.") from e
    if not isinstance(words, list) or len(words) != vectors.shape[0]:
        raise AlignError(
            f"{path / VOCAB_FILE}: {len(words) if isinstance(words, list) else 'no'} words for {vectors.shape[0]} "
            "vectors. Train it again with --word2vec."
        )
    return words, vectors, info


def train_for_stage(model: str, output_dir: str | Path, *, vector_size: int, seed: int) -> Path:
    """word2vec on `model`'s pretraining corpus into `output_dir`; an existing dir with the same corpus and settings
    is reused (training is deterministic, so it would be the same vectors)."""
    sentences, corpus = stage_corpus(model)
    wanted = {"corpus": {k: v for k, v in corpus.items() if k != "from_stage"},
              "settings": {**DEFAULTS, "vector_size": vector_size, "seed": seed}}  # fmt: skip
    if is_word2vec_dir(output_dir):
        old = json.loads((Path(output_dir) / INFO_FILE).read_text(encoding="utf-8"))
        same_corpus = {k: v for k, v in old.get("corpus", {}).items() if k != "from_stage"} == wanted["corpus"]
        same_settings = {k: v for k, v in old.get("settings", {}).items() if k != "gensim"} == wanted["settings"]
        if same_corpus and same_settings:
            logger.info("word2vec: reusing %s (same corpus and settings).", output_dir)
            return Path(output_dir)
    logger.info("word2vec: training on %d documents, %d words (dim %d, seed %d)...", corpus["documents"],
                corpus["words"], vector_size, seed)  # fmt: skip
    words, vectors, settings = train(sentences, vector_size=vector_size, seed=seed)
    return save(output_dir, words, vectors, {"corpus": corpus, "settings": settings})
