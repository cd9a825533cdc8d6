"""`align classify --averaged_embeddings true`: the bag-of-vectors baseline beside GPT-1's fine-tuning. A text is the
mean of its tokens' input embeddings (of `embeddings_from`, default `model_name_or_path`: a model, or a word2vec dir
from `align inspect embeddings --word2vec`; with `random_init`, the same architecture's fresh embeddings), and a
logistic regression on those means is fit to convergence (L-BFGS, full batch): nothing but the linear layer trains.

    align classify --config recipes/tiny/classify.yaml --averaged_embeddings true --output_dir runs/tiny/classify_avg
    align classify --config recipes/tiny/classify.yaml --averaged_embeddings true \
        --embeddings_from runs/inspect/runs--tiny--pretrain/word2vec --output_dir runs/tiny/classify_w2v

Features per input format, u and v the two texts' mean vectors (u * v elementwise: the only term in which the two
texts meet, since a linear model on [u, v] alone scores each text on its own):
    single           u
    pair             [u, v, u * v]
    similarity       [u + v, |u - v|, u * v]          (symmetric, as GPT-1 sums both orders)
    multiple choice  per choice [u, v_k, u * v_k], one score each, softmax over the choices (GPT-1's layout)
Features are standardized with the training rows' mean and std. The output dir holds `classifier.safetensors`
(weight, bias, feature mean and std) and align_stage.json with the held-out metrics GPT-1's runs report; it is no
transformers model (there is nothing to fine-tune), so `pipeline()` does not load it and `push_to_hub` is refused.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import EvalPrediction

from align.errors import AlignError
from align.inspect.embeddings import load_model_matrix, load_space, load_tokenizer_space, random_init_space
from align.io import parent_of
from align.models import word2vec
from align.stages.lifecycle import finish_stage
from align.trainers.classify import ClassifyMetrics

logger = logging.getLogger(__name__)

# Ridge on the weights (the loss is the mean cross-entropy + L2 / 2 * |W|^2): on separable data plain logistic
# regression has no minimum and L-BFGS would stop wherever max_iter left it; 1e-3 on standardized features is
# sklearn's C = 1000 / N, a light touch.
L2 = 1e-3
MAX_ITER = 500  # L-BFGS iterations; the fits below converge in far fewer (the log says how many)


def mean_vectors(space, texts: list[str]):
    """`(N, D)` float64: each text's mean token vector; a text with no known token is the zero vector (counted)."""
    out = torch.zeros(len(texts), space.matrix.shape[1], dtype=torch.float64)
    empty = unknown = 0
    for i, text in enumerate(texts):
        rows, missing = space.text_rows(text)
        unknown += missing
        if rows:
            out[i] = space.matrix[rows].double().mean(0)
        else:
            empty += 1
    if empty or unknown:
        logger.warning("averaged embeddings: %d word(s) not in %s's vocabulary were left out; %d text(s) had no known "
                       "word (zero vector).", unknown, space.source, empty)  # fmt: skip
    return out


def pair_features(u, v, fmt: str):
    """Features of (text, text_pair) mean vectors, `(N, D)` each (see the module docstring)."""
    if fmt == "pair":
        return torch.cat([u, v, u * v], -1)
    if fmt == "similarity":
        return torch.cat([u + v, (u - v).abs(), u * v], -1)
    raise ValueError(f"pair_features: {fmt}")


def features(space, rows, fmt: str):
    """(X, mask): `(N, F)` for class labels, `(N, K, F)` for multiple choice with `mask` `(N, K)` True where row n
    has a k-th choice (None otherwise)."""
    texts = list(rows["text"])
    u = mean_vectors(space, texts)
    if fmt == "single":
        return u, None
    if fmt in ("pair", "similarity"):
        return pair_features(u, mean_vectors(space, list(rows["text_pair"])), fmt), None
    choices = list(rows["choices"])
    k = max(map(len, choices))
    flat = [c for cs in choices for c in cs]
    v_flat = mean_vectors(space, flat)
    x = torch.zeros(len(texts), k, 3 * u.shape[1], dtype=torch.float64)
    mask = torch.zeros(len(texts), k, dtype=torch.bool)
    j = 0
    for n, cs in enumerate(choices):
        for c in range(len(cs)):
            v = v_flat[j]
            x[n, c] = torch.cat([u[n], v, u[n] * v])
            mask[n, c] = True
            j += 1
    return x, mask


def scores(x, weight, bias, mask=None):
    """Logits: `(N, F) @ (F, C)` -> `(N, C)`; multiple choice `(N, K, F) @ (F, 1)` -> `(N, K)`, -inf for no choice."""
    logits = x @ weight + bias
    if mask is None:
        return logits
    return logits.squeeze(-1).masked_fill(~mask, -torch.inf)


