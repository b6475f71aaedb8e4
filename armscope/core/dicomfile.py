"""DICOM slices as pixel arrays, for the MRI users who export slices from a
scanner or PACS rather than screenshots.

Why its own module: pydicom is imported only when a DICOM file is actually read
(the daemon and microscope users never pay for it), and every way a DICOM file
can fail (not DICOM, truncated pixel data, a compressed transfer syntax without
a decoder installed, several frames, no pixel data at all) becomes one
ArmscopeError naming the file, never a pydicom traceback.

What is read: the stored values with the modality rescale applied
(``RescaleSlope``/``RescaleIntercept``: the values the window refers to), the
file's own window (``WindowCenter``/``WindowWidth``, the first pair when there
are several), the photometric interpretation (MONOCHROME1 shows low values
white), and the bits stored. Windowing itself is ``armscope.core.preprocess``'s.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.core.imagefile import CorruptImage, NotAnImage

DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class DicomSlice:
    pixels: np.ndarray                  # (H, W) float64 after rescale, or (H, W, 3) uint8 BGR for colour
    window: tuple[float, float] | None  # the file's (centre, width), if it has one
    photometric: str
    bits_stored: int
    modality: str


def looks_like_dicom(path: Path, head: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; older files
    without it are recognised by their suffix."""
    return head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def read_dicom(path: str | Path) -> DicomSlice:
    """One single-frame DICOM image, or ArmscopeError naming the file and what is wrong."""
    path = Path(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # a base dependency; only a broken install lacks it
        raise ArmscopeError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), force=path.suffix.lower() in DICOM_SUFFIXES)
    except FileNotFoundError:
        raise ArmscopeError(f"{path}: no such image file") from None
    except InvalidDicomError as exc:
        raise NotAnImage(f"{path}: not a readable DICOM file ({exc})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptImage(f"{path}: corrupt DICOM: {type(exc).__name__}: {str(exc)[:160]}") from None
    if "PixelData" not in ds:
        raise NotAnImage(f"{path}: a DICOM file without pixel data ({ds.get('Modality', 'no modality')} "
                         f"{ds.get('SOPClassUID', '')}); expected an image slice")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ArmscopeError(f"{path}: a multi-frame DICOM ({frames} frames); expected one slice per file "
                            "(export the slices you want classified as single-frame files)")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = getattr(syntax, "name", str(syntax))
        raise ArmscopeError(f"{path}: DICOM pixel data in {name} cannot be decoded here ({' '.join(str(exc).split())[:120]}); "
                            "install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) or "
                            "export the slice uncompressed") from None
    except (ValueError, OSError, EOFError, AttributeError, KeyError, TypeError) as exc:
        raise CorruptImage(f"{path}: corrupt DICOM pixel data: {str(exc)[:160]}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    bits = int(ds.get("BitsStored", 8 * array.dtype.itemsize) or 8)
    modality = str(ds.get("Modality", ""))
    if array.ndim == 3 and array.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            array = convert_color_space(array, photometric, "RGB")
        rgb = array if array.dtype == np.uint8 else _to_uint8(array, bits)
        return DicomSlice(np.ascontiguousarray(rgb[..., ::-1]), None, photometric, bits, modality)
    if array.ndim != 2:
        raise ArmscopeError(f"{path}: DICOM pixel array of shape {array.shape}; expected one greyscale or RGB slice")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ArmscopeError(f"{path}: DICOM photometric interpretation {photometric}; expected MONOCHROME1/2 or RGB")
    slope = _first(ds.get("RescaleSlope")) or 1.0
    intercept = _first(ds.get("RescaleIntercept")) or 0.0
    pixels = array.astype(np.float64) * slope + intercept
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    window = (centre, width) if centre is not None and width is not None and width > 0 else None
    return DicomSlice(pixels, window, photometric, bits, modality)


def _to_uint8(array: np.ndarray, bits: int) -> np.ndarray:
    top = float(2 ** bits - 1)
    return np.clip(np.rint(array.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)
