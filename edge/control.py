"""The control socket (REP): one thread that owns the socket, parses each
request with :func:`armscope.protocol.parse_command` and always answers with
one JSON object, so a bad request can never leave a REQ client waiting or
take the daemon down. Command semantics live in the daemon (``handler``)."""
from __future__ import annotations

import json
import logging
import threading

import zmq

from armscope import protocol
from armscope.errors import ArmscopeError

log = logging.getLogger(__name__)


class ControlServer(threading.Thread):
    def __init__(self, sock: zmq.Socket, handler, stop: threading.Event):
        super().__init__(name="control", daemon=True)
        sock.setsockopt(zmq.LINGER, 0)
        self.sock, self.handler, self.stop = sock, handler, stop
        self.requests = 0

    def answer(self, raw: bytes) -> dict:
        cmd = None
        try:
            cmd, args = protocol.parse_command(raw)
            reply = self.handler(cmd, args)
            return {"ok": True, "cmd": cmd, **reply}
        except ArmscopeError as exc:
            return {"ok": False, "cmd": cmd, "error": str(exc)}
        except Exception as exc:  # a bug in one command must not kill the control thread
            log.exception("control command %r failed", cmd)
            return {"ok": False, "cmd": cmd, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.sock.poll(100, zmq.POLLIN):
                    continue
                raw = self.sock.recv()
                self.requests += 1
                reply = self.answer(raw)
                log.info("control %r -> ok=%s", raw[:80], reply["ok"])
                self.sock.send(json.dumps(reply, default=str).encode())
        except zmq.ZMQError as exc:
            if not self.stop.is_set():
                log.error("control socket failed: %s", exc)
        finally:
            self.sock.close(0)
