"""The link's wire format: message layout, CRC-32, COBS, sequence arithmetic,
and the streaming decoder.

Why this module exists
----------------------
Both ends of the link speak this format: the host (``sender.LinkSender``)
and the controller (``simulator.ControllerCore``, and the firmware written
from ``docs/link-protocol.md``). Keeping the byte layout in one place, apart
from how frames are chunked (``chunks``) and delivered (``sender``), keeps
that document and the code in step. It is also the part of the link the rest
of the bridge imports (its errors, ``MAX_PAYLOAD_RANGE``), so it imports
neither numba nor ISA-L: the compiled COBS kernel is loaded the first time a
message is encoded, and ISA-L's CRC-32 (zlib's function, faster) the first
time a CRC is computed, zlib's where ``isal`` is not installed. Both belong
to the ``[serial]`` extra.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import NamedTuple

import numpy as np

PROTOCOL_VERSION = 1
HEADER_SIZE = 8  # version u8, type u8, flags u8, reserved u8, seq u32
FRAME_BODY_HEADER_SIZE = 18  # frame_id u32, offset u32, x,y,w,h u16, format u8, reserved u8
MAX_PAYLOAD_RANGE = (FRAME_BODY_HEADER_SIZE + 1, 0xFFFF)  # a FRAME body: header + >= 1 data byte; u16 in HELLO_REPLY

CRC_SIZE = 4
MAX_SEQ = 0xFFFFFFFF
UNKNOWN_SEQ = 0xFFFFFFFF
FLAG_LAST = 0x01  # FRAME: last chunk of the frame; present after applying it
FLAG_WATCHDOG = 0x02  # HELLO_REPLY: the controller armed the link watchdog the HELLO asked for


def check_max_payload(value: int) -> int:
    """``value`` as a FRAME body limit, or ValueError naming the valid range."""
    lo, hi = MAX_PAYLOAD_RANGE
    if not lo <= int(value) <= hi:
        raise ValueError(f"max_payload must be within {lo}..{hi} bytes (a FRAME body: its {FRAME_BODY_HEADER_SIZE}-byte "
                         f"chunk header and at least one byte of pixels), got {value}")
    return int(value)


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

    def __init__(self, message: str, report=None):  # report: the sender's SendReport so far
        super().__init__(message)
        self.report = report


class LinkProtocolError(LinkError):
    """The controller rejected the request (bad region/format/...); retrying will not help."""

    def __init__(self, message: str, reason: "NakReason | int | None" = None):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- primitives


def _crc32(data, value: int = 0) -> int:
    """zlib's CRC-32 function, bound on first use: ISA-L's (faster on a 4 KB
    chunk) where the ``[serial]`` extra installed it, else zlib's (same result)."""
    global _crc32
    try:
        from isal.isal_zlib import crc32 as fn
    except ImportError:  # pragma: no cover - depends on the install
        from zlib import crc32 as fn
    _crc32 = fn
    return fn(data, value)


def crc32(data) -> int:
    """CRC-32/ISO-HDLC (zlib): poly 0x04C11DB7 reflected, init/xorout 0xFFFFFFFF."""
    return _crc32(data) & 0xFFFFFFFF


def seq_add(seq: int, n: int) -> int:
    return (seq + n) & MAX_SEQ


def seq_diff(a: int, b: int) -> int:
    """Signed distance a - b modulo 2**32 (serial-number arithmetic, RFC 1982)."""
    d = (a - b) & MAX_SEQ
    return d - (1 << 32) if d >= (1 << 31) else d


_cobs_into = _max_encoded_size = None  # the compiled COBS kernel's, once loaded


def _load_kernel() -> None:
    """Bind ``cobs_kernel`` (numba, the ``[serial]`` extra), imported on first use
    so that importing the link's names (the bridge's error handling) compiles
    nothing; an ImportError naming ``pip install 'armscope[serial]'`` where numba
    is missing. Bound as globals: a control message pays no attribute lookups."""
    global _cobs_into, _max_encoded_size
    from .cobs_kernel import cobs_into, max_encoded_size

    _cobs_into, _max_encoded_size = cobs_into, max_encoded_size


def cobs_encode(data) -> bytes:
    """COBS-encode ``data`` (no delimiter appended).  Output has no 0x00 bytes."""
    if _cobs_into is None:
        _load_kernel()
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    out = np.empty(_max_encoded_size(raw.size), dtype=np.uint8)
    end = _cobs_into(raw, raw.size, out, 0)
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
