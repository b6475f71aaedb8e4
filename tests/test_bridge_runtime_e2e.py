"""Bridge runtime end to end: a publisher speaking docs/protocol.md on a real
PUB socket -> Bridge (real Subscriber, validation, warp, conversion) ->
serial:// over pyserial to the simulated controller on a pty -> its PNGs,
compared with the overlay warped and converted independently; also png://,
CurveZMQ, and the CLI process (SIGTERM blanks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("serial")

from armscope.core import protocol  # noqa: E402
from armscope.core.overlay import focus_levels, heat_rgba, premultiplied_jet  # noqa: E402
from bridge_runtime_support import (  # noqa: E402
    BOX, CAMERA, DISPLAY, H_TRUE, REPO, FakeDaemon, assert_close_image, cam_of, close_image, expected_display, publish_until,
    read_rgb, registration, running_bridge, wait_for,
)
from armscope.firmware_bridge.bridge import Bridge  # noqa: E402
from armscope.firmware_bridge.displays import PngDisplay, open_display  # noqa: E402
from armscope.firmware_bridge.registration import save_registration  # noqa: E402
from armscope.firmware_bridge.render import render_cam_for_display  # noqa: E402
from armscope.firmware_bridge.simulator import ControllerCore, PtyController  # noqa: E402

pytestmark = pytest.mark.e2e   # the bridge runtime between real sockets, displays and processes


@pytest.fixture
def sim(tmp_path):
    core = ControllerCore(DISPLAY[0], DISPLAY[1], "rgb565le", png_dir=tmp_path / "sim")
    pty = PtyController(core)
    path = pty.start()
    try:
        yield core, path
    finally:
        pty.stop()


def last_frame(core: ControllerCore):
    kind, _fid, png = core.history[-1]
    return kind, png


def test_serial_end_to_end_shows_the_registered_converted_overlay(sim, tmp_path):
    core, pty_path = sim
    reg_file = tmp_path / "reg.json"
    save_registration(registration(), reg_file)
    from armscope.firmware_bridge.registration import load_registration

    display = open_display(f"serial://{pty_path}?baud=921600&deadline=1.0&brightness=0.8&gamma=1.2")
    daemon = FakeDaemon(stale_after_ms=1500)
    bridge = Bridge(display, connect=daemon.endpoint, registration=load_registration(reg_file), stats_interval=0)
    first, second = cam_of(0), cam_of(40)
    want_first = expected_display(first, "rgb565le", brightness=0.8, gamma=1.2)
    want_second = expected_display(second, "rgb565le", brightness=0.8, gamma=1.2)
    assert np.abs(want_first.astype(int) - want_second).mean() > 0.5  # the two overlays really differ
    try:
        with running_bridge(bridge):
            # start-up blank reaches the controller before anything else
            assert core.history[0][0] == "blank"
            assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, first)
            kind, png = last_frame(core)
            assert kind == "frame"
            assert_close_image(read_rgb(png), want_first)
            assert_close_image(core.shown_rgb(), want_first)
            # a newer overlay replaces it
            assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 2 and
                                 close_image(core.shown_rgb(), want_second), second, timeout=5)
            s = bridge.stats()
            assert s["displayed"] == "overlay" and s["rejected_total"] == 0
            assert s["daemon"]["state"] == "running" and s["clock_mode"] == "mono"
            assert s["link"]["frames"] == s["shown"] >= 2
    finally:
        daemon.close()
    # exit blanks the eyepiece
    assert core.history[-1][0] == "blank"
    assert not core.shown_rgb().any()
    s = bridge.stats()
    assert s["blanks"]["startup"] == 1 and s["blanks"]["exit"] == 1


def test_png_display_end_to_end_with_png_payloads(tmp_path):
    """png:// output with GRAY8 conversion; overlays sent PNG-encoded."""
    display = PngDisplay(tmp_path / "out", width=DISPLAY[0], height=DISPLAY[1], fmt="gray8")
    daemon = FakeDaemon(stale_after_ms=1500)
    bridge = Bridge(display, connect=daemon.endpoint, registration=registration(), stats_interval=0)
    rgba = cam_of(10)
    try:
        with running_bridge(bridge):
            assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, rgba)
            frames = [p for p in display.paths if p.name.endswith("_frame.png")]
            assert frames
            assert_close_image(read_rgb(frames[-1]), expected_display(rgba, "gray8"))
    finally:
        daemon.close()
    assert display.paths[0].name.endswith("_blank.png") and display.paths[-1].name.endswith("_blank.png")
    assert not read_rgb(display.paths[-1]).any()


