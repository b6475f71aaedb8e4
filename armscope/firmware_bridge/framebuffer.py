"""What a Linux framebuffer holds, asked of the kernel, and pixels packed for it.

Why this module exists
----------------------
sysfs gives a framebuffer's virtual size, depth and stride, but not two facts
that decide whether the eyepiece shows the right picture:

* the **channel order**: a 16-bit panel may be RGB565 or BGR565 (fbtft's
  ``bgr`` option), a 32-bit one XRGB or XBGR. Guessing wrong swaps red and
  blue: the heat map's hot and cold colours trade places.
* the **visible window**: a double-buffered framebuffer (DRM fbdev emulation
  with overallocation, or a driver that pans) is two screens tall, and only
  the part at ``yoffset`` is shown. Writing at row 0 of the virtual screen
  would draw where nobody sees it, and the old overlay would stay visible.

Both come from the ``FBIOGET_VSCREENINFO`` ioctl (``struct
fb_var_screeninfo`` in linux/fb.h), read here with ``fcntl``. 1-bit
framebuffers (fbdev drivers of SSD1306-class OLED microdisplays) also need
``FBIOGET_FSCREENINFO``'s ``visual``: whether a set bit is lit (MONO10) or
dark (MONO01). Their pixels are packed in fbdev's CPU-endian bit order:
leftmost pixel in the least significant bit on little-endian CPUs (x86,
Jetson), as ssd1307fb reads them.
"""
from __future__ import annotations

import dataclasses
import fcntl
import struct
import sys

import cv2
import numpy as np

from . import pixel_formats as pf
from .pixel_formats import PixelFormat

__all__ = ["FBIOGET_VSCREENINFO", "FBIOGET_FSCREENINFO", "VarScreenInfo", "query_var_screeninfo",
           "query_visual", "layout_for", "LAYOUTS", "pack", "black"]

FBIOGET_VSCREENINFO = 0x4600
FBIOGET_FSCREENINFO = 0x4602
FB_VISUAL_MONO01 = 0  # 1 = black (dark)
FB_VISUAL_MONO10 = 1  # 1 = white (lit)
# struct fb_fix_screeninfo, native layout (unsigned long fields): id[16] smem_start smem_len
# type type_aux visual ...; only ``visual`` is read.
_FIX = struct.Struct("@16sL4I")
# xres yres xres_virtual yres_virtual xoffset yoffset bits_per_pixel grayscale,
# red/green/blue/transp (offset length msb_right), 16 more u32 and reserved[4]: 160 bytes.
_VAR = struct.Struct("=8I12I16I4I")

Bitfield = tuple[int, int, int]  # offset, length, msb_right


@dataclasses.dataclass(frozen=True)
class VarScreenInfo:
    """The fields of ``struct fb_var_screeninfo`` the bridge uses."""

    xres: int
    yres: int
    xres_virtual: int
    yres_virtual: int
    xoffset: int
    yoffset: int
    bits_per_pixel: int
    grayscale: int
    red: Bitfield
    green: Bitfield
    blue: Bitfield

    @classmethod
    def unpack(cls, buf: bytes) -> "VarScreenInfo":
        v = _VAR.unpack_from(buf)
        return cls(*v[:8], red=tuple(v[8:11]), green=tuple(v[11:14]), blue=tuple(v[14:17]))

    def pack(self) -> bytes:
        """The ioctl's reply for these values (tests, and drivers' fixtures)."""
        rest = [0] * (3 + 16 + 4)
        return _VAR.pack(self.xres, self.yres, self.xres_virtual, self.yres_virtual, self.xoffset, self.yoffset,
                         self.bits_per_pixel, self.grayscale, *self.red, *self.green, *self.blue, *rest)


def query_var_screeninfo(fd: int) -> VarScreenInfo | None:
    """The kernel's answer for an open framebuffer, or None where the file
    does not answer the ioctl (not a framebuffer device node)."""
    try:
        return VarScreenInfo.unpack(fcntl.ioctl(fd, FBIOGET_VSCREENINFO, bytes(_VAR.size)))
    except OSError:
        return None


def query_visual(fd: int) -> int | None:
    """``fb_fix_screeninfo.visual`` of an open framebuffer, or None if it does not answer."""
    try:
        return _FIX.unpack_from(fcntl.ioctl(fd, FBIOGET_FSCREENINFO, bytes(256)))[5]
    except OSError:
        return None


