"""Grad-CAM overlays: the heat map over the field the pathologist sees, and
the outline of the AI-focused region (cells above the median CAM value, as in
the paper). A CAM is one (H, W) map of any size, upsampled to the overlay. ``heat_rgba`` is what the eyepiece shows (transparent where cold);
``blend_on_frame`` is what ``classify`` writes for review."""
from __future__ import annotations

import cv2
import numpy as np


def normalise(cam: np.ndarray) -> np.ndarray:
    """Scale one (H, W) CAM to 0..1; an all-zero CAM stays zero (nothing to highlight)."""
    cam = np.maximum(cam.astype(np.float32), 0.0)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


def focus_mask(cam: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the AI-focused region: CAM strictly above its median."""
    return cam > np.median(cam)


def focus_contours(cam: np.ndarray, size: int) -> list[np.ndarray]:
    """Outline of the focused region: the CAM upsampled (bilinear, like the heat map)
    to ``size`` pixels and cut at the median of its cells (20x20 for the tiled
    model, 8x8 for InceptionV3 at 299: any H x W), so the outline follows the
    heat map instead of the cell grid."""
    smooth = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    mask = (smooth > np.median(cam)).astype(np.uint8) * 255
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def heat_rgba(cam: np.ndarray, size: int, max_alpha: float = 0.6, outline: bool = True) -> np.ndarray:
    """RGBA uint8 (size, size, 4): JET colours, alpha rising with the CAM, outline opaque."""
    heat = cv2.resize(normalise(cam), (size, size), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (heat * max_alpha * 255).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    if outline:
        cv2.drawContours(rgba, focus_contours(cam, size), -1, (255, 255, 255, 255), max(2, size // 256))
    return rgba


def focus_levels(cam: np.ndarray) -> tuple[float, float]:
    """``(peak, threshold)`` of one CAM, as ``heat_rgba`` uses them: the heat
    is ``max(cam, 0) / peak`` and the outline is where the (interpolated) CAM
    is above ``threshold``, the median of its cells. The daemon sends them with
    the CAM (protocol v2), so a subscriber renders exactly what it decided."""
    cam = np.asarray(cam, np.float32)
    return max(float(cam.max()), 0.0), float(np.median(cam))


def premultiplied_jet(max_alpha: float = 0.6) -> np.ndarray:
    """(256, 1, 3) uint8 RGB lookup table: heat level k (0..255) -> the JET colour
    of ``heat_rgba`` times its alpha (``k * max_alpha``), i.e. the overlay
    premultiplied, which over black is what an additive display emits. One
    ``cv2.applyColorMap`` with it colours a whole heat image in display space."""
    levels = np.arange(256, dtype=np.uint8)[:, None]
    rgb = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = np.floor(levels.astype(np.float32) * float(max_alpha)) / 255.0
    return np.clip(np.rint(rgb * alpha[..., None]), 0, 255).astype(np.uint8).reshape(256, 1, 3)


def blend_on_frame(frame_bgr: np.ndarray, cam: np.ndarray, box: tuple[int, int, int], label: str) -> np.ndarray:
    """A copy of the camera frame with the overlay blended into the crop box and a label."""
    top, left, size = box
    out = frame_bgr.copy()
    rgba = heat_rgba(cam, size)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    heat_bgr = rgba[..., 2::-1].astype(np.float32)
    region = out[top : top + size, left : left + size].astype(np.float32)
    out[top : top + size, left : left + size] = (region * (1 - alpha) + heat_bgr * alpha).astype(np.uint8)
    cv2.rectangle(out, (left, top), (left + size - 1, top + size - 1), (255, 255, 255), 2)
    scale = max(0.6, size / 1024)
    cv2.putText(out, label, (left + 12, top + int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (0, 0, 0), int(6 * scale), cv2.LINE_AA)
    cv2.putText(out, label, (left + 12, top + int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (255, 255, 255), int(2 * scale), cv2.LINE_AA)
    return out
