"""Turning probabilities into the decision the manifest's task defines.

Binary tasks (the paper's step 1, IIM vs other) use the manifest threshold on
the positive class (0.3 there, chosen so no IIM is missed), not argmax."""
from __future__ import annotations

import numpy as np


def decide(probs: np.ndarray, task: dict, threshold: float | None = None) -> dict:
    """One decision for one probability vector: the displayed class and why."""
    classes = task["classes"]
    if task["type"] in ("binary", "cascade"):
        positive = task["positive_class"]
        thr = float(task["threshold"] if threshold is None else threshold)
        pos_index = classes.index(positive)
        p = float(probs[pos_index])
        if p >= thr:
            label, index = positive, pos_index
        else:
            index = int(np.argmax(np.where(np.arange(len(classes)) == pos_index, -1.0, probs)))
            label = classes[index]
        return {"label": label, "index": index, "positive": p >= thr, "score": p, "threshold": thr}
    index = int(np.argmax(probs))
    return {"label": classes[index], "index": index, "score": float(probs[index])}
