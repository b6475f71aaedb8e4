"""Hand-picked point pairs (camera pixel -> display pixel) from a JSON or CSV file,
every bad value named by file, field and line, for ``from_point_pairs``."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from .homography import RegistrationFileError


def number_field(path, field, value) -> float:
    """A finite number from a file's ``field``, or RegistrationFileError naming both."""
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
    return number_field(path, f"{field}[0]", value[0]), number_field(path, f"{field}[1]", value[1])


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
        rows.append([number_field(path, f"{c} (line {line_no})", row[c]) for c in _CSV_COLS])
    arr = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return arr[:, :2], arr[:, 2:]
