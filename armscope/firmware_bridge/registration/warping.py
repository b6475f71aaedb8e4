"""Applying a registration to an overlay (``warp``), and saying when this install's
OpenCV is one whose warp is slow (``slow_warp_warning``): the warp is the largest
stage of the bridge's work."""

from __future__ import annotations

import cv2
import numpy as np

from ..pixel_formats import premultiply
from .homography import Registration

FAST_WARP_OPENCV = 5  # OpenCV major version from which the warp below is the fast one


def opencv_build() -> str:
    """``"OpenCV 5.0.0, 2 threads"``: what the warp runs on, for benchmark headers."""
    return f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads"


def slow_warp_warning() -> str | None:
    """A line saying this install's OpenCV warps slowly, or None.

    Why: OpenCV 5's ``warpPerspective`` took half the time of 4.10's and
    4.14's on the bridge's 1280x720 RGBA warp (same CPU, BENCHMARKS.md
    section 3), the largest stage of the bridge's work. ``pip install``
    brings 5.x, but a board's system OpenCV (JetPack's, a distro's
    python3-opencv) can shadow it, and nothing else would tell."""
    try:
        major = int(cv2.__version__.split(".")[0])
    except ValueError:
        return None
    if major >= FAST_WARP_OPENCV:
        return None
    return (f"OpenCV {cv2.__version__} (from {getattr(cv2, '__file__', '?')}): its warp is slower than "
            f"OpenCV {FAST_WARP_OPENCV}'s (BENCHMARKS.md section 3); pip install 'opencv-python-headless>={FAST_WARP_OPENCV}' "
            f"and make sure that one is imported")


def warp(image: np.ndarray, registration: Registration, *, premultiplied_out: bool = False) -> np.ndarray:
    """Warp an overlay from camera to display pixels (``registration.display_size``).

    * RGBA (straight alpha) is premultiplied, warped (INTER_LINEAR, border =
      transparent black) and, unless ``premultiplied_out``, divided back to
      straight alpha.  Pass ``premultiplied_out=True`` when the result goes
      straight to ``pixel_formats.encode(..., premultiplied=True)``: it skips
      a divide and a multiply per pixel.
    * RGB (3 channels) is taken as already composited over black and warped
      with a black border.
    """
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"warp expects uint8 (H, W, 3|4), got {image.dtype} {image.shape}")
    w, h = registration.display_size
    src = premultiply(image) if image.shape[2] == 4 else image
    out = cv2.warpPerspective(
        src, registration.matrix, (w, h), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0),
    )
    if image.shape[2] == 3 or premultiplied_out:
        return out
    # mRGBA -> RGBA divides by alpha and yields 0 where alpha == 0.
    return cv2.cvtColor(out, cv2.COLOR_mRGBA2RGBA)
