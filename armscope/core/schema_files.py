"""The JSON Schemas of the files and requests that cross a boundary, other
than the published messages (``armscope.core.message_schema``): the control
socket's requests and replies (``control-request.json``, ``control-reply.json``),
the eyepiece registration file (``registration.json``) and the bundle manifest
(``manifest.json``), all in ``armscope/core/schemas/``.

Why files and not Python: each contract is then written once, in a form a tool
in another language can use as is, both sides of it validate with the same
file (the daemon and its control clients, ``bridge register`` and the bridge,
the exporter and the runtime), and ``docs/protocol.md`` is checked against
them by a test. What a schema cannot say (a singular matrix, graph shapes that
must agree with each other) stays in the code that reads the document.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


@functools.lru_cache(maxsize=None)
def schema(name: str) -> dict:
    """The schema ``armscope/core/schemas/<name>.json`` (e.g. ``control-reply``)."""
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text())


@functools.lru_cache(maxsize=None)
def validator(name: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema(name))


def first_error(name: str, document):
    """None if ``document`` follows schema ``name``, else its first error in
    document order (a ``jsonschema.ValidationError``: ``absolute_path``,
    ``message``, ``validator``), for the caller to name the field its own way."""
    check = validator(name)
    if check.is_valid(document):
        return None
    return min(check.iter_errors(document), key=lambda e: [(isinstance(p, str), p) for p in e.absolute_path])


def missing_key(error) -> str | None:
    """The key a ``required`` error is about (the first one missing), else None."""
    if error.validator != "required" or not isinstance(error.instance, dict):
        return None
    return next((k for k in error.validator_value if k not in error.instance), None)


def problem(name: str, document) -> str | None:
    """None if ``document`` follows schema ``name``, else one line naming the
    field (``metrics.fps``, ``(top level)``) and what was expected."""
    error = first_error(name, document)
    if error is None:
        return None
    return f"field {dotted(list(error.absolute_path))}: {error.message[:200]}"


def dotted(path: list) -> str:
    """``task.steps.0.when``: how bundle and control errors name a field."""
    return ".".join(str(p) for p in path) or "(top level)"


def indexed(path: list) -> str:
    """``matrix[1][2]``: how registration errors name a field."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path)) \
        or "<root>"
