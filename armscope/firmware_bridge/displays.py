"""Display outputs behind one small interface, opened by URI.

Why this module exists
----------------------
The daemon should not care whether its overlays go to a serial-attached
eyepiece controller, a Linux framebuffer (SPI/HDMI microdisplays with a
kernel driver), or a directory of PNGs on a developer's laptop.  Each output
implements ``show(image)`` / ``blank()`` / ``close()`` and is chosen by one
configuration string:

* ``png://DIR[?width=W&height=H&format=F&brightness=B&gamma=G&dither=1]``
  writes what the display would show as numbered PNGs (``blank`` writes a
  black frame).  With ``format`` the image goes through that pixel format
  and back, so quantisation/thresholding is visible.
* ``serial:///dev/ttyUSB0?baud=921600[&width=W&height=H][&format=rgb565le]
  [&brightness=B&gamma=G&dither=1&deadline=S&ack_timeout=S&window=N&max_payload=N
  &watchdog=MS]`` drives a display controller over ``link.LinkSender``.  Size
  and format default to what the controller reports in its HELLO reply; if
  given they must match it.  ``watchdog`` (default 1000 ms, 0 = off) asks the
  controller to blank by itself when the link has been silent that long, so
  the eyepiece goes dark if this process dies; ``keepalive()`` feeds it.
* ``fb:///dev/fb1[?brightness=B&gamma=G&dither=1]`` writes a Linux framebuffer via
  mmap; depth and stride come from ``<sysfs_root>/fb1/{virtual_size,bits_per_pixel,stride}``
  (``sysfs_root`` is injectable for tests), the visible window and channel
  order from the kernel (``framebuffer.py``).
* ``window://[TITLE][?width=W&height=H&format=F&brightness=B&gamma=G&dither=1&scale=S]``
  a desktop preview window (pygame/SDL 2, ``pip install 'armscope[preview]'``)
  showing what ``png://`` would write, live; for an integrator at a bench
  without the eyepiece optics. Closing the window asks the bridge to stop.

``show`` takes the overlay already in display coordinates (see
``registration.warp``): straight-alpha RGBA ``(H, W, 4)``, or RGB
``(H, W, 3)`` already composited over black; with ``region=(x, y, w, h)``
the image covers only that part of the display and the rest is black.
Displays with a fixed size then write only the region plus whatever they
showed last outside it (cleared to black): a partial update, which is what
keeps a serial link's frames small (``Display._update``).
``SerialDisplay.show`` raises ``link.LinkError`` when delivery fails; the
caller should then ``blank()``.
"""

from __future__ import annotations

import abc
import logging
import math
import mmap
import os
import re
import urllib.parse
from pathlib import Path

import cv2
import numpy as np

from . import framebuffer as fbinfo
from . import pixel_formats as pf
from .link import MAX_PAYLOAD_RANGE, LinkProtocolError, LinkSender
from .pixel_formats import PixelFormat

__all__ = [
    "Display",
    "DisplayURIError",
    "PngDisplay",
    "SerialDisplay",
    "FramebufferDisplay",
    "WindowDisplay",
    "open_display",
]

DEFAULT_SYSFS_ROOT = "/sys/class/graphics"
log = logging.getLogger(__name__)


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


_PNG_NAME = re.compile(r"(\d{6,})_(?:frame|blank)\.png")


def numbered_pngs(directory: "str | os.PathLike") -> list[Path]:
    """The ``NNNNNN_frame.png`` / ``NNNNNN_blank.png`` files a ``PngDisplay`` wrote in ``directory``, in order."""
    d = Path(directory)
    found = [f for f in d.iterdir() if _PNG_NAME.fullmatch(f.name)] if d.is_dir() else []
    return sorted(found, key=lambda f: int(_PNG_NAME.fullmatch(f.name).group(1)))


class PngDisplay(_PictureDisplay):
    """Numbered PNGs of what the display would emit (black = off)."""

    def __init__(
        self,
        directory: "str | os.PathLike",
        *,
        width: int | None = None,
        height: int | None = None,
        fmt: "PixelFormat | str | None" = None,
        brightness: float = 1.0,
        gamma: float = 1.0,
        dither: bool = False,
    ):
        self._set_picture(width, height, fmt, brightness, gamma, dither)
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise DisplayURIError(f"png://{directory}: not a directory (png:// writes numbered PNGs into one)")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise DisplayURIError(f"png://{directory}: cannot write into this directory")
        # Number on from what an earlier run left: the highest-numbered PNG is always what the display shows now
        # (a run killed mid-frame, then `bridge blank`, must not leave a lit frame as the newest file).
        earlier = numbered_pngs(self.directory)
        self.count = int(_PNG_NAME.fullmatch(earlier[-1].name).group(1)) if earlier else 0
        self.paths: list[Path] = []
        self._last_size = self.size

    def _write(self, rgb: np.ndarray, kind: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:06d}_{kind}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
        self.paths.append(path)
        return path

    def show(self, image: np.ndarray, *, region: Region | None = None, deadline: float | None = None) -> None:
        rgb = self._picture(image, region)  # a PNG is the whole display
        self._last_size = (rgb.shape[1], rgb.shape[0])
        self._write(rgb, "frame")

    def blank(self) -> None:
        w, h = self._last_size or (1, 1)
        self._write(np.zeros((h, w, 3), np.uint8), "blank")


