"""Protocol v2 (docs/protocol.md 1.2-1.7) end to end on real sockets: the CAM
drawn by the bridge agrees with the daemon's v1 bitmap on the real Grad-CAM,
a real daemon's overlay crosses the wire in a few KB, the ``offset`` clock
rule expires an overlay from another host by its capture, a refused version
costs one log line, and a stalled bridge never shows the backlog it finds."""
from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
import zmq

from armscope.core import protocol
from armscope.core.overlay import focus_levels, heat_rgba
from armscope.firmware_bridge import render as R
from armscope.firmware_bridge.bench import SAMPLE_CAM
from armscope.firmware_bridge.bridge import Bridge
from armscope.firmware_bridge.displays import PngDisplay
from armscope.firmware_bridge.staleness import expiry, resolve_mode

from bridge_runtime_support import DISPLAY, FakeDaemon, assert_close_image, cam_of, registration

COMMON_KEYS = ("schema", "topic", "payload_bytes", "run_id", "seq", "model_id", "slide_id", "stale_after_ms",
               "publish_mono", "publish_wall")


@pytest.mark.parametrize("camera_to_display", [
    # the bench's registration: scale 0.6, 1 degree, a little perspective (the crop smaller on the display)
    np.array([[0.6 * np.cos(np.deg2rad(1)), -0.6 * np.sin(np.deg2rad(1)), 170.0],
              [0.6 * np.sin(np.deg2rad(1)), 0.6 * np.cos(np.deg2rad(1)), 2.0], [1e-6, -2e-6, 1.0]]),
    # magnified 1.1x, sheared and in perspective, partly off the display
    np.array([[1.1, 0.05, -200.0], [-0.04, 1.1, -300.0], [2e-5, 1e-5, 1.0]]),
], ids=["shrunk", "magnified"])
def test_v2_render_agrees_with_the_v1_bitmap_on_the_real_cam(camera_to_display):
    """The bridge's v2 drawing (the CAM mapped per display pixel) and v1's (the
    daemon's 1024x1024 bitmap, warped) of the demo ensemble's real CAM on CMU-1,
    into a 1280x720 display. Tolerance (``assert_close_image``), away from
    the focus outline (1 px either side of either outline): mean difference at
    most 0.25 levels and at most 1 channel value in 100 000 more than 8 levels
    apart (measured: mean 0.04-0.08, one value 10 levels off, next to the
    outline); the two outlines within 1-2 px of each other."""
    cam = np.load(SAMPLE_CAM)
    size = (1280, 720)
    region = {"x": 288, "y": 88, "size": 1024, "frame_width": 1600, "frame_height": 1200}
    v2, r2 = R.render_cam_for_display(cam, focus_levels(cam), (288, 88, 1024), region, camera_to_display, size)
    v1, r1 = R.render_for_display(heat_rgba(cam, 1024), camera_to_display @ R.grid_to_camera(288, 88, 1024, (1024, 1024)),
                                  size)
    assert r1 == r2   # the same pixels sent to the display
    x, y, w, h = r1
    whole = [np.zeros((size[1], size[0], 3), np.uint8) for _ in range(2)]
    whole[0][y:y + h, x:x + w], whole[1][y:y + h, x:x + w] = v2, v1
    assert_close_image(whole[0], whole[1], max_mean=0.25, max_bad_frac=1e-5, bad_level=8)
    # nothing drawn outside the crop's projection (the outline ends at its edge, as in the bitmap)
    outside = np.ones(size[::-1], np.uint8)
    import cv2

    quad = cv2.perspectiveTransform(np.array([[[287.5, 87.5], [1311.5, 87.5], [1311.5, 1111.5], [287.5, 1111.5]]]),
                                    camera_to_display)[0]
    cv2.fillConvexPoly(outside, np.round(quad).astype(np.int32), 0)
    outside = cv2.erode(outside, np.ones((3, 3), np.uint8)).astype(bool)   # 1 px of antialiased edge allowed
    assert whole[0][outside].max() == 0 and whole[1][outside].max() == 0