# layout -> (bits per pixel, (red, green, blue) as (offset, length)); grey and mono have no channels
LAYOUTS = {
    "mono10": (1, None),  # 1 bit, set = lit
    "mono01": (1, None),  # 1 bit, set = dark
    "gray8": (8, None),
    "rgb565le": (16, ((11, 5), (5, 6), (0, 5))),
    "bgr565le": (16, ((0, 5), (5, 6), (11, 5))),
    "bgr888": (24, ((16, 8), (8, 8), (0, 8))),   # bytes B, G, R
    "rgb888": (24, ((0, 8), (8, 8), (16, 8))),   # bytes R, G, B
    "bgrx8888": (32, ((16, 8), (8, 8), (0, 8))),  # XRGB8888: bytes B, G, R, X
    "rgbx8888": (32, ((0, 8), (8, 8), (16, 8))),  # XBGR8888: bytes R, G, B, X
}
GREY_LAYOUTS = ("mono10", "mono01", "gray8")  # one luma value a pixel: (H, W) grey images do
# What a framebuffer that cannot be asked (sysfs only) is taken to hold: the usual layouts.
DEFAULT_LAYOUTS = {1: "mono10", 8: "gray8", 16: "rgb565le", 24: "bgr888", 32: "bgrx8888"}


def layout_for(info: VarScreenInfo, visual: int | None = None) -> str:
    """The layout for the kernel's bitfields (and, at 1 bpp, ``visual``);
    ValueError naming them if none fits."""
    bpp = info.bits_per_pixel
    if bpp == 1:
        if visual in (None, FB_VISUAL_MONO10):
            return "mono10"
        if visual == FB_VISUAL_MONO01:
            return "mono01"
        raise ValueError(f"1 bit per pixel with visual {visual} (expected MONO01 = 0 or MONO10 = 1)")
    if bpp == 8:
        if not info.grayscale:
            raise ValueError("8 bits per pixel with a colour palette (grayscale=0) is not supported: "
                             "the overlay's grey levels would index palette colours")
        return "gray8"
    channels = tuple((f[0], f[1]) for f in (info.red, info.green, info.blue))
    for name, (lbpp, lch) in LAYOUTS.items():
        if lbpp == bpp and lch == channels and not any(f[2] for f in (info.red, info.green, info.blue)):
            return name
    raise ValueError(f"unsupported pixel layout: {bpp} bits per pixel with red/green/blue "
                     f"(offset, length, msb_right) {info.red}/{info.green}/{info.blue}; supported: "
                     f"{', '.join(LAYOUTS)}")


# byte -> the same byte with its bit order reversed (MSB-first MONO1 -> LSB-first)
_REVERSED = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], np.uint8)


def pack(image: np.ndarray, layout: str, brightness: float = 1.0, gamma: float = 1.0,
         dither: bool = False, byteorder: str = sys.byteorder) -> np.ndarray:
    """(h, row bytes) uint8 of ``image`` (RGBA, composited RGB, or grey for
    ``gray8``/mono) as the framebuffer stores it. ``dither``: 1-bit layouts only.
    ``byteorder``: the CPU's, which sets fbdev's bit order at 1 bpp (a
    parameter so that the big-endian order is testable on x86)."""
    h = image.shape[0]
    if layout in ("mono10", "mono01"):
        bits = pf.encode(image, PixelFormat.MONO1, brightness=brightness, gamma=gamma, dither=dither)
        if byteorder == "little":
            bits = cv2.LUT(bits, _REVERSED)
        return bits if layout == "mono10" else np.bitwise_not(bits)
    if layout == "rgb565le":
        return pf.encode(image, PixelFormat.RGB565_LE, brightness=brightness, gamma=gamma)
    if layout == "gray8":
        return pf.encode(image, PixelFormat.GRAY8, brightness=brightness, gamma=gamma)
    rgb = pf.composite_over_black(image, brightness=brightness, gamma=gamma)
    code = {
        "bgr565le": cv2.COLOR_BGR2BGR565,  # red taken as "blue": it lands in the low 5 bits
        "bgr888": cv2.COLOR_RGB2BGR,
        "rgb888": None,
        "bgrx8888": cv2.COLOR_RGB2BGRA,
        "rgbx8888": cv2.COLOR_RGB2RGBA,
    }[layout]
    out = rgb.copy() if code is None else cv2.cvtColor(rgb, code)
    return out.reshape(h, -1)


def black(width: int, height: int, layout: str) -> np.ndarray:
    """The bytes of an all-dark ``width`` x ``height`` area (not zeros for MONO01)."""
    shape = (height, width) if layout in GREY_LAYOUTS else (height, width, 3)
    return pack(np.zeros(shape, np.uint8), layout)
