"""End to end: LinkSender -> pyserial -> pty -> simulated controller -> PNG, with faults.

Every wait is bounded: ports have read/write timeouts, senders have deadlines,
and the simulator thread is stopped in a finally block.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

serial = pytest.importorskip("serial")

from armscope.firmware_bridge import link as L  # noqa: E402
from armscope.firmware_bridge import pixel_formats as pf  # noqa: E402
from armscope.firmware_bridge.pixel_formats import PixelFormat  # noqa: E402
from armscope.firmware_bridge.simulator import ControllerCore, FaultPlan, PtyController  # noqa: E402
from repo_paths import REPO  # noqa: E402

pytestmark = pytest.mark.e2e   # the bridge's link against a controller on a real pty

W, H = 128, 96


def overlay(seed: int, w: int = W, h: int = H) -> np.ndarray:
    """Grad-CAM-like RGBA: JET heat blobs, alpha from heat, transparent elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = np.zeros((h, w), np.float32)
    for _ in range(3):
        cx, cy, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
        heat += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    heat = np.clip(heat, 0, 1)
    rgb = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    alpha = np.where(heat > 0.15, heat * 230, 0).astype(np.uint8)
    return np.dstack([rgb, alpha]).copy()


@contextlib.contextmanager
def linked(core: ControllerCore, **sender_kw):
    sim = PtyController(core)
    path = sim.start()
    port = serial.Serial(path, 921600, timeout=0.01, write_timeout=2.0)
    try:
        kw = dict(deadline=3.0, ack_timeout=0.1)
        kw.update(sender_kw)
        yield L.LinkSender(port, **kw), sim
    finally:
        port.close()
        sim.stop()


