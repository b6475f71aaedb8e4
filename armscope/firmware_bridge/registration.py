"""Camera -> eyepiece-display registration (a 3x3 homography).

Why this module exists
----------------------
Grad-CAM overlays are computed in *camera* pixels, but the microdisplay that
injects them into the eyepiece has its own pixel grid, offset, scaled and
slightly tilted relative to the camera's view of the specimen.  The optics
map one plane onto the other, so a single homography is the right model.  It
is measured once per instrument, either from hand-picked point pairs or by
showing a known dot grid on the display and detecting it in a camera frame
(``cv2.findCirclesGrid``), and stored in a small JSON file that the daemon
loads at start-up.  The RMS reprojection error (in display pixels) is kept in
the file so an operator can tell a good calibration from a bad one.

``warp`` applies the registration to an overlay.  RGBA is warped in
premultiplied form so that colours hidden under alpha=0 never bleed into
visible pixels, and the border is transparent black (the display's "off").
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from armscope.core import schema_files

from .pixel_formats import premultiply

__all__ = [
    "REGISTRATION_VERSION",
    "Registration",
    "RegistrationError",
    "RegistrationFileError",
    "check_fits_display",
    "from_point_pairs",
    "mirrors",
    "load_point_pairs",
    "grid_points",
    "render_dot_grid",
    "detect_dot_grid",
    "from_camera_image",
    "save_registration",
    "load_registration",
    "reprojection_errors",
    "warp",
]

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


# ---------------------------------------------------------------- point files


def _num(path, field, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RegistrationFileError(path, field, f"expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise RegistrationFileError(path, field, f"expected a finite number, got {value!r}")
    return v


def _xy(path, field, value) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RegistrationFileError(path, field, f"expected [x, y], got {value!r}")
    return _num(path, f"{field}[0]", value[0]), _num(path, f"{field}[1]", value[1])


def load_point_pairs(path: "str | os.PathLike") -> tuple[np.ndarray, np.ndarray]:
    """Read point pairs; returns ``(camera (N,2), display (N,2))``.

    Accepted formats:

    * JSON ``{"pairs": [{"camera": [x, y], "display": [x, y]}, ...]}``
    * JSON ``{"camera": [[x, y], ...], "display": [[x, y], ...]}``
    * CSV with header ``camera_x,camera_y,display_x,display_y``
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistrationFileError(path, "<file>", f"cannot read: {exc.strerror or exc}") from None
    # a .json file is read as JSON whatever it starts with, so a broken one says "invalid JSON"
    if path.suffix.lower() == ".csv" or (path.suffix.lower() != ".json" and text.lstrip()[:1] not in ("{", "[")):
        return _load_csv_pairs(path, text)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistrationFileError(path, "<json>", f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RegistrationFileError(path, "<root>", "expected a JSON object")
    cam, disp = [], []
    if "pairs" in doc:
        pairs = doc["pairs"]
        if not isinstance(pairs, list):
            raise RegistrationFileError(path, "pairs", "expected a list of {camera, display} objects")
        for i, p in enumerate(pairs):
            if not isinstance(p, dict) or "camera" not in p or "display" not in p:
                raise RegistrationFileError(path, f"pairs[{i}]", "expected {\"camera\": [x, y], \"display\": [x, y]}")
            cam.append(_xy(path, f"pairs[{i}].camera", p["camera"]))
            disp.append(_xy(path, f"pairs[{i}].display", p["display"]))
    elif "camera" in doc and "display" in doc:
        for key, out in (("camera", cam), ("display", disp)):
            if not isinstance(doc[key], list):
                raise RegistrationFileError(path, key, "expected a list of [x, y]")
            out.extend(_xy(path, f"{key}[{i}]", v) for i, v in enumerate(doc[key]))
        if len(cam) != len(disp):
            raise RegistrationFileError(path, "display", f"has {len(disp)} points but camera has {len(cam)}")
    else:
        raise RegistrationFileError(path, "pairs", "missing; expected 'pairs' or 'camera' + 'display'")
    return np.array(cam, dtype=np.float64).reshape(-1, 2), np.array(disp, dtype=np.float64).reshape(-1, 2)


_CSV_COLS = ("camera_x", "camera_y", "display_x", "display_y")


def _load_csv_pairs(path: Path, text: str) -> tuple[np.ndarray, np.ndarray]:
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in _CSV_COLS if c not in (reader.fieldnames or [])]
    if missing:
        raise RegistrationFileError(path, missing[0], f"missing CSV column; header must contain {', '.join(_CSV_COLS)}")
    rows = []
    for line_no, row in enumerate(reader, start=2):
        rows.append([_num(path, f"{c} (line {line_no})", row[c]) for c in _CSV_COLS])
    arr = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return arr[:, :2], arr[:, 2:]


# ---------------------------------------------------------------- dot grid


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


# ---------------------------------------------------------------- file I/O


def save_registration(reg: Registration, path: "str | os.PathLike") -> None:
    """Write the registration JSON (atomically: tmp file + rename)."""
    path = Path(path)
    doc = {
        "version": reg.version,
        "display_size": list(reg.display_size),
        "matrix": [[float(v) for v in row] for row in reg.matrix],
        "rms_error": float(reg.rms_error),
        "max_error": None if math.isnan(reg.max_error) else float(reg.max_error),
        "n_points": reg.n_points,
        "n_inliers": reg.n_inliers,
        "method": reg.method,
    }
    _check_schema(path, doc)   # what the reader will check: refused here rather than written unreadable
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _check_schema(path, doc) -> None:
    """``doc`` against armscope/core/schemas/registration.json, the one definition of
    the file that ``bridge register`` writes and the bridge reads; the error names
    the field (``matrix[1][2]``, a missing key by its name)."""
    error = schema_files.first_error("registration", doc)
    if error is None:
        return
    missing = schema_files.missing_key(error)
    if missing is not None:
        raise RegistrationFileError(path, missing, "missing")
    field = schema_files.indexed(list(error.absolute_path))
    if field == "version":
        raise RegistrationFileError(path, "version", f"unsupported version {doc['version']!r}; "
                                                     f"expected {REGISTRATION_VERSION}")
    raise RegistrationFileError(path, field, error.message[:160])


def load_registration(path: "str | os.PathLike") -> Registration:
    """Read a registration JSON; errors name the file and the offending field."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistrationFileError(path, "<file>", f"cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise RegistrationFileError(path, "<json>", f"invalid JSON: {exc}") from None
    _check_schema(path, doc)
    size = doc["display_size"]
    m = doc["matrix"]
    matrix = np.array([[_num(path, f"matrix[{i}][{j}]", v) for j, v in enumerate(r)] for i, r in enumerate(m)])
    if abs(np.linalg.det(matrix)) < 1e-12:
        raise RegistrationFileError(path, "matrix", "is singular")
    rms = _num(path, "rms_error", doc["rms_error"])
    max_err = doc.get("max_error")
    return Registration(
        matrix=matrix,
        display_size=(size[0], size[1]),
        rms_error=rms,
        max_error=float("nan") if max_err is None else _num(path, "max_error", max_err),
        n_points=int(doc.get("n_points", 0)),
        n_inliers=int(doc.get("n_inliers", 0)),
        method=str(doc.get("method", "points")),
        version=REGISTRATION_VERSION,
    )


# ---------------------------------------------------------------- warping

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
    return (f"OpenCV {cv2.__version__} (from {getattr(cv2, '__file__', '?')}): its warp is about 2x slower "
            f"than OpenCV {FAST_WARP_OPENCV}'s; pip install 'opencv-python-headless>={FAST_WARP_OPENCV}' "
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
