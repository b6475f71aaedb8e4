"""``fb:///dev/fbN``: a Linux framebuffer written through mmap.

Why this module exists
----------------------
SPI and HDMI microdisplays with a kernel driver appear as ``/dev/fbN``; no
link protocol, but the kernel's geometry and pixel layout (visible window of
a double-buffered framebuffer, channel order, 1-bit panels) must be honoured
exactly or red is not red and a set bit means the wrong thing. The ioctl and
layout knowledge is ``framebuffer.py``; this is the output around it.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from pathlib import Path

import numpy as np

from .. import framebuffer as fbinfo
from .. import pixel_formats as pf
from .base import Display, Region, align_to_bytes

DEFAULT_SYSFS_ROOT = "/sys/class/graphics"
log = logging.getLogger(__name__)


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