def read_png_rgb(path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("fmt", ["rgb565le", "rgb565be", "mono1", "rgb888"])
def test_frames_arrive_and_png_shows_the_converted_frame(tmp_path, fmt):
    core = ControllerCore(W, H, fmt, png_dir=tmp_path)
    with linked(core) as (sender, _):
        info = sender.hello()
        assert (info.width, info.height, info.pixel_format.slug) == (W, H, fmt)
        for i in range(3):
            rgba = overlay(i)
            data = pf.encode(rgba, fmt, dither=(fmt == "mono1"))
            report = sender.send_frame(data)
            assert report.chunks >= 1 and report.resent_chunks == 0
            kind, fid, png = core.history[-1]
            assert (kind, fid) == ("frame", report.frame_id)
            assert np.array_equal(read_png_rgb(png), pf.decode(data, fmt, W, H))
    assert core.stats.frames_shown == 3 and not core.decoder.rejected


def test_large_frame_wire_efficiency_end_to_end(tmp_path):
    core = ControllerCore(320, 240, "rgb565le", max_payload=4096)
    with linked(core) as (sender, _):
        data = pf.encode(overlay(5, 320, 240), "rgb565le")
        report = sender.send_frame(data)
        assert report.efficiency >= 0.95, report
        assert np.array_equal(core.front, data)


def test_partial_update_region_mono1():
    core = ControllerCore(W, H, "mono1", max_payload=64)
    with linked(core) as (sender, _):
        full = pf.encode(overlay(1), "mono1")
        sender.send_frame(full)
        patch_rgba = np.zeros((10, 32, 4), np.uint8)
        patch_rgba[..., :3] = 255
        patch_rgba[::2, :, 3] = 255  # every other row lit
        patch = pf.encode(patch_rgba, "mono1")
        report = sender.send_frame(patch, region=(16, 8, 32, 10))
        assert report.chunks == 1
        expected = full.copy()
        expected[8:18, 2:6] = patch
        assert np.array_equal(core.front, expected)
        with pytest.raises(L.LinkProtocolError, match="BAD_REGION"):
            sender.send_frame(patch, region=(12, 8, 32, 10))  # MONO1 needs x % 8 == 0
        with pytest.raises(L.LinkProtocolError, match="BAD_REGION"):
            sender.send_frame(patch, region=(W - 16, 8, 32, 10))  # off the display
        assert np.array_equal(core.front, expected)  # rejected updates change nothing
        # The link is still usable afterwards.
        sender.send_frame(full)
        assert np.array_equal(core.front, full)


def test_dropped_and_corrupted_bytes_at_given_points_are_recovered():
    faults = FaultPlan(drop_at={40, 5000, 9000, 17000}, corrupt_at={2500, 12000})
    core = ControllerCore(W, H, "rgb565le", max_payload=1024, faults=faults)
    with linked(core) as (sender, _):
        data = pf.encode(overlay(2), "rgb565le")
        report = sender.send_frame(data)
        assert np.array_equal(core.front, data)
        assert report.resent_chunks > 0 and report.naks > 0
        assert core.stats.bytes_dropped == 4 and core.stats.bytes_corrupted == 2
        assert core.decoder.rejected_total >= 1


def test_random_byte_errors_frames_still_arrive():
    faults = FaultPlan(drop_prob=5e-5, corrupt_prob=5e-5, seed=11)
    core = ControllerCore(W, H, "rgb565le", max_payload=2048, faults=faults)
    with linked(core, deadline=5.0) as (sender, _):
        for i in range(4):
            data = pf.encode(overlay(10 + i), "rgb565le")
            sender.send_frame(data)
            assert np.array_equal(core.front, data)
    assert core.stats.bytes_dropped + core.stats.bytes_corrupted > 0
    assert core.stats.frames_shown == 4


def test_lost_acks_are_covered_by_timeouts():
    core = ControllerCore(W, H, "gray8", max_payload=1024, faults=FaultPlan(drop_reply_prob=0.3, seed=4))
    with linked(core, ack_timeout=0.05) as (sender, _):
        data = pf.encode(overlay(3), "gray8")
        report = sender.send_frame(data)
        assert np.array_equal(core.front, data)
        assert core.stats.replies_dropped > 0 and report.elapsed_s < 3.0


def test_controller_reset_mid_frame_resends_whole_frame():
    core = ControllerCore(W, H, "rgb565le", max_payload=1024, faults=FaultPlan(reset_at_frame_msg={4}))
    with linked(core) as (sender, _):
        data = pf.encode(overlay(4), "rgb565le")
        report = sender.send_frame(data)
        assert core.stats.resets == 1 and report.resyncs == 1
        assert np.array_equal(core.front, data)
        assert [k for k, _, _ in core.history] == ["reset", "frame"]


def test_external_reset_between_frames_is_survived():
    core = ControllerCore(W, H, "rgb565le", max_payload=2048)
    with linked(core) as (sender, sim):
        sender.send_frame(pf.encode(overlay(6), "rgb565le"))
        sim.request_reset()
        deadline = time.monotonic() + 2
        while core.stats.resets == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not core.front.any()  # a rebooted controller shows nothing
        data = pf.encode(overlay(7), "rgb565le")
        report = sender.send_frame(data)
        assert np.array_equal(core.front, data) and report.resyncs >= 1
        assert sender.resets_seen >= 1


def test_hopeless_link_fails_within_deadline():
    core = ControllerCore(W, H, "rgb565le", max_payload=2048, faults=FaultPlan(drop_prob=0.05, seed=5))
    with linked(core, deadline=1.0, ack_timeout=0.05, hello_timeout=0.1) as (sender, _):
        t0 = time.monotonic()
        with pytest.raises(L.LinkTimeout) as exc:
            sender.send_frame(pf.encode(overlay(8), "rgb565le"))
        assert time.monotonic() - t0 < 1.5
        assert core.stats.frames_shown == 0
        assert "frame" in str(exc.value) or "HELLO" in str(exc.value)


def test_silent_controller_times_out():
    master, slave = os.openpty()  # nobody answers on the other side
    try:
        port = serial.Serial(os.ttyname(slave), 921600, timeout=0.01, write_timeout=0.5)
        sender = L.LinkSender(port, deadline=0.5, hello_timeout=0.1)
        t0 = time.monotonic()
        with pytest.raises(L.LinkTimeout, match="HELLO"):
            sender.hello()
        with pytest.raises(L.LinkTimeout, match="BLANK"):
            sender.blank(deadline=0.3)
        assert time.monotonic() - t0 < 1.5
        port.close()
    finally:
        os.close(master)
        os.close(slave)


def test_blank_brightness_ping(tmp_path):
    core = ControllerCore(W, H, "rgb565le", png_dir=tmp_path)
    with linked(core) as (sender, _):
        sender.send_frame(pf.encode(overlay(9), "rgb565le"))
        assert core.front.any()
        sender.blank()
        assert not core.front.any()
        kind, _, png = core.history[-1]
        assert kind == "blank" and not read_png_rgb(png).any()
        sender.set_brightness(0.5)
        assert core.brightness == 128
        assert 0 <= sender.ping(b"abc") < 1.0


def test_simulate_cli_serves_a_pty(tmp_path):
    code = "import sys; from armscope.cli.bridge import simulate_main; sys.exit(simulate_main(sys.argv[1:]))"
    args = ["--pty", "--width", "64", "--height", "32", "--format", "rgb565le", "--png-dir", str(tmp_path),
            "--duration", "30"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/"), path
        port = serial.Serial(path, 921600, timeout=0.01, write_timeout=2.0)
        sender = L.LinkSender(port, deadline=3.0)
        assert sender.hello().width == 64
        data = pf.encode(overlay(3, 64, 32), "rgb565le")
        sender.send_frame(data)
        port.close()
        pngs = sorted(tmp_path.glob("*_frame_*.png"))
        assert len(pngs) == 1
        assert np.array_equal(read_png_rgb(pngs[0]), pf.decode(data, "rgb565le", 64, 32))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "frames=1" in err


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _hello(core, watchdog_ms=None, seq=0):
    body = L.wire._HELLO.pack(7) if watchdog_ms is None else L.wire._HELLO_WATCHDOG.pack(7, watchdog_ms, 0)
    replies = L.FrameDecoder().feed(core.receive(L.frame_message(L.Message(L.MsgType.HELLO, seq, 0, body))))
    assert replies[0].type == L.MsgType.HELLO_REPLY
    return replies[0]


def _show(core, seq):
    data = pf.encode(overlay(4), "rgb565le")
    enc = L.encode_frame_chunks(data, seq0=seq, frame_id=seq + 1, region=(0, 0, W, H), fmt="rgb565le", max_payload=4096)
    core.receive(enc.wire.tobytes())
    assert core.front.any()
    return L.seq_add(seq, enc.n_chunks)


def test_controller_link_watchdog_blanks_after_silence_and_only_when_armed():
    """docs/link-protocol.md section 'Link watchdog': a HELLO with watchdog_ms
    arms it (reply flag WATCHDOG); any valid message feeds it; silence longer
    than the period blanks what is shown; a HELLO without it never blanks."""
    clock = _Clock()
    core = ControllerCore(W, H, "rgb565le", clock=clock)
    reply = _hello(core, 500)
    assert reply.flags & L.FLAG_WATCHDOG
    seq = _show(core, 0)
    clock.t += 0.4
    core.tick()
    assert core.front.any()
    core.receive(L.frame_message(L.Message(L.MsgType.PING, 9, 0, b"")))  # feeds it
    clock.t += 0.4
    core.tick()
    assert core.front.any() and core.stats.watchdog_blanks == 0
    core.receive(b"\x05garbage\x00")  # fails CRC: does not feed it
    clock.t += 0.2
    core.tick()
    assert not core.front.any() and core.stats.watchdog_blanks == 1 and core.history[-1][0] == "watchdog"
    clock.t += 5
    core.tick()
    assert core.stats.watchdog_blanks == 1  # counted once, nothing lit
    seq = _show(core, seq)  # the session survives: the next frame shows
    # an old-style HELLO (nonce only) disarms it
    reply = _hello(core, None, seq)
    assert not reply.flags & L.FLAG_WATCHDOG
    _show(core, seq)
    clock.t += 60
    core.tick()
    assert core.front.any() and core.stats.watchdog_blanks == 1


def test_sender_keepalive_holds_the_overlay_and_silence_blanks_it():
    core = ControllerCore(W, H, "rgb565le")
    with linked(core, watchdog_ms=300) as (sender, _):
        assert sender.hello().watchdog_ms == 300
        sender.send_frame(pf.encode(overlay(5), "rgb565le"))
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:  # 3 watchdog periods, fed only by keepalives
            sender.keepalive()
            time.sleep(0.02)
        assert core.front.any() and core.stats.watchdog_blanks == 0 and sender.keepalives >= 3
        silent_from = time.monotonic()
        assert wait_until(lambda: core.stats.watchdog_blanks == 1, 2.0)
        assert time.monotonic() - silent_from >= 0.25 and not core.front.any()


def wait_until(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_controller_bounds_the_whole_frame_body_by_max_payload():
    """docs/link-protocol.md: HELLO_REPLY's max_payload is the largest FRAME
    body (chunk header + data). A 64-byte body is taken, a 65-byte one NAKed
    TOO_LARGE (the simulator used to allow 18 bytes more than it advertised)."""
    core = ControllerCore(W, H, "gray8", max_payload=64)
    _hello(core, seq=0)
    for seq, size, want in ((0, 64, L.MsgType.ACK), (1, 65, L.MsgType.NAK)):
        data = bytes(size - L.FRAME_BODY_HEADER_SIZE)
        body = L.pack_frame_body(L.FrameChunkHeader(seq + 1, 0, 0, 0, len(data), 1, PixelFormat.GRAY8.wire_code), data)
        assert len(body) == size
        reply = L.FrameDecoder().feed(core.receive(L.frame_message(L.Message(L.MsgType.FRAME, seq, L.FLAG_LAST, body))))[0]
        assert reply.type == want, size
        if want == L.MsgType.NAK:
            assert L.parse_ack(reply.body).reason == L.NakReason.TOO_LARGE
    with pytest.raises(ValueError, match="max_payload must be within 19..65535"):
        ControllerCore(W, H, "gray8", max_payload=18)
