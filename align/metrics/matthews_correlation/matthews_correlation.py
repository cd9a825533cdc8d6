"""Matthews correlation coefficient. align's offline copy of the `evaluate` metric."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Matthews correlation coefficient: for binary labels
(TP * TN - FP * FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)), in [-1, 1]: 1 perfect, 0 no better than chance,
-1 always wrong. Multiclass: Gorodkin's R_K (https://doi.org/10.1016/j.compbiolchem.2004.09.006), which is the binary
formula for two labels. 0 when a denominator is 0 (scikit-learn's convention)."""
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
Returns:
    matthews_correlation (float): in [-1, 1].
Example:
    >>> evaluate.load("align/metrics/matthews_correlation").compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])
    {'matthews_correlation': 0.5773502691896258}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        pred, ref = np.asarray(predictions), np.asarray(references)
        labels = sorted(set(pred.tolist()) | set(ref.tolist()))
        index = {c: i for i, c in enumerate(labels)}
        conf = np.zeros((len(labels), len(labels)), dtype=np.float64)  # conf[true, predicted]
        for r, p in zip(ref.tolist(), pred.tolist(), strict=True):
            conf[index[r], index[p]] += 1
        t, p, c, s = conf.sum(1), conf.sum(0), np.trace(conf), conf.sum()
        cov_yy = s * s - float(np.dot(p, p))
        cov_xx = s * s - float(np.dot(t, t))
        denom = np.sqrt(cov_xx * cov_yy)
        return {"matthews_correlation": float((c * s - float(np.dot(t, p))) / denom) if denom else 0.0}
