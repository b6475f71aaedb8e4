"""The paper's frame preprocessing, shared by training, export checks,
calibration and the daemon (one function, so they can never drift apart).

camera frame (BGR uint8, any size >= crop) -> centre crop (1024 x 1024) ->
resize to 640 x 640 -> RGB float32 in 0..255. Scaling to the network's range
happens inside the graph, so the host never needs to know it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from armscope.errors import ArmscopeError
from armscope.imagefile import read_image_file

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """What the manifest's ``preprocessing`` block says, as a value."""

    center_crop: int = 1024
    resize: int = 640
    interpolation: str = "area"
    channel_order: str = "RGB"

    @classmethod
    def from_manifest(cls, block: dict) -> "Preprocessing":
        return cls(
            center_crop=int(block["center_crop"]),
            resize=int(block["resize"]),
            interpolation=str(block["interpolation"]),
            channel_order=str(block["channel_order"]),
        )

    def to_manifest(self) -> dict:
        return {
            "center_crop": self.center_crop,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "channel_order": self.channel_order,
            "layout": "NHWC",
            "dtype": "float32",
            "value_range": [0.0, 255.0],
            "note": "scaling to the network's input range is inside the graph",
        }


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as BGR uint8 (H, W, 3), or raise naming the file. Decoding is
    strict (``armscope.imagefile``): a truncated, spliced or damaged file raises
    ``CorruptImage`` instead of returning a picture made of two images."""
    return read_image_file(path)


def preprocess_frame(frame_bgr: np.ndarray, spec: Preprocessing, source: str = "frame") -> np.ndarray:
    """Centre-crop, resize and convert one BGR frame to the model input (H, W, 3) float32 RGB."""
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
        raise ArmscopeError(f"{source}: expected a BGR uint8 image (H, W, 3), got {frame_bgr.dtype} {frame_bgr.shape}")
    h, w = frame_bgr.shape[:2]
    c = spec.center_crop
    if h < c or w < c:
        raise ArmscopeError(
            f"{source}: image is {w}x{h}, smaller than the {c}x{c} centre crop the bundle expects"
        )
    top, left = (h - c) // 2, (w - c) // 2
    crop = frame_bgr[top : top + c, left : left + c]
    resized = cv2.resize(crop, (spec.resize, spec.resize), interpolation=INTERPOLATIONS[spec.interpolation])
    if spec.channel_order == "RGB":
        resized = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    return resized.astype(np.float32)


def crop_box(frame_shape: tuple[int, ...], spec: Preprocessing) -> tuple[int, int, int]:
    """(top, left, size) of the centre crop in frame pixels: where overlays go back."""
    h, w = frame_shape[:2]
    c = spec.center_crop
    return (h - c) // 2, (w - c) // 2, c
