"""The stale window from measurement, not from a constant.

``stale_after_ms`` bounds how old, from its camera capture, an overlay in the
eyepiece may be (docs/protocol.md 1.5). Too short for the machine, and the
daemon drops every overlay (its capture->publish latency already exceeds the
window) or the eyepiece goes dark between overlays; too long, and an old field's
heat map stays up after the slide moved. So with ``stale_after_ms = 0`` (auto,
the default) the daemon times its own inference at start-up, on the thread that
infers, and derives the window from that frame time T:

    an overlay is published about  L = T + preprocess + render + queue  after its
    capture (a frame waits at most one inference for the stage to be free, so
    L <= 2 T + small), and replaced T later, when it is  L + T <= 3 T  old:

    stale_after_ms = max(FLOOR_MS, ceil_100(3 T + MARGIN_MS))

The floor keeps today's 1500 ms where inference is fast (then the camera's
frame rate and ZeroMQ, not inference, set the pace); the margin covers
preprocessing, rendering and scheduling noise. An inference time of 2.75 s
per frame (a full-size five-member DenseNet-121 ensemble on a small CPU,
BENCHMARKS.md section 2) gets ~8.8 s: there the eyepiece shows overlays up to that old, and the bridge's own
``--max-stale-ms`` (default ``protocol.BRIDGE_MAX_STALE_MS``, 5000) still caps what it shows. The daemon logs the
measured T and the window it chose.
"""
from __future__ import annotations

import math
import time

import numpy as np

FLOOR_MS = 1500
MARGIN_MS = 500
TIMED_RUNS = 2


def stale_window_ms(frame_ms: float) -> int:
    """The rule above: ``frame_ms`` is the measured time of one frame's inference."""
    if not math.isfinite(frame_ms) or frame_ms < 0:
        raise ValueError(f"frame time {frame_ms!r} ms: expected a finite, non-negative number")
    return max(FLOOR_MS, int(math.ceil((3.0 * frame_ms + MARGIN_MS) / 100.0)) * 100)


def time_inference_ms(infer_steps, input_size: int, batch: np.ndarray | None = None) -> float:
    """The slowest of ``TIMED_RUNS`` frames after one warm-up: ``infer_steps(batch)``
    runs everything one frame costs (step one and, for a cascade, its slowest
    second step). The input is a mid-grey frame: ensemble cost does not depend on
    pixel values. ``batch``: another input than the float32 frame (the camera crop, feed uint8)."""
    if batch is None:
        batch = np.full((1, input_size, input_size, 3), 128.0, dtype=np.float32)
    infer_steps(batch)   # warm-up: lazy allocations, kernel selection
    times = []
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        infer_steps(batch)
        times.append((time.perf_counter() - t0) * 1000.0)
    return max(times)
