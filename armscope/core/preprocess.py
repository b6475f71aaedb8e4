"""The paper's frame preprocessing, shared by training, export checks,
calibration and the daemon (one function, so they can never drift apart).

camera frame (BGR uint8, any size >= crop) -> centre crop (1024 x 1024) ->
resize to 640 x 640 -> RGB float32 in 0..255. Scaling to the network's range
happens inside the graph, so the host never needs to know it.

Whole-image models (an MRI slice classifier) take ``center_crop`` 0: the whole
image, padded with black to a square, then resized. Files that are not 8-bit
colour pictures (greyscale and 16-bit PNG/TIFF, DICOM slices) become that BGR
uint8 frame in ``read_frame``, as the manifest's ``preprocessing.input`` block
says the model was trained (``InputSpec``): window/level or min/max or a fixed
scale for more than 8 bits, grey replicated to three channels. Every reader of
image files (classify, calibration-set, accuracy) goes through ``read_frame``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.core.imagefile import decode_image, image_format, read_file_bytes, read_image_file

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


BIT_DEPTH_HANDLING = ("window", "minmax", "scale")


@dataclass(frozen=True)
class InputSpec:
    """How an image file becomes the 8-bit frame the model was trained on
    (manifest ``preprocessing.input``). ``kind`` grey: colour files are turned
    grey and every grey image is replicated to ``replicate_channels`` channels,
    as the TSC study fed InceptionV3. More than 8 bits (16-bit PNG/TIFF, DICOM):
    ``window`` maps [centre - width/2, centre + width/2] to 0..255 (DICOM's linear
    VOI function) with ``window`` = (centre, width), or the DICOM file's own window
    when None, else the image's min..max; ``minmax`` always the image's min..max;
    ``scale`` the full range of the stored bits (x / (2^bits - 1)). 8-bit data are
    used as stored."""

    kind: str = "rgb"
    bit_depth_handling: str = "window"
    window: tuple[float, float] | None = None
    replicate_channels: int = 3

    @classmethod
    def from_manifest(cls, block: dict) -> "InputSpec":
        window = block.get("window")
        return cls(kind=str(block.get("kind", "rgb")),
                   bit_depth_handling=str(block.get("bit_depth_handling", "window")),
                   window=None if window is None else (float(window[0]), float(window[1])),
                   replicate_channels=int(block.get("replicate_channels", 3)))

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "bit_depth_handling": self.bit_depth_handling,
                "window": None if self.window is None else [float(v) for v in self.window],
                "replicate_channels": self.replicate_channels,
                "note": ("8-bit files as stored; more than 8 bits (16-bit PNG/TIFF, DICOM after its rescale "
                         "slope/intercept): " + _HANDLING_NOTES[self.bit_depth_handling]
                         + "; DICOM MONOCHROME1 inverted; "
                         + ("colour turned grey, " if self.kind == "grey" else "")
                         + f"grey replicated to {self.replicate_channels} channels (armscope.core.preprocess.read_frame)")}


_HANDLING_NOTES = {
    "window": "window [c - w/2, c + w/2] -> 0..255 (DICOM linear VOI), the window given, else the DICOM file's, "
              "else the image's min..max",
    "minmax": "the image's min..max -> 0..255",
    "scale": "x / (2^bits stored - 1) * 255",
}


def parse_window(text: str, option: str = "--window") -> tuple[float, float]:
    """'C,W' -> (centre, width) with width > 0, or ArmscopeError naming the option."""
    try:
        centre, width = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ArmscopeError(f"{option} {text!r}: expected CENTRE,WIDTH, e.g. 600,1600") from None
    if not (np.isfinite(centre) and np.isfinite(width)) or width <= 0:
        raise ArmscopeError(f"{option} {text!r}: expected a finite centre and a width above 0")
    return centre, width


@dataclass(frozen=True)
class Preprocessing:
    """What the manifest's ``preprocessing`` block says, as a value. ``center_crop``
    0: no crop, the whole image padded with black to a square. ``input`` None:
    camera frames and 8-bit colour files as they always were."""

    center_crop: int = 1024
    resize: int = 640
    interpolation: str = "area"
    channel_order: str = "RGB"
    input: InputSpec | None = None

    @classmethod
    def from_manifest(cls, block: dict) -> "Preprocessing":
        return cls(
            center_crop=int(block["center_crop"]),
            resize=int(block["resize"]),
            interpolation=str(block["interpolation"]),
            channel_order=str(block["channel_order"]),
            input=InputSpec.from_manifest(block["input"]) if block.get("input") is not None else None,
        )

    def to_manifest(self) -> dict:
        block = {
            "center_crop": self.center_crop,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "channel_order": self.channel_order,
            "layout": "NHWC",
            "dtype": "float32",
            "value_range": [0.0, 255.0],
            "note": "scaling to the network's input range is inside the graph",
        }
        if self.center_crop == 0:
            block["crop_note"] = "center_crop 0: the whole image, padded with black to a square, resized to resize"
        if self.input is not None:
            block["input"] = self.input.to_manifest()
        return block


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# what read_frame reads from a folder (classify, calibration-set, accuracy); the daemon's
# dir:// source reads camera-like pictures only (IMAGE_SUFFIXES)
FILE_SUFFIXES = IMAGE_SUFFIXES + (".dcm", ".dicom")


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as BGR uint8 (H, W, 3), or raise naming the file. Decoding is
    strict (``armscope.core.imagefile``): a truncated, spliced or damaged file raises
    ``CorruptImage`` instead of returning a picture made of two images."""
    return read_image_file(path)


