"""The daemon's side of the ZeroMQ sockets: PUB set up so that slow or dead
subscribers can never slow the daemon down, and the common header fields
(schema, run id, sequence, timestamps) filled in one place.

Why these options: ``SNDHWM=2`` (one overlay and one status per subscriber
at most) makes libzmq drop instead of queue for a subscriber that does not
read; ``SNDBUF`` (the kernel's send buffer per connection) is sized to the
largest message sent (a v2 overlay is a few KB: 16 KiB; with the opt-in
``rendered`` topic one raw bitmap), so the kernel cannot hold a backlog of
old overlays either (a 4 MiB buffer held ~1000 few-KB overlays);
``send(NOBLOCK)`` makes sure the sending thread never waits (PUB drops
anyway, NOBLOCK is belt and braces); ``LINGER=0`` lets the daemon exit at once
even with unsent messages. ``CONFLATE`` is not used: it does not support
multipart messages (see docs/protocol.md, 1.6).

libzmq applies HWM and buffer sizes when a socket binds or connects: set
afterwards, they are ignored for that endpoint (an idle subscriber then queued
the default 1000 overlays, ~4 GB of raw 1024x1024 RGBA). So the sockets are
made here, with their options, before anything binds them.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from pathlib import Path

import zmq

from armscope.core import protocol
from armscope.core.errors import ArmscopeError

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
        make_curve_server(sock, public, secret)
    return auth


def make_curve_server(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret


SNDHWM = 2
HEADER_ALLOWANCE = 64 * 1024   # a header frame is a few KB; slack for the topic and framing
MESSAGE_BUFFER = 16 * 1024     # v2: a header and a CAM (2 x 20 x 20 float16 is 1.6 KB); the kernel doubles it


def send_buffer_bytes(overlay_size: int | None) -> int:
    """SO_SNDBUF for the PUB socket (docs/protocol.md 1.6): with the opt-in
    ``rendered`` topic one raw RGBA bitmap of ``overlay_size`` squared pixels
    plus its header; without (``None``) a few v2 messages. A message larger
    than the buffer is still sent (TCP streams it); the buffer only bounds
    what can wait in the kernel."""
    if overlay_size is None:
        return MESSAGE_BUFFER
    return overlay_size * overlay_size * 4 + HEADER_ALLOWANCE


def pub_socket(context: zmq.Context, overlay_size: int | None = None) -> zmq.Socket:
    """A PUB socket with the options that must be in force before it binds
    (``overlay_size``: the ``rendered`` topic's bitmap side, or None without it)."""
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.SNDBUF, send_buffer_bytes(overlay_size))
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def rep_socket(context: zmq.Context) -> zmq.Socket:
    """The control REP socket, options set before it binds (armscope.edge.control bounds request size)."""
    from armscope.edge.control import MAX_MESSAGE_BYTES

    sock = context.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


def bind(sock: zmq.Socket, endpoint: str, key: str) -> str:
    """Bind ``endpoint`` and return the endpoint actually bound.

    Why return it: ``tcp://HOST:*`` lets the OS choose a free port at bind time
    (no window in which another process can take a port picked beforehand);
    ``ZMQ_LAST_ENDPOINT`` is the only place that port is then known."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ArmscopeError(f"key {key!r}: cannot bind {endpoint} ({exc})") from None
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


class Publisher:
    """Thread-safe PUB socket (made by :func:`pub_socket`, already bound): the
    render thread and the heartbeat thread both send."""

    def __init__(self, sock: zmq.Socket, model_id: str, stale_after_ms: int):
        if sock.getsockopt(zmq.SNDHWM) != SNDHWM:
            raise ValueError("Publisher needs a socket from pub_socket(): SNDHWM must be set before bind")
        self.sock = sock
        self.model_id = model_id
        self.stale_after_ms = stale_after_ms
        self.run_id = secrets.token_hex(8)
        self.seq = 0
        self.lock = threading.Lock()
        self.sent = 0
        self.send_failures = 0
        self.stale_dropped = 0
        self.last_stale_age_ms = None
        self.closed = False

    def send(self, topic: bytes, header: dict, payload: bytes = b"", slide_id: str | None = None) -> dict | None:
        """Fill the common keys, stamp publish time, send without blocking; returns the header sent.

        An overlay whose capture (``capture_mono``) is older than ``stale_after_ms``
        at the publish stamp is not sent (returns None, counted in ``stale_dropped``):
        the stale window bounds how old an overlay in the eyepiece may be, from the
        photon, not from the publish (docs/protocol.md 1.5). The check sits next to
        the stamp so no pause of the process (SIGSTOP, swapping) can fall between them.
        """
        with self.lock:
            if self.closed:
                return header
            now_mono, now_wall = time.monotonic(), time.time()
            capture = header.get("capture_mono")
            if capture is not None and (now_mono - capture) * 1000.0 > self.stale_after_ms:
                self.stale_dropped += 1
                self.last_stale_age_ms = (now_mono - capture) * 1000.0
                return None
            self.seq += 1
            header = dict(header, run_id=self.run_id, seq=self.seq, model_id=self.model_id, slide_id=slide_id,
                          stale_after_ms=self.stale_after_ms)
            header["publish_mono"], header["publish_wall"] = now_mono, now_wall
            frames = protocol.encode(topic, header, payload)
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(payload) < 65536)
                self.sent += 1
            except zmq.Again:
                self.send_failures += 1
            # the header as it went out (schema, topic, payload_bytes, finite numbers): what a
            # subscriber decodes, and what a snapshot saves (docs/protocol.md 2)
            return json.loads(frames[1])

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.sock.close(0)
