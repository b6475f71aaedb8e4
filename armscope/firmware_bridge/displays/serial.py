"""``serial:///dev/ttyX``: a display controller behind a serial/USB-CDC line,
driven over the acknowledged link (``link.LinkSender``).

Why this module exists
----------------------
It is the one output that talks to a device that can answer, fail and
reboot: size and format come from the controller's HELLO reply, every frame
is a partial update that ``show`` either gets acknowledged within its
deadline or raises ``link.LinkError`` for (the caller then blanks), and
``keepalive`` feeds the controller's link watchdog. It is also the only
output that needs the ``[serial]`` extra (numba for the link's compiled COBS
framing, isal for its CRCs): both are imported when a ``SerialDisplay`` is
opened, and without numba it refuses with one error naming
``pip install 'armscope[serial]'`` before touching the port.
"""

from __future__ import annotations

import numpy as np

from .. import pixel_formats as pf
from ..link import LinkProtocolError, LinkSender
from ..pixel_formats import PixelFormat
from .base import Display, DisplayURIError, Region, align_to_bytes


def serial_extra_missing() -> str | None:
    """None when the link's compiled codec (numba, the ``[serial]`` extra) imports,
    else why not, naming ``pip install 'armscope[serial]'``: for the commands that
    can do part of their work without it (``armscope bench --suite``, ``bridge bench``)
    or must refuse in one line (``bridge simulate``)."""
    try:
        from ..link import chunks  # noqa: F401  numba (and isal): the [serial] extra
    except ImportError as exc:
        return str(exc)
    return None


def _require_serial_extra(port_path: str | None) -> None:
    """The link's compiled codec, imported now so a missing extra is one clear error."""
    if (problem := serial_extra_missing()) is not None:
        raise DisplayURIError(f"serial://{port_path}: {problem}")


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
        _require_serial_extra(port_path)
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

    @classmethod
    def detached(cls, width: int, height: int, fmt: "PixelFormat | str", *, brightness: float = 1.0,
                 gamma: float = 1.0, dither: bool = False) -> "SerialDisplay":
        """The display's pixel work (``prepare``) for a controller of this size and
        format, with no port and no link, starting blank: what a benchmark times
        where the ``[serial]`` extra is absent (the link cannot run, the render and
        the pixel conversion can). ``show`` and ``blank`` need the link and fail."""
        self = cls.__new__(cls)
        self.port = self.sender = None
        self.size = (int(width), int(height))
        self.fmt = PixelFormat.parse(fmt)
        self.luma_input = self.fmt.grey
        self.brightness, self.gamma, self.dither = brightness, gamma, dither
        pf.make_lut(brightness, gamma)
        self._lit = None
        return self

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
