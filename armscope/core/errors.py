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
    return None


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