def area_sampled_heat(cam: np.ndarray, matrix: np.ndarray, box=BOX, max_alpha: float = 0.6, ss: int = 8) -> np.ndarray:
    """What the display should emit for ``cam`` without an outline, from first
    principles in float64, sharing no code with the bridge's geometry: pixel
    centres at integer coordinates on the camera and the display (the
    convention the registration is fitted in and ``warpPerspective`` applies),
    CAM cell (i, j) centred on the middle of the camera pixels it covers
    (x + (i + 0.5) * size / w - 0.5), the CAM bilinear between cell centres
    and held beyond them, the crop's pixel edges (x - 0.5 .. x + size - 0.5)
    as its boundary, and each display pixel the mean of ss x ss samples over
    its area."""
    x, y, s = box
    n = cam.shape[0]
    values = cam.astype(np.float64) / float(cam.max())
    jet = premultiplied_jet(max_alpha).reshape(256, 3).astype(np.float64)
    inverse = np.linalg.inv(matrix)
    yy, xx = np.mgrid[: DISPLAY[1], : DISPLAY[0]].astype(np.float64)
    offsets = (np.arange(ss) + 0.5) / ss - 0.5
    total = np.zeros((DISPLAY[1], DISPLAY[0], 3))
    for dy in offsets:
        for dx in offsets:
            p = np.stack([xx + dx, yy + dy, np.ones_like(xx)], -1) @ inverse.T
            cx, cy = p[..., 0] / p[..., 2], p[..., 1] / p[..., 2]
            inside = (cx >= x - 0.5) & (cx < x + s - 0.5) & (cy >= y - 0.5) & (cy < y + s - 0.5)
            u = np.clip((cx - x + 0.5) * n / s - 0.5, 0, n - 1)
            v = np.clip((cy - y + 0.5) * n / s - 0.5, 0, n - 1)
            u0, v0 = np.minimum(u.astype(int), n - 2), np.minimum(v.astype(int), n - 2)
            a, b = u - u0, v - v0
            heat = (values[v0, u0] * (1 - a) * (1 - b) + values[v0, u0 + 1] * a * (1 - b)
                    + values[v0 + 1, u0] * (1 - a) * b + values[v0 + 1, u0 + 1] * a * b)
            total += jet[np.clip(np.floor(heat * 255), 0, 255).astype(int)] * inside[..., None]
    return total / (ss * ss)


def centroid(image: np.ndarray) -> np.ndarray:
    g = image.astype(float).sum(2)
    yy, xx = np.mgrid[: g.shape[0], : g.shape[1]]
    return np.array([(g * xx).sum(), (g * yy).sum()]) / g.sum()


def test_scaled_overlay_lands_on_its_crop(tmp_path):
    """A 16x16 CAM scaled onto its 256 px crop through the registration lands
    where the crop's tissue is: by pixels against the v1 path (the daemon's
    bitmap at the crop's size, then ``registration.warp``), and by centroid
    against the picture sampled over each display pixel's area (float64).

    Why the centroid is not compared with the v1 path: that warp samples the
    bitmap at display pixel centres, and its crop edge is a one-camera-pixel
    ramp (0.25 display px here), so a display pixel whose centre lies just
    outside the crop gets nothing however much of it the crop covers. Where
    the heat is hot at the crop's edge, that aliasing alone moves its centroid
    by up to 0.16 display px (0.162 px in y for this CAM; 0.01-0.03 px in the
    crop's interior), more than the half-camera-pixel error (0.125 display px)
    this test is there to catch. The area-sampled picture has no such error;
    the bridge antialiases the crop's edge by area and lands within ~0.03 px
    of it at every sub-pixel phase of the registration."""
    reg = registration()
    display = PngDisplay(tmp_path, width=DISPLAY[0], height=DISPLAY[1])
    bridge = Bridge(display, registration=reg, stats_interval=0)
    daemon = FakeDaemon(stale_after_ms=1500)
    try:
        bridge.start()
        # the CAM's 16x16 cells over the 256 px crop, no outline (threshold at the peak): the heat alone
        cam = cam_of(5)
        assert bridge.feed(daemon.overlay_frames(cam, outline=False))
        assert bridge.feed(daemon.status_frames("running"))
        assert bridge.stats()["shown"] == 1
        got = read_rgb(display.paths[-1])
        want = expected_display(heat_rgba(cam, BOX[2], outline=False), "rgb888")
        diff = np.abs(got.astype(int) - want)
        assert want.max() > 100 and diff.mean() < 0.2 and np.percentile(diff, 99.5) <= 3, diff.mean()
        # a half-camera-pixel convention error moves it by 0.09-0.13 display px (0.125 in the interior)
        truth = area_sampled_heat(cam, reg.matrix)
        assert np.abs(centroid(got) - centroid(truth)).max() < 0.06, (centroid(got), centroid(truth))
    finally:
        bridge.close()
        daemon.close()


