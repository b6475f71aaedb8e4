"""COBS encoding of link messages, compiled with numba.

Why a compiled loop: COBS is byte-sequential (each code byte is the distance
to the next zero), which whole-array NumPy can only emulate with several
passes over index arrays; on a Grad-CAM overlay in RGB565 (hundreds of
thousands of zero/non-zero transitions in 1.8 MB) that took ~7 ms a frame,
more than the bridge's whole budget. The loop below runs at about a byte per
nanosecond. The compiled code is cached on disk (next to this file, or numba's
user cache dir when that is read-only), so only the first start pays the
compile (about a second); where neither is writable (a hardened service with
ProtectSystem=strict and ProtectHome), each process compiles once instead.

Output convention (the ``cobs`` package's and ``docs/link-protocol.md``'s):
a message that ends exactly with a full 0xFF block gets no trailing 0x01 code.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import uint8, uintp

__all__ = ["cobs_into", "encode_chunks", "max_encoded_size"]


def _compiled(fn):
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available": no writable place
        return numba.njit(cache=False, nogil=True, boundscheck=False)(fn)


def max_encoded_size(raw_size: int) -> int:
    """Worst-case COBS size of ``raw_size`` bytes, plus the 0x00 delimiter."""
    return raw_size + raw_size // 254 + 2


@_compiled
def _cobs_feed(src, start, stop, out, j, code_pos, code, ff_end):  # pragma: no cover - compiled
    """COBS state machine over ``src[start:stop]``: ``j`` is where the next
    data byte goes, ``code_pos`` where the open block's code byte goes, ``code``
    its length + 1, ``ff_end`` whether a full 0xFF block just closed. Returns
    the new state, so a message can be encoded from several buffers without
    first copying them together."""
    for b in range(start, stop):
        v = src[b]
        if v == 0:
            out[code_pos] = code
            code_pos = j
            code = uint8(1)
            ff_end = False
        else:
            out[j] = v
            code = uint8(code + uint8(1))
            ff_end = False
            if code == uint8(0xFF):
                out[code_pos] = uint8(0xFF)
                j += uintp(1)
                code_pos = j
                code = uint8(1)
                ff_end = True
        j += uintp(1)
    return j, code_pos, code, ff_end


@_compiled
def _cobs_close(out, j, code_pos, code, ff_end):  # pragma: no cover - compiled
    """Write the open block's code and the 0x00 delimiter; return the offset after it."""
    if ff_end:
        j = code_pos  # drop the empty block's code (see module docstring)
    else:
        out[code_pos] = code
    out[j] = 0
    return j + 1


@_compiled
def cobs_into(src, n, out, o):  # pragma: no cover - compiled
    """COBS-encode ``src[:n]`` into ``out[o:]``, append the 0x00 delimiter;
    return the offset after it. ``out`` needs ``max_encoded_size(n)`` bytes."""
    j, code_pos, code, ff_end = _cobs_feed(src, uintp(0), uintp(n), out, uintp(o) + uintp(1), uintp(o), uint8(1), False)
    return _cobs_close(out, j, code_pos, code, ff_end)


@_compiled
def encode_chunks(headers, payload, chunk, crcs, out, offsets, first, stop, o):  # pragma: no cover - compiled
    """Encode messages ``first <= i < stop``, message ``i`` being ``headers[i]
    + payload[i*chunk:(i+1)*chunk] + crcs[i]`` (little-endian), back to back
    into ``out`` from offset ``o``, without copying the parts together;
    ``offsets[i]:offsets[i+1]`` is message ``i`` with its delimiter
    (``offsets[first]`` is the caller's: the previous range writes it).
    Returns the offset after the last one. Ranges that do not overlap in
    ``out`` may run in parallel threads (no GIL held)."""
    hs = headers.shape[1]
    n = payload.size
    tail = np.empty(4, np.uint8)
    for i in range(first, stop):
        start = i * chunk
        end = min(start + chunk, n)
        crc = crcs[i]
        for q in range(4):
            tail[q] = (crc >> (8 * q)) & 0xFF
        st = _cobs_feed(headers[i], uintp(0), uintp(hs), out, uintp(o) + uintp(1), uintp(o), uint8(1), False)
        st = _cobs_feed(payload, uintp(start), uintp(end), out, st[0], st[1], st[2], st[3])
        st = _cobs_feed(tail, uintp(0), uintp(4), out, st[0], st[1], st[2], st[3])
        o = _cobs_close(out, st[0], st[1], st[2], st[3])
        offsets[i + 1] = o
    return o
