"""The registration itself: a camera -> display homography with the numbers to judge
it by (RMS and max reprojection error, inliers), fitted to point pairs. Everything
else in the package produces point pairs for it, stores it or applies it."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import cv2
import numpy as np


REGISTRATION_VERSION = 1


class RegistrationError(ValueError):
    """Registration could not be computed (too few points, degenerate, not found)."""


class RegistrationFileError(RegistrationError):
    """A registration or point-pair file is malformed; names the file and field."""

    def __init__(self, path, field: str, problem: str):
        self.path = str(path)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path}: field {field!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class Registration:
    """Homography camera -> display plus the quality numbers to judge it by."""

    matrix: np.ndarray  # (3, 3) float64, maps camera (x, y, 1) to display
    display_size: tuple[int, int]  # (width, height) in display pixels
    rms_error: float  # RMS reprojection error over the inliers, display px
    max_error: float = float("nan")
    n_points: int = 0
    n_inliers: int = 0
    method: str = "points"
    version: int = REGISTRATION_VERSION

    def __post_init__(self):
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (3, 3) or not np.all(np.isfinite(m)):
            raise RegistrationError(f"homography must be a finite 3x3 matrix, got {m!r}")
        object.__setattr__(self, "matrix", m)
        w, h = (int(v) for v in self.display_size)
        if w <= 0 or h <= 0:
            raise RegistrationError(f"display size must be positive, got {self.display_size}")
        object.__setattr__(self, "display_size", (w, h))

    def map_points(self, camera_points) -> np.ndarray:
        """Camera points (N, 2) -> display points (N, 2)."""
        pts = np.asarray(camera_points, dtype=np.float64).reshape(-1, 1, 2)
        return cv2.perspectiveTransform(pts, self.matrix).reshape(-1, 2)


def reprojection_errors(matrix: np.ndarray, camera_pts, display_pts) -> np.ndarray:
    """Per-point Euclidean error (display px) of ``matrix`` mapping camera to display."""
    cam = np.asarray(camera_pts, dtype=np.float64).reshape(-1, 1, 2)
    disp = np.asarray(display_pts, dtype=np.float64).reshape(-1, 2)
    proj = cv2.perspectiveTransform(cam, np.asarray(matrix, dtype=np.float64)).reshape(-1, 2)
    return np.linalg.norm(proj - disp, axis=1)


def check_fits_display(reg: "Registration | None", path, size, display: str) -> None:
    """Refuse a registration (read from ``path``) made for another display
    size than ``size`` (of ``display``, as the user named it); None passes."""
    if reg is not None and size is not None and tuple(size) != reg.display_size:
        raise RegistrationError(f"{path}: registration is for a {reg.display_size[0]}x{reg.display_size[1]} display, "
                                f"but {display} is {size[0]}x{size[1]}")


def mirrors(matrix: np.ndarray, at: Sequence[float]) -> bool:
    """True if the homography flips orientation near camera point ``at`` (a
    mirror image: left-right or up-down). A dot grid registered with its
    columns and rows swapped (``--grid 4x5`` for a 5x4 grid) fits with zero
    error and does this, so ``armscope bridge register`` refuses it unless
    the optics really mirror (``--mirrored``)."""
    x, y = float(at[0]), float(at[1])
    pts = cv2.perspectiveTransform(np.array([[[x, y], [x + 1.0, y], [x, y + 1.0]]]), np.asarray(matrix, np.float64))[0]
    (ax, ay), (bx, by) = pts[1] - pts[0], pts[2] - pts[0]
    return ax * by - ay * bx < 0


def from_point_pairs(
    camera_pts,
    display_pts,
    display_size: Sequence[int],
    *,
    ransac: bool = False,
    ransac_threshold: float = 3.0,
    method: str = "points",
) -> Registration:
    """Fit the homography from >= 4 point pairs (least squares, or RANSAC).

    With ``ransac=True`` points further than ``ransac_threshold`` display px
    from the consensus model are ignored and the reported errors cover the
    inliers only (``n_inliers`` says how many were kept).
    """
    cam = np.asarray(camera_pts, dtype=np.float64).reshape(-1, 2)
    disp = np.asarray(display_pts, dtype=np.float64).reshape(-1, 2)
    if cam.shape != disp.shape:
        raise RegistrationError(f"{len(cam)} camera points but {len(disp)} display points")
    if len(cam) < 4:
        raise RegistrationError(f"need at least 4 point pairs for a homography, got {len(cam)}")
    if not (np.all(np.isfinite(cam)) and np.all(np.isfinite(disp))):
        raise RegistrationError("point coordinates must be finite numbers")
    # Display points are display pixels: a point far off the display is a typo or a unit mix-up (camera px, mm),
    # and would still fit. 10% of a side of slack keeps points measured at the very edge.
    w, h = (int(v) for v in display_size)
    sx, sy = 0.1 * w + 0.5, 0.1 * h + 0.5
    outside = np.flatnonzero((disp[:, 0] < -sx) | (disp[:, 0] > w - 1 + sx) | (disp[:, 1] < -sy) | (disp[:, 1] > h - 1 + sy))
    if outside.size:
        i = int(outside[0])
        raise RegistrationError(f"display point {i + 1} ({disp[i, 0]:g}, {disp[i, 1]:g}) lies outside the {w}x{h} display"
                                + (f" ({outside.size} points do)" if outside.size > 1 else "")
                                + "; display points are display pixels, within it")
    flag = cv2.RANSAC if ransac else 0
    matrix, mask = cv2.findHomography(cam, disp, flag, float(ransac_threshold))
    if matrix is None or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-12:
        raise RegistrationError("points are degenerate (collinear or repeated); no homography")
    inliers = mask.ravel().astype(bool) if (ransac and mask is not None) else np.ones(len(cam), bool)
    err = reprojection_errors(matrix, cam[inliers], disp[inliers])
    return Registration(
        matrix=matrix / matrix[2, 2],
        display_size=(int(display_size[0]), int(display_size[1])),
        rms_error=float(math.sqrt(np.mean(err**2))),
        max_error=float(err.max()),
        n_points=int(len(cam)),
        n_inliers=int(inliers.sum()),
        method=method,
    )
