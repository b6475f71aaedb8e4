"""What every display output shares: the ``Display`` interface, partial-update
bookkeeping, and the picture of what a display in a pixel format emits.

Why this module exists
----------------------
The bridge drives every output the same way (``show`` / ``blank`` /
``keepalive`` / ``close``) and must never leave a stale overlay lit, so the
"where may the display still be showing something" bookkeeping (``_lit``,
``_update``) and the input checks live once, here, not in each scheme's
module. The helpers (``paste_on_black``, ``union``, ``align_to_bytes``) are
the region arithmetic the bridge and the label drawing use too.
"""

from __future__ import annotations

import abc

import numpy as np

from .. import pixel_formats as pf
from ..pixel_formats import PixelFormat

MAX_DISPLAY_SIDE = 8192  # px; beyond any microdisplay, and a typo there (99999x99999) would ask for 28 GiB


class DisplayURIError(ValueError):
    """A display URI is malformed; the message names the URI and what was expected."""


Region = tuple[int, int, int, int]  # x, y, w, h in display pixels


def paste_on_black(image: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """A black (height, width) canvas with ``image`` at (x, y): what an additive display shows."""
    canvas = np.zeros((height, width) + image.shape[2:], np.uint8)
    canvas[y : y + image.shape[0], x : x + image.shape[1]] = image
    return canvas


def align_to_bytes(region: Region, display_width: int) -> Region:
    """Grow a region of a 1-bit display to whole bytes of its rows, and to a
    multiple of 8 rows, so the 8x8 dither pattern stays anchored to the display."""
    x, y, w, h = region
    x0, y0 = x - x % 8, y - y % 8
    x1 = min(display_width, -(-(x + w) // 8) * 8)
    return (x0, y0, x1 - x0, y + h - y0)


def union(a: Region, b: Region) -> Region:
    """Smallest region holding both."""
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return (x0, y0, x1 - x0, y1 - y0)


def emitted_rgb(image: np.ndarray, fmt: PixelFormat | None, brightness: float, gamma: float,
                dither: bool) -> np.ndarray:
    """(H, W, 3) RGB a display in ``fmt`` emits for ``image`` (RGBA, composited
    RGB, or grey for grey formats): through the pixel format and back, so
    quantisation and 1-bit thresholds show; ``fmt`` None: full 8-bit RGB."""
    if fmt is None:
        return pf.composite_over_black(image, brightness=brightness, gamma=gamma)
    h, w = image.shape[:2]
    return pf.decode(pf.encode(image, fmt, brightness=brightness, gamma=gamma, dither=dither), fmt, w, h)


class Display(abc.ABC):
    """What the daemon drives.  ``size`` is (width, height) or None if not fixed yet."""

    size: tuple[int, int] | None = None
    # Where the display may be showing something other than black: None =
    # all black, the whole display when unknown (start-up, a failed write).
    _lit: Region | None = None
    # True when show() also takes a (H, W) grey image, already composited
    # (grey pixel formats): the bridge then warps one channel, not four.
    luma_input: bool = False
    # Set by an output its user can close (a preview window): the bridge stops.
    quit_requested: bool = False

    @abc.abstractmethod
    def show(self, image: np.ndarray, *, region: Region | None = None, deadline: float | None = None):
        """Show ``image`` (the whole display, or only ``region`` with black
        around it).  ``deadline`` (seconds) bounds how long delivery may
        take; only outputs that can block (``serial://``) use it.  The bridge
        passes the time left before what is on screen goes stale, so the
        eyepiece never keeps a stale overlay while a new one is in transit."""

    @abc.abstractmethod
    def blank(self) -> None: ...

    def keepalive(self) -> None:
        """Called every loop by the bridge: outputs with a watchdog on the far
        side (``serial://``) feed it here; the others need nothing."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, image: np.ndarray, region: Region | None = None) -> np.ndarray:
        grey = self.luma_input and isinstance(image, np.ndarray) and image.ndim == 2
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
                grey or (image.ndim == 3 and image.shape[2] in (3, 4))):
            also = ", or (H, W) grey" if self.luma_input else ""
            raise ValueError(
                f"show() expects a uint8 (H, W, 4) RGBA or (H, W, 3) RGB image{also}, got "
                f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
            )
        if region is not None:
            if self.size is None:
                raise ValueError("show(region=...) needs a display of fixed size; give width and height")
            x, y, w, h = region
            if x < 0 or y < 0 or w < 1 or h < 1 or x + w > self.size[0] or y + h > self.size[1]:
                raise ValueError(f"region {tuple(region)} is not inside the {self.size[0]}x{self.size[1]} display")
            if (image.shape[1], image.shape[0]) != (w, h):
                raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but its region is {w}x{h}")
        elif self.size is not None and (image.shape[1], image.shape[0]) != self.size:
            raise ValueError(
                f"image is {image.shape[1]}x{image.shape[0]} but the display is {self.size[0]}x{self.size[1]}; "
                "warp it to display coordinates first"
            )
        return image

    def align(self, region: Region) -> Region:
        """Grow a region to what the output can address (MONO1: whole bytes)."""
        return region

    def _update(self, image: np.ndarray, region: Region | None) -> tuple[np.ndarray, Region]:
        """What to write so the display shows ``image`` at ``region`` and black
        elsewhere: the union of ``region`` and the part that may still be lit,
        with ``image`` pasted into black. Call ``_written`` once it is shown."""
        full = (0, 0, self.size[0], self.size[1])
        region = full if region is None else tuple(int(v) for v in region)
        send = self.align(region if self._lit is None else union(region, self._lit))
        if send == region:
            return image, send
        return paste_on_black(image, region[0] - send[0], region[1] - send[1], send[2], send[3]), send

    def _written(self, region: Region | None) -> None:
        self._lit = (0, 0, self.size[0], self.size[1]) if region is None else tuple(int(v) for v in region)


class _PictureDisplay(Display):
    """Outputs that show a picture of what a display in ``fmt`` would emit
    (png://, window://): size optional, format round trip, brightness/gamma."""

    def _set_picture(self, width, height, fmt, brightness, gamma, dither) -> None:
        if (width is None) != (height is None):
            raise ValueError("give both width and height, or neither")
        if width is not None and not (1 <= width <= MAX_DISPLAY_SIDE and 1 <= height <= MAX_DISPLAY_SIDE):
            raise ValueError(f"width and height must be within 1..{MAX_DISPLAY_SIDE}, got {width}x{height}")
        self.size = (int(width), int(height)) if width is not None else None
        self.fmt = PixelFormat.parse(fmt) if fmt is not None else None
        self.luma_input = self.fmt is not None and self.fmt.grey
        self.brightness, self.gamma, self.dither = brightness, gamma, dither
        pf.make_lut(brightness, gamma)  # validate now

    def _picture(self, image: np.ndarray, region: Region | None) -> np.ndarray:
        """The whole display's emitted RGB for ``show(image, region=region)``."""
        image = self._check(image, region)
        if region is not None:
            image = paste_on_black(image, region[0], region[1], *self.size)
        return emitted_rgb(image, self.fmt, self.brightness, self.gamma, self.dither)
