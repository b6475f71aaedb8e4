"""Snapshots (the control command ``snapshot``): a camera frame, the overlay
computed from it and the message header, written together.

Why its own module: what a snapshot holds is a file format lab IT and
pathologists read later (docs/protocol.md, section 2), kept apart from the
command that triggers it. Written through ``armscope.edge.storage.write_all``:
all files or none, and the reason if not (a full disk must not leave half a
snapshot that looks whole).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from armscope.edge.storage import write_all


def write_snapshot(directory, frame, rgba: np.ndarray | None, header: dict) -> list[Path]:
    """``<time>_frame<id>_frame.png``, ``_overlay.png`` (RGBA; only with ``rgba``) and
    ``_header.json`` in ``directory``; returns their paths."""
    directory = Path(directory)
    stem = f"{time.strftime('%Y%m%dT%H%M%S')}_frame{frame.id:06d}"
    files = [(directory / f"{stem}_frame.png", cv2.imencode(".png", frame.image)[1].tobytes())]
    if rgba is not None:
        files.append((directory / f"{stem}_overlay.png",
                      cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes()))
    files.append((directory / f"{stem}_header.json", (json.dumps(header, indent=2, default=str) + "\n").encode()))
    return write_all(files, "snapshot")   # all three or none, and the reason if not