@pytest.mark.parametrize("phase", [0.125, 0.25, 0.375])
def test_overlay_lands_on_its_crop_at_any_subpixel_phase(phase):
    """The same at registrations moved by a fraction of a display pixel (the
    phases at which a crop edge's antialiasing matters most), on the renderer
    the bridge runs for every overlay."""
    cam = cam_of(5)
    matrix = np.array([[1.0, 0.0, phase], [0.0, 1.0, phase], [0.0, 0.0, 1.0]]) @ H_TRUE
    x, y, s = BOX
    region = {"frame_width": CAMERA[0], "frame_height": CAMERA[1], "x": x, "y": y, "size": s}
    peak, _ = focus_levels(cam)
    image, (fx, fy, fw, fh) = render_cam_for_display(cam, (peak, peak), (x, y, s), region, matrix, DISPLAY,
                                                     outline=False)
    got = np.zeros((DISPLAY[1], DISPLAY[0], 3), np.uint8)
    got[fy:fy + fh, fx:fx + fw] = image
    truth = area_sampled_heat(cam, matrix)
    assert np.abs(centroid(got) - centroid(truth)).max() < 0.06, (centroid(got), centroid(truth))


def test_without_registration_the_camera_frame_is_fitted_to_the_display(tmp_path):
    display = PngDisplay(tmp_path, width=320, height=320)
    bridge = Bridge(display, stats_interval=0)
    daemon = FakeDaemon(stale_after_ms=1500)
    try:
        bridge.start()
        flat = np.ones((4, 4), np.float32)   # all hot, no outline (nothing above the median)
        bridge.feed(daemon.status_frames("running"))
        # crop at the frame's top-left corner: 640x480 fitted into 320x320 is scale 0.5, 40 px letterbox
        assert bridge.feed(daemon.overlay_frames(flat, box=(0, 0, 128)))
        lit = np.argwhere(read_rgb(display.paths[-1]).max(2) > 40)   # JET's hottest at alpha 0.6: ~77
        (y0, x0), (y1, x1) = lit.min(0), lit.max(0)
        assert (x0, y0) == (0, 40) and (x1, y1) == (63, 103)
    finally:
        bridge.close()
        daemon.close()


def test_curve_encrypted_subscription(tmp_path):
    keys = tmp_path / "keys"
    protocol.write_keypair(keys, "server")
    protocol.write_keypair(keys, "client")
    daemon = FakeDaemon(stale_after_ms=1500, curve_secret=str(keys / "server.key_secret"))
    curve = {"server_public": str(keys / "server.key"), "client_secret": str(keys / "client.key_secret")}
    display = PngDisplay(tmp_path / "out", width=DISPLAY[0], height=DISPLAY[1])
    bridge = Bridge(display, connect=daemon.endpoint, registration=registration(), curve=curve, stats_interval=0)
    try:
        with running_bridge(bridge):
            assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, cam_of(0))
    finally:
        daemon.close()


def test_cli_process_shows_overlays_and_blanks_on_sigterm(tmp_path):
    """``armscope bridge --connect ... --display png://...`` as a real process."""
    save_registration(registration(), tmp_path / "reg.json")
    out = tmp_path / "out"
    daemon = FakeDaemon(stale_after_ms=1500)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "armscope.cli", "bridge", "--connect", daemon.endpoint,
           "--display", f"png://{out}?width={DISPLAY[0]}&height={DISPLAY[1]}&format=rgb565le",
           "--registration", str(tmp_path / "reg.json"), "--brightness", "0.9", "--gamma", "1.1",
           "--stats-interval", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rgba = cam_of(20)
    try:
        def shown():
            return any(p.name.endswith("_frame.png") for p in out.glob("*.png")) if out.exists() else False

        assert publish_until(daemon, shown, rgba, timeout=20), proc.poll()
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        daemon.close()
    assert proc.returncode == 0, err
    pngs = sorted(out.glob("*.png"))
    assert pngs[0].name.endswith("_blank.png") and pngs[-1].name.endswith("_blank.png")
    frames = [p for p in pngs if p.name.endswith("_frame.png")]
    got, want = read_rgb(frames[-1]), expected_display(rgba, "rgb565le", brightness=0.9, gamma=1.1)
    bottom = np.nonzero(want.any(axis=(1, 2)))[0].max()
    assert_close_image(got[: bottom + 1], want[: bottom + 1])
    # below the overlay: the decision, which the CLI writes by default (--no-label turns it off)
    assert not want[bottom + 1 :].any() and got[bottom + 1 :].any(axis=2).sum() > 20
    stats = json.loads(err.split("bridge stopped: ", 1)[1].splitlines()[0])
    assert stats["blanks"]["exit"] == 1 and stats["blanks"]["startup"] == 1 and stats["shown"] >= 1


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    from armscope.cli import main

    assert main(["bridge", "--connect", "tcp://127.0.0.1:1", "--display", "nope://x"]) == 2
    assert "unknown scheme" in capsys.readouterr().err
    assert main(["bridge", "run", "--connect", "tcp://127.0.0.1:1", "--display", f"png://{tmp_path}",
                 "--curve-keys", "x"]) == 2
    assert main(["bridge", "--connect", "tcp://127.0.0.1:1", "--display", f"png://{tmp_path}?brightness=0.5",
                 "--brightness", "0.7"]) == 2
    assert "contradicts" in capsys.readouterr().err
    # the old subcommands still dispatch
    assert main(["bridge", "simulate", "--pty", "--width", "10", "--height", "10", "--format", "rgb444"]) == 2
    assert "rgb444" in capsys.readouterr().err


