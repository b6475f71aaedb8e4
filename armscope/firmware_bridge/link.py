"""Framed, acknowledged link from the host to an eyepiece display controller.

Why this module exists
----------------------
The microdisplay sits behind a small microcontroller reached over a UART or
USB-CDC serial line.  Serial links drop and corrupt bytes, controllers
reboot (brown-out, watchdog), and a diagnostic overlay that arrives torn or
stale is worse than none.  So every message is

* COBS-framed with a 0x00 delimiter, so a receiver resynchronises at the
  next delimiter after any garbage;
* protected by CRC-32 (``zlib.crc32``: IEEE 802.3, reflected polynomial
  0xEDB88320) over header + body;
* numbered with a 32-bit sequence number; frame chunks are delivered in
  order with a Go-Back-N sliding window (cumulative ACKs, NAK on gap/CRC
  error, resend on timeout) because stop-and-wait would leave a USB link idle
  for a round trip per chunk;
* and the controller announces a reset (``RESET``), after which the host
  re-handshakes (``HELLO``) and resends the whole frame.

``LinkSender`` either delivers a frame within its deadline or raises
``LinkTimeout``/``LinkProtocolError``; the caller then blanks the display.
The byte-level specification is ``docs/link-protocol.md``.

Performance: ``encode_frame_chunks`` builds the chunk headers with NumPy,
CRCs with ISA-L (``isal``, zlib's function, 4x faster than zlib here; called
from compiled code in the encoder threads), and COBS with compiled passes
(``cobs_kernel``, numba), split over up to four threads for large frames:
COBS is byte-sequential, whole-array NumPy needed ~7 ms for a 1280x720
RGB565 frame and one core ~2-3 ms.  The decoder is a plain loop (the
controller side is the simulator).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import itertools
import logging
import struct
import threading
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np

from armscope.core.cpus import usable_cpus

from .cobs_kernel import HAVE_COMPILED_CRC, chunk_crcs, cobs_into, encode_chunks, max_encoded_size
from .pixel_formats import PixelFormat

try:  # ISA-L's CRC-32 (the same function as zlib's, 4x faster here); zlib where it is not installed
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the install
    from zlib import crc32 as _crc32

# How frame chunks get their CRCs on this install, for benchmark reports: the
# fallbacks are correct but serial (a Python call per chunk).
CRC_PATH = ("ISA-L, in the encoder threads" if HAVE_COMPILED_CRC
            else f"{_crc32.__module__.split('.')[-1]} from Python, one call per chunk")

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOL_VERSION",
    "HEADER_SIZE",
    "FRAME_BODY_HEADER_SIZE",
    "CRC_SIZE",
    "MAX_SEQ",
    "FLAG_LAST",
    "MsgType",
    "NakReason",
    "ResetCause",
    "Message",
    "Rejected",
    "FrameChunkHeader",
    "AckBody",
    "HelloReply",
    "CobsError",
    "LinkError",
    "LinkTimeout",
    "LinkProtocolError",
    "cobs_encode",
    "cobs_decode",
    "crc32",
    "seq_add",
    "seq_diff",
    "pack_message",
    "unpack_message",
    "frame_message",
    "pack_frame_body",
    "parse_frame_body",
    "pack_ack",
    "parse_ack",
    "pack_hello_reply",
    "parse_hello_reply",
    "EncodedFrame",
    "encode_frame_chunks",
    "warm_up",
    "FrameDecoder",
    "ControllerInfo",
    "SendReport",
    "LinkSender",
]

PROTOCOL_VERSION = 1
HEADER_SIZE = 8  # version u8, type u8, flags u8, reserved u8, seq u32
FRAME_BODY_HEADER_SIZE = 18  # frame_id u32, offset u32, x,y,w,h u16, format u8, reserved u8
MAX_PAYLOAD_RANGE = (FRAME_BODY_HEADER_SIZE + 1, 0xFFFF)  # a FRAME body: header + >= 1 data byte; u16 in HELLO_REPLY


def check_max_payload(value: int) -> int:
    """``value`` as a FRAME body limit, or ValueError naming the valid range."""
    lo, hi = MAX_PAYLOAD_RANGE
    if not lo <= int(value) <= hi:
        raise ValueError(f"max_payload must be within {lo}..{hi} bytes (a FRAME body: its {FRAME_BODY_HEADER_SIZE}-byte "
                         f"chunk header and at least one byte of pixels), got {value}")
    return int(value)
CRC_SIZE = 4
MAX_SEQ = 0xFFFFFFFF
UNKNOWN_SEQ = 0xFFFFFFFF
FLAG_LAST = 0x01  # FRAME: last chunk of the frame; present after applying it
FLAG_WATCHDOG = 0x02  # HELLO_REPLY: the controller armed the link watchdog the HELLO asked for

_HEADER = struct.Struct("<BBBBI")
_FRAME_BODY = struct.Struct("<IIHHHHBB")
_ACK = struct.Struct("<BBHII")
_HELLO = struct.Struct("<I")  # nonce: a HELLO without the watchdog fields
_HELLO_WATCHDOG = struct.Struct("<IHH")  # nonce, watchdog_ms, reserved
_HELLO_REPLY = struct.Struct("<IIHHHBB")
_RESET = struct.Struct("<BBH")
_BRIGHTNESS = struct.Struct("<B")


class MsgType(enum.IntEnum):
    HELLO = 0x01  # host -> controller, unsequenced: start a session
    HELLO_REPLY = 0x02  # controller -> host
    RESET = 0x03  # controller -> host: "I (re)started; no session"
    FRAME = 0x10  # host -> controller, sequenced: one chunk of pixel data
    BLANK = 0x11  # host -> controller, unsequenced: show black now
    BRIGHTNESS = 0x12  # host -> controller, unsequenced: backlight/LED level
    PING = 0x20  # host -> controller, unsequenced
    PONG = 0x21  # controller -> host, echoes PING body
    ACK = 0x30  # controller -> host
    NAK = 0x31  # controller -> host


class NakReason(enum.IntEnum):
    NONE = 0
    BAD_CRC = 1  # CRC/COBS/length failure; answered seq unknown (0xFFFFFFFF)
    SEQ_GAP = 2  # sequenced message arrived ahead of next_expected
    NO_SESSION = 3  # sequenced message before HELLO (e.g. after a reset)
    BAD_LENGTH = 4  # body too short, or chunk beyond the region's bytes
    BAD_REGION = 5  # region outside the display / misaligned for MONO1
    BAD_FORMAT = 6  # pixel format the display does not hold
    UNKNOWN_TYPE = 7
    BAD_VERSION = 8
    TOO_LARGE = 9  # body larger than the controller's max_payload


class ResetCause(enum.IntEnum):
    POWER_ON = 0
    WATCHDOG = 1
    REQUESTED = 2
    OTHER = 3


_FATAL_NAKS = {
    NakReason.BAD_LENGTH,
    NakReason.BAD_REGION,
    NakReason.BAD_FORMAT,
    NakReason.UNKNOWN_TYPE,
    NakReason.BAD_VERSION,
    NakReason.TOO_LARGE,
}


class CobsError(ValueError):
    """Invalid COBS encoding."""


class LinkError(RuntimeError):
    """Base class: the link could not do what was asked."""


class LinkTimeout(LinkError):
    """Not delivered within the deadline / retry budget.  Caller should blank."""

    def __init__(self, message: str, report: "SendReport | None" = None):
        super().__init__(message)
        self.report = report


class LinkProtocolError(LinkError):
    """The controller rejected the request (bad region/format/...); retrying will not help."""

    def __init__(self, message: str, reason: "NakReason | int | None" = None):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- primitives


def crc32(data) -> int:
    """CRC-32/ISO-HDLC (zlib): poly 0x04C11DB7 reflected, init/xorout 0xFFFFFFFF."""
    return _crc32(data) & 0xFFFFFFFF


def seq_add(seq: int, n: int) -> int:
    return (seq + n) & MAX_SEQ


def seq_diff(a: int, b: int) -> int:
    """Signed distance a - b modulo 2**32 (serial-number arithmetic, RFC 1982)."""
    d = (a - b) & MAX_SEQ
    return d - (1 << 32) if d >= (1 << 31) else d


def cobs_encode(data) -> bytes:
    """COBS-encode ``data`` (no delimiter appended).  Output has no 0x00 bytes."""
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    out = np.empty(max_encoded_size(raw.size), dtype=np.uint8)
    end = cobs_into(raw, raw.size, out, 0)
    return out[: end - 1].tobytes()


def cobs_decode(data) -> bytes:
    """Decode one COBS frame (without its delimiter).  Raises ``CobsError``."""
    data = bytes(data)
    n = len(data)
    out = bytearray()
    i = 0
    while i < n:
        code = data[i]
        if code == 0:
            raise CobsError(f"zero byte inside COBS frame at {i}")
        j = i + code
        if j > n:
            raise CobsError(f"COBS block at {i} (code {code}) runs past the end ({n} bytes)")
        block = data[i + 1 : j]
        if 0 in block:
            raise CobsError("zero byte inside COBS frame")
        out += block
        i = j
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


# ---------------------------------------------------------------- messages


@dataclasses.dataclass(frozen=True)
class Message:
    type: int
    seq: int
    flags: int = 0
    body: bytes = b""
    version: int = PROTOCOL_VERSION

    @property
    def type_name(self) -> str:
        try:
            return MsgType(self.type).name
        except ValueError:
            return f"0x{self.type:02x}"


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A delimited frame the decoder threw away, and why."""

    reason: str  # "cobs" | "short" | "crc" | "version" | "overflow"
    nbytes: int


