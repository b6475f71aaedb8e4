"""One exception type for every user-facing failure.

The CLI prints its message and exits non-zero without a traceback, so each
raise site must say which file or field is wrong and what was expected.
"""


class ArmscopeError(Exception):
    """A failure the user can act on (bad file, bad field, missing dependency)."""


class ProtocolError(ArmscopeError):
    """A message or request that does not follow docs/protocol.md (names the
    frame or key); ``armscope.core.protocol`` and ``control_wire`` raise it."""


class MissingDependency(ArmscopeError):
    """An optional extra (tf, gpu) is needed for this command."""

    def __init__(self, module: str, extra: str, purpose: str, hint: str = ""):
        super().__init__(
            f"{purpose} needs the Python module {module!r}, which is not installed: "
            f"pip install 'armscope[{extra}]'" + (f"; {hint}" if hint else "")
        )


def require_module(module: str, extra: str, purpose: str, hint: str = ""):
    """Import an optional heavy dependency lazily, with an actionable error."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependency(module, extra, purpose, hint) from exc


def output_file_problem(path) -> str | None:
    """Why ``path`` cannot be written as a file, or None; checked before a
    command's work, so a typo costs no minutes and leaves nothing behind."""
    import os

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a directory; expected a file path"
    probe = parent
    while not os.path.exists(probe):  # the command creates missing parents: the first existing one decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "not writable"
    return _refuses_files(probe)


def _refuses_files(directory: str) -> str | None:
    """Why ``directory`` will not take a new file, found by making (and at once removing) one: what os.access
    cannot tell (root, a read-only mount, /proc, a full disk)."""
    import os
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".armscope-probe.", dir=directory)
    except OSError as exc:
        return _refusal(directory, exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _refusal(directory: str, exc: OSError) -> str:
    import errno

    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{directory} is not writable ({exc.strerror})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left in {directory} ({exc.strerror})"
    return f"{directory} does not accept new files ({exc.strerror})"


def output_dir_problem(path) -> str | None:
    """Why the directory ``path`` cannot be created (with its missing parents), or None: the first existing
    ancestor decides, as for ``output_file_problem``; an existing directory is the caller's business (--force)."""
    import os

    path = os.path.abspath(os.fspath(path))
    probe = os.path.dirname(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file; expected a directory"
    if not os.path.isdir(probe):
        return f"its parent {probe} is a file"
    return _refuses_files(probe)


def cannot_create(path, exc: OSError) -> ArmscopeError:
    """The error for an output the system refused to create: names ``path`` as the user gave it (not a temporary
    sibling it was staged in) and the cause in words, e.g. "cannot create /tmp/a/f/ov: its parent /tmp/a/f is a
    file"."""
    import os

    problem = output_dir_problem(path)
    if problem is None:  # the check found nothing: the system's own words, for the directory it refused
        problem = _refusal(os.path.dirname(os.path.abspath(os.fspath(path))), exc)
    return ArmscopeError(f"cannot create {os.fspath(path)}: {problem}")


def check_output_dir(path, option: str) -> None:
    """Refuse, naming ``option``, an output directory that cannot be created; nothing to check when empty."""
    if path and (problem := output_dir_problem(path)) is not None:
        raise ArmscopeError(f"{option} {path}: cannot create it: {problem}")


def check_output_file(path, option: str, suffix: str | None = None) -> None:
    """Refuse, naming ``option``, an output file that cannot be written (``output_file_problem``)
    or whose name lacks ``suffix`` (e.g. ``.png``); nothing to check when ``path`` is empty."""
    import os

    if not path:
        return
    if (problem := output_file_problem(path)) is not None:
        raise ArmscopeError(f"{option} {path}: {problem}")
    if suffix is not None and not os.fspath(path).lower().endswith(suffix):
        raise ArmscopeError(f"{option} {path}: expected a {suffix} file name")
