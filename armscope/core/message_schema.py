"""The message headers' JSON Schemas (``armscope/core/schemas/message-*.json``),
loaded once and used by both ends: the daemon validates every header before
it sends it (``protocol.encode``), the bridge and every other subscriber on
receipt (``protocol.decode``).

Why files and not Python: the schema is then written once, in a form a
subscriber in another language can use as is, and ``docs/protocol.md``'s
tables are checked against it by a test (``doc_type`` says how a schema
type reads in the doc). What a schema cannot say (lengths that must agree
between keys, the payload's size, the crop inside the frame) stays in
``protocol.decode``.

Cost: a validator per topic is built once; ``is_valid`` on a well-formed
header is the only per-message work (``benchmarks/bench_bridge.py``
``test_header_validation`` times it); the full error list is computed only
for a header that fails.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
MESSAGE_TOPICS = ("overlay", "rendered", "status")


@functools.lru_cache(maxsize=None)
def _registry():
    from referencing import Registry, Resource

    resources = []
    for path in sorted(SCHEMA_DIR.glob("message-*.json")):
        schema = json.loads(path.read_text())
        resources.append((path.name, Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def schema(topic: str) -> dict:
    """The JSON Schema of a topic's header (``message-<topic>.json``)."""
    return json.loads((SCHEMA_DIR / f"message-{topic}.json").read_text())


@functools.lru_cache(maxsize=None)
def validator(topic: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema(topic), registry=_registry())


def header_problem(topic: str, header: dict) -> str | None:
    """None if ``header`` follows its topic's schema, else one line naming the
    key (``region.x``) and what was expected."""
    check = validator(topic)
    if check.is_valid(header):
        return None
    from jsonschema.exceptions import best_match

    error = best_match(check.iter_errors(header))
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        return f"header of a {topic} message: {error.message}"
    return f"header key {where or '(root)'}: {error.message[:160]}"


def resolved(topic: str) -> tuple[dict, set]:
    """(properties, required) of a topic's header with the common keys merged
    in and ``$ref`` followed: what the doc's table for the topic lists."""
    registry = _registry()
    own = schema(topic)
    common = registry.contents("message-common.json")
    properties = {**common["properties"], **own.get("properties", {})}
    required = set(common["required"]) | set(own.get("required", []))
    return {k: _follow(v, registry) for k, v in properties.items()}, required


def _follow(node: dict, registry) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    name, _, pointer = ref.partition("#")
    target = registry.contents(name)
    for part in pointer.strip("/").split("/") if pointer else []:
        target = target[part]
    return target


_TYPE_WORDS = {"integer": "int", "number": "float", "string": "string", "boolean": "bool", "object": "object",
               "array": "list", "null": "null"}


def doc_type(node: dict) -> str:
    """How ``docs/protocol.md`` writes a schema type: ``int``, ``float``,
    ``string or null``, ``list of string``, ``list of 4 int or null``,
    ``"raw"`` for a constant, ``one of "a", "b"`` for an enum."""
    if "const" in node:
        return json.dumps(node["const"])
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(v) for v in node["enum"])
    types = node.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    words = []
    for t in types:
        if t == "array":
            count = f"{node['minItems']} " if node.get("minItems") and node.get("minItems") == node.get("maxItems") else ""
            item = doc_type(node.get("items", {})) if node.get("items") else "any"
            words.append(f"list of {count}{item}")
        else:
            words.append(_TYPE_WORDS[t])
    return " or ".join(words)
