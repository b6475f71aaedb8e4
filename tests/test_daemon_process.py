"""The daemon as the operating system runs it: ``armscope run`` in a
subprocess. SIGTERM while a frame is being inferred must publish that frame,
say ``stopping`` and exit 0; the resident set must stay flat over a soak of
thousands of captured frames; ``keys`` and ``bench`` produce their files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from armscope.core import protocol

from daemon_support import (
    LARGE_FIELD, pick_bundle, rss_kib, start, stop, wait_for,
)

from repo_paths import REPO

pytestmark = pytest.mark.e2e   # `armscope run` as a real process


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    return pick_bundle(request)


def test_sigterm_during_inference_finishes_the_frame_and_exits_0(bundle_dir, camera_frames, tmp_path):
    publish = None
    # A camera faster than inference (warmed up, the demo ensemble takes ~60 ms here), so a frame is
    # always waiting and one is in the pipeline whenever an overlay has just been published.
    proc, publish, control, log_path = start(bundle_dir, f"image://{camera_frames[1]}?fps=50", tmp_path)
    try:
        with protocol.Subscriber(publish) as sub:
            wait_for(sub, lambda m: True, 90, topic="overlay")
            last, _ = wait_for(sub, lambda m: True, 30, topic="overlay")
            # The next frame entered inference as soon as the last one left it: signal now.
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            stopping, seen = wait_for(sub, lambda m: m.header["state"] == "stopping", 60, topic="status")
        assert proc.wait(60) == 0
    finally:
        stop(proc)
    after = [m for m in seen if m.topic == "overlay"]
    assert after, "the frame in flight at SIGTERM was not published"
    assert after[0].header["frame_id"] > last.header["frame_id"] and after[0].header["capture_mono"] < sent
    assert stopping.header["reason"] == "SIGTERM"
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in lines]
    assert "stopping: SIGTERM" in messages and any(m.startswith("stopped after") for m in messages)
    assert not any(entry["level"] == "error" for entry in lines)
    assert any("backend: onnxruntime" in m for m in messages)          # which backend and why


@pytest.mark.slow
def test_rss_stays_flat_over_a_soak(bundle_dir, tmp_path):
    """~3000 captured frames (a 1024x1024 crop of the real H&E field at 100 fps):
    every frame is captured, most are dropped by newest-wins, the rest gated,
    preprocessed, classified and published. RSS after warm-up must not grow."""
    still = tmp_path / "still.png"
    field = cv2.imread(str(LARGE_FIELD))
    cv2.imwrite(str(still), field[800:1824, 600:1624])
    proc, publish, control, log_path = start(bundle_dir, f"image://{still}?fps=100", tmp_path,
                                             "--overlay-size", "512")
    samples = []
    try:
        with protocol.Subscriber(publish, topics=["overlay"]) as sub:
            wait_for(sub, lambda m: True, 90)
            deadline = time.monotonic() + 8        # warm-up: arenas, ORT buffers, first overlays
            while time.monotonic() < deadline:
                sub.recv_latest(200)
            start_status = protocol.control_request("status", control)
            t_end = time.monotonic() + 30
            while time.monotonic() < t_end:
                sub.recv_latest(200)
                samples.append(rss_kib(proc.pid))
            status = protocol.control_request("status", control)
    finally:
        rc = stop(proc)
    assert rc == 0
    captured = status["metrics"]["frames_captured"] - start_status["metrics"]["frames_captured"]
    published = status["metrics"]["frames_published"] - start_status["metrics"]["frames_published"]
    print(f"soak: {captured} frames captured, {published} published, RSS {min(samples)}..{max(samples)} KiB")
    assert captured >= 2000 and published >= 10, (captured, published)
    first = max(samples[: len(samples) // 5])
    last = max(samples[-len(samples) // 5:])
    assert last - first < 20 * 1024, f"RSS grew from {first} KiB to {last} KiB over {captured} frames"


def test_keys_command_and_curve_daemon(bundle_dir, camera_frames, tmp_path):
    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "armscope.cli", "keys", "--out", str(keys)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in keys.iterdir()) == ["client.key", "client.key_secret", "server.key",
                                                      "server.key_secret"]
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_text((keys / "client.key").read_text())
    proc, publish, control, _ = start(bundle_dir, f"image://{camera_frames[1]}?fps=4", tmp_path,
                                      "--curve-server-secret", str(keys / "server.key_secret"),
                                      "--curve-clients-dir", str(allowed))
    curve = {"server_public": keys / "server.key", "client_secret": keys / "client.key_secret"}
    try:
        reply = protocol.control_request("status", control, timeout_ms=30000, curve=curve)
        assert reply["ok"] and reply["state"] in protocol.STATES
        # A client with a key the daemon does not know gets nothing.
        protocol.write_keypair(tmp_path / "stranger", "client")
        stranger = {"server_public": keys / "server.key",
                    "client_secret": tmp_path / "stranger" / "client.key_secret"}
        with pytest.raises(Exception, match="no reply"):
            protocol.control_request("status", control, timeout_ms=1500, curve=stranger)
        with protocol.Subscriber(publish, curve=curve) as sub:
            message, _ = wait_for(sub, lambda m: True, 30, topic="status")
            assert message.header["schema"] == protocol.SCHEMA_VERSION == 2
    finally:
        assert stop(proc) == 0


def test_bench_command_writes_report_and_plot(bundle_dir, camera_frames, tmp_path):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    out = subprocess.run([sys.executable, "-m", "armscope.cli", "bench", "--bundle", str(bundle_dir),
                          "--source", f"image://{camera_frames[1]}?fps=10", "--threads", "2", "--frames", "4",
                          "--warmup", "1", "--json", str(report_path), "--plot", str(plot_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(report_path.read_text())
    e2e = report["latency_ms"]["capture_to_publish"]
    assert report["frames"] == 4 and report["fps"] > 0 and e2e["n"] == 4
    assert e2e["p50"] >= report["latency_ms"]["inference"]["p50"] > 0
    image = cv2.imread(str(plot_path))
    assert image is not None and image.shape[0] >= 300
    assert "fps" in out.stdout and os.path.getsize(plot_path) > 1000