def preprocess_frame(frame_bgr: np.ndarray, spec: Preprocessing, source: str = "frame") -> np.ndarray:
    """Centre-crop (or pad to a square), resize and convert one BGR frame to the model
    input (H, W, 3) float32 RGB; grey models see the frame's grey replicated."""
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
        raise ArmscopeError(f"{source}: expected a BGR uint8 image (H, W, 3), got {frame_bgr.dtype} {frame_bgr.shape}")
    if spec.input is not None and spec.input.kind == "grey":
        frame_bgr = cv2.cvtColor(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    h, w = frame_bgr.shape[:2]
    c = spec.center_crop
    if c == 0:
        top, left, size = crop_box(frame_bgr.shape, spec)
        crop = cv2.copyMakeBorder(frame_bgr, -top, size - h + top, -left, size - w + left, cv2.BORDER_CONSTANT,
                                  value=(0, 0, 0))
    elif h < c or w < c:
        raise ArmscopeError(
            f"{source}: image is {w}x{h}, smaller than the {c}x{c} centre crop the bundle expects"
        )
    else:
        top, left = (h - c) // 2, (w - c) // 2
        crop = frame_bgr[top : top + c, left : left + c]
    resized = cv2.resize(crop, (spec.resize, spec.resize), interpolation=INTERPOLATIONS[spec.interpolation])
    if spec.channel_order == "RGB":
        resized = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    return resized.astype(np.float32)


def crop_box(frame_shape: tuple[int, ...], spec: Preprocessing) -> tuple[int, int, int]:
    """(top, left, size) of the centre crop in frame pixels: where overlays go back.
    With ``center_crop`` 0 it is the padded square around the whole image, so top or
    left is negative (the padding) and the box extends past the frame."""
    h, w = frame_shape[:2]
    c = spec.center_crop
    if c == 0:
        size = max(h, w)
        return -((size - h) // 2), -((size - w) // 2), size
    return (h - c) // 2, (w - c) // 2, c


def gate_region(frame_bgr: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """The pixels the tissue gate measures: the centre crop, or the whole image."""
    top, left, size = crop_box(frame_bgr.shape, spec)
    return frame_bgr[max(top, 0): top + size, max(left, 0): left + size]


def read_frame(path: str | Path, spec: Preprocessing, window: tuple[float, float] | None = None
               ) -> tuple[np.ndarray, dict]:
    """An image file as the BGR uint8 frame the model was trained on, at the file's
    own resolution, and how it was converted ({"format", "bit_depth", "conversion"}).
    PNG/JPEG/TIFF/BMP are decoded strictly (``armscope.core.imagefile``), DICOM by
    ``armscope.core.dicomfile``; ``window`` (centre, width) overrides the manifest's and
    the file's. Raises ArmscopeError (NotAnImage, CorruptImage) naming the file."""
    path = Path(path)
    data = read_file_bytes(path)
    kind = image_format(data)
    handling = spec.input or InputSpec()
    if kind is None or data[128:132] == b"DICM":  # a DICOM preamble may itself look like a TIFF header
        from armscope.core.dicomfile import looks_like_dicom, read_dicom

        if looks_like_dicom(path, data[:132]):
            dicom = read_dicom(path)
            if dicom.pixels.ndim == 3:
                frame = dicom.pixels
                info = {"format": "DICOM", "bit_depth": dicom.bits_stored, "conversion": "RGB as stored"}
            else:
                grey, how = to_8bit(dicom.pixels, handling, window, dicom.window, dicom.bits_stored)
                if dicom.photometric == "MONOCHROME1":
                    grey, how = 255 - grey, how + ", MONOCHROME1 inverted"
                frame = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
                info = {"format": "DICOM", "bit_depth": dicom.bits_stored, "conversion": how}
            return _as_kind(frame, handling), info
    if spec.input is None and window is None:  # camera frames and colour pictures, as always
        return decode_image(data, str(path)), {"format": kind, "bit_depth": 8, "conversion": "as stored"}
    raw = decode_image(data, str(path), unchanged=True)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = cv2.cvtColor(raw, cv2.COLOR_BGRA2BGR)
    bits = 16 if raw.dtype == np.uint16 else 8
    if raw.ndim == 3 and (bits == 8 or handling.kind != "grey"):
        frame = raw if bits == 8 else np.clip(np.rint(raw / 257.0), 0, 255).astype(np.uint8)
        info = {"format": kind, "bit_depth": bits, "conversion": "as stored" if bits == 8 else "16 -> 8 bits (x/257)"}
        return _as_kind(frame, handling), info
    if raw.ndim == 3:  # 16-bit colour for a grey model: grey first, then the bit-depth handling
        raw = cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY)
    if bits == 8:
        grey, how = raw, "as stored"
    else:
        grey, how = to_8bit(raw.astype(np.float64), handling, window, None, bits)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), {"format": kind, "bit_depth": bits, "conversion": how}


def _as_kind(frame_bgr: np.ndarray, handling: InputSpec) -> np.ndarray:
    if handling.kind == "grey":
        return cv2.cvtColor(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return frame_bgr


def to_8bit(values: np.ndarray, handling: InputSpec, window: tuple[float, float] | None,
            file_window: tuple[float, float] | None, bits: int) -> tuple[np.ndarray, str]:
    """(H, W) values of more than 8 bits -> uint8 (H, W) as ``handling`` says, and how."""
    values = values.astype(np.float64)
    mode = handling.bit_depth_handling
    if mode == "scale":
        out, how = values * 255.0 / float(2 ** bits - 1), f"scale x/{2 ** bits - 1}"
    else:
        chosen, source = None, ""
        if mode == "window":
            for candidate, source in ((window, "given"), (handling.window, "the bundle's"), (file_window, "the file's")):
                if candidate is not None:
                    chosen = candidate
                    break
        if chosen is not None:
            c, w = chosen
            if w <= 1:
                out = np.where(values > c - 0.5, 255.0, 0.0)
            else:
                out = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
            how = f"window {c:g}/{w:g} ({source})"
        else:
            lo, hi = float(values.min()), float(values.max())
            out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
            how = f"min/max {lo:g}..{hi:g}"
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), how
