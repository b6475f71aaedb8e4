"""Geometry and rendering in display pixels: where the daemon's overlay lies on
the eyepiece display, and the pixels the display should emit there.

Why one module: every map from the camera to the display passes through
here, for both overlay forms of the protocol (docs/protocol.md 1.2, 1.3):

* **v2, the CAM as data** (:func:`render_cam_for_display`, what the bridge
  runs): for each display pixel of the overlay's footprint, its position is
  mapped back through the registration to CAM coordinates and the CAM is
  sampled (bilinear) and coloured there, the outline of the focused region
  is traced in display pixels and the crop's edge is antialiased. The CAM is
  a few hundred values, so nothing large is resampled twice, and edges and
  outline stay sharp at any registration.
* **v1, a rendered bitmap** (:func:`render_for_display`): the RGBA bitmap
  warped into the display, for ``armscope bridge bench``'s comparison and for
  subscribers of the opt-in ``rendered`` topic.

Both return ``(image, region)``: the (h, w, 3) RGB (or (h, w) luma for grey
displays) that the additive display should emit inside ``region`` = (x, y,
w, h), black (see-through) everywhere else.
"""
from __future__ import annotations

import dataclasses
import functools
import threading

import cv2
import numpy as np

from armscope.core.overlay import premultiplied_jet

from .displays import Display
from .registration import Registration

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # Rec.601, as cv2.COLOR_RGB2GRAY


def camera_to_display_matrix(region: dict, registration: Registration | None,
                             display_size: tuple[int, int]) -> np.ndarray:
    """3x3 homography from camera pixels to display pixels: the registration's,
    or without one the uncalibrated default (the whole camera frame scaled
    uniformly to fit the display and centred; the CLI warns about it)."""
    if registration is not None:
        return registration.matrix
    fw, fh = region["frame_width"], region["frame_height"]
    dw, dh = display_size
    s = min(dw / fw, dh / fh)
    return np.array([[s, 0.0, (dw - s * fw) / 2 + 0.5 * s - 0.5],
                     [0.0, s, (dh - s * fh) / 2 + 0.5 * s - 0.5],
                     [0.0, 0.0, 1.0]])