class SerialDisplay(Display):
    """A display controller on a serial/USB-CDC port, via ``LinkSender``."""

    def __init__(
        self,
        port_path: str | None = None,
        *,
        baud: int = 921600,
        width: int | None = None,
        height: int | None = None,
        fmt: "PixelFormat | str | None" = None,
        brightness: float = 1.0,
        gamma: float = 1.0,
        dither: bool = False,
        deadline: float = 2.0,
        ack_timeout: float = 0.25,
        window: int = 8,
        max_payload: int = 4096,
        watchdog: int = 1000,
        port=None,
    ):
        if port is None:
            import serial  # pyserial; imported lazily so png:// and fb:// need nothing extra

            try:
                port = serial.Serial(port_path, int(baud), timeout=0.01, write_timeout=max(1.0, deadline))
            except (serial.SerialException, OSError, ValueError) as exc:
                raise DisplayURIError(f"serial://{port_path}: cannot open it as a serial port at {baud} baud: {exc}") from None
        self.port = port
        self.sender = LinkSender(port, deadline=deadline, ack_timeout=ack_timeout, window=window,
                                 max_payload=max_payload, watchdog_ms=watchdog)
        info = self.sender.hello()
        want_fmt = PixelFormat.parse(fmt) if fmt is not None else None
        if (width is not None and width != info.width) or (height is not None and height != info.height):
            raise LinkProtocolError(
                f"{port_path}: controller reports a {info.width}x{info.height} display, configured {width}x{height}"
            )
        if want_fmt is not None and want_fmt is not info.pixel_format:
            raise LinkProtocolError(
                f"{port_path}: controller holds {info.pixel_format.slug}, configured {want_fmt.slug}"
            )
        self.size = (info.width, info.height)
        self.fmt = info.pixel_format
        self.luma_input = self.fmt.grey
        self.brightness, self.gamma, self.dither = brightness, gamma, dither
        pf.make_lut(brightness, gamma)
        self._lit = (0, 0, info.width, info.height)  # unknown until the first blank or frame

    def align(self, region: Region) -> Region:
        return align_to_bytes(region, self.size[0]) if self.fmt is PixelFormat.MONO1 else region

    def prepare(self, image: np.ndarray, region: Region | None = None) -> tuple[np.ndarray, Region]:
        """The packed pixel bytes and region ``show`` sends (a partial update
        covering ``region`` and whatever the controller may still show)."""
        image = self._check(image, region)
        canvas, send = self._update(image, region)
        data = pf.encode(canvas, self.fmt, brightness=self.brightness, gamma=self.gamma, dither=self.dither)
        return data, send

    def show(self, image: np.ndarray, *, region: Region | None = None, deadline: float | None = None):
        """Send one frame or partial update; returns the link's ``SendReport``."""
        data, send = self.prepare(image, region)
        # Until acknowledged, the controller may show the old picture, the new
        # one, or (after a reset) black: assume the union may be lit.
        self._lit = send
        report = self.sender.send_frame(data, region=send, deadline=deadline)
        self._written(region)
        return report

    def blank(self) -> None:
        self._lit = (0, 0, self.size[0], self.size[1])
        self.sender.blank()
        self._lit = None

    def keepalive(self) -> None:
        """Keep the controller's link watchdog (``watchdog`` ms, 0 = off) from
        blanking a live overlay: a PING when the link has been idle for a
        quarter of it. If this process dies, the controller blanks by itself."""
        self.sender.keepalive()

    def close(self) -> None:
        try:
            self.port.close()
        except Exception:
            pass


