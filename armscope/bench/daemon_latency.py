"""``armscope bench``: the real daemon pipeline (source, gate, preprocessing,
inference, overlay, ZeroMQ publish) on a config's source and bundle, measured
from a real subscriber. Reports per-stage and capture->publish latency
percentiles over every measured overlay, capture->receive at the subscriber,
throughput, and the pure inference time for comparison, so the pipeline's
overhead over the model is one subtraction.

The daemon binds fresh localhost ports for the run (a bench must not collide
with a daemon already serving the eyepiece); everything else is the config's.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np

from armscope.core import protocol
from armscope.core.errors import ArmscopeError
from armscope.edge.config import Config

log = logging.getLogger(__name__)

STAGES = ("queue", "preprocess", "inference", "render", "total")


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A port free now, released before the daemon binds it.

    Why not ``tcp://HOST:*`` (the OS's choice at bind, reported in
    ``Daemon.endpoints``): the bench and the demo connect their subscribers
    and the bridge before the daemon starts, so that the first overlay is
    seen; they need the port before the daemon exists. Another process could
    take it in between; the daemon then fails with one clear error."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def percentiles(values) -> dict:
    if not len(values):
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None, "n": 0}
    v = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "mean": round(float(v.mean()), 2), "max": round(float(v.max()), 2), "n": int(v.size)}


FIRST_FRAME_S = 10.0   # a camera or file that delivers nothing by then is not going to: say so, not wait


def run_bench(config: Config, frames: int = 50, json_out: str | None = None, plot: str | None = None,
              warmup: int = 3, timeout_s: float | None = None, first_frame_s: float = FIRST_FRAME_S) -> dict:
    """Run the daemon until ``warmup + frames`` overlays were received; return the report.
    Stops with one error when the source has delivered no frame ``first_frame_s`` after
    capture started (the model is loaded by then): the default source is a camera
    (``v4l2:///dev/video0``), and a machine without one would otherwise keep retrying."""
    from armscope.edge.daemon import Daemon

    if frames < 2:
        raise ArmscopeError("--frames: need at least 2 overlays to measure throughput")
    config = config.replace(publish=free_tcp_endpoint(), control=free_tcp_endpoint(), max_frames=0)
    daemon = Daemon(config)
    headers: list[dict] = []
    received: list[float] = []
    done = threading.Event()
    sub = protocol.Subscriber(config.publish, topics=[protocol.TOPIC_OVERLAY])

    def collect():
        while not done.is_set():
            message = sub.recv(200)
            if message is None:
                continue
            received.append(time.monotonic())
            headers.append(message.header)
            if len(headers) >= warmup + frames:
                done.set()

    collector = threading.Thread(target=collect, name="bench-sub", daemon=True)
    runner = threading.Thread(target=lambda: daemon.run(install_signals=False), name="bench-daemon", daemon=True)
    collector.start()
    runner.start()
    limit = timeout_s or max(120.0, 10.0 * (warmup + frames))
    end = time.monotonic() + limit
    # Also stop waiting when the daemon stops on its own (a file source that ended, a fatal error): the
    # missing overlays are not coming.
    capture_since = None
    no_frames = False
    while not (finished := done.wait(0.5)) and runner.is_alive() and time.monotonic() < end:
        capture = getattr(daemon, "capture", None)   # set once the backend is ready and capture starts
        if capture is not None and capture_since is None:
            capture_since = time.monotonic()
        if capture is not None and capture.captured == 0 and time.monotonic() - capture_since > first_frame_s:
            no_frames = True
            break
    if not finished and not runner.is_alive():
        finished = done.wait(1.0)  # overlays still in flight from its last frames
    stopped_early = not finished and not runner.is_alive()
    daemon.request_stop("bench done")
    runner.join(60)
    done.set()
    collector.join(5)
    sub.close()
    if no_frames:
        raise ArmscopeError(f"no frames from {config.source} in {first_frame_s:.0f} s; give --source "
                            "(e.g. --source 'dir://samples/frames/?fps=2&loop=1', or the camera's v4l2:// URI)")
    if stopped_early:
        raise ArmscopeError(f"bench: the daemon stopped after {len(headers)} of {warmup + frames} overlays (source "
                            f"{config.source} ended, or see the log above); use a longer or looping source "
                            "(e.g. dir://...?loop=1) or fewer --frames")
    if not finished:
        raise ArmscopeError(f"bench: only {len(headers)} of {warmup + frames} overlays within {limit:.0f} s "
                            f"(source {config.source}; is there tissue in focus? see the no_tissue status)")
    measured = headers[warmup:warmup + frames]
    recv = received[warmup:warmup + frames]
    wall = recv[-1] - recv[0]
    report = {
        "source": config.source, "bundle": str(config.bundle), "model_id": daemon.model_id,
        "backend": daemon.backend_info,
        "frames": len(measured), "warmup": warmup, "wall_s": round(wall, 3),
        "fps": round((len(measured) - 1) / wall, 3) if wall > 0 else None,
        "latency_ms": {
            "capture_to_publish": percentiles([(h["publish_mono"] - h["capture_mono"]) * 1000 for h in measured]),
            "capture_to_receive": percentiles([(r - h["capture_mono"]) * 1000 for h, r in zip(measured, recv)]),
            **{stage: percentiles([h["latency_ms"][stage] for h in measured]) for stage in STAGES},
        },
        "pipeline_overhead_ms_p50": None,
        "counters": {k: v for k, v in daemon.metrics_snapshot().items() if isinstance(v, int)},
        "files": [],
    }
    lat = report["latency_ms"]
    report["pipeline_overhead_ms_p50"] = round(lat["capture_to_publish"]["p50"] - lat["inference"]["p50"], 2)
    if plot:
        e2e = [(h["publish_mono"] - h["capture_mono"]) * 1000 for h in measured]
        inference = [h["latency_ms"]["inference"] for h in measured]
        write_histogram(Path(plot), {"capture->publish": e2e, "inference": inference},
                        f"{daemon.model_id}: {report['fps']} fps over {len(measured)} overlays")
        report["files"].append(str(plot))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        report["files"].append(str(json_out))
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_histogram(path: Path, series: dict[str, list[float]], title: str) -> None:
    """Latency histogram PNG: matplotlib when installed, else drawn with OpenCV
    (the base install has no matplotlib, and the bench must still plot)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _histogram_cv2(path, series, title)
        return
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, values in series.items():
        ax.hist(values, bins=30, alpha=0.6, label=name)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("overlays")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _histogram_cv2(path: Path, series: dict[str, list[float]], title: str) -> None:
    import cv2

    w, h, margin = 800, 450, 60
    img = np.full((h, w, 3), 255, np.uint8)
    everything = np.concatenate([np.asarray(v, float) for v in series.values() if len(v)])
    lo, hi = 0.0, float(everything.max()) * 1.05 or 1.0
    bins = np.linspace(lo, hi, 31)
    counts = {name: np.histogram(v, bins)[0] for name, v in series.items()}
    top = max(int(c.max()) for c in counts.values()) or 1
    colours = [(200, 120, 30), (40, 160, 40), (40, 40, 200)]
    bw = (w - 2 * margin) / 30
    for k, (name, c) in enumerate(counts.items()):
        colour = colours[k % len(colours)]
        for i, n in enumerate(c):
            if n:
                x0 = int(margin + i * bw + k * bw / len(counts))
                x1 = int(margin + i * bw + (k + 1) * bw / len(counts)) - 1
                y0 = int(h - margin - n / top * (h - 2 * margin))
                cv2.rectangle(img, (x0, y0), (x1, h - margin), colour, -1)
        cv2.putText(img, name, (w - 230, 40 + 22 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 2, cv2.LINE_AA)
    cv2.line(img, (margin, h - margin), (w - margin, h - margin), (0, 0, 0), 1)
    cv2.line(img, (margin, margin), (margin, h - margin), (0, 0, 0), 1)
    for t in np.linspace(lo, hi, 6):
        x = int(margin + (t - lo) / (hi - lo) * (w - 2 * margin))
        cv2.putText(img, f"{t:.0f}", (x - 12, h - margin + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, "latency (ms)", (w // 2 - 50, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, f"max {top}", (5, margin - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, title[:90], (margin, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise ArmscopeError(f"{path}: could not write the histogram PNG")
