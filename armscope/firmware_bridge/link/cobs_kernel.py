"""COBS encoding of link messages, compiled with numba (the ``[serial]`` extra).

Why a compiled loop: COBS is byte-sequential (each code byte is the distance
to the next zero), which whole-array NumPy can only emulate with several
passes over index arrays; on a Grad-CAM overlay in RGB565 (hundreds of
thousands of zero/non-zero transitions in 1.8 MB) that took more than the
bridge's whole budget. The loop below takes whole 8-byte words where it can
(``_cobs_feed``), faster than the byte-at-a-time loop by a factor that
depends on how many of the frame's bytes are zero (figures: BENCHMARKS.md
section 10). The compiled code is
cached on disk (next to this file, or numba's user cache dir when that is
read-only), so only the first start pays the compile (about a second); where
neither is writable (a hardened service with ProtectSystem=strict and
ProtectHome), each process compiles once instead.

Output convention (the ``cobs`` package's and ``docs/link-protocol.md``'s):
a message that ends exactly with a full 0xFF block gets no trailing 0x01 code.
"""
from __future__ import annotations

import ctypes

import numpy as np

try:
    import numba
    from numba import types, uint8, uint32, uint64, uintp
except ImportError as exc:  # the [serial] extra is not installed
    raise ImportError(
        f"the serial link's COBS framing is compiled with numba, which is not installed ({exc}): "
        "pip install 'armscope[serial]'. There is no pure-Python fallback: NumPy framing of a display-sized "
        "frame misses the bridge's 5 ms budget (BENCHMARKS.md section 3)", name="numba") from None

__all__ = ["cobs_into", "encode_chunks", "chunk_crcs", "HAVE_COMPILED_CRC", "max_encoded_size"]


def _compiled(fn):
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available": no writable place
        return numba.njit(cache=False, nogil=True, boundscheck=False)(fn)


def _register_isal_crc32() -> bool:
    """Make ISA-L's CRC-32 (``crc32_gzip_refl``, zlib's CRC, exported by the
    ``isal`` wheel's extension module) callable from compiled code.

    Why: the chunk CRCs were a Python loop of two ISA-L calls per 4 KB chunk
    on the calling thread (about a tenth of the bridge's budget, none of it
    parallel; BENCHMARKS.md section 10). Called from the kernel they run in the
    encoder threads without the GIL. The function is declared by symbol name
    (``ExternalFunction``), so the kernel stays cacheable on disk: the address
    is bound when this module is imported, not baked into the cache.
    False where the symbol is not there (no ``isal``, or a build that hides
    it): ``chunks`` then keeps its Python loop."""
    try:
        import isal.isal_zlib as iz
        import llvmlite.binding as llvm

        fn = ctypes.CDLL(iz.__file__).crc32_gzip_refl
    except (ImportError, OSError, AttributeError):
        return False
    llvm.add_symbol("crc32_gzip_refl", ctypes.cast(fn, ctypes.c_void_p).value)
    return True


HAVE_COMPILED_CRC = _register_isal_crc32()
_crc32_gzip_refl = types.ExternalFunction("crc32_gzip_refl", types.uint32(types.uint32, types.voidptr, types.uint64))


def max_encoded_size(raw_size: int) -> int:
    """Worst-case COBS size of ``raw_size`` bytes, plus the 0x00 delimiter."""
    return raw_size + raw_size // 254 + 2


_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_GATHER = np.uint64(0x0102040810204080)  # bit 8q -> bit 56 + q: a word's zero-byte flags as one byte


