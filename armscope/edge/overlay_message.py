"""The daemon's overlay messages (docs/protocol.md 1.2, 1.3), built from one
classified frame.

Why the CAM and not a picture: the eyepiece bridge draws the overlay in its
display's own pixels after the registration (sharper than warping a bitmap,
and lighter), so the ``overlay`` topic carries what it needs to do that: the
decision, the probabilities, the CAM maps of the displayed step (``C x h x
w``, float16 or uint8 with its scale: a few KB where the bitmap was 4 MiB),
the heat's ``peak`` and the outline's ``threshold`` exactly as the daemon's
own renderer uses them, the camera pixels the CAM covers and those shown,
and the timestamps. The bitmap stays available on the opt-in ``rendered``
topic (daemon option ``rendered_topic``) for subscribers that only paste a
picture.
"""
from __future__ import annotations

import cv2
import numpy as np

from armscope.core import protocol
from armscope.core.overlay import focus_contours, focus_levels, heat_rgba


def focus_bbox(cam: np.ndarray, size: int) -> list[int] | None:
    """[x, y, w, h] in pixels of a ``size`` square: the bounding box of the
    focus outline exactly as ``heat_rgba(cam, size)`` draws it (the same
    contours, ``focus_contours``, and line width, ``max(2, size // 256)``),
    clipped to the square; None when nothing is outlined (a flat CAM).

    Why the outline as drawn and not the CAM cells above the median: the
    outline follows the interpolated map, which reaches past those cells'
    block and is drawn a few pixels wide; a box the size of the cells left
    part of what the pathologist sees outlined outside it. Only the
    contours' extreme points are needed: ``cv2.drawContours`` caps and joins
    a line of width ``t`` with discs of radius ``(t + 1) // 2``, so the
    drawn outline reaches exactly that far beyond them (tests hold it
    against the bitmap's opaque pixels)."""
    contours = focus_contours(cam, size)
    if not contours:
        return None
    reach = (max(2, size // 256) + 1) // 2
    x, y, w, h = cv2.boundingRect(np.vstack(contours))
    x0, y0 = max(0, x - reach), max(0, y - reach)
    x1, y1 = min(size, x + w + reach), min(size, y + h + reach)
    return [x0, y0, x1 - x0, y1 - y0]


def cam_box(frame_shape, region: dict, whole_image: bool) -> dict:
    """Camera pixels (x, y, size) the CAM grid covers: the model's crop, or for a
    whole-image bundle the frame padded to a centred square (the CAM then reaches
    beyond the frame; only ``region``, inside it, is shown)."""
    if not whole_image:
        return {"x": region["x"], "y": region["y"], "size": region["size"]}
    h, w = frame_shape[:2]
    side = max(h, w)
    return {"x": (w - side) / 2, "y": (h - side) / 2, "size": side}


def decision_keys(work, classes: list[str]) -> dict:
    """The keys both overlay topics share: frame, timestamps, decision, region, measures."""
    frame = work.frame
    top, left, crop = work.box
    probs = work.outputs["probs"][0]
    return {
        "frame_id": frame.id, "capture_mono": frame.capture_mono, "capture_wall": frame.capture_wall,
        "classes": classes, "probs": [protocol.finite(p) for p in probs],
        "decision": {k: (protocol.finite(v) if k in ("score", "threshold") else v) for k, v in work.decision.items()},
        "region": {"frame_width": frame.image.shape[1], "frame_height": frame.image.shape[0],
                   "x": left, "y": top, "size": crop},
        "subtype": work.subtype, "measures": work.measures,
    }


def overlay_message(work, classes: list[str], *, max_alpha: float, dtype: str = "float16",
                    whole_image: bool = False) -> tuple[dict, bytes]:
    """(header without the publisher's keys, payload) of the v2 ``overlay``.
    ``work.cam`` is the displayed map as the eyepiece region sees it (for a
    whole-image bundle cut to the inner square: its levels are those of the
    shown part), ``work.cams``/``work.cam_index`` the step's maps as the model
    made them."""
    keys = decision_keys(work, classes)
    peak, threshold = focus_levels(work.cam)
    payload, scale = protocol.cam_payload(work.cams, dtype)
    c, h, w = work.cams.shape
    region = keys["region"]
    bbox = focus_bbox(work.cam, region["size"])
    keys.update(encoding=protocol.ENCODING_RAW,
                cam={"dtype": dtype, "classes": c, "height": h, "width": w, "index": int(work.cam_index),
                     "scale": scale, "peak": peak, "threshold": threshold,
                     "box": cam_box(work.frame.image.shape, region, whole_image), "max_alpha": float(max_alpha)},
                focus_bbox=None if bbox is None else [bbox[0] + region["x"], bbox[1] + region["y"], bbox[2], bbox[3]])
    return keys, payload


def rendered_message(work, classes: list[str], *, size: int, max_alpha: float,
                     encoding: str) -> tuple[dict, bytes, np.ndarray]:
    """(header, payload, RGBA) of the opt-in ``rendered`` topic: the overlay as
    the daemon's bitmap (``heat_rgba``), ``size`` pixels square over the region."""
    rgba = heat_rgba(work.cam, size, max_alpha=max_alpha)
    if encoding == protocol.ENCODING_PNG:
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        payload = png.tobytes()
    else:
        payload = rgba.tobytes()
    keys = decision_keys(work, classes)
    keys.update(width=size, height=size, format=protocol.FORMAT_RGBA8, encoding=encoding,
                focus_bbox=focus_bbox(work.cam, size))
    return keys, payload, rgba
