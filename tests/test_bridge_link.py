"""Link framing: CRC, COBS (vectors, round trip, cross-check), chunk encoding, decoder fuzzing."""


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armscope.firmware_bridge import link as L
from armscope.firmware_bridge.pixel_formats import PixelFormat

try:
    from cobs import cobs as cobs_pkg
except ImportError:  # optional cross-check
    cobs_pkg = None

from repo_paths import REPO

DOC = REPO / "docs" / "link-protocol.md"
EXAMPLE_WIRE = "04 01 10 01 01 01 01 01 02 01 01 01 01 01 01 01 01 01 01 01 02 02 02 01 02 02 01 03 f8 1f 05 3b 94 2b 5f 00"


def test_crc32_check_value():
    assert L.crc32(b"123456789") == 0xCBF43926


@pytest.mark.parametrize(
    "raw,enc",
    [
        ("", "01"),
        ("00", "01 01"),
        ("00 00", "01 01 01"),
        ("00 11 00", "01 02 11 01"),
        ("11 22 00 33", "03 11 22 02 33"),
        ("11 22 33 44", "05 11 22 33 44"),
        ("11 00 00 00", "02 11 01 01 01"),
    ],
)
def test_cobs_known_vectors(raw, enc):
    raw_b, enc_b = bytes.fromhex(raw), bytes.fromhex(enc)
    assert L.cobs_encode(raw_b) == enc_b
    assert L.cobs_decode(enc_b) == raw_b


def test_cobs_long_runs():
    seq = bytes(range(1, 255))  # 254 non-zero bytes
    assert L.cobs_encode(seq) == b"\xff" + seq
    assert L.cobs_encode(b"\x00" + seq) == b"\x01\xff" + seq
    assert L.cobs_encode(bytes(range(1, 256))) == b"\xff" + bytes(range(1, 255)) + b"\x02\xff"
    assert L.cobs_encode(seq + b"\x00") == b"\xff" + seq + b"\x01\x01"
    # Decoders must accept the form with an explicit trailing 0x01 block too.
    assert L.cobs_decode(b"\xff" + seq + b"\x01") == seq


