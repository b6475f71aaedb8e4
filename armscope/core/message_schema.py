"""The message headers' rules: which schema each topic's header follows
(``armscope/core/schemas/message-<topic>.json``, loaded by
``armscope.core.schema_files`` like every other schema), how a refused header
is reported, and how the schemas read in ``docs/protocol.md``'s tables. Both
ends use it: the daemon validates every header before it sends it
(``protocol.encode``), the bridge and every other subscriber on receipt
(``protocol.decode``).

What a schema cannot say (lengths that must agree between keys, the payload's
size, the crop inside the frame) stays in ``protocol.decode``.

Cost: each topic's schema is compiled once into a plain predicate
(``schema_files.compiled``, the same verdicts as ``jsonschema``'s
``Draft202012Validator``, tested against it); calling it is the only
per-message work (``benchmarks/bench_bridge.py`` ``test_header_validation``
times it). ``jsonschema`` runs only for a header the predicate refused, to
word the error.
"""
from __future__ import annotations

import json

from armscope.core import schema_files

MESSAGE_TOPICS = ("overlay", "rendered", "status")


def schema_name(topic: str) -> str:
    """The schema file (without ``.json``) a topic's header follows."""
    return f"message-{topic}"


def header_problem(topic: str, header: dict) -> str | None:
    """None if ``header`` follows its topic's schema, else one line naming the
    key (``region.x``) and what was expected. The compiled predicate decides;
    ``jsonschema`` words the error of a header it refused, picked and named as
    every schema error is (``schema_files.first_error``, ``dotted``)."""
    name = schema_name(topic)
    if schema_files.compiled(name)(header):
        return None
    error = schema_files.first_error(name, header)
    if error is None:  # the predicate and jsonschema disagree (a test guards against it): jsonschema decides
        return None
    if error.validator == "required" and not error.absolute_path:
        return f"header of a {topic} message: {error.message}"
    return f"header key {schema_files.dotted(list(error.absolute_path))}: {error.message[:160]}"


def resolved(topic: str) -> tuple[dict, set]:
    """(properties, required) of a topic's header with the common keys merged
    in and ``$ref`` followed: what the doc's table for the topic lists."""
    own_name = schema_name(topic) + ".json"
    own = schema_files.schema(schema_name(topic))
    common = schema_files.schema("message-common")
    properties = {**{k: follow(v, "message-common.json") for k, v in common["properties"].items()},
                  **{k: follow(v, own_name) for k, v in own.get("properties", {}).items()}}
    required = set(common["required"]) | set(own.get("required", []))
    return properties, required


def follow(node: dict, base: str) -> dict:
    """``node``, or what its ``$ref`` points at (``base``: the file it is in)."""
    ref = node.get("$ref")
    return node if ref is None else schema_files.resolve(base, ref)[1]


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
