"""The ZeroMQ protocol between the edge daemon and its subscribers (the eyepiece
bridge, recorders, dashboards): one module imported by both sides, and the
headers' JSON Schemas (``armscope/core/schemas/message-*.json``, loaded by
``armscope.core.schema_files``, topic rules in ``message_schema``) that both sides validate with, so the
message schema has exactly one definition. ``docs/protocol.md`` is the prose
version, precise enough to write a subscriber in another language; a test
keeps its tables and the schemas in agreement.

Wire format (PUB/SUB, default ``tcp://127.0.0.1:5556``): every message is three
frames ``[topic, header, payload]``:

* ``topic``   ASCII ``overlay``, ``status`` or ``rendered`` (subscribe by prefix as usual);
* ``header``  UTF-8 JSON object, ``schema`` = :data:`SCHEMA_VERSION`;
* ``payload`` ``overlay``: the Grad-CAM as data (``cam.classes x cam.height x
  cam.width`` values of ``cam.dtype``, a few KB), rendered by the subscriber
  where it displays it; ``rendered`` (opt-in, daemon option ``rendered_topic``):
  the same overlay drawn as an RGBA bitmap for simple subscribers; ``status``: empty.

Version 2 moved the overlay from a bitmap to data: a version-1 subscriber
refuses every version-2 message on its ``schema`` check (a clear "schema 2,
this subscriber supports 1"), and one that only wants a bitmap subscribes to
``rendered``.

``ZMQ_CONFLATE`` cannot be used (it breaks multipart messages), so "newest
wins" is done by small high-water marks and kernel buffers on both ends plus
:meth:`Subscriber.recv_latest`, which drains whatever is queued and returns
only the newest message per topic.

Control (REQ/REP, default ``tcp://127.0.0.1:5557``): a request is one frame,
either text (``slide start S-0042``) or JSON (``{"cmd": "slide", "args":
["start", "S-0042"]}``); the reply is one JSON object with ``ok`` true/false.
Its wire format and client are ``armscope.core.control_wire``, re-exported
here (``protocol.control_request``, ``parse_command``, ...).

Only ``zmq``, jsonschema and the standard library are imported at module
level; numpy and OpenCV are imported by :func:`cam_array` and
:func:`overlay_image` only.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from armscope.core import message_schema
from armscope.core.control_wire import (  # noqa: F401  (re-exported: the control socket's side of the protocol)
    DEFAULT_CONTROL, control_request, format_command, parse_command,
)
from armscope.core.curve import apply_curve_client, load_keypair, write_keypair  # noqa: F401  (re-exported)
from armscope.core.errors import ArmscopeError, ProtocolError

SCHEMA_VERSION = 2

TOPIC_OVERLAY = b"overlay"      # the overlay as data: decision, probabilities, CAM, geometry, timestamps
TOPIC_STATUS = b"status"
TOPIC_RENDERED = b"rendered"    # opt-in: the overlay as an RGBA bitmap (not a prefix of "overlay", on purpose)
TOPICS = (TOPIC_OVERLAY, TOPIC_STATUS, TOPIC_RENDERED)
SUBSCRIBE_DEFAULT = (TOPIC_OVERLAY, TOPIC_STATUS)

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
# The bridge's default cap on a message's stale_after_ms (``--max-stale-ms``): the daemon warns
# when the window it derives is longer, since such a bridge blanks between its overlays
BRIDGE_MAX_STALE_MS = 5000.0

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
ENCODING_RAW = "raw"           # overlay: the CAM array; rendered: height * width * 4 bytes
ENCODING_PNG = "png"           # rendered: one PNG file (RGBA, 8 bit)
ENCODING_NONE = "none"         # empty payload (status messages)
ENCODINGS = (ENCODING_RAW, ENCODING_PNG)
CAM_DTYPES = {"float16": 2, "uint8": 1}   # cam.dtype -> bytes per value


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
        if "capture_mono" not in self.header:
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
    """The three frames for ``send_multipart``. ``header`` must already be
    complete; it is validated against its topic's schema and the payload
    (the daemon never sends what a subscriber would refuse)."""
    topic = topic.encode() if isinstance(topic, str) else topic
    if topic not in TOPICS:
        raise ProtocolError(f"topic {topic!r}: expected one of {[t.decode() for t in TOPICS]}")
    header = dict(header, schema=SCHEMA_VERSION, topic=topic.decode(), payload_bytes=len(payload))
    text = json.dumps(header, separators=(",", ":"), allow_nan=False, default=_json_default)
    _check(topic, json.loads(text), len(payload))   # the header as a subscriber will read it
    return [topic, text.encode("utf-8"), bytes(payload)]


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def decode(frames: list[bytes]) -> Message:
    """Parse and validate one received multipart message (raises ProtocolError)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames [topic, header, payload], got {len(frames)}")
    topic = bytes(frames[0])
    if topic not in TOPICS:
        raise ProtocolError(f"frame 0 (topic): {topic[:32]!r} is not one of {[t.decode() for t in TOPICS]}")
    try:
        # NaN, Infinity and 1e999 are refused here, so every number in a header is finite.
        header = json.loads(bytes(frames[1]).decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and integers
        # too long to convert; RecursionError comes from absurdly nested JSON.
        raise ProtocolError(f"frame 1 (header): not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame 1 (header): expected a JSON object")
    payload = bytes(frames[2])
    _check(topic, header, len(payload))
    return Message(topic.decode(), header, payload)


def _check(topic: bytes, header: dict, payload_bytes: int) -> None:
    """The version, the topic's schema, then what a schema cannot say."""
    if header.get("schema") != SCHEMA_VERSION:
        raise ProtocolError(f"header key schema: {str(header.get('schema'))[:20]}, this subscriber supports "
                            f"{SCHEMA_VERSION}" + (" (version 1 sent the overlay as a bitmap: see docs/protocol.md)"
                                                  if header.get("schema") == 1 else ""))
    name = topic.decode()
    if (problem := message_schema.header_problem(name, header)) is not None:
        raise ProtocolError(problem)
    if header["topic"] != name:
        raise ProtocolError(f"header key topic: {header['topic']!r}, but frame 0 is {name!r}")
    if header["payload_bytes"] != payload_bytes:
        raise ProtocolError(f"header key payload_bytes: {header['payload_bytes']}, but frame 2 has {payload_bytes} bytes")
    if topic == TOPIC_STATUS:
        return
    _check_decision(header["probs"], header["classes"], header["decision"], "")
    if header.get("subtype") is not None:  # optional (cascade bundles); docs/protocol.md
        s = header["subtype"]
        _check_decision(s["probs"], s["classes"], s["decision"], "subtype.")
    r = header["region"]
    if r["x"] + r["size"] > r["frame_width"] or r["y"] + r["size"] > r["frame_height"]:
        raise ProtocolError(f"header key region: crop x={r['x']} y={r['y']} size={r['size']} is not inside the "
                            f"{r['frame_width']}x{r['frame_height']} frame")
    if topic == TOPIC_RENDERED:
        if header["encoding"] == ENCODING_RAW and payload_bytes != header["width"] * header["height"] * 4:
            raise ProtocolError(f"header keys width/height: {header['width']}x{header['height']} RGBA8 is "
                                f"{header['width'] * header['height'] * 4} bytes, payload has {payload_bytes}")
        return
    c = header["cam"]
    if c["index"] >= c["classes"]:
        raise ProtocolError(f"header key cam.index: {c['index']} is not an index into its {c['classes']} maps")
    want = c["classes"] * c["height"] * c["width"] * CAM_DTYPES[c["dtype"]]
    if payload_bytes != want:
        raise ProtocolError(f"header key cam: {c['classes']}x{c['height']}x{c['width']} {c['dtype']} is {want} "
                            f"bytes, payload has {payload_bytes}")
    b = c["box"]
    if b["x"] > r["x"] or b["y"] > r["y"] or b["x"] + b["size"] < r["x"] + r["size"] \
            or b["y"] + b["size"] < r["y"] + r["size"]:
        raise ProtocolError(f"header key cam.box: {b} does not cover the region x={r['x']} y={r['y']} "
                            f"size={r['size']}")


def _check_decision(probs: list, classes: list, decision: dict, prefix: str) -> None:
    if len(probs) != len(classes):
        raise ProtocolError(f"header keys {prefix}probs/{prefix}classes: lengths differ")
    if decision["index"] >= len(classes):
        raise ProtocolError(f"header key {prefix}decision.index: {decision['index']} is not an index into its "
                            f"{len(classes)} classes")


def cam_array(message: Message):
    """The CAM maps of an ``overlay`` as float32 (classes, height, width), in
    the model's units (``cam.scale`` applied). Raises ProtocolError on a
    non-finite value (a float16 payload can carry NaN/inf bit patterns)."""
    import numpy as np

    c = message.header["cam"]
    dtype = np.dtype("<f2") if c["dtype"] == "float16" else np.dtype(np.uint8)
    maps = np.frombuffer(message.payload, dtype=dtype).reshape(c["classes"], c["height"], c["width"])
    maps = maps.astype(np.float32) * np.float32(c["scale"])
    if not np.isfinite(maps).all():
        raise ProtocolError("overlay payload: the CAM holds non-finite values")
    return maps


def cam_payload(maps, dtype: str = "float16") -> tuple[bytes, float]:
    """``(payload, scale)`` for (classes, height, width) CAM maps: float16 as
    is (scale 1), or uint8 of ``maps / scale`` with ``scale = max / 255``
    (negative values clamp to 0: Grad-CAM is rectified)."""
    import numpy as np

    maps = np.ascontiguousarray(maps, dtype=np.float32)
    if dtype == "float16":
        return maps.astype("<f2").tobytes(), 1.0
    if dtype != "uint8":
        raise ValueError(f"cam dtype {dtype!r}: expected one of {list(CAM_DTYPES)}")
    peak = float(maps.max()) if maps.size else 0.0
    scale = peak / 255.0 if peak > 0 and math.isfinite(peak) else 1.0
    return np.clip(np.rint(maps / scale), 0, 255).astype(np.uint8).tobytes(), scale


def overlay_image(message: Message):
    """A ``rendered`` message's overlay as a numpy (height, width, 4) uint8 RGBA array (straight alpha)."""
    import numpy as np

    if "width" not in message.header:
        raise ProtocolError(f"a {message.topic} message carries no bitmap: subscribe to 'rendered' "
                            "(daemon option rendered_topic) or render the CAM (armscope.core.overlay)")
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


RCVHWM = 4
RCVBUF_BYTES = 16 * 1024   # the kernel doubles it: ~32 KiB, a few v2 overlays and heartbeats, never seconds of them


class Subscriber:
    """A SUB socket set up the way this protocol expects (small RCVHWM, a
    small kernel receive buffer, no linger), options set before it connects
    (libzmq ignores them afterwards). ``recv_latest`` is what a display wants:
    everything queued is drained and only the newest message per topic is
    returned, so a slow reader never works through a backlog.

    Why a fixed ``SO_RCVBUF``: left alone, Linux grows a TCP receive buffer
    up to megabytes, which holds minutes of few-KB overlays for a reader that
    stalled; set, it stays small (and TCP flow control then holds the daemon's
    sends back, where its own small buffers drop them). A ``rendered``
    subscriber can pass a larger ``rcvbuf`` for throughput.
    ``topics``: ``overlay`` and ``status`` by default; ``rendered`` is opt-in."""

    def __init__(self, endpoint: str = DEFAULT_PUBLISH, topics=SUBSCRIBE_DEFAULT, context=None,
                 curve: dict | None = None, rcvbuf: int = RCVBUF_BYTES):
        zmq = _zmq()
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, RCVHWM)
        self.socket.setsockopt(zmq.RCVBUF, int(rcvbuf))
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


def now_pair() -> tuple[float, float]:
    """(monotonic, wall) seconds, read together."""
    return time.monotonic(), time.time()


def finite(value: Any) -> float:
    """A probability for a header: JSON forbids NaN/inf, so they become 0.0 (never seen in practice)."""
    value = float(value)
    return value if math.isfinite(value) else 0.0
