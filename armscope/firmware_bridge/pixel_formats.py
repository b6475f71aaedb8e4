"""Convert RGBA overlays into the byte layouts eyepiece microdisplays accept.

Why this module exists
----------------------
The edge daemon produces Grad-CAM overlays as straight-alpha RGBA (``uint8``,
shape ``(H, W, 4)``).  An AR eyepiece display is *additive light* injected
into the optical path: a black pixel adds nothing, so black *is* transparent.
Showing an overlay therefore means compositing it over black
(``rgb * alpha / 255``) and then packing the result into whatever the display
controller's framebuffer holds (RGB888, RGB565 in either byte order, 8-bit
grey or 1-bit monochrome).

Everything here is vectorised with OpenCV/NumPy because this runs once per
overlay on small edge CPUs: a 1280x720 frame must convert in about a
millisecond, so there is no per-pixel Python anywhere.

Order of operations (fixed, so that host and simulator agree):

1. composite over black (premultiply by alpha; skipped when the caller says
   the image is already premultiplied or passes 3-channel RGB);
2. reduce to the output channels (RGB, or Rec.601 luma for GRAY8/MONO1);
3. apply the brightness/gamma 256-entry LUT (``out = 255*b*(in/255)**gamma``);
4. pack (RGB565 truncates to 5/6/5 bits; MONO1 thresholds or ordered-dithers
   and packs 8 pixels per byte, MSB = leftmost pixel, each row padded to a
   whole byte).
"""

from __future__ import annotations

import enum
import functools

import cv2
import numpy as np

__all__ = [
    "PixelFormat",
    "make_lut",
    "premultiply",
    "composite_over_black",
    "encode",
    "decode",
    "unpack_mono1",
]


class PixelFormat(enum.Enum):
    """Framebuffer layouts; the value is the wire code used by the link protocol."""

    RGB888 = 1  # 3 bytes/pixel, R G B
    RGB565_LE = 2  # 16-bit RRRRRGGGGGGBBBBB, low byte first
    RGB565_BE = 3  # same value, high byte first
    GRAY8 = 4  # 1 byte/pixel, Rec.601 luma
    MONO1 = 5  # 1 bit/pixel, MSB-first, rows padded to whole bytes

    @property
    def bits_per_pixel(self) -> int:
        return _BPP[self]

    @property
    def wire_code(self) -> int:
        return int(self.value)

    @property
    def slug(self) -> str:
        """Short lower-case name used in URIs and on the command line."""
        return _SLUGS[self]

    @property
    def grey(self) -> bool:
        """GRAY8 and MONO1: one luma value a pixel, so (H, W) grey images do."""
        return self in (PixelFormat.GRAY8, PixelFormat.MONO1)

    def row_bytes(self, width: int) -> int:
        """Bytes per row of ``width`` pixels (MONO1 rows are padded to bytes)."""
        if width < 0:
            raise ValueError(f"width must be >= 0, got {width}")
        return (width * self.bits_per_pixel + 7) // 8

    def frame_bytes(self, width: int, height: int) -> int:
        """Bytes for a ``width`` x ``height`` frame in this format."""
        if height < 0:
            raise ValueError(f"height must be >= 0, got {height}")
        return self.row_bytes(width) * height

    @classmethod
    def from_wire(cls, code: int) -> "PixelFormat":
        try:
            return cls(code)
        except ValueError:
            raise ValueError(f"unknown pixel format wire code {code}") from None

    @classmethod
    def parse(cls, name: "str | PixelFormat") -> "PixelFormat":
        """Accept ``rgb565le``, ``RGB565_LE``, ``rgb565-le`` ... (case/sep-insensitive)."""
        if isinstance(name, PixelFormat):
            return name
        key = str(name).strip().lower().replace("_", "").replace("-", "")
        for fmt, slug in _SLUGS.items():
            if key == slug:
                return fmt
        expected = ", ".join(_SLUGS.values())
        raise ValueError(f"unknown pixel format {name!r}; expected one of: {expected}")


_BPP = {
    PixelFormat.RGB888: 24,
    PixelFormat.RGB565_LE: 16,
    PixelFormat.RGB565_BE: 16,
    PixelFormat.GRAY8: 8,
    PixelFormat.MONO1: 1,
}
_SLUGS = {
    PixelFormat.RGB888: "rgb888",
    PixelFormat.RGB565_LE: "rgb565le",
    PixelFormat.RGB565_BE: "rgb565be",
    PixelFormat.GRAY8: "gray8",
    PixelFormat.MONO1: "mono1",
}

