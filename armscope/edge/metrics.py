"""Daemon metrics: counters, per-stage latency windows with p50/p95/p99, fps,
for the control socket's ``status`` reply, the benchmark, and an optional
Prometheus text endpoint. Windows are bounded (last N samples) so a daemon
that runs for weeks uses constant memory."""
from __future__ import annotations

import collections
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger(__name__)

STAGES = ("queue", "preprocess", "inference", "render", "publish", "capture_to_publish")
WINDOW = 1000


class LatencyWindow:
    """The last ``size`` durations (milliseconds) of one stage."""

    def __init__(self, size: int = WINDOW):
        self.samples: collections.deque[float] = collections.deque(maxlen=size)
        self.count = 0
        self.total_ms = 0.0

    def add(self, ms: float) -> None:
        self.samples.append(ms)
        self.count += 1
        self.total_ms += ms

    def summary(self) -> dict:
        if not self.samples:
            return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}
        values = np.fromiter(self.samples, dtype=np.float64)
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
                "mean": round(float(values.mean()), 2), "n": len(values)}


class RateMeter:
    """Events per second over the last ``span`` seconds."""

    def __init__(self, span: float = 5.0):
        self.span = span
        self.times: collections.deque[float] = collections.deque(maxlen=10000)
        self.lock = threading.Lock()   # ticks and reads come from different threads

    def tick(self, now: float | None = None) -> None:
        with self.lock:
            self.times.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self.lock:
            while self.times and now - self.times[0] > self.span:
                self.times.popleft()
            if len(self.times) < 2:
                return 0.0
            elapsed = max(now - self.times[0], self.times[-1] - self.times[0])
            count = len(self.times) - 1
        return round(count / elapsed, 2) if elapsed > 0 else 0.0


class OverlayGapWatch:
    """Warns when overlays expire before the next one replaces them. Since
    ``stale_after_ms`` counts from the capture (docs/protocol.md 1.4), an overlay
    published ``L`` ms after its capture and replaced ``P`` ms later is ``L + P``
    old by then: above ``stale_after_ms`` the eyepiece goes dark between
    overlays. Judged on the median of the last ``window`` such ages, so a pause
    (no tissue, slide change) does not trigger it; at most one warning per
    ``every_s``. (``stale_after_ms = 0``, auto, sizes the window for this from
    the measured frame time: edge/pacing.py.)"""

    def __init__(self, stale_after_ms: float, window: int = 8, every_s: float = 300.0):
        self.stale_after_ms = float(stale_after_ms)
        self.intervals: collections.deque[float] = collections.deque(maxlen=window)
        self.every_s = every_s
        self._last_publish: float | None = None
        self._last_latency_ms = 0.0
        self._last_warning = float("-inf")

    def observe(self, now: float, latency_ms: float = 0.0) -> str | None:
        """Record a publish at ``now`` (monotonic seconds) of an overlay captured
        ``latency_ms`` earlier; returns the warning text when due."""
        prev, self._last_publish = self._last_publish, now
        prev_latency, self._last_latency_ms = self._last_latency_ms, float(latency_ms)
        if prev is not None:
            self.intervals.append((now - prev) * 1000.0 + prev_latency)
        if len(self.intervals) < self.intervals.maxlen or now - self._last_warning < self.every_s:
            return None
        age = float(np.median(np.fromiter(self.intervals, dtype=np.float64)))
        if age <= self.stale_after_ms:
            return None
        self._last_warning = now
        return (f"overlays are ~{age:.0f} ms old (from capture) when the next one replaces them, but subscribers "
                f"blank them at stale_after_ms={self.stale_after_ms:.0f}: the eyepiece goes dark between overlays. "
                f"Use stale_after_ms = 0 (auto) or raise it above {age:.0f} (older overlays stay up longer), or make "
                f"inference faster (backend, precision, fewer members)")


class Metrics:
    """Thread-safe container; stages call ``observe`` and ``count``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency = {stage: LatencyWindow() for stage in STAGES}
        # Named up front so the status reply always has them, zero or not.
        self.counters = collections.Counter({name: 0 for name in ("no_tissue", "paused_frames", "too_small",
                                                                "stale_dropped")})
        self.published = RateMeter()
        self.captured = RateMeter()

    def observe(self, stage: str, ms: float) -> None:
        with self.lock:
            self.latency[stage].add(ms)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def snapshot(self, extra_counters: dict | None = None) -> dict:
        with self.lock:
            counters = dict(self.counters)
            latency = {stage: w.summary() for stage, w in self.latency.items()}
            fps, capture_fps = self.published.rate(), self.captured.rate()
        counters.update(extra_counters or {})
        return {**counters, "fps": fps, "capture_fps": capture_fps, "latency_ms": latency}


def prometheus_text(snapshot: dict, labels: str = "") -> str:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    lines = []
    for key, value in sorted(snapshot.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kind = "gauge" if key in ("fps", "capture_fps") else "counter"
            name = f"armscope_{key}" + ("_total" if kind == "counter" else "")
            lines += [f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
    lines.append("# TYPE armscope_latency_ms summary")
    for stage, summary in snapshot.get("latency_ms", {}).items():
        for q in ("p50", "p95", "p99"):
            if summary[q] is not None:
                sep = "," if labels else ""
                lines.append(f'armscope_latency_ms{{{labels}{sep}stage="{stage}",quantile="0.{q[1:]}"}} {summary[q]}')
        lines.append(f'armscope_latency_ms_count{{{labels}{"," if labels else ""}stage="{stage}"}} {summary["n"]}')
    return "\n".join(lines) + "\n"


def serve_prometheus(address: str, provider) -> ThreadingHTTPServer:
    """Serve ``GET /metrics`` on ``HOST:PORT`` from a daemon thread; ``provider()`` returns the text."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics")
                return
            body = provider().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("Prometheus metrics on http://%s/metrics", address)
    return server