def test_a_real_daemons_overlay_crosses_the_wire_in_a_few_kb(tmp_path):
    """The demo ensemble on a real H&E frame: the v2 ``overlay`` message, all three
    frames as received, is under 4 KiB; the opt-in ``rendered`` bitmap of the same
    frame is the 4 MiB it replaced. Both ``focus_bbox``es bound the focus outline
    exactly as the bitmap draws it (its opaque pixels; the heat is at most
    ``max_alpha`` opaque), the overlay's in camera pixels. The frame is one whose
    outline ends 56 px inside the crop's left edge, where the CAM cells above the
    median (the box sent before) began at 51."""
    from daemon_support import REPO, free_endpoint, running

    publish = free_endpoint()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVBUF, 16 << 20)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (b"overlay", b"rendered"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(publish)
    sizes: dict[str, int] = {}
    messages: dict[tuple[str, int], protocol.Message] = {}
    pair = None
    try:
        with running(REPO / "samples" / "demo_bundle", f"image://{REPO / 'samples/frames/cmu1_frame_2.jpg'}?fps=4",
                     tmp_path, publish=publish, rendered_topic=True):
            deadline = time.monotonic() + 90
            while pair is None and time.monotonic() < deadline:
                if sub.poll(1000):
                    frames = sub.recv_multipart()
                    message = protocol.decode(frames)   # what every subscriber checks
                    topic = frames[0].decode()
                    sizes[topic] = sum(len(f) for f in frames)
                    messages[topic, message.header["frame_id"]] = message
                    if topic == "rendered" and ("overlay", message.header["frame_id"]) in messages:
                        pair = messages["overlay", message.header["frame_id"]], message
    finally:
        sub.close(0)
        ctx.term()
    assert sizes["overlay"] <= 4096, sizes
    assert sizes["rendered"] >= 1024 * 1024 * 4, sizes
    assert pair is not None, sorted(messages)
    overlay, rendered = pair
    rgba = protocol.overlay_image(rendered)
    region = overlay.header["region"]
    assert rgba.shape[:2] == (region["size"], region["size"])   # overlay_size: the crop, one bitmap px a camera px
    opaque = np.argwhere(rgba[..., 3] == 255)
    assert len(opaque) > 1000   # the outline of a real CAM, drawn
    (y0, x0), (y1, x1) = opaque.min(0), opaque.max(0)
    assert rendered.header["focus_bbox"] == [int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)]
    assert overlay.header["focus_bbox"] == [int(x0) + region["x"], int(y0) + region["y"],
                                            int(x1 - x0 + 1), int(y1 - y0 + 1)]


def _shifted(frames: list[bytes], shift: float, **override) -> list[bytes]:
    """The message as a daemon whose monotonic clock is ``shift`` s ahead of ours sends it."""
    header = json.loads(frames[1])
    for key in ("publish_mono", "capture_mono"):
        if key in header:
            header[key] += shift
    header.update(override)
    return protocol.encode(frames[0], header, frames[2])


