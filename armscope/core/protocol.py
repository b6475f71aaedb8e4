"""The ZeroMQ protocol between the edge daemon and its subscribers (the eyepiece
bridge, recorders, dashboards): one module imported by both sides, so the
message schema has exactly one definition. ``docs/protocol.md`` is the prose
version, precise enough to write a subscriber in another language.

Wire format (PUB/SUB, default ``tcp://127.0.0.1:5556``): every message is three
frames ``[topic, header, payload]``:

* ``topic``   ASCII ``overlay`` or ``status`` (subscribe by prefix as usual);
* ``header``  UTF-8 JSON object, ``schema`` = :data:`SCHEMA_VERSION`;
* ``payload`` the overlay image (``overlay``) or empty (``status``).

``ZMQ_CONFLATE`` cannot be used (it breaks multipart messages), so "newest
wins" is done by small high-water marks on both ends plus :meth:`Subscriber.recv_latest`,
which drains whatever is queued and returns only the newest message per topic.

Control (REQ/REP, default ``tcp://127.0.0.1:5557``): a request is one frame,
either text (``slide start S-0042``) or JSON (``{"cmd": "slide", "args":
["start", "S-0042"]}``); the reply is one JSON object with ``ok`` true/false.

Only ``zmq`` and the standard library are imported at module level; numpy and
OpenCV are imported by :func:`overlay_image` only.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armscope.core.errors import ArmscopeError

SCHEMA_VERSION = 1

TOPIC_OVERLAY = b"overlay"
TOPIC_STATUS = b"status"
TOPICS = (TOPIC_OVERLAY, TOPIC_STATUS)

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"

# Daemon states carried by every ``status`` message (``state`` field).
STATE_STARTING = "starting"      # opening the backend / source; nothing classified yet
STATE_RUNNING = "running"        # overlays are being published
STATE_NO_TISSUE = "no_tissue"    # frames arrive but are not classified (see ``reason``)
STATE_NO_SIGNAL = "no_signal"    # no frames from the source; reconnecting with backoff
STATE_PAUSED = "paused"          # paused by the control socket; frames are not classified
STATE_STOPPING = "stopping"      # last message before the daemon exits
STATES = (STATE_STARTING, STATE_RUNNING, STATE_NO_TISSUE, STATE_NO_SIGNAL, STATE_PAUSED, STATE_STOPPING)

# ``reason`` values that accompany STATE_NO_TISSUE.
REASON_NO_TISSUE = "no_tissue"        # too little stained tissue in the crop (mostly glass)
REASON_OUT_OF_FOCUS = "out_of_focus"  # tissue present but the image is blurred

FORMAT_RGBA8 = "RGBA8"         # straight (non-premultiplied) alpha, row-major, 4 bytes/pixel
ENCODING_RAW = "raw"           # payload = height * width * 4 bytes
ENCODING_PNG = "png"           # payload = one PNG file (RGBA, 8 bit)
ENCODING_NONE = "none"         # empty payload (status messages)
ENCODINGS = (ENCODING_RAW, ENCODING_PNG)

# Header keys every message has, then the extra keys per topic.
COMMON_KEYS = ("schema", "topic", "run_id", "seq", "publish_mono", "publish_wall", "model_id", "slide_id",
               "stale_after_ms", "encoding", "payload_bytes")
OVERLAY_KEYS = COMMON_KEYS + ("frame_id", "capture_mono", "capture_wall", "classes", "probs", "decision",
                              "width", "height", "format", "region")
STATUS_KEYS = COMMON_KEYS + ("state", "heartbeat", "frame_id")


class ProtocolError(ArmscopeError):
    """A message that does not follow this schema (names the frame or key)."""


@dataclass
class Message:
    """One decoded message. ``header`` is the JSON object; ``payload`` the raw bytes."""

    topic: str
    header: dict
    payload: bytes

    @property
    def is_overlay(self) -> bool:
        return self.topic == TOPIC_OVERLAY.decode()

    def age_ms(self, now_mono: float | None = None) -> float:
        """Milliseconds since publication (same host only: CLOCK_MONOTONIC is per machine)."""
        now = time.monotonic() if now_mono is None else now_mono
        return (now - float(self.header["publish_mono"])) * 1000.0

    def latency_ms(self) -> float | None:
        """Capture -> publish latency the daemon measured, for overlays."""
        if not self.is_overlay:
            return None
        return (float(self.header["publish_mono"]) - float(self.header["capture_mono"])) * 1000.0

    def is_stale(self, received_mono: float, now_mono: float | None = None) -> bool:
        """True once ``stale_after_ms`` has passed since this message was received:
        a subscriber must then stop showing it (blank the display)."""
        now = time.monotonic() if now_mono is None else now_mono
        return (now - received_mono) * 1000.0 > float(self.header["stale_after_ms"])


def _json_default(value):
    # numpy scalars and arrays sneak into headers; make them plain JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode(topic: bytes | str, header: dict, payload: bytes = b"") -> list[bytes]:
    """The three frames for ``send_multipart``. ``header`` must already be complete."""
    topic = topic.encode() if isinstance(topic, str) else topic
    if topic not in TOPICS:
        raise ProtocolError(f"topic {topic!r}: expected one of {[t.decode() for t in TOPICS]}")
    header = dict(header, schema=SCHEMA_VERSION, topic=topic.decode(), payload_bytes=len(payload))
    text = json.dumps(header, separators=(",", ":"), allow_nan=False, default=_json_default)
    return [topic, text.encode("utf-8"), bytes(payload)]


def decode(frames: list[bytes]) -> Message:
    """Parse and validate one received multipart message (raises ProtocolError)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames [topic, header, payload], got {len(frames)}")
    topic = bytes(frames[0])
    if topic not in TOPICS:
        raise ProtocolError(f"frame 0 (topic): {topic[:32]!r} is not one of {[t.decode() for t in TOPICS]}")
    try:
        header = json.loads(bytes(frames[1]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and integers
        # too long to convert; RecursionError comes from absurdly nested JSON.
        raise ProtocolError(f"frame 1 (header): not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame 1 (header): expected a JSON object")
    if header.get("schema") != SCHEMA_VERSION:
        raise ProtocolError(f"header key schema: {header.get('schema')!r}, this subscriber supports {SCHEMA_VERSION}")
    required = OVERLAY_KEYS if topic == TOPIC_OVERLAY else STATUS_KEYS
    missing = [k for k in required if k not in header]
    if missing:
        raise ProtocolError(f"header of a {topic.decode()} message: missing keys {missing}")
    payload = bytes(frames[2])
    # Type-check the keys used in arithmetic below, so a malformed header is a
    # ProtocolError, never a TypeError (or "x" * 10**9 from width * height).
    int_keys = ("payload_bytes", "width", "height") if topic == TOPIC_OVERLAY else ("payload_bytes",)
    for key in int_keys:
        if not _is_int(header[key]) or header[key] < 0:
            raise ProtocolError(f"header key {key}: {str(header[key])[:40]!r} is not a non-negative integer")
    if header["payload_bytes"] != len(payload):
        raise ProtocolError(f"header key payload_bytes: {header['payload_bytes']}, but frame 2 has {len(payload)} bytes")
    if topic == TOPIC_OVERLAY:
        if header["encoding"] not in ENCODINGS:
            raise ProtocolError(f"header key encoding: {header['encoding']!r}, expected one of {list(ENCODINGS)}")
        if header["format"] != FORMAT_RGBA8:
            raise ProtocolError(f"header key format: {header['format']!r}, expected {FORMAT_RGBA8!r}")
        if header["encoding"] == ENCODING_RAW and len(payload) != header["width"] * header["height"] * 4:
            raise ProtocolError(f"header keys width/height: {header['width']}x{header['height']} RGBA8 is "
                                f"{header['width'] * header['height'] * 4} bytes, payload has {len(payload)}")
        if not isinstance(header["probs"], list) or not isinstance(header["classes"], list):
            raise ProtocolError("header keys probs/classes: expected lists")
        if len(header["probs"]) != len(header["classes"]):
            raise ProtocolError("header keys probs/classes: lengths differ")
        subtype = header.get("subtype")
        if subtype is not None:  # optional (cascade bundles); docs/protocol.md
            if not isinstance(subtype, dict) or not isinstance(subtype.get("classes"), list) \
                    or not isinstance(subtype.get("probs"), list) or not isinstance(subtype.get("decision"), dict):
                raise ProtocolError("header key subtype: expected null or an object with lists classes/probs "
                                    "and an object decision")
            if len(subtype["probs"]) != len(subtype["classes"]):
                raise ProtocolError("header key subtype: probs/classes lengths differ")
    elif header["state"] not in STATES:
        raise ProtocolError(f"header key state: {header['state']!r}, expected one of {list(STATES)}")
    return Message(topic.decode(), header, payload)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def overlay_image(message: Message):
    """The overlay as a numpy (height, width, 4) uint8 RGBA array (straight alpha)."""
    import numpy as np

    h, w = int(message.header["height"]), int(message.header["width"])
    if message.header["encoding"] == ENCODING_RAW:
        return np.frombuffer(message.payload, dtype=np.uint8).reshape(h, w, 4)
    import cv2

    image = cv2.imdecode(np.frombuffer(message.payload, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 3 or image.shape != (h, w, 4):
        got = None if image is None else image.shape
        raise ProtocolError(f"PNG payload: decoded to {got}, header says {(h, w, 4)}")
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)


# ---------------------------------------------------------------- sockets


def _zmq():
    import zmq

    return zmq


def endpoint_problem(endpoint: str, *, bind: bool) -> str | None:
    """What is wrong with a ZeroMQ ``endpoint`` for ``bind``/connect, or None.

    Why: libzmq answers a typo with "Invalid argument" and no hint, a port
    out of range only when connecting in the background (the bridge would
    wait forever, dark), and a wildcard host is only meaningful to bind."""
    scheme, sep, rest = str(endpoint).partition("://")
    expected = ("expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:5556)" + (", tcp://*:PORT" if bind else "")
                + " or ipc:///PATH")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        return expected
    if scheme != "tcp":
        return None if rest else expected
    host, _, port = rest.rpartition(":")
    if not host or not (port.isdigit() and 1 <= int(port) <= 65535 or bind and port == "*"):
        return f"{expected}; PORT 1..65535"
    if not bind and host.strip("[]") in ("*", "0.0.0.0", "::"):
        return f"a wildcard host can only be bound to; connect to the daemon's address, e.g. tcp://127.0.0.1:{port}"
    return None


class Subscriber:
    """A SUB socket set up the way this protocol expects (small RCVHWM, no
    linger). ``recv_latest`` is what a display wants: everything queued is
    drained and only the newest message per topic is returned, so a slow
    reader never works through a backlog."""

    def __init__(self, endpoint: str = DEFAULT_PUBLISH, topics=TOPICS, context=None, curve: dict | None = None):
        zmq = _zmq()
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 4)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve:
            apply_curve_client(self.socket, **curve)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode() if isinstance(topic, str) else topic)
        try:
            if (problem := endpoint_problem(endpoint, bind=False)) is not None:
                raise ArmscopeError(problem)
            self.socket.connect(endpoint)
        except (ArmscopeError, zmq.ZMQError) as exc:
            self.close()
            raise ArmscopeError(f"cannot subscribe to {endpoint!r}: {exc}") from None

    def recv(self, timeout_ms: int = 1000) -> Message | None:
        """The next message, or None after ``timeout_ms``."""
        zmq = _zmq()
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return None
        return decode(self.socket.recv_multipart())

    def recv_latest(self, timeout_ms: int = 1000) -> dict[str, Message]:
        """Wait up to ``timeout_ms`` for a message, then drain the queue; returns
        ``{topic: newest message}`` (empty dict on timeout)."""
        zmq = _zmq()
        newest: dict[str, Message] = {}
        first = self.recv(timeout_ms)
        if first is None:
            return newest
        newest[first.topic] = first
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return newest
            message = decode(frames)
            newest[message.topic] = message

    def close(self) -> None:
        self.socket.close(0)
        if self._own_context:
            self.context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_command(command: str | dict) -> bytes:
    if isinstance(command, dict):
        return json.dumps(command).encode()
    return command.encode()


def parse_command(raw: bytes) -> tuple[str, list[str]]:
    """A request frame -> (command, args). Text is split on whitespace; JSON is
    ``{"cmd": str, "args": [str, ...]}``. Raises ProtocolError naming the problem."""
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
        if not isinstance(obj, dict) or not isinstance(obj.get("cmd"), str):
            raise ProtocolError("request: JSON requests need a string key 'cmd'")
        args = obj.get("args", [])
        if not isinstance(args, list):
            raise ProtocolError("request key args: expected a list")
        if not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in args):
            raise ProtocolError("request key args: expected a list of strings or numbers")
        return obj["cmd"].lower(), [str(a) for a in args]
    parts = text.split()
    return parts[0].lower(), parts[1:]


