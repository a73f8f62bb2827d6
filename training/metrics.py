"""The one classification-metrics function: training validation, `training eval`, exports and benchmarks.

Key spelling is `<average>_<metric>` (`macro_f1`, `weighted_recall`, ...) everywhere; readers
(benchmarks/report.py, the training results JSON) use these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and weighted F1/precision/recall, per-class scores, confusion matrix.

    Returns {"n", "accuracy", "macro_f1", "macro_precision", "macro_recall", "weighted_f1",
    "weighted_precision", "weighted_recall", "per_class": {label: {"precision", "recall", "f1",
    "support"}}, "confusion_matrix"} with rows = true class, columns = predicted class.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    idx = list(range(len(labels)))
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    out: dict[str, Any] = {"n": int(len(yt)), "accuracy": float((yt == yp).mean()) if len(yt) else 0.0}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(yt, yp, labels=idx, average=avg, zero_division=0)
        out[f"{avg}_f1"], out[f"{avg}_precision"], out[f"{avg}_recall"] = float(f), float(p), float(r)
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=idx, average=None, zero_division=0)
    out["per_class"] = {
        labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i in idx
    }
    out["confusion_matrix"] = confusion_matrix(yt, yp, labels=idx).tolist()
    return out
