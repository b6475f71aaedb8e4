"""window:// (desktop preview): what it draws, how it refuses to open where
nobody can see it, and closing it stopping the bridge.

Runs on SDL's real ``dummy`` video driver (pygame draws into the window
surface as on a desktop; nothing is put on a screen), named explicitly in
SDL_VIDEODRIVER, the only way window:// accepts a headless driver.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("pygame")
pytest.importorskip("serial")

from bridge_runtime_support import (  # noqa: E402
    DISPLAY, FakeDaemon, assert_close_image, cam_of, expected_display, registration,
)
from armscope.firmware_bridge import pixel_formats as pf  # noqa: E402
from armscope.firmware_bridge.bridge import Bridge  # noqa: E402
from armscope.firmware_bridge.displays import DisplayURIError, WindowDisplay, open_display  # noqa: E402


@pytest.fixture
def headless_sdl(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")


def rgba(seed, w=40, h=30):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img[:, :5, 3] = 0
    return img


def test_window_shows_what_the_display_emits(headless_sdl):
    d = open_display("window://bench%20preview?width=40&height=30&format=rgb565le&scale=2&gamma=1.2")
    try:
        assert isinstance(d, WindowDisplay) and d.size == (40, 30) and d.title == "bench preview"
        assert d.window_pixels().shape == (60, 80, 3) and not d.window_pixels().any()  # opens black
        img = rgba(1)
        d.show(img)
        want = pf.decode(pf.encode(img, "rgb565le", gamma=1.2), "rgb565le", 40, 30)
        got = d.window_pixels()
        assert np.array_equal(got[::2, ::2], want) and np.array_equal(got[1::2, 1::2], want)
        part = rgba(2, 10, 8)
        d.show(part, region=(20, 12, 10, 8))  # partial update: black around it
        canvas = np.zeros((30, 40, 4), np.uint8)
        canvas[12:20, 20:30] = part
        assert np.array_equal(d.window_pixels()[::2, ::2], pf.decode(pf.encode(canvas, "rgb565le", gamma=1.2),
                                                                      "rgb565le", 40, 30))
        d.blank()
        assert not d.window_pixels().any()
        with pytest.raises(ValueError, match="not inside the 40x30 display"):
            d.show(part, region=(35, 12, 10, 8))
    finally:
        d.close()


def test_window_refuses_where_nobody_can_see_it(monkeypatch):
    # No desktop: SDL would fall back to its invisible offscreen driver by itself.
    for var in ("SDL_VIDEODRIVER", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DisplayURIError, match="no desktop"):
        open_display("window://")
    monkeypatch.setenv("SDL_VIDEODRIVER", "no-such-driver")
    with pytest.raises(DisplayURIError, match="no desktop to open a window on"):
        open_display("window://")
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if the [preview] extra were not installed
    with pytest.raises(DisplayURIError, match=r"pip install 'armscope\[preview\]'"):
        open_display("window://")


def test_window_uri_options_are_checked(headless_sdl):
    with pytest.raises(DisplayURIError, match="unknown option 'baud'"):
        open_display("window://?baud=9600")
    with pytest.raises(ValueError, match="scale must be within"):
        open_display("window://?scale=0")
    with pytest.raises(ValueError, match="both width and height"):
        open_display("window://?width=40")


def test_bridge_draws_into_the_window_and_stops_when_it_is_closed(headless_sdl):
    import pygame

    display = open_display(f"window://?width={DISPLAY[0]}&height={DISPLAY[1]}&format=rgb888")
    bridge = Bridge(display, registration=registration(), stats_interval=0)
    daemon = FakeDaemon(stale_after_ms=1500)
    try:
        bridge.start()
        overlay = cam_of(10)
        assert bridge.feed(daemon.overlay_frames(overlay))
        assert bridge.feed(daemon.status_frames("running"))
        assert bridge.stats()["shown"] == 1
        assert_close_image(display.window_pixels(), expected_display(overlay, "rgb888"))
        bridge.tick()
        assert not bridge.stopping
        pygame.event.post(pygame.event.Event(pygame.QUIT))  # the user closes the window
        bridge.tick()
        assert bridge.stopping and display.quit_requested
    finally:
        daemon.close()
        bridge.close()
    s = bridge.stats()
    assert s["blanks"]["exit"] == 1 and s.get("display_errors", 0) == 0 and s.get("keepalive_failures", 0) == 0