def _step_until(bridge: Bridge, pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        bridge.step()
        if pred():
            return True
    return False


def test_offset_clock_expires_an_overlay_from_another_host_by_its_capture(tmp_path):
    """A daemon on another host: its monotonic clock is 5000 s off ours. The
    bridge (clock ``offset``, what ``auto`` picks for a remote endpoint) learns
    the offset from the heartbeats over a real socket, and an overlay that was
    held 0.45 s after publication (a queue, a slow link) expires 0.6 s after its
    capture on the daemon's clock, where rule 1 alone would keep it 0.55 s."""
    assert resolve_mode("auto", "tcp://10.20.30.40:5556") == "offset"
    shift, stale = 5000.0, 0.6
    daemon = FakeDaemon(stale_after_ms=int(stale * 1000))
    bridge = Bridge(PngDisplay(tmp_path / "eyepiece", width=DISPLAY[0], height=DISPLAY[1]), connect=daemon.endpoint,
                    registration=registration(), clock_mode="offset", stats_interval=0, poll_interval=0.02)
    cam = cam_of(0)
    try:
        bridge.start()
        end = time.monotonic() + 10
        while bridge.stats()["shown"] < 1 and time.monotonic() < end:   # ZeroMQ's slow joiner, then one overlay
            daemon.send(_shifted(daemon.status_frames("running"), shift))
            daemon.send(_shifted(daemon.overlay_frames(cam), shift))
            bridge.step()
        assert bridge.stats()["shown"] == 1 and bridge.clock_mode == "offset"
        # the estimate: our clock minus the daemon's, plus the fastest transit seen (loopback: sub-ms)
        assert bridge.offset.offset == pytest.approx(-shift, abs=0.05)

        t = time.monotonic()
        held = daemon.overlay_frames(cam, publish_mono=t + shift - 0.45, capture_mono=t + shift - 0.5)
        daemon.send(held)
        fid = json.loads(held[1])["frame_id"]
        assert _step_until(bridge, lambda: bridge.last_frame_id == fid, 5)
        received = t   # at most the time it took to arrive later: the bounds below allow for it
        shown = bridge.current if bridge.current is not None and bridge.current.msg.header["frame_id"] == fid else None
        if shown is not None:  # shown for what is left of its 0.6 s, not for rule 1's 0.55 s after receipt
            assert shown.expiry - shown.received < 0.2
            header = shown.msg.header
            assert expiry(header, shown.received, stale, "receipt", now=0, wall_now=0, offset=None) \
                - shown.received == pytest.approx(0.55, abs=0.01)
        else:                  # or, on a slow moment, already too old to be worth sending
            assert bridge.stats()["expired_unshown"] >= 1
        blanks = bridge.stats()["blanks"].get("stale", 0)
        _step_until(bridge, lambda: False, 0.3)   # heartbeats keep the daemon "alive"; the overlay must go
        assert bridge.displayed == "blank" and time.monotonic() - received < 5
        assert shown is None or bridge.stats()["blanks"].get("stale", 0) == blanks + 1
    finally:
        bridge.close()
        daemon.close()


def test_a_refused_version_is_one_log_line_and_blanks(tmp_path, caplog):
    """Version 1 messages (the overlay as a bitmap) and a future version 3 reach a
    v2 bridge over a real socket: every one is refused and counted, the display
    stays blank, and the log gets one line per version, not one per message."""
    daemon = FakeDaemon(stale_after_ms=600)
    bridge = Bridge(PngDisplay(tmp_path / "eyepiece", width=DISPLAY[0], height=DISPLAY[1]), connect=daemon.endpoint,
                    registration=registration(), stats_interval=0, poll_interval=0.02)

    def as_version(frames, version):
        header = dict(json.loads(frames[1]), schema=version)
        return [frames[0], json.dumps(header).encode(), frames[2]]

    v1 = {k: v for k, v in json.loads(daemon.overlay_frames(cam_of(0))[1]).items() if k != "cam"}
    v1_frames = [b"overlay", json.dumps(dict(v1, schema=1, width=4, height=4, format="RGBA8", payload_bytes=64)).encode(),
                 bytes(64)]
    try:
        with caplog.at_level(logging.WARNING, logger="armscope.firmware_bridge.bridge"):
            bridge.start()
            end = time.monotonic() + 10
            while bridge.received["messages"] < 1 and time.monotonic() < end:   # slow joiner
                daemon.send(v1_frames)
                bridge.step()
            for version, count in ((1, 30), (3, 10)):   # paced: PUB/SUB drops a burst beyond the HWMs, on purpose
                for _ in range(count):
                    daemon.send(v1_frames if version == 1 else as_version(daemon.status_frames("running"), 3))
                    daemon.send(as_version(daemon.status_frames("running"), version))
                    _step_until(bridge, lambda: False, 0.01)
            _step_until(bridge, lambda: False, 0.2)
        s = bridge.stats()
        assert s["rejected"] == {"schema": s["received"]["messages"]} and s["received"]["messages"] >= 40, s
        assert s["shown"] == 0 and bridge.displayed == "blank"
        lines = [r.getMessage() for r in caplog.records if "another protocol version" in r.getMessage()]
        assert len(lines) == 2, lines
        assert "schema: 1, this subscriber supports 2" in lines[0] and "bitmap" in lines[0]
        assert "schema: 3, this subscriber supports 2" in lines[1]
        # a v2 daemon on the same socket is shown at once: the refusal is per message, not a latch
        end = time.monotonic() + 10
        while bridge.stats()["shown"] < 1 and time.monotonic() < end:
            daemon.status("running")
            daemon.overlay(cam_of(0))
            bridge.step()
        assert bridge.stats()["shown"] >= 1
    finally:
        bridge.close()
        daemon.close()


def test_a_stalled_bridge_is_handed_a_short_backlog_and_shows_none_of_it(tmp_path):
    """The daemon's own PUB socket (``edge.publisher``: SNDHWM 2, 16 KiB SNDBUF)
    publishes overlays at ~100 Hz; the bridge's loop stalls for 4 s (a blocked
    display, a swapped-out process). Small buffers on both ends (docs/protocol.md
    1.6): the backlog it finds is a few dozen messages, not the ~400 published
    (a kernel buffer left to grow would hold minutes of few-KB overlays), it is
    drained at once, and nothing in it is shown: every overlay the eyepiece
    shows, before or after the stall, landed within stale_after_ms of its capture."""
    from armscope.edge.publisher import Publisher, pub_socket

    stale_ms = 500
    ctx = zmq.Context()
    sock = pub_socket(ctx, None)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    publisher = Publisher(sock, "test@0123456789ab", stale_after_ms=stale_ms)
    template = FakeDaemon.__new__(FakeDaemon)   # header builder only (no socket of its own)
    template.run_id, template.seq, template.frame_id, template.stale_after_ms = "x", 0, 0, stale_ms
    cam = cam_of(0)
    stop = threading.Event()
    counts = {"published": 0}

    def publish():
        i = 0
        while not stop.is_set():
            frames = template.overlay_frames(cam, capture_age_s=0.0)
            header = {k: v for k, v in json.loads(frames[1]).items() if k not in COMMON_KEYS}
            header["capture_mono"], header["capture_wall"] = protocol.now_pair()
            if publisher.send(protocol.TOPIC_OVERLAY, header, frames[2]) is not None:
                counts["published"] += 1
            if i % 10 == 0:
                publisher.send(protocol.TOPIC_STATUS, {"state": "running", "heartbeat": True, "reason": None,
                                                       "frame_id": header["frame_id"], "detail": {},
                                                       "encoding": protocol.ENCODING_NONE})
            i += 1
            time.sleep(0.01)

    endpoint = f"tcp://127.0.0.1:{port}"
    bridge = Bridge(PngDisplay(tmp_path / "eyepiece", width=DISPLAY[0], height=DISPLAY[1]), connect=endpoint,
                    registration=registration(), stats_interval=0, poll_interval=0.02)
    plain = protocol.Subscriber(endpoint, topics=["overlay"])   # the reference subscriber, stalled alongside
    thread = threading.Thread(target=publish, name="publisher", daemon=True)
    try:
        bridge.start()
        assert bridge.clock_mode == "mono"   # loopback: the capture is compared on the one clock
        thread.start()
        assert _step_until(bridge, lambda: bridge.stats()["shown"] >= 3, 15)
        while plain.recv(0) is not None or not plain.recv(100):
            pass                                            # joined and drained
        before = bridge.stats()
        stalled_at = counts["published"]
        time.sleep(4.0)                                     # the stall: neither reads its socket
        resumed = time.monotonic()
        during = counts["published"] - stalled_at
        # the bridge: drains what was queued and shows only what is fresh
        assert _step_until(bridge, lambda: bridge.current is not None
                           and bridge.current.msg.header["capture_mono"] > resumed, 2.0)
        after = bridge.stats()
        # the plain subscriber: how much was queued for it, and how old
        backlog = []
        while (message := plain.recv(200)) is not None and message.header["capture_mono"] < resumed:
            backlog.append(resumed - message.header["capture_mono"])
            assert time.monotonic() - resumed < 2.0, f"still draining old overlays after 2 s ({len(backlog)})"
        assert message is not None, "no fresh overlay after the stall"
    finally:
        stop.set()
        thread.join(5)
        plain.close()
        bridge.close()
        publisher.close()
        ctx.term()
    assert during >= 200, f"only {during} overlays published during the stall"
    # the backlog: about the first half second of the stall (measured: ~52 overlays of ~1.3 KB), not the 4 s
    assert len(backlog) <= 64, f"{len(backlog)} old overlays were still queued for the stalled subscriber"
    assert after["shown"] > before["shown"]
    # nothing old was ever shown (clock mono: capture -> on the display, the oldest over the run)
    assert after["capture_to_shown_max_ms"] < stale_ms, after
