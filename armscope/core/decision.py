"""Turning probabilities into the decision the manifest's task defines.

Binary tasks (the paper's step 1, IIM vs other) use the manifest threshold on
the positive class (0.3 there, chosen so no IIM is missed), not argmax."""
from __future__ import annotations

import math

import numpy as np

from armscope.core.errors import ArmscopeError


def check_threshold(value: float, task: dict, where: str) -> float:
    """A decision threshold given by a user (flag, config key, control command):
    a finite number in 0..1, for a task that has one. Refused otherwise rather
    than silently deciding every field one way (NaN compares false with every
    probability)."""
    if task["type"] not in ("binary", "cascade"):
        raise ArmscopeError(f"{where}: the bundle's task is {task['type']!r}; "
                            "a threshold applies to binary and cascade tasks only")
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ArmscopeError(f"{where}: {value} is not a threshold (expected a number in 0..1)")
    return float(value)


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
