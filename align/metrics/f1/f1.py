"""F1 = 2 * precision * recall / (precision + recall). align's offline copy of the `evaluate` metric."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1, the harmonic mean of precision and recall: 2 * TP / (2 * TP + FP + FN)."
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str): 'binary' (default: the F1 of `pos_label`), 'macro' (unweighted mean over the labels present in
        predictions or references), 'micro' (from the summed TP, FP, FN; equals accuracy for single-label data) or
        'weighted' (mean weighted by each label's count in references).
    pos_label (int): the positive label for average='binary' (default 1).
Returns:
    f1 (float): in [0, 1]; a label with no TP, FP or FN scores 0 (scikit-learn's zero_division=0).
Example:
    >>> evaluate.load("align/metrics/f1").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666}
"""


def _f1(tp, fp, fn):
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        pred, ref = np.asarray(predictions), np.asarray(references)
        if average == "binary":
            labels = [pos_label]
        elif average in ("macro", "micro", "weighted"):
            labels = sorted(set(pred.tolist()) | set(ref.tolist()))
        else:
            raise ValueError(f"average={average!r}; use binary, macro, micro or weighted")
        counts = [
            (int(((pred == c) & (ref == c)).sum()), int(((pred == c) & (ref != c)).sum()),
             int(((pred != c) & (ref == c)).sum()))
            for c in labels
        ]  # fmt: skip
        if average == "micro":
            tp, fp, fn = (sum(x) for x in zip(*counts, strict=True))
            return {"f1": float(_f1(tp, fp, fn))}
        scores = np.array([_f1(*c) for c in counts], dtype=float)
        if average == "weighted":
            support = np.array([int((ref == c).sum()) for c in labels], dtype=float)
            return {"f1": float((scores * support).sum() / support.sum()) if support.sum() else 0.0}
        return {"f1": float(scores.mean())}
