"""Registration without hand-picked points: the display shows a dot grid
(``render_dot_grid``), the camera sees it, ``detect_dot_grid`` finds it
(``cv2.findCirclesGrid``) and ``from_camera_image`` fits the homography to it."""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from .homography import Registration, RegistrationError, from_point_pairs


def grid_points(cols: int, rows: int, display_size: Sequence[int], *, margin: float = 0.1) -> np.ndarray:
    """Display-pixel centres of the ``cols`` x ``rows`` dot grid, row-major from top-left.

    The order matches what ``cv2.findCirclesGrid`` returns for an unrotated
    view (left to right, then top to bottom).
    """
    if cols < 2 or rows < 2:
        raise RegistrationError(f"grid must be at least 2x2, got {cols}x{rows}")
    w, h = display_size
    xs = np.linspace(margin * w, (1 - margin) * w, cols)
    ys = np.linspace(margin * h, (1 - margin) * h, rows)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def render_dot_grid(
    cols: int, rows: int, display_size: Sequence[int], *, margin: float = 0.1, radius: float | None = None
) -> np.ndarray:
    """The calibration pattern the display shows: white dots on black, ``(H, W)`` uint8."""
    w, h = (int(v) for v in display_size)
    pts = grid_points(cols, rows, (w, h), margin=margin)
    if radius is None:
        pitch = min((1 - 2 * margin) * w / (cols - 1), (1 - 2 * margin) * h / (rows - 1))
        radius = max(2.0, pitch * 0.25)
    img = np.zeros((h, w), np.uint8)
    shift = 4
    for x, y in pts:
        cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), int(round(radius * 16)), 255, -1, cv2.LINE_AA, shift)
    return img


def _blob_detector(image_area: int):
    params = cv2.SimpleBlobDetector_Params()
    params.filterByArea = True
    params.minArea = 4
    params.maxArea = max(100.0, image_area * 0.05)
    params.filterByCircularity = False
    params.filterByConvexity = False
    params.filterByInertia = False
    return cv2.SimpleBlobDetector_create(params)


def detect_dot_grid(image: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """Find the dot grid in a camera image; returns ``(cols*rows, 2)`` camera points.

    Dots may be bright on dark (what an eyepiece camera sees) or dark on
    bright; both polarities are tried.
    """
    if image.ndim == 3:
        code = cv2.COLOR_RGBA2GRAY if image.shape[2] == 4 else cv2.COLOR_RGB2GRAY
        gray = cv2.cvtColor(image, code)
    else:
        gray = image
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    detector = _blob_detector(gray.size)
    expected = cols * rows
    crowded = []
    for candidate in (255 - gray, gray):  # findCirclesGrid's default detector wants dark dots
        # findCirclesGrid's search grows combinatorially with the spots it is given: on a textured image
        # (thousands of spots) it runs for many minutes. A grid image has about cols*rows of them.
        spots = len(detector.detect(candidate))
        if spots > 4 * expected + 20:
            crowded.append(spots)
            continue
        found, centers = cv2.findCirclesGrid(
            candidate, (cols, rows), flags=cv2.CALIB_CB_SYMMETRIC_GRID, blobDetector=detector
        )
        if found:
            return centers.reshape(-1, 2).astype(np.float64)
    if len(crowded) == 2:
        raise RegistrationError(f"no {cols}x{rows} dot grid found: the camera image has {min(crowded)} dot-like spots, "
                                f"not about {expected}; it should show only the display's dot grid (no specimen in the field, in focus)")
    raise RegistrationError(f"no {cols}x{rows} dot grid found in the camera image")


def _rotation_penalty(matrix: np.ndarray, camera_pts: np.ndarray) -> float:
    # How far the camera +x direction is rotated on the display, in radians.
    c = camera_pts.mean(axis=0)
    a = cv2.perspectiveTransform(np.array([[c, c + [10.0, 0.0]]]), matrix)[0]
    d = a[1] - a[0]
    return abs(math.atan2(d[1], d[0]))


def from_camera_image(
    image: np.ndarray,
    grid: Sequence[int],
    display_size: Sequence[int],
    *,
    margin: float = 0.1,
    ransac: bool = False,
) -> Registration:
    """Register from a camera frame of the dot grid shown by ``render_dot_grid``.

    A symmetric grid looks the same rotated by 180 degrees, so the detected
    order is ambiguous; both orders are fitted and the one needing the
    smaller rotation is kept (the eyepiece display is never mounted upside
    down relative to the camera by more than 90 degrees).
    """
    cols, rows = (int(v) for v in grid)
    cam = detect_dot_grid(image, cols, rows)
    disp = grid_points(cols, rows, display_size, margin=margin)
    best = None
    for order in (cam, cam[::-1]):
        reg = from_point_pairs(order, disp, display_size, ransac=ransac, method="dot-grid")
        key = (_rotation_penalty(reg.matrix, order), reg.rms_error)
        if best is None or key < best[0]:
            best = (key, reg)
    return best[1]
