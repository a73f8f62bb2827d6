"""Classification metrics shared by training, evaluation and exports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and weighted F1/precision/recall, per-class report, confusion matrix."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

    idx = list(range(len(labels)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out: dict[str, Any] = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=idx, average=avg, zero_division=0)
        out[f"{avg}_f1"], out[f"{avg}_precision"], out[f"{avg}_recall"] = float(f), float(p), float(r)
    report = classification_report(
        y_true, y_pred, labels=idx, target_names=list(labels), output_dict=True, zero_division=0
    )
    out["per_class"] = {name: {k: float(v) for k, v in report[name].items()} for name in labels}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=idx).tolist()
    return out
