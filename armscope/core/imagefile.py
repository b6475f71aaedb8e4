"""Whole images only: decoding that refuses a truncated, spliced or half-written file.

Why: OpenCV decodes what it can and returns an image. A JPEG whose tail still
belongs to the previous file (a camera tool rewriting a frame in place), or
one read while it was being written, decodes to a picture made of two
exposures, and the only sign is a libjpeg warning printed on stderr. Such a
frame must never be classified. So, before and while decoding:

* JPEG: the marker structure is walked from SOI to EOI. The file must end at
  its end-of-image marker (bytes after it are another image's tail), every
  segment must fit in the file, and restart markers must count 0..7 in order
  (a jump means two bitstreams were joined).
* PNG: every chunk's CRC is checked and the file must end with IEND.
* Every format: the decoder's own warnings (libjpeg's "Corrupt JPEG data",
  libpng's "libpng warning", OpenCV's codec messages) make the image corrupt.
  libjpeg and libpng print those on file descriptor 2 and OpenCV does not pass
  them on, so during the decode descriptor 2 points at a private file, read
  afterwards. That also keeps them out of the user's terminal; anything else
  written to descriptor 2 in that window (another thread's log line) is passed
  through unchanged.

TIFF and BMP are checked by their decoders only.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np

from armscope.core.errors import ArmscopeError

SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"II*\x00", "TIFF"),
              (b"MM\x00*", "TIFF"), (b"BM", "BMP"))

# Lines the decoders print for damaged data, matched at the start of the line (libjpeg-turbo's
# JWRN_* texts, libpng's prefix, OpenCV's codec log lines), so that another thread's log line
# quoting one is not taken for it. Anything else captured is not ours and is passed on.
_DECODER_LINE = re.compile(
    rb"(Corrupt JPEG data|Premature end of JPEG|Invalid SOS parameters|Inconsistent progression|"
    rb"Unknown Adobe color transform|Warning: unknown JFIF revision|libpng (warning|error)|"
    rb"\[ *(WARN|ERROR)[^\]]*\] global (grfmt_|loadsave|bitstrm))")


class NotAnImage(ArmscopeError):
    """The file is not in an image format the toolkit reads."""


class CorruptImage(ArmscopeError):
    """The file is an image format, but not one whole, undamaged image."""


def image_format(data: bytes) -> str | None:
    for magic, name in SIGNATURES:
        if data[: len(magic)] == magic:
            return name
    return None


def jpeg_problem(data: bytes) -> str | None:
    """None when the JPEG's marker structure is whole, else what is wrong."""
    n = len(data)
    arr = np.frombuffer(data, np.uint8)
    # Every 0xFF followed by a byte that makes it a marker (not stuffing 0x00, not fill 0xFF).
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    nxt = arr[ff + 1]
    is_marker = (nxt != 0x00) & (nxt != 0xFF)
    marks, codes = ff[is_marker], nxt[is_marker]
    pos = 2
    while True:
        if pos + 2 > n:
            return "no end-of-image marker (truncated, or still being written)"
        if data[pos] != 0xFF:
            return f"expected a marker at byte {pos}"
        while pos + 1 < n and data[pos + 1] == 0xFF:   # fill bytes before a marker
            pos += 1
        code = data[pos + 1]
        if code == 0xD9:
            if pos + 2 != n:
                return f"{n - pos - 2} bytes after the end-of-image marker (another image's tail?)"
            return None
        if 0xD0 <= code <= 0xD7 or code == 0x01:
            pos += 2
            continue
        if pos + 4 > n:
            return "no end-of-image marker (truncated, or still being written)"
        length = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 2 + length
        if length < 2 or end > n:
            return f"marker 0x{code:02X} at byte {pos} runs past the end of the file (truncated)"
        if code != 0xDA:
            pos = end
            continue
        # Start of scan: entropy-coded data up to the next marker that is not a restart.
        k = int(np.searchsorted(marks, end))
        expected = 0
        while k < len(marks) and 0xD0 <= codes[k] <= 0xD7:
            if codes[k] != 0xD0 + expected:
                return (f"restart marker RST{codes[k] - 0xD0} at byte {marks[k]} where RST{expected} was due "
                        "(data from two images?)")
            expected = (expected + 1) % 8
            k += 1
        if k == len(marks):
            return "no end-of-image marker (truncated, or still being written)"
        pos = int(marks[k])


