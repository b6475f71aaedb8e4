"""The control socket's side of the protocol (docs/protocol.md 2): how a
request is written (:func:`format_command`) and read (:func:`parse_command`,
what the daemon's control thread runs), and the client (:func:`control_request`,
what ``armscope ctl``, the demo and tests use). ``armscope.core.protocol``
re-exports all of it.

Why apart from the published messages: the control socket is REQ/REP, one
JSON object each way, checked against ``control-request.json`` and
``control-reply.json`` (``armscope.core.schema_files``); it shares no frame,
header or payload rule with the PUB/SUB messages, and a control client needs
none of them.
"""
from __future__ import annotations

import json

from armscope.core import schema_files
from armscope.core.curve import apply_curve_client
from armscope.core.errors import ArmscopeError, ProtocolError

DEFAULT_CONTROL = "tcp://127.0.0.1:5557"


def format_command(command: str | dict) -> bytes:
    """A request frame: text as it is, a dict as JSON."""
    if isinstance(command, dict):
        return json.dumps(command).encode()
    return command.encode()


def parse_command(raw: bytes) -> tuple[str, list[str]]:
    """A request frame -> (command, args). Text is split on whitespace; JSON
    follows ``control-request.json`` (``{"cmd": str, "args": [str or number,
    ...]}``; numbers become their text). Raises ProtocolError naming the problem
    (the key, for JSON, as every schema refusal names it)."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ProtocolError("request: not UTF-8 text") from None
    if not text:
        raise ProtocolError("request: empty")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"request: invalid JSON ({exc})") from None
        except RecursionError:
            raise ProtocolError("request: JSON nested too deeply") from None
        error = schema_files.first_error("control-request", obj)
        if error is not None:
            key = schema_files.missing_key(error) or schema_files.dotted(list(error.absolute_path))
            raise ProtocolError(f"request key {key}: {error.message[:120]} "
                                "(expected {\"cmd\": string, \"args\": [strings or numbers]})")
        return obj["cmd"].lower(), [str(a) for a in obj.get("args", [])]
    parts = text.split()
    return parts[0].lower(), parts[1:]


def control_request(command: str | dict, endpoint: str = DEFAULT_CONTROL, timeout_ms: int = 3000,
                    context=None, curve: dict | None = None) -> dict:
    """Send one control command and return the JSON reply, checked against
    ``control-reply.json`` as the daemon checks it before sending (a reply off
    it is a ProtocolError naming the field). A fresh REQ socket per call, so a
    lost reply never wedges the next request."""
    import zmq

    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve:
            apply_curve_client(sock, **curve)
        sock.connect(endpoint)
        sock.send(format_command(command))
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise ArmscopeError(f"control {endpoint}: no reply within {timeout_ms} ms")
        reply = json.loads(sock.recv().decode("utf-8"))
        if (problem := schema_files.problem("control-reply", reply)) is not None:
            raise ProtocolError(f"control {endpoint}: the reply does not follow control-reply.json: {problem}")
        return reply
    finally:
        sock.close(0)

