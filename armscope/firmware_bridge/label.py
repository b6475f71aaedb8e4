"""The diagnosis as text in the eyepiece, beside the heat overlay.

Why here and not in the daemon's overlay: the overlay is warped from camera
to display pixels, so text drawn into it would arrive skewed and resampled;
drawn in display pixels after the warp it stays crisp at any registration.
It is part of the same frame as the overlay, so it is shown and blanked with
it (stale, heartbeat loss, no_tissue, exit): it can never outlive its overlay.

Where: just below the overlay's footprint if there is room, else just above,
else inside it at its bottom-left on a black (see-through) box. Beside the
footprint keeps the partial update that carries overlay and text small on a
serial link, and keeps the text off the tissue the pathologist is reading.
The text is white (all channels on), the brightest an additive display
emits; ``Display`` brightness and gamma apply to it as to the overlay.
"""
from __future__ import annotations

import cv2
import numpy as np

from .displays import Region, union

FONT = cv2.FONT_HERSHEY_SIMPLEX  # OpenCV's built-in vector font: no font files on the board
_GAP = 4


def label_text(header: dict) -> str:
    """``"other 0.88 > STR 0.41"``: step one's displayed class and *its*
    probability, then the second step's for a cascade (``subtype``). Not the
    decision's ``score``: for a binary task that is the positive class's
    probability, so "other 0.12" would read as p(other) = 0.12. ASCII only
    (the built-in font has no other glyphs): anything else becomes ``?``."""
    parts = []
    for step in (header, header.get("subtype")):
        if step:
            d = step["decision"]
            parts.append(f"{d['label']} {float(step['probs'][d['index']]):.2f}")
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in " > ".join(parts))


def _fit(text: str, display_size: tuple[int, int]) -> tuple[float, int, tuple[int, int], int]:
    """Font scale, thickness, text size and baseline for ``text`` at about
    1/24 of the display height, shrunk until it fits the display's width."""
    w, h = display_size
    scale = max(0.3, h / 24 / 22)  # FONT's cap height is ~22 px at scale 1
    while True:
        thickness = max(1, int(round(scale * 1.6)))
        (tw, th), base = cv2.getTextSize(text, FONT, scale, thickness)
        if tw + 2 * _GAP <= w or scale <= 0.3:
            return scale, thickness, (tw, th), base
        scale *= 0.85


def place(box: tuple[int, int], footprint: Region, display_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left of a ``box`` (w, h) for the label of an overlay at
    ``footprint``: below it, else above it, else inside it at its bottom-left."""
    bw, bh = box
    dw, dh = display_size
    fx, fy, fw, fh = footprint
    x = min(max(0, fx), max(0, dw - bw))
    if fy + fh + bh <= dh:
        return x, fy + fh
    if fy - bh >= 0:
        return x, fy - bh
    return x, min(max(0, fy + fh - bh), max(0, dh - bh))


def widen(image: np.ndarray, region: Region, box: Region, align=None) -> tuple[np.ndarray, Region]:
    """``image`` (at ``region``) on a black canvas that also covers ``box`` (aligned
    as the display wants): what is sent when something is drawn beside the overlay."""
    send = union(tuple(region), tuple(box))
    if align is not None:
        send = align(send)
    sx, sy, sw, sh = send
    if tuple(send) == tuple(region):
        return image, send
    canvas = np.zeros((sh, sw) + image.shape[2:], np.uint8)
    rx, ry = region[0] - sx, region[1] - sy
    canvas[ry : ry + image.shape[0], rx : rx + image.shape[1]] = image
    return canvas, send


def add_label(image: np.ndarray, region: Region, text: str, display_size: tuple[int, int],
              align=None) -> tuple[np.ndarray, Region]:
    """``image`` (the rendered overlay at ``region``, RGB or grey) with
    ``text`` beside it: the new ``(image, region)`` covering both, black
    elsewhere. ``align``: the display's ``Display.align``. Where the text
    fits inside ``region`` (a display-filling overlay) it is drawn into
    ``image`` itself, which the bridge owns (render_for made it): no copy of
    a whole display's pixels for a few hundred of text."""
    scale, thickness, (tw, th), base = _fit(text, display_size)
    box_w = min(tw + 2 * _GAP, display_size[0])
    box_h = min(th + base + 2 * _GAP, display_size[1])
    bx, by = place((box_w, box_h), region, display_size)
    canvas, send = widen(image, region, (bx, by, box_w, box_h), align)
    lx, ly = bx - send[0], by - send[1]
    canvas[ly : ly + box_h, lx : lx + box_w] = 0  # see-through behind the text where it overlaps the overlay
    white = 255 if canvas.ndim == 2 else (255, 255, 255)
    cv2.putText(canvas, text, (lx + _GAP, ly + _GAP + th), FONT, scale, white, thickness, cv2.LINE_AA)
    return canvas, send

