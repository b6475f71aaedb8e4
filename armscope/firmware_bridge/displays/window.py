"""``window://``: a desktop preview window of what the eyepiece would emit.

Why this module exists
----------------------
An integrator at a bench without the eyepiece optics wants to see the
registered, converted overlay live; ``png://`` shows it only after the fact.
The window needs pygame (SDL 2, the ``[preview]`` extra: the base OpenCV is
the headless build), imported only when a window is opened.
"""

from __future__ import annotations

import os

import numpy as np

from ..pixel_formats import PixelFormat
from .base import DisplayURIError, Region, _PictureDisplay


class WindowDisplay(_PictureDisplay):
    """A desktop window showing what the eyepiece display would emit.

    For bench work: the integrator sees the registered, converted overlay
    (through ``format`` and back, like ``png://``) without the optics. Drawn
    with pygame (SDL 2; the base install's OpenCV is the headless build,
    which has no windows). SDL events are handled in ``keepalive()``, which
    the bridge calls every loop; closing the window sets ``quit_requested``
    and the bridge then stops (blanking on its way out, as always).

    Without a desktop, SDL would quietly pick its invisible ``offscreen``
    driver; that is refused (a preview nobody can see is a silent failure)
    unless ``SDL_VIDEODRIVER`` names it explicitly, as headless tests do.
    """

    _HEADLESS_DRIVERS = ("offscreen", "dummy")

    def __init__(
        self,
        title: str = "armscope eyepiece preview",
        *,
        width: int | None = None,
        height: int | None = None,
        fmt: "PixelFormat | str | None" = None,
        brightness: float = 1.0,
        gamma: float = 1.0,
        dither: bool = False,
        scale: float = 1.0,
    ):
        self._set_picture(width, height, fmt, brightness, gamma, dither)
        if not 0.1 <= float(scale) <= 8.0:
            raise ValueError(f"scale must be within [0.1, 8], got {scale}")
        self.scale = float(scale)
        self.title = title
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        try:
            import pygame  # optional: armscope[preview]
        except ImportError:
            raise DisplayURIError("window:// needs pygame: pip install 'armscope[preview]' "
                                  "(or use png://DIR to see what the display would show)") from None
        self._pg = pygame
        try:
            pygame.display.init()
        except pygame.error as exc:
            raise DisplayURIError(f"window://: no desktop to open a window on (SDL: {exc}); "
                                  "use png://DIR for headless checks") from None
        driver = pygame.display.get_driver()
        if driver in self._HEADLESS_DRIVERS and os.environ.get("SDL_VIDEODRIVER") != driver:
            pygame.display.quit()
            raise DisplayURIError(f"window://: no desktop session (no X11/Wayland display; SDL fell back to "
                                  f"{driver!r}); use png://DIR, or run where a desktop is")
        self._screen = None
        self._shown = None   # the picture in the window, display pixels (H, W, 3)
        if self.size is not None:
            self._show_rgb(np.zeros((self.size[1], self.size[0], 3), np.uint8))

    def _show_rgb(self, rgb: np.ndarray) -> None:
        pg = self._pg
        h, w = rgb.shape[:2]
        win = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
        if self._screen is None or self._screen.get_size() != win:
            self._screen = pg.display.set_mode(win)
            pg.display.set_caption(self.title)
        rgb = np.ascontiguousarray(rgb)
        surface = pg.image.frombuffer(rgb, (w, h), "RGB")
        if win != (w, h):
            surface = pg.transform.scale(surface, win)
        self._screen.blit(surface, (0, 0))
        pg.display.flip()
        self._shown = rgb
        self.keepalive()

    def window_pixels(self) -> np.ndarray:
        """(H, W, 3) RGB read back from the window's surface (tests, screenshots)."""
        return self._pg.surfarray.array3d(self._pg.display.get_surface()).transpose(1, 0, 2).copy()

    def show(self, image: np.ndarray, *, region: Region | None = None, deadline: float | None = None) -> None:
        self._show_rgb(self._picture(image, region))

    def blank(self) -> None:
        if self._shown is not None:
            self._show_rgb(np.zeros_like(self._shown))

    def keepalive(self) -> None:
        for event in self._pg.event.get():
            if event.type == self._pg.QUIT:
                self.quit_requested = True

    def close(self) -> None:
        if self._pg is not None:
            self._pg.display.quit()
            self._pg = None
            self._screen = None