class FrameChunkHeader(NamedTuple):
    frame_id: int
    offset: int
    x: int
    y: int
    w: int
    h: int
    fmt: int


class AckBody(NamedTuple):
    answered_type: int
    reason: int
    answered_seq: int
    next_expected: int


class HelloReply(NamedTuple):
    nonce: int
    next_expected: int
    width: int
    height: int
    max_payload: int
    pixel_format: int
    version: int


def pack_message(msg: Message) -> bytes:
    """Header + body + CRC-32 (little-endian), before COBS."""
    head = _HEADER.pack(msg.version, msg.type, msg.flags, 0, msg.seq & MAX_SEQ) + bytes(msg.body)
    return head + struct.pack("<I", crc32(head))


def unpack_message(raw: bytes) -> "Message | Rejected":
    if len(raw) < HEADER_SIZE + CRC_SIZE:
        return Rejected("short", len(raw))
    (want,) = struct.unpack_from("<I", raw, len(raw) - CRC_SIZE)
    if crc32(memoryview(raw)[: len(raw) - CRC_SIZE]) != want:
        return Rejected("crc", len(raw))
    version, mtype, flags, _reserved, seq = _HEADER.unpack_from(raw, 0)
    if version != PROTOCOL_VERSION:
        return Rejected("version", len(raw))
    return Message(mtype, seq, flags, bytes(raw[HEADER_SIZE : len(raw) - CRC_SIZE]), version)


