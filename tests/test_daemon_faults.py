"""The faults a lab hits, against ``armscope run`` as a real process on real
sockets: a daemon frozen (SIGSTOP/SIGCONT) under a running eyepiece bridge
must never put an overlay from before the freeze on the display; no client
message can disable the control socket; a subscriber that never reads costs
the daemon at most a few overlays of memory."""
from __future__ import annotations

import json
import signal
import socket
import time

import pytest
import zmq

from armscope.core import protocol
from bridge_runtime_support import running_bridge
from daemon_support import pick_bundle, raw_request, rss_kib, start, stop, wait_for

pytestmark = pytest.mark.e2e   # `armscope run` as a real process, with a bridge
from armscope.firmware_bridge.bridge import Bridge
from armscope.firmware_bridge.displays import PngDisplay

STALE_MS = 1500   # the daemon's default stale_after_ms


@pytest.fixture(scope="module")
def bundle_dir(request):
    return pick_bundle(request)


def log_entries(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_a_frozen_daemon_never_shows_an_overlay_from_before_the_freeze(bundle_dir, camera_frames, tmp_path):
    # A camera faster than the warmed-up inference: a frame is always in the pipeline after an overlay.
    proc, publish, control, log_path = start(bundle_dir, f"image://{camera_frames[1]}?fps=50", tmp_path)
    display = PngDisplay(tmp_path / "eyepiece", width=640, height=480)
    bridge = Bridge(display, connect=publish, stats_interval=0)   # loopback: clock "mono"
    assert bridge.clock_mode == "mono"
    try:
        with protocol.Subscriber(publish) as sub, running_bridge(bridge):
            wait_for(sub, lambda m: True, 90, topic="overlay")
            freezes = []
            for _ in range(2):
                # Right after an overlay the next frame is already in the pipeline: freeze it there.
                wait_for(sub, lambda m: True, 30, topic="overlay")
                shown_before = bridge.stats()["shown"]
                proc.send_signal(signal.SIGSTOP)
                frozen_at = time.monotonic()
                time.sleep(STALE_MS / 1000 + 1.5)
                assert bridge.displayed == "blank", "the eyepiece kept an overlay of a frozen daemon"
                proc.send_signal(signal.SIGCONT)
                freezes.append(frozen_at)
                # After the resume: every overlay published is younger than the stale window,
                # and the eyepiece shows fresh overlays again.
                resumed = time.monotonic()
                fresh = 0
                while fresh < 2:
                    msg, _ = wait_for(sub, lambda m: True, 30, topic="overlay")
                    h = msg.header
                    assert (h["publish_mono"] - h["capture_mono"]) * 1000 <= STALE_MS, h["frame_id"]
                    assert h["capture_mono"] > frozen_at or h["publish_mono"] < frozen_at + 0.5
                    fresh += h["capture_mono"] > resumed
                deadline = time.monotonic() + 10
                while bridge.stats()["shown"] <= shown_before and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert bridge.stats()["shown"] > shown_before, "nothing shown after the resume"
            status = protocol.control_request("status", control)
        stats = bridge.stats()
    finally:
        rc = stop(proc)
    assert rc == 0
    # What the eyepiece showed was never older than the window, from the capture.
    assert stats["capture_to_shown_max_ms"] is not None and stats["capture_to_shown_max_ms"] <= STALE_MS, stats
    # The frames caught in the pipeline by the freezes were dropped by the daemon, counted, logged once each.
    assert status["metrics"]["stale_dropped"] >= 1, status["metrics"]
    warnings = [e["msg"] for e in log_entries(log_path) if "not published: captured" in e["msg"]]
    assert 1 <= len(warnings) <= 2, warnings


def test_no_client_message_disables_the_control_socket(bundle_dir, camera_frames, tmp_path):
    proc, publish, control, log_path = start(bundle_dir, f"image://{camera_frames[1]}?fps=5", tmp_path)
    try:
        assert protocol.control_request("status", control, timeout_ms=90_000)["ok"]
        # A multipart request: an error reply, not a dead socket.
        reply = json.loads(raw_request(control, [b"status", b"x"]))
        assert reply["ok"] is False and "one frame" in reply["error"]
        assert protocol.control_request("status", control)["ok"]
        # Raw bytes on the TCP port (not ZMTP).
        host, port = control.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7fGARBAGE")
            time.sleep(0.3)
        assert protocol.control_request("status", control)["ok"]
        # JSON nested too deeply for the parser, under the size limit.
        deep = ('{"cmd": "status", "args": ' + "[" * 2000 + "]" * 2000 + "}").encode()
        assert len(deep) < 4096
        reply = json.loads(raw_request(control, [deep]))
        assert reply["ok"] is False and "nested too deeply" in reply["error"]
        # A 1 MB unknown command: refused without echoing it back.
        huge = b"x" * 1_000_000
        raw_reply = raw_request(control, [huge])
        assert raw_reply is not None and len(raw_reply) < 300, len(raw_reply or b"")
        assert json.loads(raw_reply)["ok"] is False
        # Over ZMQ_MAXMSGSIZE: libzmq drops that connection; the socket lives on.
        assert raw_request(control, [b"y" * 2_000_000], timeout_ms=1000) is None
        # Every command still works.
        for command in ("pause", "resume", "slide start S-1", "slide end", "status"):
            reply = protocol.control_request(command, control)
            assert reply["ok"], (command, reply)
        metrics = reply["metrics"]
        assert metrics["control"] == "ok" and metrics["control_restarts"] == 0
        assert metrics["control_bad_requests"] >= 3
    finally:
        assert stop(proc) == 0
    entries = log_entries(log_path)
    text = log_path.read_text()
    assert "Traceback" not in text and not any(e.get("exc_info") for e in entries)
    refused = [e["msg"] for e in entries if "-> refused" in e["msg"]]
    assert len(refused) >= 3 and all(len(m) < 400 for m in refused), refused
    assert not any(e["level"] == "error" for e in entries), [e for e in entries if e["level"] == "error"]


@pytest.mark.slow
def test_a_subscriber_that_never_reads_costs_at_most_a_few_bitmaps(bundle_dir, camera_frames, tmp_path):
    """The opt-in ``rendered`` topic (rendered_topic on) carries raw 1024x1024 RGBA
    bitmaps, 4 MiB each: the one place a message is still large, so the one where
    a subscriber that stops reading could cost the daemon memory. (With SNDHWM set
    after bind, libzmq kept its default of 1000 and the daemon queued every
    bitmap for an idle subscriber.) The v2 ``overlay`` is a few KB and cannot."""
    proc, publish, control, log_path = start(bundle_dir, f"image://{camera_frames[1]}?fps=30", tmp_path,
                                             "--encoding", "raw", "--rendered-topic")
    try:
        # the bitmaps really flow: a reader gets one of 4 MiB, then leaves
        with protocol.Subscriber(publish, topics=["rendered"], rcvbuf=16 << 20) as reader:
            deadline = time.monotonic() + 90
            bitmap = None
            while bitmap is None and time.monotonic() < deadline:
                bitmap = reader.recv_latest(1000).get("rendered")
        assert bitmap is not None, "no rendered bitmap within 90 s"
        assert bitmap.header["width"] == 1024 and len(bitmap.payload) == 1024 * 1024 * 4
        # connected, subscribed to the bitmaps with the buffer 1.6 tells a rendered subscriber to ask for, never reads
        with protocol.Subscriber(publish, topics=["rendered"], rcvbuf=16 << 20) as idle:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                published = protocol.control_request("status", control, timeout_ms=15_000)["metrics"]["frames_published"]
                if published >= 10:
                    break
                time.sleep(0.5)
            before, start_count = rss_kib(proc.pid), published
            deadline = time.monotonic() + 120
            while published < start_count + 50 and time.monotonic() < deadline:
                time.sleep(0.5)
                published = protocol.control_request("status", control, timeout_ms=15_000)["metrics"]["frames_published"]
            assert published >= start_count + 50, f"only {published - start_count} overlays in 120 s"
            grown_mib = (rss_kib(proc.pid) - before) / 1024
            assert idle.socket.getsockopt(zmq.RCVHWM) == 4
    finally:
        assert stop(proc) == 0
    # 50 bitmaps of 4 MiB went to a subscriber that read none: at most ~2 may wait in the
    # daemon's queue plus what its socket buffer holds; a queue of 1000 would hold all 200 MiB.
    assert grown_mib < 48, f"the daemon grew by {grown_mib:.0f} MiB for an idle subscriber"
