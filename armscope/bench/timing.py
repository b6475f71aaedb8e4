"""Timing primitives of the suite: summaries of real measurements only, and
interleaved rounds.

Why interleave: on a shared or thermally limited machine the speed moves by
tens of percent minute to minute (BENCHMARKS.md section 3). Timing path A for
a minute and then path B for a minute turns that drift into a false A/B
difference; one round of every path, then the next round, spreads the drift
over all paths alike. The order within a round rotates too, so no path is
always first after a pause.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np


def summarize(values_ms) -> dict:
    """median, p95, p99, mean, min, max and n of ``values_ms`` (milliseconds).
    Raises on an empty or non-finite series: a figure that was not measured is
    left out of the report with its reason, never written as 0 or NaN."""
    v = np.asarray(list(values_ms), dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"not a measurement: {v.size} values, finite: {bool(np.all(np.isfinite(v)))}")
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"median": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "mean": round(float(v.mean()), 3), "min": round(float(v.min()), 3), "max": round(float(v.max()), 3),
            "n": int(v.size)}


def time_call(fn: Callable[[], object]) -> float:
    """Milliseconds one call of ``fn`` took (perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def interleaved(cases: dict[str, Callable[[int], object]], rounds: int, warmup: int = 1,
                budget_s: float | None = None) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``rounds`` rounds of one call each,
    rotating the order every round. ``cases[name](r)`` gets the round number
    (e.g. to pick the round's frame, the same for every case). ``budget_s``:
    stop after the round in which it ran out (at least 2 rounds stay)."""
    names = list(cases)
    for name in names:
        for w in range(warmup):
            cases[name](-1 - w)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.monotonic()
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            times[name].append(time_call(lambda: cases[name](r)))
        if budget_s is not None and r >= 1 and time.monotonic() - start > budget_s:
            break
    return times


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0
