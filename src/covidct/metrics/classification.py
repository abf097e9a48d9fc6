"""Classification measures from a confusion matrix, ROC AUC and bootstrap intervals.

Rows of a confusion matrix are the true classes, columns the predicted ones. Each class is
scored one-vs-rest; the micro average pools TP/FP/FN/TN over the classes before dividing (the
COVID-CT-Mask-Net report's convention). A ratio whose denominator is 0 is ``nan``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: The 13 measures of the COVID-CT-Mask-Net report, in its order.
MEASURES: tuple[str, ...] = (
    "accuracy", "f1", "false_discovery_rate", "false_negative_rate", "false_positive_rate",
    "negative_predictive_value", "positive_predictive_value", "precision", "recall", "sensitivity",
    "specificity", "true_negative_rate", "true_positive_rate",
)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def measures_from_counts(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """The 13 measures from one-vs-rest counts."""
    tpr = _ratio(tp, tp + fn)
    tnr = _ratio(tn, tn + fp)
    ppv = _ratio(tp, tp + fp)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "false_discovery_rate": _ratio(fp, tp + fp),
        "false_negative_rate": _ratio(fn, tp + fn),
        "false_positive_rate": _ratio(fp, fp + tn),
        "negative_predictive_value": _ratio(tn, tn + fn),
        "positive_predictive_value": ppv,
        "precision": ppv,
        "recall": tpr,
        "sensitivity": tpr,
        "specificity": tnr,
        "true_negative_rate": tnr,
        "true_positive_rate": tpr,
    }


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts, rows = truth, columns = prediction (scikit-learn)."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int),
                        labels=list(range(n_classes))).astype(np.int64)


def parse_confusion(text: str) -> np.ndarray:
    """``"423,8,0;10,336,5;0,11,207"`` -> square int matrix."""
    try:
        rows = [[int(v) for v in row.split(",")] for row in text.strip().split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"confusion matrix {text!r}: use integers, ',' between columns and ';' between rows") from None
    n = len(rows)
    if n < 2 or any(len(r) != n for r in rows):
        raise ValueError(f"confusion matrix {text!r}: must be square with at least 2 classes")
    cm = np.array(rows, dtype=np.int64)
    if (cm < 0).any():
        raise ValueError(f"confusion matrix {text!r}: counts must not be negative")
    return cm


@dataclass
class ClassificationReport:
    """Everything ``covidct metrics`` and ``covidct evaluate cls`` print."""

    classes: list[str]
    confusion: np.ndarray
    overall_accuracy: float
    per_class: dict[str, dict[str, float]]
    micro: dict[str, float]

    def normalized_confusion(self) -> np.ndarray:
        """Row-normalised confusion matrix (each true class sums to 1)."""
        rows = self.confusion.sum(axis=1, keepdims=True).astype(float)
        return np.divide(self.confusion, rows, out=np.zeros_like(self.confusion, dtype=float), where=rows > 0)

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes),
            "confusion": self.confusion.tolist(),
            "confusion_normalized": self.normalized_confusion().round(6).tolist(),
            "overall_accuracy": self.overall_accuracy,
            "per_class": self.per_class,
            "micro": self.micro,
        }

    def table(self, digits: int = 6) -> str:
        """A text table: one row per measure, one column per class and ``micro``."""
        names = [*self.classes, "micro"]
        width = max(12, *(len(n) for n in names)) + 2
        lines = ["measure".ljust(27) + "".join(n.rjust(width) for n in names)]
        for m in MEASURES:
            vals = [self.per_class[c][m] for c in self.classes] + [self.micro[m]]
            lines.append(m.ljust(27) + "".join(f"{v:.{digits}f}".rjust(width) for v in vals))
        return "\n".join(lines)

    def confusion_text(self) -> str:
        width = max(10, *(len(c) for c in self.classes)) + 2
        head = "true \\ predicted".ljust(width + 6) + "".join(c.rjust(width) for c in self.classes)
        body = [c.ljust(width + 6) + "".join(str(v).rjust(width) for v in row) for c, row in zip(self.classes, self.confusion.tolist())]
        sens = "sensitivity".ljust(width + 6) + "".join(f"{self.per_class[c]['sensitivity']:.4f}".rjust(width) for c in self.classes)
        return "\n".join([head, *body, sens])


def classification_report(confusion: np.ndarray, classes: Sequence[str] | None = None) -> ClassificationReport:
    """Per-class and micro-averaged measures from a confusion matrix."""
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    n = cm.shape[0]
    names = list(classes) if classes is not None else [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}x{n} confusion matrix")
    total = cm.sum()
    per_class = {}
    sums = np.zeros(4)
    for i, name in enumerate(names):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = total - tp - fn - fp
        sums += (tp, fp, fn, tn)
        per_class[name] = measures_from_counts(tp, fp, fn, tn)
    micro = measures_from_counts(*sums)
    overall = _ratio(np.trace(cm), total)
    return ClassificationReport(names, cm, overall, per_class, micro)


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Binary ROC AUC (scikit-learn); ``nan`` if one class is absent."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def roc_auc_per_class(y_true: Sequence[int], probabilities: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """One-vs-rest AUC for each class from an ``(N, C)`` probability matrix."""
    y = np.asarray(y_true)
    p = np.asarray(probabilities)
    return {c: roc_auc(y == i, p[:, i]) for i, c in enumerate(classes)}


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Sequence,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap: ``(estimate, low, high)`` of ``statistic(*arrays)``, resampling
    the items (rows) of all arrays together."""
    arrs = [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise ValueError("all arrays must have the same length")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(*arrs))
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        v = statistic(*(a[idx] for a in arrs))
        if not np.isnan(v):
            values.append(v)
    if not values:
        return estimate, float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)
