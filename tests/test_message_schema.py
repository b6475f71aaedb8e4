"""The published messages' JSON Schemas (armscope/core/schemas/message-*.json):
docs/protocol.md's tables for them list exactly their keys, types and which
are required (as tests/test_schema_files.py checks the control table), and
the compiled predicates that check every header (armscope.core.schema_compile)
give jsonschema's verdict on thousands of mutated headers. Fast: no sockets."""
from __future__ import annotations

import copy
import json
import random
import re

import jsonschema
import pytest

from armscope.core import message_schema, protocol, schema_files

from repo_paths import REPO


def _tables() -> dict[str, dict[str, tuple[str, str]]]:
    """docs/protocol.md section 1: {table: {key: (type cell, req. cell)}}, the table
    named by the heading above it (``1.1``, ``1.2``, ``1.3``, ``1.4``) or, for the
    tables of an object's keys, by the backquoted key that opens the line above it."""
    doc = (REPO / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## 1. Messages on the publish socket"):doc.index("## 2. Control socket")]
    tables: dict[str, dict] = {}
    name, above = None, ""
    for line in section.splitlines():
        if line.startswith("### "):
            name = line.split()[1]
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[2] in ("yes", "no"):
            table = name if not re.match(r"^`\w+`,", above) else above.split("`")[1]
            key = re.fullmatch(r"`([\w.]+)`", cells[0])
            assert key, f"docs/protocol.md: key cell {cells[0]!r} is not one `key`"
            tables.setdefault(table, {})[key.group(1)] = (cells[1], cells[2])
        elif line.strip() and not line.startswith("|"):
            above = line
    return tables


def _check_table(rows: dict, properties: dict, required: set, where: str) -> None:
    """Exactly the schema's keys; each type as ``doc_type`` writes it (a unit may
    follow after a comma); ``yes`` exactly for the required keys."""
    assert set(rows) == set(properties), (where, sorted(set(rows) ^ set(properties)))
    for key, (type_cell, req_cell) in rows.items():
        want = message_schema.doc_type(properties[key])   # resolved: $ref already followed
        assert type_cell == want or type_cell.startswith(want + ", "), (where, key, type_cell, want)
        assert (req_cell == "yes") == (key in required), (where, key, req_cell)


TOPIC_TABLES = {"1.2": "overlay", "1.3": "rendered", "1.4": "status"}


def test_protocol_doc_tables_agree_with_the_message_schemas():
    tables = _tables()
    assert set(tables) == {"1.1", "1.2", "1.3", "1.4", "region", "cam"}, sorted(tables)
    common = schema_files.schema("message-common")
    _check_table(tables["1.1"], common["properties"], set(common["required"]), "1.1")
    for number, topic in TOPIC_TABLES.items():
        properties, required = message_schema.resolved(topic)
        rows = {**{k: v for k, v in tables["1.1"].items()}, **tables[number]}
        if topic == "rendered":   # 1.3 lists the keys that differ from or add to 1.2
            assert "cam" not in rows
        _check_table(rows, properties, required, f"{number} {topic}")
    for name, topic in (("region", "overlay"), ("cam", "overlay")):
        node = message_schema.resolved(topic)[0][name]
        rows = tables[name]
        flat = {k: v for k, v in rows.items() if "." not in k}
        _check_table(flat, node["properties"], set(node["required"]), name)
        for key, (type_cell, req_cell) in rows.items():   # dotted: `box.x` is cam.box's x
            if "." in key:
                parent, child = key.split(".")
                sub = node["properties"][parent]
                assert set(k for k in rows if k.startswith(parent + ".")) == {f"{parent}.{c}" for c in sub["properties"]}
                want = message_schema.doc_type(sub["properties"][child])
                assert type_cell == want and (req_cell == "yes") == (child in sub["required"]), (name, key)
    # the version the doc states is the one the code speaks
    doc = (REPO / "docs" / "protocol.md").read_text()
    assert doc.startswith(f"# armscope edge daemon protocol, schema version {protocol.SCHEMA_VERSION}\n")


# --------------------------------------------------------------- compiled predicates vs jsonschema


def _valid_headers() -> dict[str, dict]:
    from bridge_runtime_support import FakeDaemon, cam_of

    daemon = FakeDaemon()
    try:
        overlay = json.loads(daemon.overlay_frames(cam_of(0))[1])
        status = json.loads(daemon.status_frames("no_tissue", reason="out_of_focus")[1])
    finally:
        daemon.close()
    overlay["subtype"] = {"when": "tumour", "model_id": "s@1", "classes": ["x", "y"], "probs": [0.4, 0.6],
                          "decision": {"label": "y", "index": 1, "score": 0.6}}
    overlay["focus_bbox"] = [1, 2, 3, 4]
    rendered = {k: v for k, v in overlay.items() if k != "cam"}
    rendered.update(topic="rendered", width=4, height=4, format="RGBA8", encoding="png")
    return {"overlay": overlay, "status": status, "rendered": rendered}


# values that sit on either side of what the schemas accept (types, bounds, bool-vs-int, 1.0 vs 1, ...)
_VALUES = [None, True, False, 0, 1, -1, 2, 0.0, 1.0, 2.0, 0.5, -0.5, 1e6, 1e6 + 1, -1e6 - 1, 255, 256, 1024, 1025,
           65535, 65536, 8192, 8193, "", "a", "x" * 65, "x" * 129, "overlay", "status", "rendered", "raw", "png",
           "none", "RGBA8", "float16", "uint8", "running", [], [1, 2, 3, 4], [1, 2, 3], ["a"], [0.5], {}, {"x": 1}]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate(header: dict, rng: random.Random) -> dict:
    out = copy.deepcopy(header)
    for _ in range(rng.choice((1, 1, 2, 3))):
        paths = [p for p in _paths(out) if p]
        path = rng.choice(paths)
        parent = out
        for part in path[:-1]:
            parent = parent[part]
        action = rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif action < 0.2 and isinstance(parent, dict):
            parent["extra_" + str(rng.randint(0, 9))] = rng.choice(_VALUES)   # unknown keys are allowed
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(_VALUES))
    return out


@pytest.mark.parametrize("topic", message_schema.MESSAGE_TOPICS)
def test_compiled_predicate_gives_jsonschemas_verdict(topic):
    from armscope.core.schema_compile import Unsupported, compile_schema

    # the message schemas compile (no fallback to jsonschema on the per-message path)
    name = message_schema.schema_name(topic)
    check = compile_schema(schema_files.schema(name), schema_files.resolve, f"{name}.json")
    assert schema_files.compiled(name) is not schema_files.validator(name).is_valid
    reference = schema_files.validator(name)
    header = _valid_headers()[topic]
    assert check(header) and reference.is_valid(header)
    rng = random.Random(20261203)
    verdicts = {True: 0, False: 0}
    for _ in range(3000):
        mutated = _mutate(header, rng)
        want = reference.is_valid(mutated)
        assert check(mutated) == want, json.dumps(mutated)[:600]
        verdicts[want] += 1
        # and protocol's one-line error names a key whenever the predicate refuses
        if not want:
            assert message_schema.header_problem(topic, mutated).startswith("header")
    assert min(verdicts.values()) > 300, verdicts   # both verdicts well exercised
    with pytest.raises(Unsupported):
        compile_schema({"type": "object", "additionalProperties": False}, schema_files.resolve)
    assert jsonschema.Draft202012Validator({"type": "integer"}).is_valid(1.0) and compile_schema(
        {"type": "integer"}, schema_files.resolve)(1.0)   # the draft's integer: a number without a fraction
