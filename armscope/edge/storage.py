"""Files the daemon writes (slide records, snapshots) without losing data to a
disk error.

Why: a slide's result exists only in memory until its record is on disk. When
the disk is full or read-only the write fails; the caller must then keep what
it had (the slide stays open), say why in words ("No space left on device"),
and leave no half-written file behind. Checking the output directories at
start-up catches the common case (a read-only mount, a full card) before a
pathologist has spent an hour on a slide.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from armscope.core.errors import ArmscopeError

MiB = 1024 * 1024
# Free space each output directory needs at start-up: slide records are ~1 KB;
# one snapshot of a 1600x1200 frame is about 5 MB of PNGs.
MIN_FREE_BYTES = {"slides_dir": 1 * MiB, "snapshot_dir": 16 * MiB}


def os_reason(exc: OSError) -> str:
    """The error in words, e.g. '[Errno 28] No space left on device'."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc) or type(exc).__name__


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory,
    flushed to disk before the rename; on any error the temporary file is
    removed and the OSError propagates (``path`` is then untouched)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())         # a delayed-allocation filesystem reports ENOSPC here, not at write()
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(key: str, directory: str | Path) -> None:
    """Start-up check of an output directory: it (or, while it does not exist yet,
    the nearest existing parent it will be created in) is a directory we can
    create files in, with ``MIN_FREE_BYTES[key]`` free. Raises ArmscopeError naming the key."""
    directory = Path(directory)
    where = _existing_ancestor(directory)
    if not where.is_dir():
        raise ArmscopeError(f"key {key!r}: {directory}: {where} is not a directory")
    try:
        # A real file, not os.access: as root, access() says yes on a read-only mount.
        with tempfile.TemporaryFile(dir=where, prefix=".armscope-write-check-"):
            pass
    except OSError as exc:
        raise ArmscopeError(f"key {key!r}: {directory}: cannot create files in {where} ({os_reason(exc)})") from None
    free = shutil.disk_usage(where).free
    need = MIN_FREE_BYTES.get(key, MiB)
    if free < need:
        raise ArmscopeError(f"key {key!r}: {directory}: only {free / MiB:.1f} MiB free on its filesystem "
                            f"(at least {need / MiB:.0f} MiB needed)")


def write_all(files: list[tuple[Path, bytes]], what: str) -> list[Path]:
    """Write several files that belong together (a snapshot's frame, overlay and
    header), each atomically; if one fails, those already written are removed and
    an ArmscopeError names the file and the reason. Returns the paths written."""
    written: list[Path] = []
    for path, data in files:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(path), data)
        except OSError as exc:
            for done in written:
                try:
                    done.unlink()
                except OSError:
                    pass
            raise ArmscopeError(f"{what}: could not write {path}: {os_reason(exc)}") from None
        written.append(Path(path))
    return written