def test_cobs_decode_errors():
    with pytest.raises(L.CobsError):
        L.cobs_decode(b"\x05\x11\x22")  # block runs past the end
    with pytest.raises(L.CobsError):
        L.cobs_decode(b"\x03\x11\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_cobs_round_trip_and_no_zeros(data):
    enc = L.cobs_encode(data)
    assert 0 not in enc
    assert len(enc) <= len(data) + 1 + len(data) // 254
    assert L.cobs_decode(enc) == data
    if cobs_pkg is not None:
        assert enc == cobs_pkg.encode(data)


_RUN = st.one_of(
    st.tuples(st.just("zeros"), st.integers(1, 300)),
    st.tuples(st.just("nonzero"), st.integers(1, 600)),
    st.tuples(st.just("pixels"), st.integers(1, 200)),  # RGB565 heat colours: zero and non-zero bytes mixed
    st.tuples(st.just("random"), st.integers(1, 100)),
)


@settings(max_examples=300, deadline=None)
@given(runs=st.lists(_RUN, max_size=12), skip=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_cobs_word_path_matches_byte_reference(runs, skip, seed):
    """The kernel's 8-bytes-at-a-time path (long zero runs, non-zero runs across
    the 254-byte block limit, mixed pixel bytes, any alignment) gives exactly
    the bytes of a byte-at-a-time COBS encoder."""
    rng = np.random.default_rng(seed)
    make = {
        "zeros": lambda n: np.zeros(n, np.uint8),
        "nonzero": lambda n: rng.integers(1, 256, n, dtype=np.uint8),
        "pixels": lambda n: np.array([0x1F, 0x00, 0x00, 0xF8, 0xE0, 0x07, 0x00, 0x00], np.uint8)[rng.integers(0, 8, n)],
        "random": lambda n: rng.integers(0, 256, n, dtype=np.uint8),
    }
    data = np.concatenate([np.zeros(skip, np.uint8)] + [make[kind](n) for kind, n in runs])[skip:]
    enc = L.cobs_encode(data.tobytes())
    assert enc == _cobs_reference(data.tobytes())
    assert L.cobs_decode(enc) == data.tobytes()


def _cobs_reference(data: bytes) -> bytes:
    """Textbook COBS (docs/link-protocol.md's convention: no trailing 0x01 after a full block)."""
    out, block = bytearray(), bytearray()
    for v in data:
        if v == 0:
            out += bytes([len(block) + 1]) + block
            block.clear()
        else:
            block.append(v)
            if len(block) == 254:
                out += b"\xff" + block
                block.clear()
                full = True
                continue
        full = False
    if not (data and block == b"" and full):
        out += bytes([len(block) + 1]) + block
    return bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    w=st.integers(1, 70),
    h=st.integers(1, 20),
    fmt=st.sampled_from(list(PixelFormat)),
    max_payload=st.integers(L.FRAME_BODY_HEADER_SIZE + 1, 700),
    seq0=st.integers(0, L.MAX_SEQ),
    kind=st.sampled_from(["random", "zeros", "nonzero", "sparse"]),
    seed=st.integers(0, 2**31),
)
def test_encode_frame_chunks_decodes_back(w, h, fmt, max_payload, seq0, kind, seed):
    rng = np.random.default_rng(seed)
    n = fmt.frame_bytes(w, h)
    payload = {
        "random": lambda: rng.integers(0, 256, n, dtype=np.uint8),
        "zeros": lambda: np.zeros(n, np.uint8),
        "nonzero": lambda: rng.integers(1, 256, n, dtype=np.uint8),
        "sparse": lambda: (rng.random(n) < 0.02).astype(np.uint8) * rng.integers(0, 256, n, dtype=np.uint8),
    }[kind]()
    enc = L.encode_frame_chunks(payload, seq0=seq0, frame_id=9, region=(0, 0, w, h), fmt=fmt, max_payload=max_payload)
    dec = L.FrameDecoder()
    msgs = dec.feed(enc.wire.tobytes())
    assert dec.rejected_total == 0 and len(msgs) == enc.n_chunks
    got = bytearray()
    for k, m in enumerate(msgs):
        assert m.type == L.MsgType.FRAME and m.seq == L.seq_add(seq0, k)
        assert m.flags == (L.FLAG_LAST if k == enc.n_chunks - 1 else 0)
        hdr, data = L.parse_frame_body(m.body)
        assert (hdr.frame_id, hdr.x, hdr.y, hdr.w, hdr.h, hdr.fmt) == (9, 0, 0, w, h, fmt.wire_code)
        assert hdr.offset == len(got) and len(m.body) <= max_payload
        got += data
        assert bytes(enc.chunk(k)) == L.frame_message(m)  # batch encoder == one-at-a-time encoder
    assert bytes(got) == payload.tobytes()


def _segments(stream: bytes) -> int:
    """Non-empty 0x00-terminated segments, counted independently of the decoder."""
    return sum(1 for s in stream.split(b"\x00")[:-1] if s)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_decoder_fuzz_never_crashes_and_counts_every_rejection(garbage, cuts):
    dec = L.FrameDecoder(max_frame=1 << 16)
    events = []
    prev = 0
    for c in sorted(set(min(c, len(garbage)) for c in cuts)) + [len(garbage)]:
        events += dec.feed(garbage[prev:c])
        prev = c
    rejected = [e for e in events if isinstance(e, L.Rejected)]
    assert len(events) == _segments(garbage)  # one event per delimited frame, none lost
    assert dec.rejected_total == len(rejected)
    assert dec.messages == len(events) - len(rejected)
    # ...and a valid message after the garbage always gets through.
    good = L.Message(L.MsgType.PING, 77, 0, b"after garbage")
    out = dec.feed(b"\x00" + L.frame_message(good))
    assert out and out[-1] == good


def test_decoder_rejection_reasons_and_resync():
    dec = L.FrameDecoder(max_frame=64)
    good = L.frame_message(L.Message(L.MsgType.BLANK, 5))
    bad_crc = bytearray(good)
    assert good[:3] == b"\x03\x01\x11"
    bad_crc[2] ^= 0x40  # the type byte: still valid COBS, wrong CRC
    events = dec.feed(bytes(bad_crc) + b"\x07\x01\x00" + b"\x02\x01\x01\x00" + bytes(range(1, 120)) + b"\x00" + good)
    reasons = [e.reason if isinstance(e, L.Rejected) else e.type for e in events]
    assert reasons == ["crc", "cobs", "short", "overflow", L.MsgType.BLANK]
    assert dec.rejected == {"crc": 1, "cobs": 1, "short": 1, "overflow": 1}
    wrong_version = L.frame_message(L.Message(L.MsgType.BLANK, 5, version=2))
    assert dec.feed(wrong_version)[0].reason == "version"


def test_decoder_handles_byte_at_a_time_feeding():
    dec = L.FrameDecoder()
    msgs = [L.Message(L.MsgType.PING, i, 0, bytes([i] * i)) for i in range(5)]
    stream = b"".join(L.frame_message(m) for m in msgs)
    got = []
    for b in stream:
        got += dec.feed(bytes([b]))
    assert got == msgs


def test_sequence_arithmetic_wraps():
    assert L.seq_add(L.MAX_SEQ, 1) == 0
    assert L.seq_diff(0, L.MAX_SEQ) == 1
    assert L.seq_diff(L.MAX_SEQ, 0) == -1
    assert L.seq_diff(5, 5) == 0
    enc = L.encode_frame_chunks(np.ones(300, np.uint8), seq0=L.MAX_SEQ - 1, frame_id=1,
                                region=(0, 0, 150, 1), fmt="rgb565le", max_payload=L.FRAME_BODY_HEADER_SIZE + 100)
    seqs = [m.seq for m in L.FrameDecoder().feed(enc.wire.tobytes())]
    assert seqs == [L.MAX_SEQ - 1, L.MAX_SEQ, 0]


def test_encode_frame_chunks_validates_size():
    with pytest.raises(ValueError, match="does not match region"):
        L.encode_frame_chunks(np.zeros(10, np.uint8), seq0=0, frame_id=1, region=(0, 0, 4, 4), fmt="gray8", max_payload=100)


@pytest.mark.parametrize("max_payload", [1024, 2048, 4096])
def test_full_frame_wire_efficiency(max_payload):
    rng = np.random.default_rng(0)
    for payload in (rng.integers(0, 256, 1280 * 720 * 2, dtype=np.uint8), np.zeros(1280 * 720 * 2, np.uint8)):
        enc = L.encode_frame_chunks(payload, seq0=0, frame_id=1, region=(0, 0, 1280, 720), fmt="rgb565le",
                                    max_payload=max_payload)
        assert enc.efficiency >= 0.95


def test_worked_example_in_protocol_doc_matches_encoder():
    body = L.pack_frame_body(L.FrameChunkHeader(1, 0, 0, 0, 2, 1, PixelFormat.RGB565_LE.wire_code),
                             bytes([0x00, 0xF8, 0x1F, 0x00]))
    wire = L.frame_message(L.Message(L.MsgType.FRAME, 0, L.FLAG_LAST, body))
    assert wire.hex(" ") == EXAMPLE_WIRE
    text = DOC.read_text()
    assert EXAMPLE_WIRE.upper() in text.upper().replace("\n", " ")


def test_cobs_kernel_compiles_without_a_writable_cache(monkeypatch):
    """A hardened service (read-only install, no home) has nowhere to cache
    compiled code: the kernel then compiles per process instead of failing."""
    import importlib

    from numba.core import caching

    import armscope.firmware_bridge.link.cobs_kernel as kernel

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # as if no place were writable
    try:
        fresh = importlib.reload(kernel)
        src = np.frombuffer(b"\x11\x00\x22", np.uint8)
        out = np.empty(fresh.max_encoded_size(3), np.uint8)
        end = fresh.cobs_into(src, 3, out, 0)
        assert bytes(out[: end - 1]) == L.cobs_encode(b"\x11\x00\x22") == b"\x02\x11\x02\x22"
    finally:
        monkeypatch.undo()
        importlib.reload(kernel)


def test_link_crc_is_zlibs_crc32():
    """The link's CRC functions (ISA-L's when installed: the single messages'
    in ``wire``, the frame chunks' fallback in ``chunks``) are zlib's CRC-32 on
    any span and starting value: the protocol document names zlib's."""
    import zlib

    from armscope.firmware_bridge.link import chunks

    buf = np.random.default_rng(5).integers(0, 256, 5000, dtype=np.uint8)
    for start, stop, init in [(0, 0, 0), (0, 1, 0), (3, 10, 0), (1, 17, 0xDEADBEEF), (7, 4103, 12345), (0, 5000, 0)]:
        assert L.wire._crc32(buf[start:stop], init) == zlib.crc32(buf[start:stop], init)
        assert chunks._crc32(buf[start:stop], init) == zlib.crc32(buf[start:stop], init)


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_encoding_split_over_threads_is_byte_identical(monkeypatch, threads):
    """Large frames are encoded by several threads into separate slots that
    are closed up afterwards: the wire and chunk offsets must be exactly the
    single-threaded ones (real RGB565 overlay bytes, uneven last chunk)."""
    from armscope.firmware_bridge.link import chunks

    rng = np.random.default_rng(6)
    w, h = 640, 241
    payload = (rng.random(w * h * 2) < 0.6).astype(np.uint8) * rng.integers(0, 256, w * h * 2, dtype=np.uint8)
    kw = dict(seq0=L.MAX_SEQ - 5, frame_id=3, region=(0, 0, w, h), fmt="rgb565le", max_payload=1000)
    monkeypatch.setattr(chunks, "_ENCODER_THREADS", 1)
    one = L.encode_frame_chunks(payload, **kw)
    monkeypatch.setattr(chunks, "_ENCODER_THREADS", threads)
    assert len(chunks._chunk_ranges(one.n_chunks)) == threads + 1  # really split
    many = L.encode_frame_chunks(payload, **kw)
    assert np.array_equal(one.offsets, many.offsets) and np.array_equal(one.wire, many.wire)
    msgs = L.FrameDecoder(max_frame=4096).feed(many.wire.tobytes())
    assert b"".join(L.parse_frame_body(m.body)[1] for m in msgs) == payload.tobytes()


def test_chunk_crcs_in_compiled_code_match_the_python_loop(monkeypatch):
    """The chunk CRCs are computed in the encoder threads by ISA-L called from
    compiled code (``cobs_kernel.chunk_crcs``); without that symbol ``chunks``
    keeps a Python loop. Both must put the same bytes on the wire, and with the
    ``[serial]`` extra (which installs ``isal``) the compiled path must be the one
    in use, or the bridge silently loses its parallel CRCs."""
    from armscope.firmware_bridge.link import chunks, cobs_kernel

    assert cobs_kernel.HAVE_COMPILED_CRC
    rng = np.random.default_rng(8)
    w, h = 300, 97
    payload = (rng.random(w * h * 2) < 0.5).astype(np.uint8) * rng.integers(0, 256, w * h * 2, dtype=np.uint8)
    kw = dict(seq0=17, frame_id=4, region=(0, 0, w, h), fmt="rgb565be", max_payload=777)
    compiled = L.encode_frame_chunks(payload, **kw)
    monkeypatch.setattr(chunks, "HAVE_COMPILED_CRC", False)
    loop = L.encode_frame_chunks(payload, **kw)
    assert np.array_equal(compiled.wire, loop.wire) and np.array_equal(compiled.offsets, loop.offsets)
    msgs = L.FrameDecoder().feed(compiled.wire.tobytes())  # the decoder checks each CRC with zlib's function
    assert len(msgs) == compiled.n_chunks and b"".join(L.parse_frame_body(m.body)[1] for m in msgs) == payload.tobytes()


def test_sender_reports_a_port_that_went_away_as_a_link_error():
    """pyserial raises SerialException (an OSError) when the device vanishes;
    the sender turns it into a LinkError naming the port, which the bridge
    counts as a `link` blank, instead of a bare library error."""

    class VanishedPort:
        port = "/dev/ttyACM9"
        timeout = 0.01

        @property
        def in_waiting(self):
            raise OSError("device reports readiness to read but returned no data")

        def write(self, data):
            return len(data)

    sender = L.LinkSender(VanishedPort(), deadline=0.5)
    with pytest.raises(L.LinkError, match="read from /dev/ttyACM9 failed: device reports readiness"):
        sender.hello()
    for bad in ({"ack_timeout": 0}, {"deadline": float("nan")}, {"max_payload": 10}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            L.LinkSender(VanishedPort(), **bad)
