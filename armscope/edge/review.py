"""Explanations a clinician reads away from the microscope (``armscope classify``):
the Grad-CAM and the saliency map over the ORIGINAL image at its own resolution,
with the decision and its probability written in a caption band above the image
(never over the anatomy), and a contact sheet: one PNG for many images.

Why these choices:
* The model saw a padded, resized square (``armscope.core.preprocess``); the maps are
  put back through the same box, so a map pixel lands on the image pixel it
  explains, and the padding is cut away again.
* Small images (a 64 x 64 MR crop, a 256 x 256 slice) are enlarged by a whole
  factor with nearest-neighbour, so every original pixel stays one visible block
  and the caption fits; the caption says the factor.
* Grad-CAM is coarse (the pooled map, 5 x 5 to 12 x 12 cells): JET colours with
  the AI-focused outline, as on the eyepiece (``armscope.core.overlay.heat_rgba``).
  Saliency is pixel-fine and heavy-tailed: it is scaled to its 99.5th percentile
  (a handful of extreme pixels would otherwise leave the rest black) and drawn in
  a "hot" ramp whose opacity rises with the value, so the image stays readable
  where the gradient is small.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from armscope.core.overlay import heat_rgba

MIN_SIDE = 512       # enlarge smaller images by a whole factor up to at least this
MAX_ZOOM = 16
FONT = cv2.FONT_HERSHEY_SIMPLEX
SALIENCY_PERCENTILE = 99.5


def zoom_factor(shape: tuple[int, ...]) -> int:
    side = max(shape[:2])
    return 1 if side >= MIN_SIDE else min(MAX_ZOOM, math.ceil(MIN_SIDE / side))


def _box_heat(rgba_box: np.ndarray, frame_shape, box: tuple[int, int, int], zoom: int) -> np.ndarray:
    """The part of a box-sized RGBA map that lies over the (zoomed) frame, frame-sized
    (zero where the box does not reach: the centre crop of a microscope field)."""
    h, w = frame_shape[0] * zoom, frame_shape[1] * zoom
    top, left = box[0] * zoom, box[1] * zoom
    out = np.zeros((h, w, 4), np.uint8)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + rgba_box.shape[0], h), min(left + rgba_box.shape[1], w)
    out[y0:y1, x0:x1] = rgba_box[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def saliency_rgba(saliency: np.ndarray, size: int, max_alpha: float = 0.85) -> np.ndarray:
    """RGBA uint8 (size, size, 4) of one (S, S) saliency map: 'hot' ramp, opacity rising with it."""
    sal = np.abs(saliency.astype(np.float32))
    top = float(np.percentile(sal, SALIENCY_PERCENTILE))
    norm = np.clip(sal / top, 0.0, 1.0) if top > 0 else np.zeros_like(sal)
    norm = cv2.resize(norm, (size, size), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_HOT), cv2.COLOR_BGR2RGB)
    alpha = (np.sqrt(norm) * max_alpha * 255).astype(np.uint8)
    return np.dstack([rgb, alpha])


def _blend(base_bgr: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return (base_bgr.astype(np.float32) * (1 - alpha) + rgba[..., 2::-1].astype(np.float32) * alpha).astype(np.uint8)


def _fit_scale(text: str, width: int, wanted: float, thickness: int) -> float:
    scale = wanted
    while scale > 0.3:
        (tw, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
        if tw <= width:
            break
        scale *= 0.9
    return scale


def caption_band(width: int, lines: list[tuple[str, tuple[int, int, int]]], ramp: str | None = None) -> np.ndarray:
    """A dark band, ``width`` wide, with one line of text per (text, BGR colour); the
    first line large (the decision). ``ramp``: 'jet' or 'hot' draws the colour scale
    (low -> high) at the right of the first line."""
    base = max(0.55, min(1.3, width / 700))
    ramp_w = int(width * 0.22) if ramp else 0
    heights, rendered = [], []
    for k, (text, colour) in enumerate(lines):
        thick = 2 if k == 0 else 1
        avail = width - 24 - (ramp_w + 16 if k == 0 else 0)
        scale = _fit_scale(text, avail, base * (1.0 if k == 0 else 0.62), thick)
        (_, th), baseline = cv2.getTextSize(text, FONT, scale, thick)
        rendered.append((text, colour, scale, thick, th, baseline))
        heights.append(th + baseline + int(10 * base))
    band = np.full((sum(heights) + int(12 * base), width, 3), 24, np.uint8)
    y = int(8 * base)
    for (text, colour, scale, thick, th, baseline), hgt in zip(rendered, heights):
        cv2.putText(band, text, (12, y + th), FONT, scale, colour, thick, cv2.LINE_AA)
        y += hgt
    if ramp:
        th0 = rendered[0][4]
        x0, x1 = width - ramp_w - 12, width - 12
        y0, y1 = int(8 * base) + th0 // 4, int(8 * base) + th0
        grad = np.tile(np.linspace(0, 255, x1 - x0).astype(np.uint8), (max(y1 - y0, 2), 1))
        band[y0:y0 + grad.shape[0], x0:x1] = cv2.applyColorMap(
            grad, cv2.COLORMAP_JET if ramp == "jet" else cv2.COLORMAP_HOT)
        small = base * 0.45
        cv2.putText(band, "low", (x0, y1 + int(16 * base)), FONT, small, (200, 200, 200), 1, cv2.LINE_AA)
        (tw, _), _ = cv2.getTextSize("high", FONT, small, 1)
        cv2.putText(band, "high", (x1 - tw, y1 + int(16 * base)), FONT, small, (200, 200, 200), 1, cv2.LINE_AA)
    return band


def explanation_panel(frame_bgr: np.ndarray, box: tuple[int, int, int], kind: str, heat: np.ndarray
                      ) -> tuple[np.ndarray, int]:
    """The original image (enlarged by a whole factor when small) with ``kind``
    ('Grad-CAM' or 'saliency') over it, and the factor."""
    zoom = zoom_factor(frame_bgr.shape)
    base = frame_bgr if zoom == 1 else cv2.resize(frame_bgr, None, fx=zoom, fy=zoom,
                                                  interpolation=cv2.INTER_NEAREST)
    size = box[2] * zoom
    rgba = saliency_rgba(heat, size) if kind == "saliency" else heat_rgba(heat, size, outline=True)
    return _blend(base, _box_heat(rgba, frame_bgr.shape, box, zoom)), zoom


def decision_colour(positive: bool) -> tuple[int, int, int]:
    return (80, 80, 255) if positive else (140, 230, 140)


def explanation_image(frame_bgr: np.ndarray, box: tuple[int, int, int], kind: str, heat: np.ndarray,
                      headline: str, detail: str, positive: bool) -> np.ndarray:
    """``explanation_panel`` with a caption band on top: ``headline`` (the decision
    and probability), ``detail`` (what the map is, the file) and the colour scale."""
    shown, zoom = explanation_panel(frame_bgr, box, kind, heat)
    zoom_note = f"; shown x{zoom}" if zoom > 1 else ""
    band = caption_band(shown.shape[1], [(headline, decision_colour(positive)), (detail + zoom_note, (225, 225, 225))],
                        "hot" if kind == "saliency" else "jet")
    return np.vstack([band, shown])


def greyed(frame_bgr: np.ndarray | None) -> np.ndarray:
    """An image without a decision, darkened (or a grey square when it could not be read)."""
    if frame_bgr is None:
        return np.full((MIN_SIDE, MIN_SIDE, 3), 60, np.uint8)
    zoom = zoom_factor(frame_bgr.shape)
    shown = cv2.resize(frame_bgr, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    return (shown.astype(np.float32) * 0.45).astype(np.uint8)


def _label_corner(panel: np.ndarray, text: str, scale: float) -> np.ndarray:
    out = panel.copy()
    (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
    cv2.rectangle(out, (0, 0), (tw + 12, th + base + 10), (24, 24, 24), -1)
    cv2.putText(out, text, (6, th + 5), FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def contact_sheet(cells: list[dict], panel_width: int = 340, title: str = "") -> np.ndarray:
    """One PNG for many images. Each cell: {"title": file name, "headline": decision
    text, "colour": BGR, "panels": [(label, image), ...]}; the panels (e.g. Grad-CAM
    and saliency) side by side, each scaled to ``panel_width`` and labelled in its
    corner, under a caption rendered at the sheet's own scale (legible, not shrunk)."""
    panels_per_cell = max(len(c["panels"]) for c in cells)
    cell_width = panels_per_cell * panel_width + (panels_per_cell - 1) * 6
    rendered = []
    for cell in cells:
        scaled = []
        for label, image in cell["panels"]:
            h = max(1, round(image.shape[0] * panel_width / image.shape[1]))
            scaled.append(_label_corner(cv2.resize(image, (panel_width, h), interpolation=cv2.INTER_AREA),
                                        label, 0.5))
        height = max(s.shape[0] for s in scaled)
        row = np.zeros((height, cell_width, 3), np.uint8)
        for k, s in enumerate(scaled):
            row[:s.shape[0], k * (panel_width + 6):k * (panel_width + 6) + panel_width] = s
        band = caption_band(cell_width, [(cell["headline"], cell["colour"]), (cell["title"], (225, 225, 225))])
        rendered.append(np.vstack([band, row]))
    columns = max(1, min(len(rendered), 2400 // (cell_width + 16)))
    rows = []
    for start in range(0, len(rendered), columns):
        group = rendered[start:start + columns]
        height = max(r.shape[0] for r in group)
        padded = [np.pad(r, ((0, height - r.shape[0]), (0, 0), (0, 0))) for r in group]
        padded += [np.full((height, cell_width, 3), 255, np.uint8)] * (columns - len(group))
        line = padded[0]
        for p in padded[1:]:
            line = np.hstack([line, np.full((height, 16, 3), 255, np.uint8), p])
        rows.append(line)
    sheet = rows[0]
    for r in rows[1:]:
        sheet = np.vstack([sheet, np.full((16, sheet.shape[1], 3), 255, np.uint8), r])
    if title:
        sheet = np.vstack([caption_band(sheet.shape[1], [(title, (255, 255, 255))]), sheet])
    return sheet
