"""Helpers shared by the tests/test_daemon_*.py files: free ports, the bundle
the daemon tests run (the demo bundle when present, else the session's
mini bundle), a real H&E video with a slow pan and a focus change, and
bounded-time waits on a real SUB socket."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LARGE_FIELD = REPO / "samples" / "he" / "cmu-small-region" / "cmu_small_region_level0.jpg"
DEMO_BUNDLE = REPO / "samples" / "demo_bundle"


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def pick_bundle(request) -> Path:
    """$ARMSCOPE_TEST_BUNDLE, else samples/demo_bundle, else the conftest's mini bundle (needs TF, minutes)."""
    if os.environ.get("ARMSCOPE_TEST_BUNDLE"):
        return Path(os.environ["ARMSCOPE_TEST_BUNDLE"])
    if (DEMO_BUNDLE / "manifest.json").is_file():
        return DEMO_BUNDLE
    return request.getfixturevalue("mini_bundle")


def blur_sigma(i: int, start: int, stop: int, peak: float) -> float:
    """A focus change: sharp, defocus ramping up to ``peak`` then back, sharp."""
    if not start <= i < stop:
        return 0.0
    mid = (start + stop - 1) / 2
    return peak * (1 - abs(i - mid) / (mid - start + 1))


def make_pan_video(path: Path, n_frames: int = 36, size=(1280, 1024), fps: float = 8.0,
                   blur=(14, 24, 9.0)) -> list[float]:
    """MJPG/AVI of a diagonal pan over the real CMU H&E field, frames
    ``blur[0]..blur[1]`` defocused (Gaussian, sigma up to ``blur[2]``).
    Returns the sigma of each frame."""
    field = cv2.imread(str(LARGE_FIELD))
    assert field is not None, LARGE_FIELD
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    sigmas = []
    fh, fw = field.shape[:2]
    for i in range(n_frames):
        t = i / max(1, n_frames - 1)
        x, y = int(t * (fw - w)), int(t * (fh - h) * 0.5)
        frame = field[y:y + h, x:x + w]
        sigma = blur_sigma(i, *blur)
        if sigma > 0:
            frame = cv2.GaussianBlur(frame, (0, 0), sigma)
        writer.write(np.ascontiguousarray(frame))
        sigmas.append(sigma)
    writer.release()
    return sigmas


def wait_for(sub, predicate, timeout: float, topic: str | None = None):
    """Receive until ``predicate(message)`` is true; returns (message, all received). Fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        message = sub.recv(int(max(1, (deadline - time.monotonic()) * 1000)))
        if message is None:
            break
        seen.append(message)
        if (topic is None or message.topic == topic) and predicate(message):
            return message, seen
    states = [m.header.get("state") for m in seen if m.topic == "status"][-10:]
    raise AssertionError(f"condition not met within {timeout} s; {len(seen)} messages, last states {states}")


def start(bundle_dir, source, tmp_path, *extra):
    """``armscope run`` as a subprocess with fresh ports and JSON logs in ``tmp_path/daemon.log``.
    Returns (process, publish endpoint, control endpoint, log path)."""
    publish, control = free_endpoint(), free_endpoint()
    cmd = [sys.executable, "-m", "armscope.cli", "run", "--bundle", str(bundle_dir), "--source", source,
           "--publish", publish, "--control", control, "--threads", "1", "--heartbeat-hz", "5",
           "--log-format", "json", "--slides-dir", str(tmp_path / "slides"), *extra]
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return proc, publish, control, tmp_path / "daemon.log"


def stop(proc, timeout=60):
    """SIGTERM (SIGCONT first, in case a test froze it) and wait; kill and fail after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"daemon did not exit within {timeout} s of SIGTERM")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextmanager
def running(bundle_dir, source, tmp_path, **overrides):
    """A daemon in a background thread of this process, with fresh ports; stopped and checked on exit."""
    from armscope.edge.config import load_config
    from armscope.edge.daemon import Daemon

    options = dict(bundle=str(bundle_dir), source=source, publish=free_endpoint(), control=free_endpoint(),
                   threads=2, heartbeat_hz=5.0, reconnect_min_s=0.2, reconnect_max_s=1.0,
                   slides_dir=str(tmp_path / "slides"), snapshot_dir=str(tmp_path / "snapshots"))
    options.update(overrides)
    daemon = Daemon(load_config(None, options))
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", daemon.run(install_signals=False)),
                              name="daemon-under-test", daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        daemon.request_stop("test over")
        thread.join(60)
        assert not thread.is_alive(), "daemon did not stop within 60 s"
        assert result.get("rc") == 0