# 8x8 Bayer matrix -> thresholds in 0..255.  A pixel is on when its value is
# >= the threshold, so the on-fraction of a flat field of value v is ~v/256.
_BAYER8 = np.array(
    [
        [0, 32, 8, 40, 2, 34, 10, 42],
        [48, 16, 56, 24, 50, 18, 58, 26],
        [12, 44, 4, 36, 14, 46, 6, 38],
        [60, 28, 52, 20, 62, 30, 54, 22],
        [3, 35, 11, 43, 1, 33, 9, 41],
        [51, 19, 59, 27, 49, 17, 57, 25],
        [15, 47, 7, 39, 13, 45, 5, 37],
        [63, 31, 55, 23, 61, 29, 53, 21],
    ],
    dtype=np.float64,
)
_BAYER8_THRESH = np.floor((_BAYER8 + 0.5) * 4.0).astype(np.uint8)  # 2..254


@functools.lru_cache(maxsize=64)
def _lut_cached(brightness: float, gamma: float) -> np.ndarray:
    x = np.arange(256, dtype=np.float64) / 255.0
    lut = np.clip(np.rint(255.0 * brightness * np.power(x, gamma)), 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


GAMMA_RANGE = (0.1, 10.0)  # display responses are ~1.8-2.6; 0.1..10 leaves room and keeps black black


def make_lut(brightness: float = 1.0, gamma: float = 1.0) -> np.ndarray:
    """256-entry ``uint8`` LUT: ``out = round(255 * brightness * (in/255) ** gamma)``.

    ``brightness`` in [0, 1] scales emitted light; ``gamma`` (``GAMMA_RANGE``) > 1 darkens
    mid-tones (use it to match the microdisplay's response), < 1 brightens
    them.  ``make_lut(1, 1)`` is the identity.  Cached: callers may call it
    per frame.
    """
    brightness = float(brightness)
    gamma = float(gamma)
    if not 0.0 <= brightness <= 1.0:
        raise ValueError(f"brightness must be within [0, 1], got {brightness}")
    if not GAMMA_RANGE[0] <= gamma <= GAMMA_RANGE[1]:
        # far outside it the LUT degenerates: gamma -> 0 lights every pixel (black included) at full white
        raise ValueError(f"gamma must be within [{GAMMA_RANGE[0]:g}, {GAMMA_RANGE[1]:g}], got {gamma}")
    return _lut_cached(round(brightness, 6), round(gamma, 6))


def _is_identity(brightness: float, gamma: float) -> bool:
    return float(brightness) == 1.0 and float(gamma) == 1.0


def _check_image(image: np.ndarray, grey_ok: bool = False) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 numpy array, got {type(image).__name__} "
                        f"{getattr(image, 'dtype', '')}")
    if not ((grey_ok and image.ndim == 2) or (image.ndim == 3 and image.shape[2] in (3, 4))):
        also = " or (H, W) grey" if grey_ok else " ((H, W) grey only for gray8/mono1)"
        raise ValueError(f"expected an (H, W, 4) RGBA or (H, W, 3) RGB image{also}, got shape {image.shape}")
    if not image.flags.c_contiguous:
        image = np.ascontiguousarray(image)
    return image


def premultiply(rgba: np.ndarray) -> np.ndarray:
    """Return RGBA with colour multiplied by alpha (rounded); alpha is kept.

    Premultiplied colour is exactly "what the eyepiece shows" (composited over
    black), and it is the only form that interpolates correctly when warped.
    """
    rgba = _check_image(rgba)
    if rgba.shape[2] != 4:
        raise ValueError(f"premultiply needs RGBA (H, W, 4), got shape {rgba.shape}")
    # OpenCV's RGBA -> "mRGBA" is exactly round(c * a / 255), SIMD, ~4x
    # faster than cv2.multiply with a scale.
    return cv2.cvtColor(rgba, cv2.COLOR_RGBA2mRGBA)


def composite_over_black(image: np.ndarray, *, premultiplied: bool = False, brightness: float = 1.0,
                         gamma: float = 1.0) -> np.ndarray:
    """(H, W, 3) RGB as seen in the eyepiece, after the brightness/gamma LUT.
    3-channel input with the identity LUT is returned as is."""
    image = _check_image(image)
    if image.shape[2] == 4:
        if not premultiplied:
            image = premultiply(image)
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2RGB)
    return image if _is_identity(brightness, gamma) else cv2.LUT(image, make_lut(brightness, gamma))


