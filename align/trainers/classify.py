"""GPT-1's discriminative fine-tuning on transformers' Trainer: `ClassifyTrainer` and its metrics.

Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training", Sec. 3.2
(https://cdn.openai.com/research-covers/language-unsupervised/language_understanding_paper.pdf): the pretrained
decoder's final state at the extract token h_l^m goes through a new linear layer W_y, P(y | x) = softmax(h_l^m W_y),
and the objective keeps language modeling as an auxiliary loss on the same inputs,

    L3(C) = L2(C) + lambda * L1(C)          (lambda = 0.5 in the paper; `lm_aux_coef`)

which "improves generalization of the supervised model and accelerates convergence". Similarity sums the two orders'
final states before W_y; the head has no bias (`score` of LlamaForSequenceClassification and
GPT2ForSequenceClassification), so summing the two orders' logits is the same computation. Multiple choice scores
each choice (one logit) and takes the softmax over a row's choices.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer

from align.data.classification import SpecialIds
from align.metrics import load_metric

logger = logging.getLogger(__name__)


def group_logits(logits: torch.Tensor, num_seqs: torch.Tensor, input_format: str, width: int) -> torch.Tensor:
    """Per-sequence logits -> per-row logits.

    Args:
        logits: `(N, C)` for the N = sum(num_seqs) sequences of the batch (C = 1 for multiple choice).
        num_seqs: `(B,)` sequences per row.
        width: multiple choice: the most choices of any row of the dataset (rows with fewer get -inf, so every batch
            has the same width and Trainer can concatenate them).
    Returns:
        `(B, C)`: single/pair as they are, similarity the sum over the 2 orders; multiple choice `(B, width)`.
    """
    if input_format in ("single", "pair"):
        return logits
    if input_format == "similarity":
        return logits.view(-1, 2, logits.shape[-1]).sum(1)
    rows = torch.repeat_interleave(torch.arange(len(num_seqs), device=logits.device), num_seqs)
    starts = torch.cumsum(num_seqs, 0) - num_seqs
    cols = torch.arange(logits.shape[0], device=logits.device) - starts[rows]
    out = torch.full((len(num_seqs), width), float("-inf"), dtype=logits.dtype, device=logits.device)
    out[rows, cols] = logits[:, 0]
    return out


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            skip_ids: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    """Mean next-token cross-entropy (nats) of the input tokens, GPT-1's L1 on the task's inputs.

    Args:
        hidden: `(N, T, H)` final hidden states; weight: `(V, H)` the LM head (the tied input embeddings).
        input_ids, attention_mask: `(N, T)`. Targets that are padding or one of `skip_ids` (the new delimiter and
            extract tokens, which carry no text) are not counted.
    """
    targets = input_ids[:, 1:]
    keep = attention_mask[:, 1:].bool()
    for t in skip_ids:
        keep &= targets != t
    if not keep.any():  # nothing but special tokens: no text to model
        return hidden.sum() * 0.0
    logits = F.linear(hidden[:, :-1][keep], weight)  # only the counted positions: (M, V)
    return F.cross_entropy(logits.float(), targets[keep])


def lm_head_weight(model) -> torch.Tensor:
    """The LM head's weight for the auxiliary loss: a kept untied head (`align_lm_head`), else the input embeddings
    (GPT-1 ties them; so do GPT-2, SmolLM2 and align's tiny llama)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(inner, "align_lm_head", None)
    return head.weight if head is not None else inner.get_input_embeddings().weight


class ClassifyTrainer(Trainer):
    """`transformers.Trainer` for `align classify`: batches from `ClassifyCollator`, loss L2 + `lm_aux_coef` * L1.

    The model is an `AutoModelForSequenceClassification` (num_labels classes, or 1 score per choice), which reads
    its logits at the last non-pad token: the extract token. The loss is each micro-batch's mean (Trainer divides
    by the accumulation steps). Training logs add `cls_loss` and `lm_loss` beside `loss`.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, input_format: str, special_ids: SpecialIds, lm_aux_coef: float, num_choices: int = 1,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.input_format = input_format
        self.special_ids = special_ids
        self.lm_aux_coef = lm_aux_coef
        self.num_choices = num_choices
        self.label_names = ["labels"]
        self.can_return_loss = True
        self._train_logs: dict[str, list[float]] = defaultdict(list)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        aux = self.lm_aux_coef > 0
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                    output_hidden_states=aux)  # fmt: skip
        logits = group_logits(out.logits, inputs["num_seqs"], self.input_format, self.num_choices)
        cls = F.cross_entropy(logits.float(), inputs["labels"])
        loss = cls
        if aux:
            ids = self.special_ids
            weight = lm_head_weight(self.accelerator.unwrap_model(model))
            lm = lm_loss(out.hidden_states[-1], weight, inputs["input_ids"], inputs["attention_mask"],
                         (ids.delim, ids.extract))  # fmt: skip
            loss = cls + self.lm_aux_coef * lm
        if model.training:
            self._train_logs["cls_loss"].append(cls.item())
            if aux:
                self._train_logs["lm_loss"].append(lm.item())
        return (loss, {"logits": logits, "cls_loss": cls}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(classification loss L2 alone, so `eval_loss` compares across lm_aux_coef; logits; labels)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            _, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = outputs["cls_loss"].detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs["logits"].detach(), inputs["labels"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_logs:
            logs.update({k: sum(v) / len(v) for k, v in self._train_logs.items()})
            self._train_logs.clear()
        super().log(logs, start_time)


class ClassifyMetrics:
    """`compute_metrics` through `evaluate`, from the modules shipped in `align/metrics` (loaded by local path, so
    offline): accuracy always; with 2 classes F1 of class 1 and Matthews correlation; with more, macro F1.
    Multiple choice predicts an answer position, so its F1 is the macro F1 over the positions (`num_labels` = the
    most choices): a head that leans to one position scores below its accuracy, as with any skewed classifier."""

    def __init__(self, num_labels: int, input_format: str):
        self.binary = num_labels == 2 and input_format != "multiple_choice"
        names = ["accuracy", "f1"]
        if self.binary:
            names.append("matthews_correlation")
        self.metrics = {n: load_metric(n) for n in names}

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        preds = np.asarray(eval_pred.predictions).argmax(-1).tolist()
        refs = np.asarray(eval_pred.label_ids).tolist()
        out = {}
        for name, metric in self.metrics.items():
            kwargs = {"average": "binary" if self.binary else "macro"} if name == "f1" else {}
            out.update(metric.compute(predictions=preds, references=refs, **kwargs))
        return out
