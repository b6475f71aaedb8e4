"""The package's JSON Schema files (armscope/core/schemas: control requests and
replies, registration, bundle manifest) are valid schemas, agree with the code
that reads the same documents, and docs/protocol.md's control table lists
exactly the reply keys control-reply.json allows; the control client checks
the replies it gets. Fast: no model, one local socket."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from armscope.core import schema_files
from armscope.core.bundle import SUPPORTED_SCHEMA_VERSIONS, load_bundle
from armscope.firmware_bridge import registration as R

from repo_paths import REPO
NAMES = ("control-request", "control-reply", "registration", "manifest")


@pytest.mark.parametrize("name", NAMES)
def test_schema_files_are_valid_and_installed(name):
    jsonschema.Draft202012Validator.check_schema(schema_files.schema(name))
    package_data = (REPO / "pyproject.toml").read_text()
    assert '"armscope.core" = ["schemas/*.json"]' in package_data


def _strip_parens(text: str) -> str:
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return text
        text = stripped


def _control_table() -> dict[str, set[str]]:
    """docs/protocol.md section 2: command (as written) -> the reply keys the table names."""
    doc = (REPO / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## 2. Control socket"):doc.index("### 2.1")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        command = " / ".join(re.findall(r"`([^`]+)`", cells[0]))
        rows[command] = set(re.findall(r"`([a-z_]+)`", _strip_parens(cells[1])))
    return rows


def test_protocol_doc_control_table_agrees_with_control_reply_schema():
    schema = schema_files.schema("control-reply")
    by_title = {d["title"]: d for d in schema["$defs"].values()}
    rows = _control_table()
    assert set(rows) == set(by_title) - {"(any command that failed)"}, (sorted(rows), sorted(by_title))
    for command, keys in rows.items():
        definition = by_title[command]
        assert keys == set(definition["required"]) == set(definition["properties"]), (command, keys)
    assert set(schema["required"]) == {"ok", "cmd"} and by_title["(any command that failed)"]["required"] == ["error"]
    # The commands the daemon lists in `help` are the rows of the table.
    from armscope.edge.commands import COMMANDS

    assert {c.split()[0] for c in COMMANDS} == {r.split()[0] for r in " / ".join(rows).split(" / ")}


def test_control_reply_schema_refuses_what_the_doc_refuses():
    ok = {"ok": True, "cmd": "pause", "state": "paused"}
    assert schema_files.problem("control-reply", ok) is None
    for bad in ({**ok, "extra": 1}, {**ok, "cmd": None}, {"ok": False, "cmd": "x"}, {"ok": True, "cmd": "fly"},
                {**ok, "state": "asleep"}, {"ok": True, "cmd": "snapshot", "files": ["only-one.png"]}):
        assert schema_files.problem("control-reply", bad) is not None, bad


def test_manifest_schema_versions_and_v1_bundle():
    schema = schema_files.schema("manifest")
    assert schema["properties"]["schema_version"]["enum"] == list(SUPPORTED_SCHEMA_VERSIONS)
    bundle = load_bundle(REPO / "samples" / "demo_bundle")        # a schema 1 bundle
    assert bundle.manifest["schema_version"] == 1
    assert schema_files.first_error("manifest", bundle.manifest) is None


def test_registration_written_is_what_the_schema_and_the_reader_take(tmp_path):
    reg = R.Registration(matrix=[[0.5, 0.01, 10.0], [0.0, 0.5, 5.0], [0.0, 0.0, 1.0]], display_size=(640, 480),
                         rms_error=0.3, max_error=0.7, n_points=20, n_inliers=20, method="dot-grid")
    path = tmp_path / "reg.json"
    R.save_registration(reg, path)
    assert schema_files.first_error("registration", json.loads(path.read_text())) is None
    assert R.load_registration(path).display_size == (640, 480)
    # A file the schema refuses is refused on both sides, naming the field.
    doc = json.loads(path.read_text())
    doc["matrix"][2] = [0, 0]
    path.write_text(json.dumps(doc))
    with pytest.raises(R.RegistrationFileError) as info:
        R.load_registration(path)
    assert info.value.field == "matrix[2]"
    with pytest.raises(R.RegistrationFileError, match="rms_error"):   # refused before writing
        R.save_registration(R.Registration(matrix=reg.matrix, display_size=(640, 480), rms_error=-1.0), path)


def test_control_client_refuses_a_reply_off_the_schema():
    """``protocol.control_request`` checks what it is told as the daemon checks
    what it sends: a reply off control-reply.json is a ProtocolError naming the
    field, not a dict the caller trusts. A real REP socket answers."""
    import threading

    import zmq

    from armscope.core import protocol

    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    replies = [{"ok": True, "cmd": "pause", "state": "paused"}, {"ok": True, "cmd": "pause", "state": "asleep"}]

    def serve():
        for reply in replies:
            if rep.poll(5000):
                rep.recv()
                rep.send(json.dumps(reply).encode())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        endpoint = f"tcp://127.0.0.1:{port}"
        assert protocol.control_request("pause", endpoint, timeout_ms=5000, context=ctx) == replies[0]
        with pytest.raises(protocol.ProtocolError, match=r"control-reply\.json: field state: 'asleep'"):
            protocol.control_request("pause", endpoint, timeout_ms=5000, context=ctx)
    finally:
        server.join(5)
        rep.close(0)
        ctx.term()
