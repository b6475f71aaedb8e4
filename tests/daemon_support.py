"""Helpers shared by the tests/test_daemon_*.py files: daemons on ports the OS
chooses, the bundle the daemon tests run (the demo bundle when present, else
the session's mini bundle), a real H&E video with a slow pan and a focus
change, and bounded-time waits on a real SUB socket.

Ports: the daemon binds ``OS_PORT`` (``tcp://127.0.0.1:*``) and reports the
port the OS chose (``Daemon.endpoints``, its log line, the ``status`` reply),
so no other process can take a port between its choice and the bind.
``free_endpoint`` (a port picked, then released, then bound by someone else:
a race, rare but real on a busy CI box) is kept only for what must be known
before the daemon exists (see its docstring)."""
from __future__ import annotations

import json
import os
import re
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

from repo_paths import DEMO_BUNDLE, REPO
from repo_paths import HE_FIELD as LARGE_FIELD

OS_PORT = "tcp://127.0.0.1:*"   # bind to a port the OS chooses; the daemon reports which


def free_endpoint() -> str:
    """A port free now, for what needs an endpoint before any daemon exists: a
    socket connected before the daemon binds (to hear its very first messages),
    or an address that is not a ZeroMQ bind (``metrics_http``). It is released
    before the daemon binds it, so another process could take it meanwhile:
    prefer ``OS_PORT`` with ``running``/``start``."""
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


BOUND_LINE = re.compile(r"publishing on (\S+), control on (\S+), source ")


def bound_endpoints(log_path: Path, proc, timeout: float = 120) -> tuple[str, str]:
    """The (publish, control) endpoints a daemon subprocess logged once bound
    (JSON logs); fails if it exits or does not bind within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if line.startswith("{") and (found := BOUND_LINE.match(json.loads(line).get("msg", ""))):
                return found.group(1), found.group(2)
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) before binding: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"daemon did not bind within {timeout} s")


def start(bundle_dir, source, tmp_path, *extra):
    """``armscope run`` as a subprocess on ports the OS chooses, JSON logs in ``tmp_path/daemon.log``;
    returns once it has bound (before its model is loaded: it says ``starting`` meanwhile).
    Returns (process, publish endpoint, control endpoint, log path)."""
    cmd = [sys.executable, "-m", "armscope.cli", "run", "--bundle", str(bundle_dir), "--source", source,
           "--publish", OS_PORT, "--control", OS_PORT, "--threads", "1", "--heartbeat-hz", "5",
           "--log-format", "json", "--slides-dir", str(tmp_path / "slides"), *extra]
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        publish, control = bound_endpoints(log_path, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, publish, control, log_path


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
def running(bundle_dir, source, tmp_path, wait_bound=True, **overrides):
    """A daemon in a background thread of this process, on ports the OS chooses unless ``publish``/``control``
    are given; yields once its sockets are bound (``daemon.endpoints``; at once with ``wait_bound=False``,
    for a test that watches the start-up itself), stopped and checked on exit."""
    from armscope.edge.config import load_config
    from armscope.edge.daemon import Daemon

    options = dict(bundle=str(bundle_dir), source=source, publish=OS_PORT, control=OS_PORT,
                   threads=2, heartbeat_hz=5.0, reconnect_min_s=0.2, reconnect_max_s=1.0,
                   slides_dir=str(tmp_path / "slides"), snapshot_dir=str(tmp_path / "snapshots"))
    options.update(overrides)
    daemon = Daemon(load_config(None, options))
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", daemon.run(install_signals=False)),
                              name="daemon-under-test", daemon=True)
    thread.start()
    try:
        while wait_bound and not daemon.bound.wait(0.05):
            assert thread.is_alive(), "the daemon stopped before binding its sockets"
        yield daemon
    finally:
        daemon.request_stop("test over")
        thread.join(60)
        assert not thread.is_alive(), "daemon did not stop within 60 s"
        assert result.get("rc") == 0


def raw_request(endpoint: str, frames: list[bytes], timeout_ms: int = 5000) -> bytes | None:
    """One request of any frames (well-formed or not) on a fresh REQ socket: the
    reply's bytes, or None when none came within ``timeout_ms``."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return sock.recv()
    finally:
        sock.close(0)
