"""The registration file: the JSON ``armscope bridge register`` writes and the bridge
loads, checked against armscope/core/schemas/registration.json on both sides, so a
file is refused when written rather than written unreadable."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from armscope.core import schema_files

from .homography import REGISTRATION_VERSION, Registration, RegistrationFileError
from .point_pairs import number_field


def save_registration(reg: Registration, path: "str | os.PathLike") -> None:
    """Write the registration JSON (atomically: tmp file + rename)."""
    path = Path(path)
    doc = {
        "version": reg.version,
        "display_size": list(reg.display_size),
        "matrix": [[float(v) for v in row] for row in reg.matrix],
        "rms_error": float(reg.rms_error),
        "max_error": None if math.isnan(reg.max_error) else float(reg.max_error),
        "n_points": reg.n_points,
        "n_inliers": reg.n_inliers,
        "method": reg.method,
    }
    _check_schema(path, doc)   # what the reader will check: refused here rather than written unreadable
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _check_schema(path, doc) -> None:
    """``doc`` against armscope/core/schemas/registration.json, the one definition of
    the file that ``bridge register`` writes and the bridge reads; the error names
    the field (``matrix[1][2]``, a missing key by its name)."""
    error = schema_files.first_error("registration", doc)
    if error is None:
        return
    missing = schema_files.missing_key(error)
    if missing is not None:
        raise RegistrationFileError(path, missing, "missing")
    field = schema_files.indexed(list(error.absolute_path))
    if field == "version":
        raise RegistrationFileError(path, "version", f"unsupported version {doc['version']!r}; "
                                                     f"expected {REGISTRATION_VERSION}")
    raise RegistrationFileError(path, field, error.message[:160])


def load_registration(path: "str | os.PathLike") -> Registration:
    """Read a registration JSON; errors name the file and the offending field."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistrationFileError(path, "<file>", f"cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise RegistrationFileError(path, "<json>", f"invalid JSON: {exc}") from None
    _check_schema(path, doc)
    size = doc["display_size"]
    m = doc["matrix"]
    matrix = np.array([[number_field(path, f"matrix[{i}][{j}]", v) for j, v in enumerate(r)] for i, r in enumerate(m)])
    if abs(np.linalg.det(matrix)) < 1e-12:
        raise RegistrationFileError(path, "matrix", "is singular")
    rms = number_field(path, "rms_error", doc["rms_error"])
    max_err = doc.get("max_error")
    return Registration(
        matrix=matrix,
        display_size=(size[0], size[1]),
        rms_error=rms,
        max_error=float("nan") if max_err is None else number_field(path, "max_error", max_err),
        n_points=int(doc.get("n_points", 0)),
        n_inliers=int(doc.get("n_inliers", 0)),
        method=str(doc.get("method", "points")),
        version=REGISTRATION_VERSION,
    )
