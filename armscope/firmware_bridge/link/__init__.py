"""Framed, acknowledged link from the host to an eyepiece display controller.

Why this package exists
-----------------------
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
  error, resend on timeout);
* and the controller announces a reset (``RESET``), after which the host
  re-handshakes (``HELLO``) and resends the whole frame.

``LinkSender`` either delivers a frame within its deadline or raises
``LinkTimeout``/``LinkProtocolError``; the caller then blanks the display.
The byte-level specification is ``docs/link-protocol.md``.

Modules, along the protocol's seams:

* ``wire``        - message layout, CRC-32, COBS, sequence arithmetic, errors,
  and ``FrameDecoder`` (both ends speak it; the simulator is the other end).
* ``chunks``      - the hot path: a frame's pixels -> all its FRAME messages,
  encoded in compiled passes over threads (``EncodedFrame``, ``encode_frame_chunks``).
* ``cobs_kernel`` - the numba kernels ``chunks`` runs (and ISA-L's CRC bound into them).
* ``sender``      - ``LinkSender``: sessions, control requests, Go-Back-N delivery.

The names below are importable from here as before the split. numba and
isal (the ``[serial]`` extra) are loaded only by ``chunks``/``cobs_kernel``,
when the first ``LinkSender`` is made or a message is encoded; importing
this package (the bridge does, for ``LinkError``) loads neither, and the
``chunks`` names here are resolved on first access.
"""

from __future__ import annotations

from .sender import ControllerInfo, LinkSender, SendReport
from .wire import (CRC_SIZE, FLAG_LAST, FLAG_WATCHDOG, FRAME_BODY_HEADER_SIZE, HEADER_SIZE, MAX_PAYLOAD_RANGE,
                   MAX_SEQ, PROTOCOL_VERSION, UNKNOWN_SEQ, AckBody, CobsError, FrameChunkHeader, FrameDecoder,
                   HelloReply, LinkError, LinkProtocolError, LinkTimeout, Message, MsgType, NakReason, Rejected,
                   ResetCause, check_max_payload, cobs_decode, cobs_encode, crc32, frame_message, pack_ack,
                   pack_frame_body, pack_hello_reply, pack_message, parse_ack, parse_frame_body,
                   parse_hello_reply, seq_add, seq_diff, unpack_message)

__all__ = [
    "PROTOCOL_VERSION",
    "HEADER_SIZE",
    "FRAME_BODY_HEADER_SIZE",
    "CRC_SIZE",
    "MAX_SEQ",
    "UNKNOWN_SEQ",
    "MAX_PAYLOAD_RANGE",
    "FLAG_LAST",
    "FLAG_WATCHDOG",
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
    "check_max_payload",
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
    "CRC_PATH",
    "FrameDecoder",
    "ControllerInfo",
    "SendReport",
    "LinkSender",
]

_FROM_CHUNKS = {"EncodedFrame", "encode_frame_chunks", "warm_up", "CRC_PATH"}


def __getattr__(name: str):
    """The ``chunks`` names, imported on first access (numba: the ``[serial]`` extra)."""
    if name in _FROM_CHUNKS:
        from . import chunks

        return getattr(chunks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