def grid_to_camera(x: float, y: float, size: float, grid: tuple[int, int]) -> np.ndarray:
    """3x3 map from a (w, h) grid laid over the camera square at ``x, y`` of side
    ``size`` (an overlay bitmap, a CAM) to camera pixels; pixel centres map to
    pixel centres (the convention of ``cv2.resize``)."""
    w, h = grid
    sx, sy = size / w, size / h
    return np.array([[sx, 0.0, x + 0.5 * sx - 0.5], [0.0, sy, y + 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def overlay_to_display_matrix(region: dict, overlay_size: tuple[int, int],
                              registration: Registration | None, display_size: tuple[int, int]) -> np.ndarray:
    """3x3 homography from overlay pixels to display pixels.

    The overlay covers the square crop ``region`` of the camera frame
    (docs/protocol.md 1.2), scaled by ``size / width``; pixel centres map to
    pixel centres (the convention of ``cv2.resize``).  That is composed with
    the camera -> display registration.  Without a registration the display
    is assumed to show the whole camera frame, scaled uniformly to fit and
    centred (an uncalibrated default; the CLI warns about it).
    """
    to_camera = grid_to_camera(region["x"], region["y"], region["size"], overlay_size)
    return camera_to_display_matrix(region, registration, display_size) @ to_camera


def overlay_footprint(matrix: np.ndarray, overlay_size: tuple[int, int],
                      display_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Display pixels (x, y, w, h) the warped overlay can touch, or None if it
    misses the display: the bounding box of the overlay's corners (pixel edges,
    -0.5 .. size-0.5) mapped through ``matrix``, grown by one pixel for the
    bilinear footprint and clipped. Outside it the warp is the transparent
    border by construction, so nothing outside needs computing or sending."""
    w, h = overlay_size
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]], np.float64)
    pts = cv2.perspectiveTransform(corners[None], matrix)[0]
    if not np.isfinite(pts).all():
        return (0, 0, int(display_size[0]), int(display_size[1]))  # through the horizon: be safe, whole display
    dw, dh = (int(v) for v in display_size)
    x0 = max(0, int(np.floor(pts[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(pts[:, 1].min())) - 1)
    x1 = min(dw, int(np.ceil(pts[:, 0].max())) + 2)
    y1 = min(dh, int(np.ceil(pts[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def render_for_display(rgba: np.ndarray, matrix: np.ndarray, display_size: tuple[int, int], *,
                       luma: bool = False, align=None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Warp a straight-alpha RGBA overlay to the display and composite it over
    black: ``(image, region)``, the (h, w, 3) RGB the additive display should
    emit inside ``region`` = (x, y, w, h) before its brightness/gamma and pixel
    packing (done by the ``Display``); everything outside ``region`` is black.

    Only the overlay's footprint is warped (a display shows the crop square,
    about half its pixels) and the display sends only that region plus what
    it must clear (partial update): at 1280x720 RGB565 a full frame is 1.8 MB,
    20 s on a 921600-baud UART. Warped in premultiplied form, as
    ``registration.warp`` does, so colour hidden under alpha 0 never bleeds
    into visible pixels.

    ``align``: the display's ``Display.align``, so the region is already one
    the display can address (MONO1: whole bytes) and needs no padding copy.
    ``luma``: for grey displays (``Display.luma_input``), return the (h, w)
    Rec.601 luma instead of RGB; it is computed before the warp, which is
    linear, so one channel is warped instead of four (within 1 grey level of
    warping RGB first)."""
    rgba = np.ascontiguousarray(rgba)
    region = overlay_footprint(matrix, (rgba.shape[1], rgba.shape[0]), display_size)
    if region is None:  # the overlay misses the display entirely: show black
        region = (0, 0, 1, 1) if align is None else align((0, 0, 1, 1))
        return np.zeros((region[3], region[2]) if luma else (region[3], region[2], 3), np.uint8), region
    if align is not None:
        region = align(region)
    x, y, w, h = region
    shift = np.array([[1.0, 0.0, -x], [0.0, 1.0, -y], [0.0, 0.0, 1.0]])
    premult = cv2.cvtColor(rgba, cv2.COLOR_RGBA2mRGBA)
    src = cv2.cvtColor(premult, cv2.COLOR_RGBA2GRAY) if luma else premult
    out = cv2.warpPerspective(src, shift @ matrix, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    return (out if luma else cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)), region


def render_for(display: Display, rgba: np.ndarray, matrix: np.ndarray,
               display_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``render_for_display`` as ``display`` wants it (its alignment, luma for
    grey displays): what the bridge does for every overlay."""
    return render_for_display(rgba, matrix, display_size, luma=display.luma_input, align=display.align)


def _edges_to_display(x: float, y: float, size: float, camera_to_display: np.ndarray) -> np.ndarray:
    """The camera square's pixel edges (x - 0.5 .. x + size - 0.5) in display pixels: (4, 2)."""
    lo, hi = -0.5, size - 0.5
    corners = np.array([[x + lo, y + lo], [x + hi, y + lo], [x + hi, y + hi], [x + lo, y + hi]], np.float64)
    return cv2.perspectiveTransform(corners[None], camera_to_display)[0]


def outline_thickness(size: float, quad: np.ndarray) -> int:
    """Display pixels of the focus outline: the daemon's bitmap draws it
    ``max(2, side // 256)`` pixels wide at the crop's size (``heat_rgba``),
    scaled here by how large the crop appears on the display."""
    diagonal = (np.linalg.norm(quad[2] - quad[0]) + np.linalg.norm(quad[3] - quad[1])) / 2
    scale = diagonal / (size * np.sqrt(2.0)) if np.isfinite(diagonal) else 1.0
    return max(1, int(round(max(2, int(size) // 256) * scale)))


_scratch = threading.local()


def _buffer(name: str, shape: tuple, dtype) -> np.ndarray:
    """A per-thread scratch array for an intermediate image of the render.

    Why: a render's intermediates are a few MB (the warped CAM as float32,
    the levels, the colours); allocated afresh per overlay they are mapped
    and page-faulted anew every time (glibc hands blocks this size to mmap
    and returns them on free), which cost more than the drawing itself.
    Reused, they stay mapped. Per thread, so two bridges in one process do
    not share them; only the returned image is allocated per overlay."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    array = buffers.get(name)
    if array is None or array.shape != shape or array.dtype != dtype:
        array = buffers[name] = np.empty(shape, dtype)
    return array


@functools.lru_cache(maxsize=8)
def _jet(max_alpha: float, luma: bool) -> np.ndarray:
    """The premultiplied JET table (RGB, or its Rec.601 luma), built once per ``max_alpha``."""
    table = premultiplied_jet(max_alpha)
    if luma:
        table = np.rint(table.reshape(256, 3).astype(np.float32) @ _LUMA).astype(np.uint8)
    table.flags.writeable = False
    return table


@dataclasses.dataclass(frozen=True)
class _Footprint:
    """What one overlay geometry costs to draw, computed once: the coverage of
    the shown square in the footprint (255 inside, the fraction of each
    display pixel the square covers on its projected edge, 0 outside), the
    same as three channels, the inside mask that bounds the outline, and the
    outline's width."""

    coverage: np.ndarray   # (h, w) uint8
    coverage3: np.ndarray  # (h, w, 3) uint8
    inside: np.ndarray     # (h, w) uint8, 255 where coverage > 127
    thickness: int


def square_coverage(quad: np.ndarray, out_region: tuple[int, int, int, int]) -> np.ndarray:
    """(h, w) float32 in 0..1: how much of each display pixel of ``out_region``
    the convex ``quad`` (4, 2) covers (display pixels, centres at integers).

    Per edge, ``clip(0.5 + d, 0, 1)`` with ``d`` the signed distance (display
    px) from the pixel's centre to the edge's line, inside positive; the four
    multiplied. That is a pixel's exact area coverage for an axis-aligned
    edge or rectangle corner, and within a few per cent of it at the small
    rotations a registration has.

    Why not warp a lit grid (as the v1 bitmap's edge is warped): a grid's
    bilinear ramp is one grid cell wide, not one display pixel, and a ramp
    of the wrong width moves the mass of a hot edge by up to ~0.05 display px
    depending on the registration's sub-pixel phase; the distance is exact
    for any registration, so where the heat lies does not depend on it."""
    fx, fy, fw, fh = out_region
    xs = np.arange(fx, fx + fw, dtype=np.float64)
    ys = np.arange(fy, fy + fh, dtype=np.float64)[:, None]
    e1, e2 = quad[1] - quad[0], quad[2] - quad[1]
    orientation = 1.0 if e1[0] * e2[1] - e1[1] * e2[0] >= 0 else -1.0  # y down: > 0 is clockwise on screen
    coverage = np.ones((fh, fw), np.float32)
    edge = np.empty((fh, fw), np.float32)
    for a, b in zip(quad, np.roll(quad, -1, axis=0)):
        ex, ey = b - a
        length = float(np.hypot(ex, ey))
        if length == 0:
            continue
        # 0.5 + the signed distance, inside positive, separable: a row term plus a column term
        k = orientation / length
        row = (0.5 + k * ex * (ys - a[1])).astype(np.float32)
        col = (-k * ey * (xs - a[0])).astype(np.float32)
        np.add(row, col, out=edge)
        np.clip(edge, 0.0, 1.0, out=edge)
        coverage *= edge
    return coverage


@functools.lru_cache(maxsize=8)
def _footprint(x: float, y: float, size: int, camera_to_display: tuple, out_region: tuple) -> _Footprint:
    """The coverage of the square ``x, y, size`` (camera pixels) inside
    ``out_region`` (display pixels), antialiased (:func:`square_coverage` of
    the square's pixel edges mapped to the display; a homography maps the
    square to an exact quadrilateral).

    Why cached: the registration and the daemon's crop are the same for every
    overlay of a run, so this (the dearest step of a render) is done once
    per geometry, not per overlay; only the CAM changes from one overlay to the next."""
    matrix = np.array(camera_to_display, np.float64).reshape(3, 3)
    quad = _edges_to_display(x, y, size, matrix)
    if np.isfinite(quad).all():
        coverage = np.rint(square_coverage(quad, out_region) * 255).astype(np.uint8)
    else:  # the square crosses the horizon: warp a lit grid (the homography's own answer) instead
        fx, fy, fw, fh = out_region
        shift = np.array([[1.0, 0.0, -fx], [0.0, 1.0, -fy], [0.0, 0.0, 1.0]])
        n = int(min(size, max(fw, fh)))
        coverage = cv2.warpPerspective(np.full((n, n), 255, np.uint8),
                                       shift @ matrix @ grid_to_camera(x, y, size, (n, n)), (fw, fh),
                                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = cv2.compare(coverage, 127, cv2.CMP_GT)
    footprint = _Footprint(coverage, cv2.merge([coverage] * 3), inside, outline_thickness(size, quad))
    for array in (footprint.coverage, footprint.coverage3, footprint.inside):
        array.flags.writeable = False
    return footprint


def render_cam_for_display(cam: np.ndarray, levels: tuple[float, float], cam_box: tuple[float, float, float],
                           region: dict, camera_to_display: np.ndarray, display_size: tuple[int, int], *,
                           max_alpha: float = 0.6, outline: bool = True, luma: bool = False,
                           align=None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Render one (h, w) CAM straight into display pixels (protocol v2).

    ``levels``: the daemon's ``(peak, threshold)`` (``armscope.core.overlay.focus_levels``):
    heat = ``max(cam, 0) / peak``, outline where the CAM is above
    ``threshold``. ``cam_box``: camera pixels (x, y, side) the CAM grid
    covers; ``region``: the square shown (``x``, ``y``, ``size``), inside it.
    Each footprint pixel is mapped through the inverse of ``camera_to_display``
    to CAM coordinates and the CAM sampled there (``warpPerspective`` does
    exactly that, bilinear, the CAM's edge values held outwards as
    ``cv2.resize`` holds them); its level is coloured by one lookup of the
    premultiplied JET table; the outline is traced on the display-space
    mask; then everything is multiplied by the shown square's coverage, so
    heat and outline end at the crop's edge, antialiased, as the warped
    bitmap's do. The coverage depends on the geometry only and is cached
    (:func:`_footprint`). ``luma``/``align`` as for :func:`render_for_display`."""
    x, y, size = region["x"], region["y"], region["size"]
    matrix = camera_to_display @ grid_to_camera(x, y, size, (size, size))
    out_region = overlay_footprint(matrix, (size, size), display_size)
    if out_region is None:  # the overlay misses the display entirely: show black
        out_region = (0, 0, 1, 1) if align is None else align((0, 0, 1, 1))
        return np.zeros((out_region[3], out_region[2]) if luma else (out_region[3], out_region[2], 3),
                        np.uint8), out_region
    if align is not None:
        out_region = tuple(int(v) for v in align(out_region))
    fx, fy, fw, fh = out_region
    footprint = _footprint(x, y, int(size), tuple(float(v) for v in np.asarray(camera_to_display).ravel()),
                           out_region)
    shift = np.array([[1.0, 0.0, -fx], [0.0, 1.0, -fy], [0.0, 0.0, 1.0]])
    cam = np.ascontiguousarray(cam, np.float32)
    bx, by, bsize = cam_box
    to_footprint = shift @ camera_to_display @ grid_to_camera(bx, by, bsize, (cam.shape[1], cam.shape[0]))
    rectified = cam.min() >= 0  # Grad-CAM is: then the heat and the outline sample one warped map
    source = cam if rectified else cv2.merge([np.maximum(cam, 0), cam])
    warped = cv2.warpPerspective(source, to_footprint, (fw, fh),
                                 dst=_buffer("warped", (fh, fw) + source.shape[2:], np.float32),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    heat_raw, outline_raw = (warped, warped) if rectified else cv2.split(warped)
    peak, threshold = levels
    level = _buffer("level", (fh, fw), np.uint8)
    if peak > 0:  # (heat * 255) truncated, as heat_rgba quantises it
        cv2.convertScaleAbs(heat_raw, dst=level, alpha=255.0 / peak, beta=-0.5)
    else:
        level[:] = 0
    table = _jet(float(max_alpha), bool(luma))
    if luma:
        image = cv2.LUT(level, table, dst=_buffer("colour", (fh, fw), np.uint8))
    else:
        image = cv2.applyColorMap(level, table, dst=_buffer("colour", (fh, fw, 3), np.uint8))
    if outline and peak > 0:
        focused = cv2.compare(outline_raw, float(threshold), cv2.CMP_GT, dst=_buffer("focused", (fh, fw), np.uint8))
        cv2.bitwise_and(focused, footprint.inside, dst=focused)
        contours, _ = cv2.findContours(focused, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        white = 255 if luma else (255, 255, 255)
        cv2.drawContours(image, contours, -1, white, footprint.thickness, cv2.LINE_8)
    return cv2.multiply(image, footprint.coverage if luma else footprint.coverage3, scale=1 / 255.0), out_region


def render_cam_for(display: Display, header: dict, maps: np.ndarray, registration: Registration | None,
                   display_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A v2 ``overlay`` message (``header``, its ``protocol.cam_array`` maps) as
    ``display`` wants it: what the bridge does for every overlay."""
    c, region = header["cam"], header["region"]
    box = c["box"]
    return render_cam_for_display(maps[c["index"]], (c["peak"], c["threshold"]), (box["x"], box["y"], box["size"]),
                                  region, camera_to_display_matrix(region, registration, display_size),
                                  display_size, max_alpha=c["max_alpha"], luma=display.luma_input,
                                  align=display.align)
