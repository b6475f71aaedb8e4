"""``png://DIR``: numbered PNGs of what the display would emit.

Why this module exists
----------------------
A developer's laptop has no eyepiece: ``png://`` writes what the display
would show, frame by frame (``blank`` writes a black frame), so the bridge's
whole path runs and can be checked in tests and the demo. With ``format`` the
image goes through that pixel format and back, so quantisation and 1-bit
thresholds are visible. Needs nothing beyond the base install.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from armscope.core.errors import cannot_create

from ..pixel_formats import PixelFormat
from .base import DisplayURIError, Region, _PictureDisplay


_PNG_NAME = re.compile(r"(\d{6,})_(?:frame|blank)\.png")


def numbered_pngs(directory: "str | os.PathLike") -> list[Path]:
    """The ``NNNNNN_frame.png`` / ``NNNNNN_blank.png`` files a ``PngDisplay`` wrote in ``directory``, in order."""
    d = Path(directory)
    found = [f for f in d.iterdir() if _PNG_NAME.fullmatch(f.name)] if d.is_dir() else []
    return sorted(found, key=lambda f: int(_PNG_NAME.fullmatch(f.name).group(1)))


class PngDisplay(_PictureDisplay):
    """Numbered PNGs of what the display would emit (black = off)."""

    def __init__(
        self,
        directory: "str | os.PathLike",
        *,
        width: int | None = None,
        height: int | None = None,
        fmt: "PixelFormat | str | None" = None,
        brightness: float = 1.0,
        gamma: float = 1.0,
        dither: bool = False,
    ):
        self._set_picture(width, height, fmt, brightness, gamma, dither)
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise DisplayURIError(f"png://{directory}: not a directory (png:// writes numbered PNGs into one)")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # named as given, the cause in words: not a bare "[Errno 2]"
            raise DisplayURIError(f"png://{directory}: {cannot_create(directory, exc)}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise DisplayURIError(f"png://{directory}: cannot write into this directory")
        # Number on from what an earlier run left: the highest-numbered PNG is always what the display shows now
        # (a run killed mid-frame, then `bridge blank`, must not leave a lit frame as the newest file).
        earlier = numbered_pngs(self.directory)
        self.count = int(_PNG_NAME.fullmatch(earlier[-1].name).group(1)) if earlier else 0
        self.paths: list[Path] = []
        self._last_size = self.size

    def _write(self, rgb: np.ndarray, kind: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:06d}_{kind}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
        self.paths.append(path)
        return path

    def show(self, image: np.ndarray, *, region: Region | None = None, deadline: float | None = None) -> None:
        rgb = self._picture(image, region)  # a PNG is the whole display
        self._last_size = (rgb.shape[1], rgb.shape[0])
        self._write(rgb, "frame")

    def blank(self) -> None:
        w, h = self._last_size or (1, 1)
        self._write(np.zeros((h, w, 3), np.uint8), "blank")