def test_killed_bridge_process_leaves_the_eyepiece_dark(tmp_path):
    """SIGKILL gives the bridge no chance to blank on exit: the display
    controller's link watchdog must. A real ``armscope bridge`` process drives
    the simulated controller over a pty; while it lives, daemon heartbeats and
    a still-fresh overlay must keep the picture up (keepalives, no new
    frames) for several watchdog periods; after kill -9 it goes dark."""
    save_registration(registration(), tmp_path / "reg.json")
    core = ControllerCore(DISPLAY[0], DISPLAY[1], "rgb565le")
    daemon = FakeDaemon(stale_after_ms=4000)
    with PtyController(core) as sim:
        cmd = [sys.executable, "-m", "armscope.cli", "bridge", "--connect", daemon.endpoint,
               "--display", f"serial://{sim.slave_path}?baud=921600&watchdog=400",
               "--registration", str(tmp_path / "reg.json"), "--stats-interval", "0"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert publish_until(daemon, lambda: core.stats.frames_shown >= 1, cam_of(5), timeout=30), proc.poll()
            shown = core.stats.frames_shown
            end = time.monotonic() + 1.3
            while time.monotonic() < end:
                daemon.status("running")
                time.sleep(0.1)
            assert core.stats.frames_shown == shown and core.stats.watchdog_blanks == 0
            assert core.shown_rgb().any() and proc.poll() is None
            proc.kill()
            killed = time.monotonic()
            assert wait_for(lambda: core.stats.watchdog_blanks == 1, 3.0)
            assert time.monotonic() - killed >= 0.3 and not core.shown_rgb().any()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
            daemon.close()


@pytest.mark.parametrize("fmt,dither", [("gray8", False), ("mono1", True)])
def test_grey_controller_end_to_end(tmp_path, fmt, dither):
    """Grey microdisplays (8-bit, dithered 1-bit) through the bridge, which
    warps the overlay's luma straight into the byte-aligned region: the
    controller shows what the two-step reference computes, up to the grey
    level of rounding that warping luma instead of RGB may move (for 1-bit,
    a pixel whose luma sits on its dither threshold may flip)."""
    core = ControllerCore(DISPLAY[0], DISPLAY[1], fmt)
    daemon = FakeDaemon(stale_after_ms=1500)
    rgba = cam_of(10)
    want = expected_display(rgba, fmt, dither=dither)
    with PtyController(core) as sim:
        display = open_display(f"serial://{sim.slave_path}?baud=921600&deadline=1.0&dither={int(dither)}")
        assert display.luma_input
        bridge = Bridge(display, connect=daemon.endpoint, registration=registration(), stats_interval=0)
        try:
            with running_bridge(bridge):
                assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, rgba)
                got = core.shown_rgb()
        finally:
            daemon.close()
    if fmt == "gray8":
        assert_close_image(got, want)
    else:
        lit_got, lit_want = got[..., 0] > 0, want[..., 0] > 0
        assert lit_want.sum() > 200
        # 1-bit: the outline (drawn in display pixels by the bridge, warped from the bitmap in the
        # expected path) flips the most pixels; the heat's dither pattern agrees elsewhere
        assert (lit_got != lit_want).mean() < 0.03
        # the bridge's outline is at least 1 display px, all lit; the warped bitmap's is 2 px at the crop's
        # size, 0.5 px here, half lit: more pixels pass the 1-bit threshold on the bridge's side
        assert abs(int(lit_got.sum()) - int(lit_want.sum())) < 0.6 * lit_want.sum()
