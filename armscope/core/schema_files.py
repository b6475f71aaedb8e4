"""The JSON Schemas of everything that crosses a boundary, all in
``armscope/core/schemas/``, and the one place they are loaded from: the
published message headers (``message-*.json``, topic rules in
``armscope.core.message_schema``), the control socket's requests and replies
(``control-request.json``, ``control-reply.json``), the eyepiece registration
file (``registration.json``) and the bundle manifest (``manifest.json``).

Why files and not Python: each contract is then written once, in a form a tool
in another language can use as is, both sides of it validate with the same
file (the daemon and its subscribers and control clients, ``bridge register``
and the bridge, the exporter and the runtime), and ``docs/protocol.md`` is
checked against them by a test. What a schema cannot say (a singular matrix,
graph shapes that must agree with each other) stays in the code that reads
the document.

One registry holds every file, so a ``$ref`` to another file resolves the
same way for ``jsonschema`` and for the compiled predicates
(:func:`compiled`, ``armscope.core.schema_compile``) that check each message
header. A refusal is worded one way everywhere: :func:`first_error` picks the
error, :func:`dotted`/:func:`indexed` name its field, :func:`missing_key` the
key a ``required`` error is about.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


@functools.lru_cache(maxsize=None)
def schema(name: str) -> dict:
    """The schema ``armscope/core/schemas/<name>.json`` (e.g. ``control-reply``,
    ``message-overlay``), loaded once; callers must not modify it."""
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text())


@functools.lru_cache(maxsize=None)
def registry():
    """A ``referencing.Registry`` of every schema file, by file name (what a
    ``$ref`` such as ``message-decision.json#/$defs/bbox`` names)."""
    from referencing import Registry, Resource

    return Registry().with_resources(
        (path.name, Resource.from_contents(schema(path.stem))) for path in sorted(SCHEMA_DIR.glob("*.json")))


@functools.lru_cache(maxsize=None)
def validator(name: str):
    """The ``jsonschema`` validator of schema ``name``, built once: the reference
    semantics, and what words every refusal."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema(name), registry=registry())


def resolve(base: str, ref: str) -> tuple[str, dict]:
    """``$ref`` within file ``base`` -> (file name, node), as :func:`registry` resolves it."""
    name, _, pointer = ref.partition("#")
    name = name or base
    node = registry().contents(name)
    for part in pointer.strip("/").split("/") if pointer else []:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return name, node


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    """Schema ``name`` as a plain predicate (``armscope.core.schema_compile``),
    built once: the per-message check, the same verdicts as :func:`validator`'s
    ``is_valid`` at a fraction of the cost. ``is_valid`` itself if the schema
    uses a keyword the compiler does not implement (never for the message
    schemas; a test checks)."""
    from armscope.core.schema_compile import Unsupported, compile_schema

    try:
        return compile_schema(schema(name), resolve, f"{name}.json")
    except Unsupported:
        return validator(name).is_valid


def first_error(name: str, document):
    """None if ``document`` follows schema ``name``, else its first error in
    document order (a ``jsonschema.ValidationError``: ``absolute_path``,
    ``message``, ``validator``), for the caller to name the field its own way.

    An ``unevaluatedProperties`` error comes after any other: it is usually
    the echo of a failed ``if``/``then`` branch (a key the failed branch
    would have allowed), and the branch's own error names the key and what
    it should have been (``state: 'asleep' is not one of ...``)."""
    check = validator(name)
    if check.is_valid(document):
        return None
    return min(check.iter_errors(document), key=lambda e: (e.validator == "unevaluatedProperties",
                                                           [(isinstance(p, str), p) for p in e.absolute_path]))


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
