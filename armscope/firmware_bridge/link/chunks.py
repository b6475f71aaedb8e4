"""The chunk codec: one frame's pixel bytes -> every FRAME message of it,
COBS-framed and ready for the wire, in one compiled pass.

Why this module exists
----------------------
This is the link's hot path (the bridge's 5 ms budget per overlay), and the
only part of it that needs compiled code: chunk headers are built with
NumPy, CRCs with ISA-L (``isal``, zlib's function, several times faster than
zlib; called from compiled code in the encoder threads), and COBS with compiled
passes (``cobs_kernel``, numba), split over up to four threads for large
frames: COBS is byte-sequential, and whole-array NumPy alone took more than
the budget for a 1280x720 RGB565 frame (BENCHMARKS.md section 10). numba and isal are the
``[serial]`` extra; this module is imported only when a serial link is opened
(``LinkSender``), so ``png://``, ``fb://`` and ``window://`` never load them.
Without numba there is no fallback that meets the budget, and importing this
module raises an ImportError naming ``pip install 'armscope[serial]'``.
Without isal (numba alone), the CRCs fall back to zlib from Python, one call
per chunk: correct, but several times slower and on the calling thread (``CRC_PATH`` says which path an install takes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Sequence

import numpy as np

from armscope.core.cpus import usable_cpus

from ..pixel_formats import PixelFormat
from .cobs_kernel import HAVE_COMPILED_CRC, chunk_crcs, encode_chunks, max_encoded_size
from .wire import (CRC_SIZE, FLAG_LAST, FRAME_BODY_HEADER_SIZE, HEADER_SIZE, MAX_SEQ, PROTOCOL_VERSION, MsgType,
                   cobs_encode)

try:  # ISA-L's CRC-32 (the same function as zlib's, faster); zlib where it is not installed
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the install
    from zlib import crc32 as _crc32

# How frame chunks get their CRCs on this install, for benchmark reports: the
# fallbacks are correct but serial (a Python call per chunk).
CRC_PATH = ("ISA-L, in the encoder threads" if HAVE_COMPILED_CRC
            else f"{_crc32.__module__.split('.')[-1]} from Python, one call per chunk")

__all__ = ["EncodedFrame", "encode_frame_chunks", "warm_up", "CRC_PATH"]

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

    # CRC-32 of header + data per chunk (ISA-L, several times faster than zlib:
    # BENCHMARKS.md section 10), then one compiled pass per range of chunks writes
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
