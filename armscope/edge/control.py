"""The control socket (REP): one thread that owns the socket, parses each
request with :func:`armscope.core.protocol.parse_command` and always answers with
one JSON object, so a bad request can never leave a REQ client waiting or
take the daemon down. Command semantics live in the daemon (``handler``).

Why it reads whole messages and never gives up: a REP socket must answer every
request it received before it may receive the next, and a request is every
frame of a ZeroMQ message. Reading only the first frame of a multipart request
left the socket in a state where the reply was refused, and treating that as
fatal disabled pause, slide, threshold and snapshot until a restart while the
heartbeats still said ``running``. So: every frame is read, a multipart or
oversized request gets an error reply, no per-request error is fatal, and if
the socket itself fails it is closed and made again (``make_socket``), counted
in ``restarts`` and visible in the daemon's status (``control`` in ``detail``).

Bad requests cost one log line each (not a traceback), and replies quote at
most :data:`ECHO_CHARS` characters of what the client sent, so a client cannot
flood the log or make the daemon echo a megabyte back.
"""
from __future__ import annotations

import json
import logging
import threading

import zmq

from armscope.core import protocol, schema_files
from armscope.core.errors import ArmscopeError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096          # a request longer than this gets an error reply
MAX_MESSAGE_BYTES = 1 << 20       # ZMQ_MAXMSGSIZE: libzmq drops the connection of a longer message
ECHO_CHARS = 64                   # at most this much of a client's text in a reply or log line
RESTART_BACKOFF_S = (0.1, 5.0)


def clip(text, limit: int = ECHO_CHARS):
    """``text`` (str or bytes) cut to ``limit`` characters, marked when cut."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def echo(cmd: str | None, frames: list[bytes]) -> str:
    """The reply's ``cmd`` (docs/protocol.md 2: always a string): the command
    if it was understood, else what was sent in its place, clipped: a JSON
    request's ``cmd`` value as JSON text (``5``, ``null``), or the request's
    first word (empty for an empty request)."""
    if cmd is not None:
        return clip(cmd)
    text = frames[0].decode("utf-8", "replace").strip() if frames else ""
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return clip(text)
        if isinstance(obj, dict) and "cmd" in obj:
            value = obj["cmd"]
            return clip(value if isinstance(value, str) else json.dumps(value))
        return clip(text)
    return clip(text.split()[0] if text.split() else "")


class ControlServer(threading.Thread):
    """``make_socket()`` returns a bound REP socket (options set before bind:
    ``armscope.edge.publisher.rep_socket``); it is called once at start and again after
    a socket failure. ``state`` is ``ok``, ``restarting`` or ``stopped``."""

    def __init__(self, make_socket, handler, stop: threading.Event, sock: zmq.Socket | None = None):
        super().__init__(name="control", daemon=True)
        self.make_socket, self.handler, self.stop = make_socket, handler, stop
        self.sock = sock
        self.requests = 0
        self.bad_requests = 0
        self.restarts = 0
        self.state = "ok"
        self._traced: set[str] = set()   # exception types already logged with a traceback
        self._off_schema: set = set()    # commands whose reply was logged as not following the schema

    def answer(self, frames: list[bytes]) -> dict:
        cmd = None
        try:
            if len(frames) != 1:
                raise ArmscopeError(f"request: expected one frame, got {len(frames)} (docs/protocol.md 2)")
            raw = frames[0]
            if len(raw) > MAX_REQUEST_BYTES:
                raise ArmscopeError(f"request: {len(raw)} bytes, at most {MAX_REQUEST_BYTES}")
            cmd, args = protocol.parse_command(raw)   # JSON checked against control-request.json
            if len(cmd) > ECHO_CHARS:
                raise ArmscopeError(f"unknown command {clip(cmd)!r}")
            reply = self.handler(cmd, args)
            return {"ok": True, "cmd": cmd, **reply}
        except ArmscopeError as exc:   # ProtocolError is one
            self.bad_requests += 1
            return {"ok": False, "cmd": echo(cmd, frames), "error": str(exc)}
        except Exception as exc:  # a bug in one command must not kill the control thread
            name = type(exc).__name__
            if name not in self._traced:     # the first of each kind with its traceback, then one line
                self._traced.add(name)
                log.exception("control command %r failed", clip(cmd))
            else:
                log.error("control command %r failed: %s: %s", clip(cmd), name, clip(str(exc), 200))
            return {"ok": False, "cmd": echo(cmd, frames), "error": f"internal error: {name}: {clip(str(exc), 200)}"}

    def checked(self, reply: dict) -> dict:
        """``reply`` as it goes out, checked against control-reply.json: a reply
        that does not follow it is a daemon bug, logged (once per command) with
        the field; the reply is still sent, so the command keeps working."""
        problem = schema_files.problem("control-reply", reply)
        if problem is not None and reply.get("cmd") not in self._off_schema:
            self._off_schema.add(reply.get("cmd"))
            log.error("control reply to %r does not follow control-reply.json: %s", clip(reply.get("cmd")), problem)
        return reply

    def _serve_one(self) -> None:
        frames = self.sock.recv_multipart()
        self.requests += 1
        reply = self.checked(self.answer(frames))
        if reply["ok"]:
            log.info("control %r -> ok", clip(frames[0]))
        else:
            log.warning("control %r -> refused: %s", clip(frames[0]), clip(reply["error"], 200))
        self.sock.send(json.dumps(reply, default=str).encode())

    def run(self) -> None:
        backoff = RESTART_BACKOFF_S[0]
        try:
            while not self.stop.is_set():
                try:
                    if self.sock is None:
                        self.sock = self.make_socket()
                        self.state = "ok"
                        backoff = RESTART_BACKOFF_S[0]
                    if self.sock.poll(100, zmq.POLLIN):
                        self._serve_one()
                except Exception as exc:   # the socket itself failed: make a new one
                    if self.stop.is_set():
                        break
                    self.state = "restarting"
                    self.restarts += 1
                    log.error("control socket failed (%s: %s); making it again in %.1f s",
                              type(exc).__name__, clip(str(exc), 200), backoff)
                    if self.sock is not None:
                        self.sock.close(0)
                        self.sock = None
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
        finally:
            self.state = "stopped"
            if self.sock is not None:
                self.sock.close(0)
