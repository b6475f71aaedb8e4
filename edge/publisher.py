"""The daemon's side of the ZeroMQ sockets: PUB set up so that slow or dead
subscribers can never slow the daemon down, and the common header fields
(schema, run id, sequence, timestamps) filled in one place.

Why these options: ``SNDHWM=2`` (one overlay and one status per subscriber
at most) makes libzmq drop instead of queue for a subscriber that does not
read; ``send(NOBLOCK)`` makes sure the sending thread never waits (PUB drops
anyway, NOBLOCK is belt and braces); ``LINGER=0`` lets the daemon exit at once
even with unsent messages. ``CONFLATE`` is not used: it does not support
multipart messages (see docs/protocol.md, 1.5).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

import zmq

from armscope import protocol
from armscope.errors import ArmscopeError

log = logging.getLogger(__name__)


def setup_curve_server(context: zmq.Context, sockets, server_secret: str, clients_dir: str):
    """Make ``sockets`` CurveZMQ servers; with ``clients_dir`` start a ZAP
    authenticator that admits only the public keys found there. Returns the
    authenticator (to stop on shutdown) or None."""
    public, secret = protocol.load_keypair(server_secret)
    if secret is None:
        raise ArmscopeError(f"{server_secret}: has no secret-key (key 'curve_server_secret' needs the .key_secret file)")
    auth = None
    if clients_dir:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(Path(clients_dir)))
    for sock in sockets:
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    return auth


def bind(sock: zmq.Socket, endpoint: str, key: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ArmscopeError(f"key {key!r}: cannot bind {endpoint} ({exc})") from None


class Publisher:
    """Thread-safe PUB socket: the render thread and the heartbeat thread both send."""

    def __init__(self, sock: zmq.Socket, model_id: str, stale_after_ms: int):
        sock.setsockopt(zmq.SNDHWM, 2)
        sock.setsockopt(zmq.LINGER, 0)
        self.sock = sock
        self.model_id = model_id
        self.stale_after_ms = stale_after_ms
        self.run_id = secrets.token_hex(8)
        self.seq = 0
        self.lock = threading.Lock()
        self.sent = 0
        self.send_failures = 0
        self.closed = False

    def send(self, topic: bytes, header: dict, payload: bytes = b"", slide_id: str | None = None) -> dict:
        """Fill the common keys, stamp publish time, send without blocking; returns the header sent."""
        with self.lock:
            if self.closed:
                return header
            self.seq += 1
            header = dict(header, run_id=self.run_id, seq=self.seq, model_id=self.model_id, slide_id=slide_id,
                          stale_after_ms=self.stale_after_ms)
            header["publish_mono"], header["publish_wall"] = time.monotonic(), time.time()
            frames = protocol.encode(topic, header, payload)
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(payload) < 65536)
                self.sent += 1
            except zmq.Again:
                self.send_failures += 1
            return header

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.sock.close(0)