def _zero_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each 8-bit set ``m`` of zero bytes in a word: the word of codes that
    fill them (each zero but the last gets the distance to the next zero),
    the first zero's and the last zero's position."""
    codes = np.zeros(256, np.uint64)
    first = np.zeros(256, np.uint64)
    last = np.zeros(256, np.uint64)
    for m in range(1, 256):
        zeros = [q for q in range(8) if m >> q & 1]
        codes[m] = sum((b - a) << (8 * a) for a, b in zip(zeros, zeros[1:]))
        first[m], last[m] = zeros[0], zeros[-1]
    return codes, first, last


_CODES, _FIRST, _LAST = _zero_tables()


@_compiled
def _words(src):  # pragma: no cover - compiled
    """``(a0, words)``: ``src[a0:]``'s whole aligned 8-byte words as uint64
    (``a0`` = bytes before the first 8-aligned address)."""
    a0 = (-src.ctypes.data) & 7
    if a0 > src.size:
        a0 = src.size
    m = (src.size - a0) // 8
    return a0, src[a0 : a0 + m * 8].view(np.uint64)


@_compiled
def _cobs_feed(src, words, a0, start, stop, out, j, code_pos, ff_end):  # pragma: no cover - compiled
    """COBS state machine over ``src[start:stop]``: ``j`` is where the next
    data byte goes, ``code_pos`` where the open block's code byte goes (its
    code is ``j - code_pos``), ``ff_end`` whether a full 0xFF block just
    closed. Returns the new state, so a message can be encoded from several
    buffers without first copying them together.

    ``words``/``a0`` are ``_words(src)`` (or an empty array: bytes only).
    Where a whole aligned word fits in the open block, it is done at once:
    COBS puts every input byte at its own output position (a zero's position
    becomes the next block's code byte), so the word is stored with its zero
    bytes replaced by their codes, looked up by the set of zero positions
    (found by bit tricks; no per-byte or per-zero branch), and the block left
    open gets its code. Transparent overlay pixels are long zero runs and
    coloured ones mix zero and non-zero bytes: both were branch
    mispredictions byte by byte (slower on a heat overlay, BENCHMARKS.md
    section 10)."""
    b = start
    w_end = a0 + uintp(words.size) * uintp(8)
    if w_end > stop:
        w_end = stop
    while b < stop:
        if (b >= a0 and ((b - a0) & uintp(7)) == 0 and b + uintp(8) <= w_end
                and j + uintp(8) - code_pos <= uintp(0xFE)):
            w = words[(b - a0) >> uintp(3)]
            if w == 0:  # eight zeros: seven one-byte blocks, the eighth opens
                out[code_pos] = uint8(j - code_pos)
                for q in range(8):
                    out[j + uintp(q)] = uint8(1)
                code_pos = j + uintp(7)
            else:
                # high bit of each byte set where that byte is zero (exact: no borrow between bytes)
                zeros = ((((w & _LOW7) + _LOW7) | w) & _HIGH) ^ _HIGH
                if zeros != 0:  # close the open block at the first zero, fill the codes, open at the last
                    m = ((zeros >> uint64(7)) * _GATHER) >> uint64(56)
                    w |= _CODES[m]
                    out[code_pos] = uint8(j + uintp(_FIRST[m]) - code_pos)
                    code_pos = j + uintp(_LAST[m])
                for q in range(8):
                    out[j + uintp(q)] = uint8((w >> uint64(8 * q)) & uint64(0xFF))
            j += uintp(8)
            ff_end = False
            b += uintp(8)
            continue
        if src[b] == 0:
            out[code_pos] = uint8(j - code_pos)
            code_pos = j
            ff_end = False
        else:
            out[j] = src[b]
            ff_end = False
            if j + uintp(1) - code_pos == uintp(0xFF):  # 254 data bytes: close the block
                out[code_pos] = uint8(0xFF)
                j += uintp(1)
                code_pos = j
                ff_end = True
        j += uintp(1)
        b += uintp(1)
    return j, code_pos, ff_end


@_compiled
def _cobs_close(out, j, code_pos, ff_end):  # pragma: no cover - compiled
    """Write the open block's code and the 0x00 delimiter; return the offset after it."""
    if ff_end:
        j = code_pos  # drop the empty block's code (see module docstring)
    else:
        out[code_pos] = uint8(j - code_pos)
    out[j] = 0
    return j + 1


@_compiled
def cobs_into(src, n, out, o):  # pragma: no cover - compiled
    """COBS-encode ``src[:n]`` into ``out[o:]``, append the 0x00 delimiter;
    return the offset after it. ``out`` needs ``max_encoded_size(n)`` bytes."""
    a0, words = _words(src)
    j, code_pos, ff_end = _cobs_feed(src, words, uintp(a0), uintp(0), uintp(n), out, uintp(o) + uintp(1), uintp(o), False)
    return _cobs_close(out, j, code_pos, ff_end)


@_compiled
def chunk_crcs(headers, payload, chunk, crcs, first, stop):  # pragma: no cover - compiled
    """``crcs[i]`` = CRC-32 of ``headers[i] + payload[i*chunk:(i+1)*chunk]``
    for ``first <= i < stop``, with ISA-L (only where ``HAVE_COMPILED_CRC``)."""
    hs = headers.shape[1]
    n = payload.size
    for i in range(first, stop):
        start = i * chunk
        end = min(start + chunk, n)
        crc = _crc32_gzip_refl(uint32(0), headers[i].ctypes.data, uint64(hs))
        crcs[i] = _crc32_gzip_refl(crc, payload[start:end].ctypes.data, uint64(end - start))


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
    no_words = np.empty(0, np.uint64)
    a0, words = _words(payload)
    for i in range(first, stop):
        start = i * chunk
        end = min(start + chunk, n)
        crc = crcs[i]
        for q in range(4):
            tail[q] = (crc >> (8 * q)) & 0xFF
        st = _cobs_feed(headers[i], no_words, uintp(0), uintp(0), uintp(hs), out, uintp(o) + uintp(1), uintp(o), False)
        st = _cobs_feed(payload, words, uintp(a0), uintp(start), uintp(end), out, st[0], st[1], st[2])
        st = _cobs_feed(tail, no_words, uintp(0), uintp(0), uintp(4), out, st[0], st[1], st[2])
        o = _cobs_close(out, st[0], st[1], st[2])
        offsets[i + 1] = o
    return o
