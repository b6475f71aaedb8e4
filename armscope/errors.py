"""One exception type for every user-facing failure.

The CLI prints its message and exits non-zero without a traceback, so each
raise site must say which file or field is wrong and what was expected.
"""


class ArmscopeError(Exception):
    """A failure the user can act on (bad file, bad field, missing dependency)."""


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