def fit_logistic(x, y, num_classes: int, mask=None, *, l2: float = L2, max_iter: int = MAX_ITER) -> dict[str, Any]:
    """Multinomial logistic regression (multiple choice: one score per choice, softmax over them) on standardized
    features, by full-batch L-BFGS from zeros: deterministic. Returns weight `(F, C)`, bias `(C,)`, mean and std
    `(F,)` and the iterations and final loss."""
    rows = x[mask] if mask is not None else x
    mean, std = rows.mean(0), rows.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    if mask is not None:
        z = z.masked_fill(~mask[..., None], 0.0)
    out_dim = 1 if mask is not None else num_classes
    weight = torch.zeros(z.shape[-1], out_dim, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(out_dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip
    y = torch.as_tensor(y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores(z, weight, bias, mask), y) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(scores(z, weight, bias, mask), y))
    return {"weight": weight.detach(), "bias": bias.detach(), "mean": mean, "std": std,
            "iterations": int(state.get("n_iter", 0)), "train_loss": loss}  # fmt: skip


def predict(fit: dict[str, Any], x, mask=None):
    z = (x - fit["mean"]) / fit["std"]
    if mask is not None:
        z = z.masked_fill(~mask[..., None], 0.0)
    return scores(z, fit["weight"], fit["bias"], mask)


def embedding_space(cfg):
    """The space whose vectors are averaged: `embeddings_from` or `model_name_or_path`; `random_init`: that
    architecture's fresh embeddings, seeded with `seed`."""
    source = cfg.embeddings_from or cfg.model_name_or_path
    kw = {"revision": cfg.model_revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.random_init:
        if word2vec.is_word2vec_dir(source):
            raise AlignError(f"embeddings_from {source}: a word2vec dir has no architecture to initialize; drop "
                             "random_init or point embeddings_from at a model.")  # fmt: skip
        space, config = load_tokenizer_space(source, **kw)
        return random_init_space(space, config, cfg.seed, trust_remote_code=cfg.trust_remote_code)
    if word2vec.is_word2vec_dir(source):
        return load_space(source)
    space, config = load_tokenizer_space(source, **kw)
    load_model_matrix(space, config, **kw)
    return space


def run_averaged(cfg, data: dict[str, Any]) -> Path:
    """Fit and evaluate the baseline on `classify.load_classify_data`'s rows; write the output dir (the stage's
    lifecycle, as `classify.run`)."""
    fmt, id2label, label2id = data["format"], data["id2label"], data["label2id"]
    output_dir = Path(cfg.output_dir)
    start = time.perf_counter()
    space = embedding_space(cfg)

    def labels(part) -> list[int]:
        raw = list(part["label"])
        return [int(v) for v in raw] if fmt == "multiple_choice" else [label2id[str(v)] for v in raw]

    x, mask = features(space, data["train"], fmt)
    num_classes = data["num_choices"] if fmt == "multiple_choice" else len(id2label)
    fit = fit_logistic(x, labels(data["train"]), num_classes, mask)
    metrics: dict[str, Any] = {"train_loss": fit["train_loss"], "lbfgs_iterations": fit["iterations"]}
    logger.info("averaged embeddings of %s (%s, dim %d): %d features, %d training rows, L-BFGS %d iterations, "
                "training loss %.4f", space.source, space.describe(), space.matrix.shape[1], x.shape[-1], x.shape[0],
                fit["iterations"], fit["train_loss"])  # fmt: skip
    if data["eval"] is not None:
        xe, me = features(space, data["eval"], fmt)
        refs = labels(data["eval"])
        logits = predict(fit, xe, me)
        ev = ClassifyMetrics(num_classes, fmt)(EvalPrediction(predictions=logits.numpy(), label_ids=np.array(refs)))
        metrics.update({k: float(v) for k, v in ev.items()})
        metrics["eval_loss"] = float(torch.nn.functional.cross_entropy(logits, torch.tensor(refs)))
        metrics["majority_accuracy"] = Counter(refs).most_common(1)[0][1] / len(refs)
        logger.info("Held-out (%d rows): %s; majority class %.4f.", len(refs),
                    ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "f1", "matthews_correlation")
                              if k in metrics), metrics["majority_accuracy"])  # fmt: skip
    metrics["train_runtime"] = time.perf_counter() - start

    # Save
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: fit[k].float().contiguous() for k in ("weight", "bias", "mean", "std")},
              str(output_dir / "classifier.safetensors"))  # fmt: skip
    source = cfg.embeddings_from or cfg.model_name_or_path
    finish_stage(output_dir, "classify", cfg, False, parent=parent_of(source), data=data["info"],
                 metrics={k: float(v) for k, v in metrics.items()}, input_format=fmt,
                 id2label={str(k): v for k, v in id2label.items()},
                 averaged_embeddings={"source": source, "space": space.kind, "vocabulary": space.describe(),
                                      "dim": int(space.matrix.shape[1]), "features": int(x.shape[-1]), "l2": L2,
                                      "random_init": bool(cfg.random_init)})  # fmt: skip
    logger.info("classify (averaged embeddings): wrote %s", output_dir)
    return output_dir