def encode(
    image: np.ndarray,
    fmt: "PixelFormat | str",
    *,
    brightness: float = 1.0,
    gamma: float = 1.0,
    premultiplied: bool = False,
    dither: bool = False,
    threshold: int = 128,
) -> np.ndarray:
    """Convert an overlay to display bytes, shape ``(H, fmt.row_bytes(W))`` uint8.

    ``image`` is straight-alpha RGBA ``(H, W, 4)`` (``premultiplied=True`` if
    its colour is already multiplied by alpha, e.g. the output of a
    premultiplied warp), or RGB ``(H, W, 3)`` already composited over black,
    or, for GRAY8/MONO1, its ``(H, W)`` luma already composited.
    ``threshold``/``dither`` only affect MONO1: a pixel is lit when its
    (LUT-mapped) luma is >= ``threshold``, or, with ``dither``, >= the 8x8
    Bayer threshold at its position (ordered dithering keeps soft heat-map
    gradients visible on 1-bit displays).
    """
    fmt = PixelFormat.parse(fmt)
    image = _check_image(image, grey_ok=fmt.grey)
    h, w = image.shape[:2]
    if image.ndim == 3 and image.shape[2] == 4 and not premultiplied:
        image = premultiply(image)
    lut = None if _is_identity(brightness, gamma) else make_lut(brightness, gamma)
    four = image.ndim == 3 and image.shape[2] == 4

    if fmt in (PixelFormat.RGB565_LE, PixelFormat.RGB565_BE):
        if lut is not None:
            image = cv2.LUT(image, lut)
        out = cv2.cvtColor(image, cv2.COLOR_RGBA2BGR565 if four else cv2.COLOR_RGB2BGR565)
        # OpenCV's "BGR565" from RGB input is the standard R-high RGB565, little-endian.
        out = out.reshape(h, w * 2)
        if fmt is PixelFormat.RGB565_BE:
            out = out.view("<u2").byteswap().view(np.uint8)
        return out
    if fmt is PixelFormat.RGB888:
        rgb = cv2.cvtColor(image, cv2.COLOR_RGBA2RGB) if four else image.copy()
        if lut is not None:
            rgb = cv2.LUT(rgb, lut)
        return rgb.reshape(h, w * 3)

    if image.ndim == 2:
        luma = image
    else:
        luma = cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY if four else cv2.COLOR_RGB2GRAY)
    if lut is not None:
        luma = cv2.LUT(luma, lut)
    if fmt is PixelFormat.GRAY8:
        return luma.copy() if luma is image else luma  # never hand back the caller's array
    if fmt is PixelFormat.MONO1:
        if dither:
            reps = (-(-h // 8), -(-w // 8))
            thresh = np.tile(_BAYER8_THRESH, reps)[:h, :w]
            bits = luma >= thresh
        else:
            if not 0 <= int(threshold) <= 256:
                raise ValueError(f"threshold must be within [0, 256], got {threshold}")
            bits = luma >= int(threshold)
        return np.packbits(bits, axis=1, bitorder="big")
    raise AssertionError(fmt)  # pragma: no cover


def unpack_mono1(buf, width: int, height: int) -> np.ndarray:
    """MONO1 bytes -> boolean ``(height, width)`` array (True = lit)."""
    data = _as_frame(buf, PixelFormat.MONO1, width, height)
    return np.unpackbits(data, axis=1, bitorder="big")[:, :width].astype(bool)


def _as_frame(buf, fmt: PixelFormat, width: int, height: int) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    need = fmt.frame_bytes(width, height)
    if arr.size != need:
        raise ValueError(f"{fmt.slug} frame of {width}x{height} needs {need} bytes, got {arr.size}")
    return arr.reshape(height, fmt.row_bytes(width))


def _expand(v: np.ndarray, bits: int) -> np.ndarray:
    # Bit replication maps 0 -> 0 and max -> 255 exactly.
    v = v.astype(np.uint8)
    return (v << (8 - bits)) | (v >> (2 * bits - 8))


def decode(buf, fmt: "PixelFormat | str", width: int, height: int) -> np.ndarray:
    """Display bytes -> ``(height, width, 3)`` uint8 RGB (what the panel emits).

    Used by the controller simulator and by ``png://`` outputs to render what
    the real display would show, including quantisation.
    """
    fmt = PixelFormat.parse(fmt)
    data = _as_frame(buf, fmt, width, height)
    if fmt is PixelFormat.RGB888:
        return data.reshape(height, width, 3).copy()
    if fmt in (PixelFormat.RGB565_LE, PixelFormat.RGB565_BE):
        v = data.view("<u2" if fmt is PixelFormat.RGB565_LE else ">u2").reshape(height, width)
        v = v.astype(np.uint16)
        r = _expand((v >> 11) & 0x1F, 5)
        g = _expand((v >> 5) & 0x3F, 6)
        b = _expand(v & 0x1F, 5)
        return np.dstack((r, g, b))
    if fmt is PixelFormat.GRAY8:
        return cv2.cvtColor(np.ascontiguousarray(data), cv2.COLOR_GRAY2RGB)
    if fmt is PixelFormat.MONO1:
        lit = unpack_mono1(data, width, height).astype(np.uint8) * 255
        return cv2.cvtColor(lit, cv2.COLOR_GRAY2RGB)
    raise AssertionError(fmt)  # pragma: no cover