def frame_message(msg: Message) -> bytes:
    """What goes on the wire: COBS(pack_message(msg)) + 0x00."""
    return cobs_encode(pack_message(msg)) + b"\x00"


def pack_frame_body(h: FrameChunkHeader, data=b"") -> bytes:
    return _FRAME_BODY.pack(h.frame_id, h.offset, h.x, h.y, h.w, h.h, int(h.fmt), 0) + bytes(data)


def parse_frame_body(body: bytes) -> tuple[FrameChunkHeader, bytes]:
    if len(body) < FRAME_BODY_HEADER_SIZE:
        raise ValueError(f"FRAME body of {len(body)} bytes is shorter than its {FRAME_BODY_HEADER_SIZE}-byte header")
    fid, off, x, y, w, h, fmt, _ = _FRAME_BODY.unpack_from(body, 0)
    return FrameChunkHeader(fid, off, x, y, w, h, fmt), body[FRAME_BODY_HEADER_SIZE:]


def pack_ack(answered_type: int, answered_seq: int, next_expected: int, reason: int = 0) -> bytes:
    return _ACK.pack(int(answered_type), int(reason), 0, answered_seq & MAX_SEQ, next_expected & MAX_SEQ)


def parse_ack(body: bytes) -> AckBody:
    if len(body) < _ACK.size:
        raise ValueError(f"ACK/NAK body of {len(body)} bytes, need {_ACK.size}")
    t, reason, _, seq, nxt = _ACK.unpack_from(body, 0)
    return AckBody(t, reason, seq, nxt)


def pack_hello_reply(r: HelloReply) -> bytes:
    return _HELLO_REPLY.pack(r.nonce, r.next_expected, r.width, r.height, r.max_payload, r.pixel_format, r.version)


def parse_hello_reply(body: bytes) -> HelloReply:
    if len(body) < _HELLO_REPLY.size:
        raise ValueError(f"HELLO_REPLY body of {len(body)} bytes, need {_HELLO_REPLY.size}")
    return HelloReply(*_HELLO_REPLY.unpack_from(body, 0))


# ---------------------------------------------------------------- frame encoding

_CHUNK_HDR = np.dtype(
    [
        ("ver", "u1"), ("type", "u1"), ("flags", "u1"), ("rsv", "u1"), ("seq", "<u4"),
        ("fid", "<u4"), ("off", "<u4"), ("x", "<u2"), ("y", "<u2"), ("w", "<u2"), ("h", "<u2"),
        ("fmt", "u1"), ("rsv2", "u1"),
    ]
)
assert _CHUNK_HDR.itemsize == HEADER_SIZE + FRAME_BODY_HEADER_SIZE
_PER_CHUNK_RAW = HEADER_SIZE + FRAME_BODY_HEADER_SIZE + CRC_SIZE  # 30


