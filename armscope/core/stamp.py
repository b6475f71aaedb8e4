"""A machine-readable frame stamp for glass-to-glass latency measurement.

Why: what a pathologist waits for is the time from a field reaching the
camera to its overlay being visible in the eyepiece, and only a camera looking
at the display can see the second instant. So in measurement mode the bridge
draws the overlay's ``frame_id`` in a corner of the display
(``Bridge(stamp=True)``, ``armscope bridge --stamp``), and whatever camera
watches the display decodes it (``decode``), as NVIDIA Holoscan's latency tool
does with its loopback pattern.

The code: 16 bits of the frame id and an 8-bit CRC of them, 24 bits, each
Manchester-coded as a pair of cells (1 = lit then dark, 0 = dark then lit).
A bit is read by comparing its two cells, never against a fixed level, so the
stamp survives a display's brightness, gamma and pixel format, a camera's
exposure and a scene seen through the display (an eyepiece adds the display's
light to the slide's). A pair whose cells do not differ clearly (a blank
display, a frame caught mid-update) or a CRC mismatch decodes as ``None``,
never as a wrong number. 48 cells in 4 rows of 12, in the bottom-left corner,
one cell margin; the cell side scales with the display (``cell_size``).
"""
from __future__ import annotations

import numpy as np

BITS = 16
CHECK_BITS = 8
ROWS, COLS = 4, 12                 # 2 x (BITS + CHECK_BITS) cells
MODULUS = 1 << BITS
MIN_CONTRAST = 24                  # grey levels between a pair's lit and dark cell


def crc8(value: int) -> int:
    """CRC-8 (polynomial 0x07) of the two bytes of ``value``."""
    crc = 0
    for byte in ((value >> 8) & 0xFF, value & 0xFF):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def cell_size(display_size: tuple[int, int]) -> int:
    """Cell side in display pixels: about 1/60 of the shorter side, at least 2."""
    return max(2, min(display_size) // 60)


def box(display_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the stamp on a display of ``display_size`` (width, height)."""
    c = cell_size(display_size)
    w, h = COLS * c, ROWS * c
    dw, dh = display_size
    if w + 2 * c > dw or h + 2 * c > dh:
        raise ValueError(f"a {dw}x{dh} display is too small for the {w}x{h} frame stamp")
    return c, dh - h - c, w, h


def cells(value: int) -> np.ndarray:
    """(ROWS, COLS) bool, True = lit, for ``value`` mod 2^16."""
    value %= MODULUS
    word = (value << CHECK_BITS) | crc8(value)
    bits = [(word >> (BITS + CHECK_BITS - 1 - i)) & 1 for i in range(BITS + CHECK_BITS)]
    flat = np.array([[b, 1 - b] for b in bits], dtype=bool).reshape(-1)
    return flat.reshape(ROWS, COLS)


def draw(image: np.ndarray, value: int, origin: tuple[int, int], cell: int) -> None:
    """Draw the stamp into ``image`` (H, W) or (H, W, C) uint8, in place, at ``origin`` (x, y)."""
    x0, y0 = origin
    lit = 255
    for (r, c), on in np.ndenumerate(cells(value)):
        image[y0 + r * cell:y0 + (r + 1) * cell, x0 + c * cell:x0 + (c + 1) * cell] = lit if on else 0


def decode(image: np.ndarray, where: tuple[int, int, int, int], min_contrast: float = MIN_CONTRAST) -> int | None:
    """The stamp's value (mod 2^16) in ``image`` inside ``where`` = (x, y, w, h)
    (image pixels; the camera's view of the stamp box), or None when there is
    no readable stamp. Each cell is read as the mean of its central half."""
    x, y, w, h = (int(round(v)) for v in where)
    if w < COLS or h < ROWS or x < 0 or y < 0 or x + w > image.shape[1] or y + h > image.shape[0]:
        return None
    grey = image[y:y + h, x:x + w].astype(np.float32)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(axis=2)
    cw, ch = w / COLS, h / ROWS
    levels = np.empty((ROWS, COLS), np.float32)
    for r in range(ROWS):
        for c in range(COLS):
            ya, yb = int(y0 := (r + 0.25) * ch), max(int(y0) + 1, int((r + 0.75) * ch))
            xa, xb = int(x0 := (c + 0.25) * cw), max(int(x0) + 1, int((c + 0.75) * cw))
            levels[r, c] = grey[ya:yb, xa:xb].mean()
    pairs = levels.reshape(-1, 2)
    diff = pairs[:, 0] - pairs[:, 1]
    if np.abs(diff).min() < min_contrast:
        return None
    word = 0
    for d in diff:
        word = (word << 1) | int(d > 0)
    value, check = word >> CHECK_BITS, word & 0xFF
    return value if crc8(value) == check else None
