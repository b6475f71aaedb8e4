"""JSON Schemas compiled to plain Python predicates: the per-message check of
the published headers (``armscope.core.message_schema``).

Why: ``jsonschema``'s validator walks the schema on every call, dispatching
each keyword through its registry of checkers (a measurable share of a
frame's budget, more under load: BENCHMARKS.md section 10), at 30 messages a second on both ends
(the daemon checks what it sends, the bridge what it receives). The message
schemas use a small set of keywords, so each schema is turned once into
nested closures that test exactly those keywords with the same semantics as
``Draft202012Validator`` (an ``integer`` is also a float with no fraction,
``true`` is not ``1``, ``$ref`` beside other keywords applies both, numeric
bounds only constrain numbers, and so on). A schema with any keyword outside
that set is not compiled (:class:`Unsupported`) and the caller uses
``jsonschema`` for it; ``jsonschema`` also still words every error, so
what a refused header is told is unchanged. ``tests/test_message_schema.py``
checks the compiled predicate against ``jsonschema`` on thousands of
mutated headers.
"""
from __future__ import annotations

from typing import Any, Callable

Check = Callable[[Any], bool]

# Keywords that only annotate (no effect on validity).
_ANNOTATIONS = {"$schema", "$id", "$defs", "$comment", "title", "description", "examples", "default"}
_KEYWORDS = {"type", "const", "enum", "required", "properties", "items", "minItems", "maxItems", "minimum",
             "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "$ref", "allOf"}


class Unsupported(ValueError):
    """The schema uses a keyword this compiler does not implement."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": _is_integer,
}


def json_equal(a, b) -> bool:
    """JSON equality as JSON Schema's ``const``/``enum`` define it: ``true`` is
    not ``1``, ``1.0`` is ``1``, arrays and objects compare element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) \
            and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() \
            and all(json_equal(a[k], b[k]) for k in a)
    return a == b


def compile_schema(schema: dict, resolve: Callable[[str, str], dict], base: str = "") -> Check:
    """A predicate equivalent to validating against ``schema``.

    ``resolve(base, ref)`` returns ``(document_name, node)`` for a ``$ref``
    met in document ``base`` (``"other.json#/$defs/x"``, or ``"#/$defs/x"``
    within ``base``); refs are compiled once each (there are no cycles in
    the message schemas; a cycle raises :class:`Unsupported`)."""
    return _Compiler(resolve).compile(schema, base)


class _Compiler:
    def __init__(self, resolve):
        self.resolve = resolve
        self.done: dict[tuple[str, str], Check] = {}
        self.busy: set[tuple[str, str]] = set()

    def compile(self, node, base: str) -> Check:
        if node is True:
            return lambda v: True
        if node is False:
            return lambda v: False
        if not isinstance(node, dict):
            raise Unsupported(f"schema node {node!r}")
        unknown = set(node) - _KEYWORDS - _ANNOTATIONS
        if unknown:
            raise Unsupported(f"keywords {sorted(unknown)}")
        checks = [check for check in (self._keyword(key, node[key], node, base) for key in node) if check is not None]
        if not checks:
            return lambda v: True
        if len(checks) == 1:
            return checks[0]
        return lambda v: all(check(v) for check in checks)

    def _ref(self, ref: str, base: str) -> Check:
        name, target = self.resolve(base, ref)
        key = (name, ref.partition("#")[2])
        if key in self.done:
            return self.done[key]
        if key in self.busy:
            raise Unsupported(f"recursive $ref {ref}")
        self.busy.add(key)
        check = self.done[key] = self.compile(target, name)
        self.busy.discard(key)
        return check

    def _keyword(self, key: str, value, node: dict, base: str) -> Check | None:
        if key in _ANNOTATIONS:
            return None
        if key == "type":
            names = [value] if isinstance(value, str) else list(value)
            tests = [_TYPES[n] for n in names]
            return tests[0] if len(tests) == 1 else (lambda v: any(t(v) for t in tests))
        if key == "const":
            return lambda v: json_equal(v, value)
        if key == "enum":
            return lambda v: any(json_equal(v, option) for option in value)
        if key == "required":
            keys = tuple(value)
            return lambda v: not isinstance(v, dict) or all(k in v for k in keys)
        if key == "properties":
            props = {k: self.compile(sub, base) for k, sub in value.items()}
            return lambda v: not isinstance(v, dict) or all(check(v[k]) for k, check in props.items() if k in v)
        if key == "items":
            item = self.compile(value, base)
            return lambda v: not isinstance(v, list) or all(item(x) for x in v)
        if key == "minItems":
            return lambda v: not isinstance(v, list) or len(v) >= value
        if key == "maxItems":
            return lambda v: not isinstance(v, list) or len(v) <= value
        if key == "minLength":
            return lambda v: not isinstance(v, str) or len(v) >= value
        if key == "maxLength":
            return lambda v: not isinstance(v, str) or len(v) <= value
        if key == "minimum":
            return lambda v: not _is_number(v) or v >= value
        if key == "maximum":
            return lambda v: not _is_number(v) or v <= value
        if key == "exclusiveMinimum":
            return lambda v: not _is_number(v) or v > value
        if key == "exclusiveMaximum":
            return lambda v: not _is_number(v) or v < value
        if key == "$ref":
            return self._ref(value, base)
        if key == "allOf":
            parts = [self.compile(sub, base) for sub in value]
            return lambda v: all(part(v) for part in parts)
        raise Unsupported(key)  # pragma: no cover - filtered above