@dataclasses.dataclass(frozen=True)
class EncodedFrame:
    """All chunks of one frame, ready for the wire.

    Chunk ``k`` is ``wire[offsets[k]:offsets[k+1]]`` (COBS bytes + 0x00) and
    carries sequence number ``seq_add(seq0, k)``.
    """

    wire: np.ndarray  # uint8
    offsets: np.ndarray  # int64, n_chunks + 1
    seq0: int
    frame_id: int
    payload_bytes: int

    @property
    def n_chunks(self) -> int:
        return len(self.offsets) - 1

    def chunk(self, k: int) -> memoryview:
        return memoryview(self.wire)[int(self.offsets[k]) : int(self.offsets[k + 1])]

    @property
    def efficiency(self) -> float:
        """Payload bytes / bytes on the wire, without retransmissions."""
        return self.payload_bytes / max(1, self.wire.size)


def warm_up() -> None:
    """Compile (or load from numba's cache) the COBS kernels now, with the
    argument types the link uses, so the first frame's delivery deadline is
    not spent compiling (a second or more on a fresh install)."""
    cobs_encode(b"\x00\x01")
    encode_frame_chunks(np.zeros(2, np.uint8), seq0=0, frame_id=0, region=(0, 0, 1, 1),
                        fmt=PixelFormat.RGB565_LE, max_payload=64)


_MIN_CHUNKS_PER_THREAD = 64  # ~260 KB at 4 KB chunks: below that a thread costs more than it saves
_ENCODER_THREADS = min(4, usable_cpus())
_pool = None
_pool_lock = threading.Lock()


