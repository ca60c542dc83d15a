"""Classification accuracy (NLVR2 dev / test-P)."""
from __future__ import annotations

import numpy as np


def accuracy(preds, labels) -> float:
    """Percentage of predictions equal to their labels (lists, arrays or tensors)."""
    p = preds.detach().cpu().numpy() if hasattr(preds, "detach") else np.asarray(preds)
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"accuracy: predictions {p.shape} and labels {y.shape} differ in shape")
    if p.size == 0:
        raise ValueError("accuracy: no predictions")
    return float(100.0 * np.mean(p == y))