def control_request(command: str | dict, endpoint: str = DEFAULT_CONTROL, timeout_ms: int = 3000,
                    context=None, curve: dict | None = None) -> dict:
    """Send one control command and return the JSON reply. A fresh REQ socket
    per call, so a lost reply never wedges the next request."""
    zmq = _zmq()
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
        return json.loads(sock.recv().decode("utf-8"))
    finally:
        sock.close(0)


# ---------------------------------------------------------------- CurveZMQ keys


def _read_z85(path: Path, field: str) -> bytes | None:
    """Read ``public-key``/``secret-key`` from a ZPL certificate (the format
    ``zmq.auth`` uses, so its tools read our files and vice versa)."""
    if not path.is_file():
        raise ArmscopeError(f"{path}: no such CurveZMQ key file")
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith(field):
            _, _, value = line.partition("=")
            value = value.strip().strip('"')
            if len(value) != 40:
                raise ArmscopeError(f"{path}: {field} is not a 40-character Z85 key")
            return value.encode()
    return None


def load_keypair(path: str | Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from ``NAME.key`` or ``NAME.key_secret``."""
    path = Path(path)
    public = _read_z85(path, "public-key")
    if public is None:
        raise ArmscopeError(f"{path}: no public-key line (expected a ZPL certificate written by 'armscope keys')")
    return public, _read_z85(path, "secret-key")


def apply_curve_client(socket, server_public: str | Path, client_secret: str | Path) -> None:
    """Configure a client socket (SUB, REQ) for CurveZMQ: the server's public
    key file and this client's secret key file."""
    server_key, _ = load_keypair(server_public)
    public, secret = load_keypair(client_secret)
    if secret is None:
        raise ArmscopeError(f"{client_secret}: has no secret-key (pass the .key_secret file)")
    socket.curve_serverkey = server_key
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def write_keypair(directory: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Make a CurveZMQ keypair with ``zmq.curve_keypair`` and write
    ``NAME.key`` (public, give it to peers) and ``NAME.key_secret`` (mode 0600)."""
    zmq = _zmq()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists() and not force:
            raise ArmscopeError(f"{path}: already exists (use --force to replace it)")
    public, secret = zmq.curve_keypair()
    banner = "#   ZeroMQ CURVE certificate written by 'armscope keys'\n"
    public_text = f"{banner}metadata\ncurve\n    public-key = \"{public.decode()}\"\n"
    secret_text = public_text + f"    secret-key = \"{secret.decode()}\"\n"
    public_path.write_text(public_text)
    secret_path.touch(mode=0o600)
    secret_path.chmod(0o600)
    secret_path.write_text(secret_text)
    return public_path, secret_path


def now_pair() -> tuple[float, float]:
    """(monotonic, wall) seconds, read together."""
    return time.monotonic(), time.time()


def finite(value: Any) -> float:
    """A probability for a header: JSON forbids NaN/inf, so they become 0.0 (never seen in practice)."""
    value = float(value)
    return value if math.isfinite(value) else 0.0