def _chunk_ranges(k: int) -> list[int]:
    """Boundaries ``[0, b1, ..., k]`` splitting ``k`` chunks over the threads used."""
    n = max(1, min(_ENCODER_THREADS, k // _MIN_CHUNKS_PER_THREAD))
    return [k * t // n for t in range(n + 1)]


def _encoder_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(_ENCODER_THREADS - 1, thread_name_prefix="link-encode")
        return _pool


def _encode_range(hb, p, c, crcs, wire, offsets, first, stop, o) -> int:
    """Chunks ``first <= i < stop``: their CRCs (in this thread, where ISA-L
    is callable from compiled code), then their COBS bytes from ``wire[o]``."""
    if HAVE_COMPILED_CRC:
        chunk_crcs(hb, p, c, crcs, first, stop)
    return encode_chunks(hb, p, c, crcs, wire, offsets, first, stop, o)


def encode_frame_chunks(
    payload,
    *,
    seq0: int,
    frame_id: int,
    region: Sequence[int],
    fmt: "PixelFormat | str",
    max_payload: int,
) -> EncodedFrame:
    """Split a region's pixel bytes into FRAME messages and encode them all.

    ``payload`` is the region's packed rows (``fmt.frame_bytes(w, h)`` bytes,
    e.g. the output of ``pixel_formats.encode``).  The last chunk has
    ``FLAG_LAST`` set.
    """
    fmt = PixelFormat.parse(fmt)
    x, y, w, h = (int(v) for v in region)
    p = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload.reshape(-1)
    if p.dtype != np.uint8:
        raise TypeError(f"payload must be uint8 bytes, got {p.dtype}")
    n = p.size
    if n != fmt.frame_bytes(w, h) or n == 0:
        raise ValueError(f"payload of {n} bytes does not match region {w}x{h} in {fmt.slug} ({fmt.frame_bytes(w, h)} bytes)")
    c = int(max_payload) - FRAME_BODY_HEADER_SIZE
    if c <= 0:
        raise ValueError(f"max_payload {max_payload} leaves no room for pixel data")
    k = -(-n // c)
    hdr = np.zeros(k, dtype=_CHUNK_HDR)
    hdr["ver"] = PROTOCOL_VERSION
    hdr["type"] = MsgType.FRAME
    hdr["flags"][-1] = FLAG_LAST
    hdr["seq"] = (np.arange(k, dtype=np.uint64) + np.uint64(seq0 & MAX_SEQ)) & np.uint64(MAX_SEQ)
    hdr["fid"] = frame_id & MAX_SEQ
    hdr["off"] = np.arange(k, dtype=np.uint64) * c
    hdr["x"], hdr["y"], hdr["w"], hdr["h"] = x, y, w, h
    hdr["fmt"] = fmt.wire_code
    hb = hdr.view(np.uint8).reshape(k, _CHUNK_HDR.itemsize)

    # CRC-32 of header + data per chunk (ISA-L: ~0.2 ms for a 1.8 MB frame
    # against zlib's ~1 ms), then one compiled pass per range of chunks writes
    # the COBS bytes and delimiters. Large frames are split over threads (the
    # kernels hold no GIL): each range computes its own CRCs where ISA-L is
    # callable from compiled code, and writes into its own slot of ``wire``;
    # the slots are closed up afterwards.
    if HAVE_COMPILED_CRC:
        crcs = np.empty(k, dtype=np.uint32)  # filled by each range's thread
    else:
        mp, mh, hs = memoryview(p), memoryview(hb.reshape(-1)), hb.shape[1]  # memoryview slices are cheapest
        crcs = np.fromiter((_crc32(mp[i * c : (i + 1) * c], _crc32(mh[i * hs : (i + 1) * hs])) for i in range(k)),
                           dtype=np.uint32, count=k)
    slot = max_encoded_size(_PER_CHUNK_RAW + c)
    wire = np.empty(k * slot, dtype=np.uint8)
    offsets = np.empty(k + 1, dtype=np.int64)
    offsets[0] = 0
    bounds = _chunk_ranges(k)
    if len(bounds) == 2:
        end = _encode_range(hb, p, c, crcs, wire, offsets, 0, k, 0)
    else:
        pool = _encoder_pool()
        jobs = [pool.submit(_encode_range, hb, p, c, crcs, wire, offsets, a, b, a * slot)
                for a, b in zip(bounds[1:-1], bounds[2:])]
        ends = [_encode_range(hb, p, c, crcs, wire, offsets, 0, bounds[1], 0)]
        ends += [j.result() for j in jobs]
        end = ends[0]
        for a, b, e in zip(bounds[1:-1], bounds[2:], ends[1:]):
            start = a * slot
            wire[end : end + e - start] = wire[start:e]
            offsets[a + 1 : b + 1] -= start - end
            end += e - start
    wire = wire[:end]
    return EncodedFrame(wire=wire, offsets=offsets, seq0=seq0 & MAX_SEQ, frame_id=frame_id & MAX_SEQ, payload_bytes=n)


# ---------------------------------------------------------------- decoding


class FrameDecoder:
    """Streaming receiver: bytes in, ``Message``/``Rejected`` out.

    Splits on 0x00, so any garbage costs at most the frame it lands in: the
    next delimiter resynchronises.  Every non-empty delimited frame yields
    exactly one event, and every ``Rejected`` is counted in ``rejected``.
    A frame longer than ``max_frame`` encoded bytes is dropped as
    ``overflow`` (counted once) and the rest of it is skipped.
    """

    def __init__(self, max_frame: int = 1 << 16):
        self.max_frame = int(max_frame)
        self._buf = bytearray()
        self._skipping = False
        self.messages = 0
        self.rejected: dict[str, int] = {}
        self.bytes_in = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reset(self) -> None:
        """Forget any partial frame (e.g. the controller rebooted)."""
        self._buf.clear()
        self._skipping = False

    def _reject(self, reason: str, nbytes: int) -> Rejected:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return Rejected(reason, nbytes)

    def feed(self, data) -> list["Message | Rejected"]:
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        events: list[Message | Rejected] = []
        start = 0
        while True:
            i = buf.find(0, start)
            if i < 0:
                break
            if self._skipping:
                self._skipping = False
            elif i > start:
                events.append(self._decode_one(bytes(buf[start:i])))
            start = i + 1
        if start:
            del buf[:start]
        if len(buf) > self.max_frame:
            if not self._skipping:
                events.append(self._reject("overflow", len(buf)))
            buf.clear()
            self._skipping = True
        return events

    def _decode_one(self, frame: bytes) -> "Message | Rejected":
        if len(frame) > self.max_frame:
            return self._reject("overflow", len(frame))
        try:
            raw = cobs_decode(frame)
        except CobsError:
            return self._reject("cobs", len(frame))
        ev = unpack_message(raw)
        if isinstance(ev, Rejected):
            return self._reject(ev.reason, len(frame))
        self.messages += 1
        return ev


# ---------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class ControllerInfo:
    width: int
    height: int
    pixel_format: PixelFormat
    max_payload: int
    version: int
    watchdog_ms: int = 0  # the controller blanks after this long without a valid message (0: it will not)


@dataclasses.dataclass
class SendReport:
    frame_id: int = 0
    chunks: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0  # bytes written for this frame, including resends
    resent_chunks: int = 0
    naks: int = 0
    timeouts: int = 0
    resyncs: int = 0
    elapsed_s: float = 0.0

    @property
    def efficiency(self) -> float:
        return self.payload_bytes / self.wire_bytes if self.wire_bytes else 0.0


class _Resync(Exception):
    pass


class LinkSender:
    """Host side of the link over any pyserial-like port.

    ``port`` needs ``write(bytes)``, ``read(n)`` honouring a settable
    ``timeout`` attribute, and optionally ``in_waiting``.  The sender sets
    ``port.timeout`` to ``poll_interval`` (short reads keep every wait
    bounded); give the port a ``write_timeout`` so a wedged controller cannot
    block a write forever.

    Delivery: Go-Back-N with ``window`` chunks in flight.  A NAK rewinds to
    the controller's ``next_expected``; ``ack_timeout`` without progress
    rewinds to the oldest unacknowledged chunk.  ``max_retries`` consecutive
    rewinds without progress, or passing the frame ``deadline``, raises
    ``LinkTimeout``.  A controller ``RESET`` or ``NO_SESSION`` NAK triggers a
    new HELLO and a resend of the whole frame (at most ``max_resyncs`` times).

    Link watchdog: with ``watchdog_ms`` > 0 every HELLO asks the controller
    to blank by itself after that long without a valid message, so a host
    that dies (killed, crashed, unplugged) cannot leave an overlay in the
    eyepiece. The host must then call :meth:`keepalive` regularly (the
    bridge does, every loop); it sends a PING when nothing else was written
    for a quarter of the period.
    """

    def __init__(
        self,
        port,
        *,
        max_payload: int = 4096,
        window: int = 8,
        ack_timeout: float = 0.25,
        max_retries: int = 8,
        deadline: float = 2.0,
        hello_timeout: float = 0.3,
        max_resyncs: int = 3,
        poll_interval: float = 0.01,
        first_seq: int = 0,
        watchdog_ms: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if window < 1:
            raise ValueError("window must be >= 1")
        for name, value in (("ack_timeout", ack_timeout), ("deadline", deadline), ("hello_timeout", hello_timeout)):
            if not 0.0 < float(value) < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if not 0 <= int(watchdog_ms) <= 0xFFFF:
            raise ValueError(f"watchdog_ms must be within 0..65535 (0 = off), got {watchdog_ms}")
        self.watchdog_ms = int(watchdog_ms)
        self._last_write = float("-inf")
        self._warned_no_watchdog = False
        self.keepalives = 0
        self.port = port
        self.max_payload = check_max_payload(max_payload)
        self.window = int(window)
        self.ack_timeout = float(ack_timeout)
        self.max_retries = int(max_retries)
        self.deadline = float(deadline)
        self.hello_timeout = float(hello_timeout)
        self.max_resyncs = int(max_resyncs)
        self.clock = clock
        self.decoder = FrameDecoder()
        self.info: ControllerInfo | None = None
        self.resets_seen = 0
        self._next_seq = first_seq & MAX_SEQ
        self._tags = itertools.count(1)
        self._nonce = itertools.count(0x5EED0001)
        self._frame_ids = itertools.count(1)
        self._reset_pending = False
        self._pending: list[Message] = []
        if getattr(port, "timeout", None) != poll_interval:
            port.timeout = poll_interval
        warm_up()

    # -- I/O helpers ------------------------------------------------------

    def _write(self, data) -> int:
        try:
            n = self.port.write(data)
        except Exception as exc:  # serial.SerialTimeoutException is an OSError subclass
            raise LinkError(f"write to {getattr(self.port, 'port', 'port')} failed: {exc}") from exc
        self._last_write = self.clock()
        return len(data) if n is None else n

    def _poll(self, wait: bool) -> list[Message]:
        """Read what is available (waiting up to one poll interval if ``wait``)."""
        port = self.port
        try:
            waiting = getattr(port, "in_waiting", None)
            if waiting:
                data = port.read(waiting)
            elif wait:
                data = port.read(1)
                if data:
                    more = getattr(port, "in_waiting", 0)
                    if more:
                        data += port.read(more)
            else:
                return []
        except OSError as exc:  # serial.SerialException: the port went away (unplugged, controller gone)
            raise LinkError(f"read from {getattr(port, 'port', 'port')} failed: {exc}") from exc
        if not data:
            return []
        out = []
        for ev in self.decoder.feed(data):
            if isinstance(ev, Message):
                if ev.type == MsgType.RESET:
                    self.resets_seen += 1
                    self._reset_pending = True
                    self.info = None
                out.append(ev)
        return out

    def _wait_for(self, pred, until: float) -> Message | None:
        while True:
            for m in self._poll(wait=True):
                if pred(m):
                    return m
            if self.clock() >= until:
                return None

    # -- session ----------------------------------------------------------

    def hello(self, *, deadline: float | None = None) -> ControllerInfo:
        """(Re)start the session; returns what the controller reports about itself."""
        until = self.clock() + (self.deadline if deadline is None else deadline)
        return self._hello(until)

    def _hello(self, until: float) -> ControllerInfo:
        while self.clock() < until:
            nonce = next(self._nonce) & MAX_SEQ
            seq = self._next_seq
            body = _HELLO_WATCHDOG.pack(nonce, self.watchdog_ms, 0) if self.watchdog_ms else _HELLO.pack(nonce)
            # A lone 0x00 first ends any partial frame the controller holds.
            self._write(b"\x00" + frame_message(Message(MsgType.HELLO, seq, 0, body)))

            def is_reply(m: Message) -> bool:
                if m.type != MsgType.HELLO_REPLY:
                    return False
                try:
                    r = parse_hello_reply(m.body)
                except ValueError:
                    return False
                return r.nonce == nonce

            m = self._wait_for(is_reply, min(until, self.clock() + self.hello_timeout))
            if m is None:
                continue
            r = parse_hello_reply(m.body)
            if r.next_expected != seq:
                raise LinkProtocolError(f"controller expects seq {r.next_expected} after HELLO with seq {seq}")
            try:
                fmt = PixelFormat.from_wire(r.pixel_format)
            except ValueError as exc:
                raise LinkProtocolError(f"controller reports {exc}") from None
            armed = self.watchdog_ms if m.flags & FLAG_WATCHDOG else 0
            if self.watchdog_ms and not armed and not self._warned_no_watchdog:
                self._warned_no_watchdog = True
                log.warning("display controller did not arm the %d ms link watchdog: if this host dies, "
                            "the eyepiece keeps its last picture until the controller is reset", self.watchdog_ms)
            self.info = ControllerInfo(r.width, r.height, fmt, r.max_payload, r.version, armed)
            self._reset_pending = False
            return self.info
        raise LinkTimeout("no HELLO_REPLY from the display controller before the deadline")

    def keepalive(self) -> bool:
        """Feed the controller's link watchdog: send a PING if nothing was
        written for a quarter of ``watchdog_ms`` (replies are read and dropped
        so they cannot pile up). Returns whether a PING went out. Raises
        ``LinkError`` if the port fails."""
        if not self.watchdog_ms or self.clock() - self._last_write < self.watchdog_ms / 4000.0:
            return False
        tag = next(self._tags) & MAX_SEQ
        self._write(frame_message(Message(MsgType.PING, tag, 0, b"")))
        self.keepalives += 1
        self._poll(wait=False)  # PONGs are dropped; a RESET is noted (next frame re-HELLOs)
        return True

    # -- unsequenced requests ---------------------------------------------

    def _request(self, mtype: MsgType, body: bytes, reply_type: MsgType, what: str, deadline: float | None) -> Message:
        until = self.clock() + (self.deadline if deadline is None else deadline)
        while self.clock() < until:
            tag = next(self._tags) & MAX_SEQ
            self._write(frame_message(Message(mtype, tag, 0, body)))

            def match(m: Message) -> bool:
                if m.type != reply_type:
                    return False
                if reply_type == MsgType.PONG:
                    return m.seq == tag
                try:
                    a = parse_ack(m.body)
                except ValueError:
                    return False
                return a.answered_type == mtype and a.answered_seq == tag

            m = self._wait_for(match, min(until, self.clock() + self.ack_timeout))
            if m is not None:
                return m
        raise LinkTimeout(f"{what}: no answer from the display controller before the deadline")

    def blank(self, *, deadline: float | None = None) -> None:
        """Show black now.  Works without a session (it is the safe state)."""
        self._request(MsgType.BLANK, b"", MsgType.ACK, "BLANK", deadline)

    def set_brightness(self, level: float, *, deadline: float | None = None) -> None:
        """Display (backlight/LED) level in [0, 1], sent as 0..255."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"brightness must be within [0, 1], got {level}")
        self._request(MsgType.BRIGHTNESS, _BRIGHTNESS.pack(round(level * 255)), MsgType.ACK, "BRIGHTNESS", deadline)

    def ping(self, payload: bytes = b"", *, deadline: float | None = None) -> float:
        """Round-trip time in seconds."""
        if len(payload) > 64:
            raise ValueError("PING payload is limited to 64 bytes")
        t0 = self.clock()
        m = self._request(MsgType.PING, payload, MsgType.PONG, "PING", deadline)
        if m.body != payload:
            raise LinkProtocolError("PONG body differs from PING body")
        return self.clock() - t0

    # -- frames -----------------------------------------------------------

    def send_frame(
        self,
        data,
        *,
        region: Sequence[int] | None = None,
        fmt: "PixelFormat | str | None" = None,
        frame_id: int | None = None,
        deadline: float | None = None,
    ) -> SendReport:
        """Deliver one frame (or a partial-update region) or raise.

        ``data`` is the packed pixel bytes of ``region`` (x, y, w, h; default
        the whole display) in ``fmt`` (default the controller's format).
        Raises ``LinkTimeout`` if it is not acknowledged within ``deadline``
        seconds (default ``self.deadline``), ``LinkProtocolError`` if the
        controller rejects it.  After either, the caller should blank.
        """
        t0 = self.clock()
        until = t0 + (self.deadline if deadline is None else deadline)
        report = SendReport(frame_id=(next(self._frame_ids) if frame_id is None else frame_id) & MAX_SEQ)
        payload = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
        report.payload_bytes = int(payload.size)
        try:
            while True:
                if self.info is None or self._reset_pending:
                    self._hello(until)
                info = self.info
                rgn = (0, 0, info.width, info.height) if region is None else tuple(int(v) for v in region)
                pf = info.pixel_format if fmt is None else PixelFormat.parse(fmt)
                try:
                    self._send_once(payload, rgn, pf, report, until)
                    report.elapsed_s = self.clock() - t0
                    return report
                except _Resync:
                    report.resyncs += 1
                    self.info = None
                    if report.resyncs > self.max_resyncs:
                        raise LinkTimeout(
                            f"frame {report.frame_id}: controller reset {report.resyncs} times while sending", report
                        ) from None
        except LinkTimeout as exc:
            report.elapsed_s = self.clock() - t0
            exc.report = report
            raise

    def _send_once(self, payload: np.ndarray, rgn, pf: PixelFormat, report: SendReport, until: float) -> None:
        info = self.info
        max_payload = min(self.max_payload, info.max_payload)
        enc = encode_frame_chunks(
            payload, seq0=self._next_seq, frame_id=report.frame_id, region=rgn, fmt=pf, max_payload=max_payload
        )
        k = enc.n_chunks
        report.chunks = k
        seq0 = enc.seq0
        base = nxt = sent_hi = 0
        retries = 0
        last_progress = self.clock()
        last_rewind: tuple[int, float] = (-1, 0.0)
        try:
            while base < k:
                now = self.clock()
                if now >= until:
                    raise LinkTimeout(
                        f"frame {report.frame_id}: {base}/{k} chunks acknowledged when the deadline passed", report
                    )
                while nxt < k and nxt - base < self.window:
                    chunk = enc.chunk(nxt)
                    self._write(chunk)
                    report.wire_bytes += len(chunk)
                    if nxt < sent_hi:
                        report.resent_chunks += 1
                    nxt += 1
                    sent_hi = max(sent_hi, nxt)
                    self._handle(self._poll(wait=False), seq0, k, report)  # may raise
                    base, nxt, retries, last_progress, last_rewind = self._apply(
                        seq0, k, base, nxt, retries, last_progress, last_rewind, report
                    )
                if base >= k:
                    break
                self._handle(self._poll(wait=True), seq0, k, report)
                base, nxt, retries, last_progress, last_rewind = self._apply(
                    seq0, k, base, nxt, retries, last_progress, last_rewind, report
                )
                if base < k and self.clock() - last_progress >= self.ack_timeout:
                    report.timeouts += 1
                    retries += 1
                    nxt = base
                    last_progress = self.clock()
                if retries > self.max_retries:
                    raise LinkTimeout(
                        f"frame {report.frame_id}: chunk {base}/{k} not acknowledged after {retries - 1} resends", report
                    )
        finally:
            # Never reuse a sequence number the controller may have seen.
            self._next_seq = seq_add(seq0, max(sent_hi, base))

    def _handle(self, msgs: list[Message], seq0: int, k: int, report: SendReport) -> None:
        if self._reset_pending:
            raise _Resync()
        for m in msgs:
            if m.type not in (MsgType.ACK, MsgType.NAK):
                continue
            try:
                a = parse_ack(m.body)
            except ValueError:
                continue
            if m.type == MsgType.NAK:
                if a.reason == NakReason.NO_SESSION:
                    raise _Resync()
                if a.reason in _FATAL_NAKS and a.answered_type == MsgType.FRAME and 0 <= seq_diff(a.answered_seq, seq0) < k:
                    name = NakReason(a.reason).name
                    raise LinkProtocolError(f"controller rejected frame {report.frame_id} chunk: {name}", a.reason)
                report.naks += 1
            if a.answered_type not in (MsgType.FRAME, 0):
                continue
            self._pending.append(m)

    def _apply(self, seq0, k, base, nxt, retries, last_progress, last_rewind, report):
        pending, self._pending = self._pending, []
        for m in pending:
            a = parse_ack(m.body)
            e = seq_diff(a.next_expected, seq0)
            if e < 0 or e > k:
                # The controller's sequence is outside this frame: it missed
                # numbers we will never send again.  Start a fresh session.
                raise _Resync()
            if e > base:
                base = e
                retries = 0
                last_progress = self.clock()
            if m.type == MsgType.NAK and e < nxt:
                now = self.clock()
                if last_rewind[0] == e and now - last_rewind[1] < self.ack_timeout / 2:
                    continue  # duplicate NAK for a rewind already under way
                nxt = max(e, base)
                retries += 1
                last_rewind = (e, now)
        return base, nxt, retries, last_progress, last_rewind