class FramebufferDisplay(Display):
    """Linux framebuffer (``/dev/fbN``) written through mmap.

    Geometry and pixel layout come from the kernel (``FBIOGET_VSCREENINFO``,
    see ``framebuffer.py``): the visible window of a double-buffered
    framebuffer and the channel order (RGB565/BGR565, XRGB/XBGR8888,
    RGB/BGR888, 8-bit grey, 1-bit mono with ``dither`` for heat maps), so
    red stays red and a set bit means what the panel means. Rows are
    ``stride`` bytes apart (sysfs; computed if the file is missing). A file that does not
    answer the ioctl (a regular file standing in for a device) is taken to
    hold sysfs' virtual size in the usual layout for its depth
    (``framebuffer.DEFAULT_LAYOUTS``). ``screeninfo`` and ``visual`` override
    the ioctls' answers (tests; drivers that answer wrongly).
    """

    def __init__(
        self,
        device: "str | os.PathLike",
        *,
        sysfs_root: "str | os.PathLike" = DEFAULT_SYSFS_ROOT,
        brightness: float = 1.0,
        gamma: float = 1.0,
        dither: bool = False,
        screeninfo: "fbinfo.VarScreenInfo | None" = None,
        visual: int | None = None,
    ):
        self.device = str(device)
        name = os.path.basename(self.device)
        if not re.fullmatch(r"fb\d+", name):
            raise ValueError(f"{self.device}: framebuffer device name must look like /dev/fbN")
        sysdir = Path(sysfs_root) / name
        self.sysdir = sysdir
        vs = self._read_sys("virtual_size")
        m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", vs)
        if not m:
            raise ValueError(f"{sysdir / 'virtual_size'}: expected 'WIDTH,HEIGHT', got {vs!r}")
        vw, vh = int(m.group(1)), int(m.group(2))
        bpp_text = self._read_sys("bits_per_pixel").strip()
        if not bpp_text.isdigit() or int(bpp_text) not in fbinfo.DEFAULT_LAYOUTS:
            raise ValueError(f"{sysdir / 'bits_per_pixel'}: unsupported value {bpp_text!r}; "
                             f"expected one of {sorted(fbinfo.DEFAULT_LAYOUTS)}")
        self.bpp = int(bpp_text)
        try:
            stride_text = self._read_sys("stride").strip()
            self.stride = int(stride_text)
        except FileNotFoundError:
            self.stride = (vw * self.bpp + 7) // 8
        except ValueError:
            raise ValueError(f"{sysdir / 'stride'}: expected an integer") from None
        self.brightness, self.gamma, self.dither = brightness, gamma, dither
        pf.make_lut(brightness, gamma)
        self._fd = os.open(self.device, os.O_RDWR)
        try:
            info = screeninfo if screeninfo is not None else fbinfo.query_var_screeninfo(self._fd)
            if info is None:
                w, h, x0, y0, self.layout = vw, vh, 0, 0, fbinfo.DEFAULT_LAYOUTS[self.bpp]
                log.warning("%s does not answer FBIOGET_VSCREENINFO: assuming %dx%d %s from sysfs",
                            self.device, w, h, self.layout)
            else:
                if visual is None and info.bits_per_pixel == 1 and screeninfo is None:
                    visual = fbinfo.query_visual(self._fd)
                try:
                    self.layout = fbinfo.layout_for(info, visual)
                except ValueError as exc:
                    raise ValueError(f"{self.device}: {exc}") from None
                self.bpp = info.bits_per_pixel
                w, h, x0, y0 = info.xres, info.yres, info.xoffset, info.yoffset
                vw, vh = info.xres_virtual, info.yres_virtual
            row = (w * self.bpp + 7) // 8
            if (x0 * self.bpp) % 8:
                raise ValueError(f"{self.device}: visible window starts inside a byte (xoffset {x0})")
            if self.stride < (x0 * self.bpp) // 8 + row:
                raise ValueError(f"{sysdir / 'stride'}: stride {self.stride} is smaller than a row "
                                 f"({(x0 * self.bpp) // 8 + row} bytes)")
            if w < 1 or h < 1 or y0 + h > vh:
                raise ValueError(f"{self.device}: visible {w}x{h} at row {y0} does not fit the {vw}x{vh} "
                                 "virtual screen")
            length = self.stride * vh
            size = os.fstat(self._fd).st_size
            if size and size < length:
                raise ValueError(f"{self.device}: is {size} bytes, need {length}")
            self._mm = mmap.mmap(self._fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self.luma_input = self.layout in fbinfo.GREY_LAYOUTS
        self.size = (w, h)
        self._lit = (0, 0, w, h)  # whatever was on the framebuffer before us
        bx = x0 * self.bpp // 8
        # Only the visible window: a panned/double-buffered framebuffer shows the part at (xoffset, yoffset).
        self._view = np.frombuffer(self._mm, dtype=np.uint8).reshape(vh, self.stride)[y0 : y0 + h, bx : bx + row]

    def _read_sys(self, field: str) -> str:
        path = self.sysdir / field
        try:
            return path.read_text()
        except FileNotFoundError:
            if field == "stride":
                raise
            raise ValueError(f"{path}: missing (is {self.device} a framebuffer?)") from None

    def show(self, image: np.ndarray, *, region: Region | None = None, deadline: float | None = None) -> None:
        image = self._check(image, region)
        canvas, (x, y, w, h) = self._update(image, region)
        data = fbinfo.pack(canvas, self.layout, self.brightness, self.gamma, self.dither)
        bx = x * self.bpp // 8
        self._view[y : y + h, bx : bx + data.shape[1]] = data
        self._written(region)

    def blank(self) -> None:
        self._view[:] = fbinfo.black(self.size[0], self.size[1], self.layout)
        self._lit = None

    def align(self, region: Region) -> Region:
        return align_to_bytes(region, self.size[0]) if self.bpp == 1 else region

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._view = None
            self._mm.close()
            self._mm = None
            os.close(self._fd)


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


# ---------------------------------------------------------------- URIs

_EXPECTED = (
    "png://DIR[?width=W&height=H&format=F], "
    "serial:///dev/ttyX?baud=N[&width=W&height=H&format=F], fb:///dev/fbN, "
    "or window://[TITLE][?width=W&height=H&format=F&scale=S]"
)
_COMMON = {"brightness": float, "gamma": float}
MAX_DISPLAY_SIDE = 8192  # px; beyond any microdisplay, and a typo there (99999x99999) would ask for 28 GiB
# Inclusive ranges of numeric options (brightness and gamma: ``pixel_formats.make_lut``; window: LinkSender;
# max_payload: ``link.MAX_PAYLOAD_RANGE``); floats must also be finite.
_RANGES = {
    "width": (1, MAX_DISPLAY_SIDE), "height": (1, MAX_DISPLAY_SIDE), "baud": (1, 100_000_000),
    "deadline": (1e-3, 3600.0), "ack_timeout": (1e-3, 60.0), "max_payload": MAX_PAYLOAD_RANGE,
    "brightness": (0.0, 1.0), "gamma": pf.GAMMA_RANGE,
}
_KEYS = {
    "png": {"width": int, "height": int, "format": str, "dither": bool, **_COMMON},
    "serial": {
        "baud": int, "width": int, "height": int, "format": str, "dither": bool,
        "deadline": float, "ack_timeout": float, "window": int, "max_payload": int, "watchdog": int, **_COMMON,
    },
    "fb": {"dither": bool, **_COMMON},
    "window": {"width": int, "height": int, "format": str, "dither": bool, "scale": float, **_COMMON},
}


def _parse_query(uri: str, scheme: str, query: str) -> dict:
    out = {}
    for key, values in urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        kinds = _KEYS[scheme]
        if key not in kinds:
            raise DisplayURIError(f"display URI {uri!r}: unknown option {key!r}; {scheme}:// accepts {', '.join(sorted(kinds))}")
        raw = values[-1]
        typ = kinds[key]
        try:
            if typ is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", ""):
                    raise ValueError
                val = raw.lower() in ("1", "true", "yes", "")
            else:
                val = typ(raw)
        except ValueError:
            raise DisplayURIError(f"display URI {uri!r}: option {key}={raw!r} is not a valid {typ.__name__}") from None
        if typ is float and not math.isfinite(val):
            raise DisplayURIError(f"display URI {uri!r}: option {key}={raw!r} must be a finite number")
        if key in _RANGES and not _RANGES[key][0] <= val <= _RANGES[key][1]:
            lo, hi = _RANGES[key]
            raise DisplayURIError(f"display URI {uri!r}: option {key}={raw!r} must be within {lo:g}..{hi:g}")
        out[key] = val
    if "format" in out:
        try:
            out["format"] = PixelFormat.parse(out["format"])
        except ValueError as exc:
            raise DisplayURIError(f"display URI {uri!r}: {exc}") from None
    return out


def open_display(uri: str, *, sysfs_root: "str | os.PathLike" = DEFAULT_SYSFS_ROOT, port=None) -> Display:
    """Open a display by URI (see the module docstring).  ``port`` injects an open serial port."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _KEYS:
        raise DisplayURIError(f"display URI {uri!r}: unknown scheme {parts.scheme!r}; expected {_EXPECTED}")
    opts = _parse_query(uri, scheme, parts.query)
    target = parts.netloc + parts.path
    fmt = opts.pop("format", None)
    if scheme == "window":
        title = urllib.parse.unquote(target).strip("/") or "armscope eyepiece preview"
        return WindowDisplay(title, fmt=fmt, **opts)
    if not target:
        raise DisplayURIError(f"display URI {uri!r}: missing the path; expected {_EXPECTED}")
    if scheme == "png":
        return PngDisplay(target, fmt=fmt, **opts)
    if scheme == "serial":
        if parts.netloc:
            raise DisplayURIError(f"display URI {uri!r}: use three slashes, e.g. serial:///dev/ttyUSB0")
        return SerialDisplay(parts.path, fmt=fmt, port=port, **opts)
    if parts.netloc or not re.fullmatch(r"/.*/fb\d+", parts.path):
        raise DisplayURIError(f"display URI {uri!r}: expected fb:///dev/fbN")
    return FramebufferDisplay(parts.path, sysfs_root=sysfs_root, **opts)
