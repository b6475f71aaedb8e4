"""Timing primitives of the suite: summaries of real measurements only, and
interleaved rounds.

Why interleave: on a shared or thermally limited machine the speed moves by
tens of percent minute to minute (BENCHMARKS.md section 3). Timing path A for
a minute and then path B for a minute turns that drift into a false A/B
difference; one round of every path, then the next round, spreads the drift
over all paths alike. The order within a round rotates too, so no path is
always first after a pause.

Warm-up: a fixed count of untimed calls is a guess; ``warm_up`` runs rounds
until each path's time has stopped moving (``Settle``, a documented rule with a
cap) and records how many it took.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Settle:
    """When a path's warm-up is over: after each warm-up round, the median of its
    last ``window`` times is compared with the median of the ``window`` before;
    within ``tolerance`` (relative) it has settled (caches, allocator pools, JIT
    and lazy kernel choices, clocks all stopped moving its time). At least
    ``2 x window`` rounds, at most ``cap``; a path still moving at the cap is timed
    anyway and reported as not settled, with its last drift."""
    window: int = 3
    tolerance: float = 0.05
    cap: int = 15

    def drift(self, times: list[float]) -> float | None:
        w = self.window
        if len(times) < 2 * w:
            return None
        before = float(np.median(times[-2 * w:-w]))
        return abs(float(np.median(times[-w:])) - before) / before if before > 0 else None

    def settled(self, times: list[float]) -> bool:
        d = self.drift(times)
        return d is not None and d <= self.tolerance

    def describe(self) -> dict:
        return {"window": self.window, "tolerance": self.tolerance, "cap": self.cap,
                "rule": f"warm up until the median of the last {self.window} calls is within "
                        f"{100 * self.tolerance:g}% of the median of the {self.window} before "
                        f"(at least {2 * self.window}, at most {self.cap} rounds)"}


def warm_up(cases: dict[str, Callable[[int], object]], rule: Settle) -> dict[str, dict]:
    """Interleaved warm-up rounds (order rotating, as ``interleaved``) until every case
    has settled by ``rule`` or the cap; a settled case leaves the rotation.
    Per case: {"rounds", "settled", "drift", "ms"} (the warm-up times, for the record)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    pending = list(cases)
    for r in range(rule.cap):
        if not pending:
            break
        k = r % len(pending)
        for name in pending[k:] + pending[:k]:
            times[name].append(time_call(lambda: cases[name](-1 - r)))
        pending = [name for name in pending if not rule.settled(times[name])]
    out = {}
    for name, t in times.items():
        d = rule.drift(t)
        out[name] = {"rounds": len(t), "settled": rule.settled(t), "drift": None if d is None else round(d, 4),
                     "ms": [round(x, 3) for x in t]}
    return out


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0