def png_problem(data: bytes) -> str | None:
    """None when every PNG chunk is whole with a valid CRC and the file ends at IEND."""
    n, pos = len(data), 8
    while True:
        if pos + 8 > n:
            return "no IEND chunk (truncated, or still being written)"
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            return f"chunk {kind.decode('latin-1')!r} at byte {pos} runs past the end of the file (truncated)"
        if zlib.crc32(data[pos + 4 : pos + 8 + length]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"chunk {kind.decode('latin-1')!r} at byte {pos} has a bad CRC (damaged or spliced)"
        if kind == b"IEND":
            return None if end == n else f"{n - end} bytes after the IEND chunk (another image's tail?)"
        pos = end


_capture_lock = threading.Lock()
_capture_file = None


def _decode_capturing_stderr(data: np.ndarray, flags: int = cv2.IMREAD_COLOR) -> tuple[np.ndarray | None, list[str]]:
    """cv2.imdecode with descriptor 2 redirected; returns the image and the decoder's warning lines."""
    global _capture_file
    with _capture_lock:
        try:
            saved = os.dup(2)
        except OSError:                   # no stderr at all: nothing to capture, nothing to hide
            return cv2.imdecode(data, flags), []
        try:
            if _capture_file is None:
                _capture_file = tempfile.TemporaryFile()
            _capture_file.seek(0)
            _capture_file.truncate()
            for stream in (sys.stderr, sys.__stderr__):
                if stream is not None:
                    try:
                        stream.flush()
                    except (OSError, ValueError):
                        pass
            os.dup2(_capture_file.fileno(), 2)
            try:
                image = cv2.imdecode(data, flags)
            finally:
                os.dup2(saved, 2)
            _capture_file.seek(0)
            captured = _capture_file.read()
        finally:
            os.close(saved)
    ours, others = [], []
    for line in captured.splitlines(keepends=True):
        (ours if _DECODER_LINE.match(line.lstrip()) else others).append(line)
    if others:
        try:
            os.write(2, b"".join(others))
        except OSError:
            pass
    return image, [line.decode("utf-8", "replace").strip() for line in ours]


def decode_image(data: bytes, name: str, unchanged: bool = False) -> np.ndarray:
    """Decode one image file's bytes to BGR uint8, or raise NotAnImage/CorruptImage naming ``name``.
    ``unchanged``: as stored (greyscale stays (H, W), 16-bit stays uint16, alpha is kept), for
    ``armscope.core.preprocess.read_frame``, which converts it as the bundle's manifest says."""
    kind = image_format(data)
    if kind is None:
        what = "an empty file (0 bytes)" if not data else "not a readable image"
        raise NotAnImage(f"{name}: {what} (expected PNG, JPEG, TIFF or BMP)")
    problem = jpeg_problem(data) if kind == "JPEG" else png_problem(data) if kind == "PNG" else None
    if problem is None:
        flags = cv2.IMREAD_UNCHANGED if unchanged else cv2.IMREAD_COLOR
        image, warnings = _decode_capturing_stderr(np.frombuffer(data, np.uint8), flags)
        if warnings:
            problem = "; ".join(warnings)
        elif image is None:
            problem = "the decoder could not read it"
    if problem is not None:
        raise CorruptImage(f"{name}: corrupt {kind}: {problem}")
    if unchanged:
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)) or \
                image.dtype not in (np.uint8, np.uint16):
            raise CorruptImage(f"{name}: {kind} decoded to {image.dtype} {image.shape}; expected an 8- or 16-bit "
                               "greyscale or colour image")
        return image
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CorruptImage(f"{name}: {kind} did not decode to a BGR uint8 image")
    return image


def read_file_bytes(path: str | Path) -> bytes:
    """A file's bytes, or ArmscopeError naming it (missing, a directory, unreadable)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArmscopeError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ArmscopeError(f"{path}: a directory, not an image file") from None
    except OSError as exc:
        raise ArmscopeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return data


def read_image_file(path: str | Path) -> np.ndarray:
    """Read and strictly decode an image file; raises ArmscopeError subclasses naming the file."""
    return decode_image(read_file_bytes(path), str(path))
