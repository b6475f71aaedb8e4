"""Daemon metrics: counters, per-stage latency windows with p50/p95/p99, fps,
for the control socket's ``status`` reply, the benchmark, and an optional
Prometheus endpoint. Windows are bounded (last N samples) so a daemon
that runs for weeks uses constant memory; the Prometheus side adds per-stage
histograms in seconds (real ``_count``/``_sum`` since start, fixed buckets), written
by ``prometheus_client`` so the exposition format is the library's, not ours."""
from __future__ import annotations

import collections
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

STAGES = ("queue", "preprocess", "inference", "render", "publish", "capture_to_publish")
WINDOW = 1000
# Histogram bounds, seconds: a stage takes from well under a millisecond (publish) to
# seconds (a five-member ensemble on a small CPU), so the buckets span 0.5 ms .. 10 s.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GAUGES = ("fps", "capture_fps")  # snapshot values that go up and down; every other number is a total since start


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
    ``stale_after_ms`` counts from the capture (docs/protocol.md 1.5), an overlay
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
        # Not in prometheus_client's global registry: a process (the tests, the bench) may run several daemons
        self.stage_seconds = Histogram("armscope_stage_latency_seconds", "time per pipeline stage since start",
                                       ["stage"], buckets=LATENCY_BUCKETS_S, registry=None)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)  # every stage exposed from the start, zero or not

    def observe(self, stage: str, ms: float) -> None:
        with self.lock:
            self.latency[stage].add(ms)
        self.stage_seconds.labels(stage=stage).observe(ms / 1000.0)

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


class _SnapshotCollector:
    """The snapshot's counters and gauges, and the windows' percentiles as gauges, for one scrape.
    The daemon owns these values (capture, slots, control thread), so they are read when
    scraped (prometheus_client's custom-collector pattern) rather than mirrored in its types."""

    def __init__(self, snapshot: dict):
        self.snapshot = snapshot

    def collect(self):
        for key, value in sorted(self.snapshot.items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # e.g. "control": the control thread's state, a word
            if key in GAUGES:
                yield GaugeMetricFamily(f"armscope_{key}", f"{key} over the last 5 s", value=value)
            else:  # prometheus_client appends _total
                yield CounterMetricFamily(f"armscope_{key}", f"{key.replace('_', ' ')} since start", value=value)
        window = GaugeMetricFamily("armscope_latency_window_seconds",
                                   f"per-stage percentiles over the last {WINDOW} frames",
                                   labels=["stage", "quantile"])
        for stage, summary in self.snapshot.get("latency_ms", {}).items():
            for key, quantile in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
                if summary[key] is not None:
                    window.add_metric([stage, quantile], summary[key] / 1000.0)
        yield window


def prometheus_text(metrics: Metrics, extra_counters: dict | None = None) -> str:
    """``metrics`` (with the daemon's own counters) in the Prometheus text exposition format:
    ``armscope_<counter>_total``, ``armscope_fps``, ``armscope_capture_fps``, the histogram
    ``armscope_stage_latency_seconds{stage=...}`` and ``armscope_latency_window_seconds{stage=...,quantile=...}``."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics.stage_seconds)
    registry.register(_SnapshotCollector(metrics.snapshot(extra_counters)))
    return generate_latest(registry).decode()


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
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
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
