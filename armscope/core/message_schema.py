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

Cost: each topic's schema is compiled once into a plain predicate
(``armscope.core.schema_compile``, the same verdicts as ``jsonschema``'s
``Draft202012Validator``, tested against it); calling it is the only
per-message work (``benchmarks/bench_bridge.py`` ``test_header_validation``
times it). ``jsonschema`` runs only for a header the predicate refused, to
word the error.
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


def _resolve(base: str, ref: str) -> tuple[str, dict]:
    """``$ref`` -> (document name, node), as the registry resolves it."""
    name, _, pointer = ref.partition("#")
    name = name or base
    node = _registry().contents(name)
    for part in pointer.strip("/").split("/") if pointer else []:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return name, node


@functools.lru_cache(maxsize=None)
def compiled(topic: str):
    """The topic's schema as a plain predicate (``armscope.core.schema_compile``),
    built once; ``jsonschema``'s ``is_valid`` if the schema uses a keyword the
    compiler does not implement (never for the message schemas; a test checks)."""
    from armscope.core.schema_compile import Unsupported, compile_schema

    try:
        return compile_schema(schema(topic), _resolve, f"message-{topic}.json")
    except Unsupported:
        return validator(topic).is_valid


def header_problem(topic: str, header: dict) -> str | None:
    """None if ``header`` follows its topic's schema, else one line naming the
    key (``region.x``) and what was expected. The compiled predicate decides;
    ``jsonschema`` words the error of a header it refused."""
    if compiled(topic)(header):
        return None
    check = validator(topic)
    from jsonschema.exceptions import best_match

    error = best_match(check.iter_errors(header))
    if error is None:  # the predicate and jsonschema disagree (a test guards against it): jsonschema decides
        return None
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required" and not where:
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
