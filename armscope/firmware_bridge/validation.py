"""What the bridge accepts: every message is checked by ``protocol.decode``
against the headers' JSON Schemas (``armscope/core/schemas/message-*.json``,
the one declaration both the daemon and the bridge use) and the cross-key
rules there (payload size, indices, the crop inside the frame, the CAM box
covering it); this module adds what only the bridge cares about and names
each rejection for the counters.

Why a rejection blanks: a stream that produced one malformed message is not
trusted to have produced a correct overlay just before it. A message of
another protocol version is refused the same way, with one log line per
version seen (not one per message at 30 Hz).
"""
from __future__ import annotations

import numpy as np

from armscope.core import protocol

ACCEPTED_TOPICS = ("overlay", "status")   # "rendered" is for simple subscribers, never the eyepiece


def check_message(msg: protocol.Message) -> np.ndarray | None:
    """Checks beyond ``protocol.decode``; returns the overlay's CAM maps
    (float32, classes x height x width) or None for a status. Raises
    ``protocol.ProtocolError`` naming the problem."""
    if msg.topic not in ACCEPTED_TOPICS:
        raise protocol.ProtocolError(f"frame 0 (topic): {msg.topic!r} is not shown by the bridge "
                                     f"(it reads {list(ACCEPTED_TOPICS)})")
    if not msg.is_overlay:
        return None
    return protocol.cam_array(msg)   # non-finite CAM values are refused here


def reject_category(exc: BaseException) -> str:
    """Short counter key for a rejection (the full text is logged and kept)."""
    text = str(exc)
    if not isinstance(exc, protocol.ProtocolError):
        return "malformed"
    if text.startswith("header key schema"):
        return "schema"
    if text.startswith(("expected 3 frames", "frame 0")):
        return "framing"
    if "payload" in text.split(":")[0] or text.startswith(("overlay payload", "header key cam:")):
        return "payload"
    return "header"
