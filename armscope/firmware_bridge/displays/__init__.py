"""Display outputs behind one small interface, opened by URI.

Why this package exists
-----------------------
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

One module per scheme (``png``, ``serial``, ``fb``, ``window``), the shared
interface in ``base``; this module parses the URI and opens the right one.
Each scheme's extra dependencies are imported only when it is opened:
``serial://`` needs the ``[serial]`` extra (numba, isal) and ``window://``
the ``[preview]`` extra (pygame); ``png://`` and ``fb://`` need neither.

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

import math
import os
import re
import urllib.parse

from .. import pixel_formats as pf
from ..link import MAX_PAYLOAD_RANGE
from ..pixel_formats import PixelFormat
from .base import (MAX_DISPLAY_SIDE, Display, DisplayURIError, Region, align_to_bytes, emitted_rgb, paste_on_black,
                   union)
from .fb import DEFAULT_SYSFS_ROOT, FramebufferDisplay
from .png import PngDisplay, numbered_pngs
from .serial import SerialDisplay
from .window import WindowDisplay

__all__ = [
    "Display",
    "DisplayURIError",
    "Region",
    "PngDisplay",
    "SerialDisplay",
    "FramebufferDisplay",
    "WindowDisplay",
    "open_display",
    "numbered_pngs",
    "paste_on_black",
    "align_to_bytes",
    "union",
    "emitted_rgb",
    "MAX_DISPLAY_SIDE",
    "DEFAULT_SYSFS_ROOT",
]


# ---------------------------------------------------------------- URIs

_EXPECTED = (
    "png://DIR[?width=W&height=H&format=F], "
    "serial:///dev/ttyX?baud=N[&width=W&height=H&format=F], fb:///dev/fbN, "
    "or window://[TITLE][?width=W&height=H&format=F&scale=S]"
)
_COMMON = {"brightness": float, "gamma": float}
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
