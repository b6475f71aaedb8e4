"""The simulated display controller: the far end of the link, in Python, without I/O.

Why this module exists
----------------------
The host side (``LinkSender``) must be tested against something that behaves
like the microcontroller behind the eyepiece display, including its failure
modes, without hardware.  ``ControllerCore`` is a transport-free state
machine implementing ``docs/link-protocol.md`` (it doubles as a reference
for firmware authors); ``pty_transport.PtyController`` serves it on a
pseudo-terminal.  Faults are injected on the controller's input (dropped and
corrupted bytes, at given byte indices or with given probabilities), on its
output (lost replies) and as resets that lose all state mid-frame.

What the simulated display shows is kept as a framebuffer in the display's
pixel format and, if ``png_dir`` is set, written as numbered PNGs (decoded
back to RGB, so quantisation and MONO1 thresholding are visible).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from .. import link as L
from ..pixel_formats import PixelFormat, decode

__all__ = ["FaultPlan", "ControllerStats", "ControllerCore"]


@dataclasses.dataclass
class FaultPlan:
    """What to break, and when.  Byte indices count controller input bytes from 0."""

    drop_prob: float = 0.0  # per input byte
    corrupt_prob: float = 0.0  # per input byte (XOR with a random non-zero value)
    drop_at: frozenset[int] = frozenset()
    corrupt_at: frozenset[int] = frozenset()
    reset_at_frame_msg: frozenset[int] = frozenset()  # n-th valid FRAME message (0-based) triggers a reset
    reset_prob: float = 0.0  # per valid FRAME message
    drop_reply_prob: float = 0.0  # per reply message
    seed: int | None = None

    def __post_init__(self):
        for name in ("drop_prob", "corrupt_prob", "reset_prob", "drop_reply_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")
        for name in ("drop_at", "corrupt_at", "reset_at_frame_msg"):
            setattr(self, name, frozenset(int(v) for v in getattr(self, name)))


@dataclasses.dataclass
class ControllerStats:
    frames_shown: int = 0
    blanks: int = 0
    resets: int = 0
    acks: int = 0
    naks: dict = dataclasses.field(default_factory=dict)
    bytes_in: int = 0
    bytes_dropped: int = 0
    bytes_corrupted: int = 0
    replies_dropped: int = 0
    duplicates: int = 0
    watchdog_blanks: int = 0


class ControllerCore:
    """Protocol state machine of the display controller (no I/O).

    ``receive(bytes) -> bytes`` consumes what arrived on the wire and returns
    what the controller sends back.  Thread-safe for one feeder plus readers.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fmt: "PixelFormat | str",
        *,
        max_payload: int = 4096,
        png_dir: "str | os.PathLike | None" = None,
        faults: FaultPlan | None = None,
        clock=time.monotonic,
    ):
        self.width, self.height = int(width), int(height)
        self.clock = clock
        self.fmt = PixelFormat.parse(fmt)
        if self.width <= 0 or self.height <= 0 or self.width > 0xFFFF or self.height > 0xFFFF:
            raise ValueError(f"display size must be within 1..65535, got {width}x{height}")
        self.max_payload = L.check_max_payload(max_payload)
        self.stride = self.fmt.row_bytes(self.width)
        self.png_dir = Path(png_dir) if png_dir is not None else None
        if self.png_dir is not None:
            self.png_dir.mkdir(parents=True, exist_ok=True)
        self.faults = faults or FaultPlan()
        self._rng = np.random.default_rng(self.faults.seed)
        self.stats = ControllerStats()
        self.decoder = L.FrameDecoder(max_frame=2 * (self.max_payload + 64))
        self.front = np.zeros((self.height, self.stride), np.uint8)
        self.brightness = 255
        self.history: list[tuple[str, int | None, str | None]] = []  # (kind, frame_id, png path)
        self._lock = threading.Condition()
        self._frame_msgs = 0
        self._png_counter = 0
        self._power_on()
        L.warm_up()  # its replies are COBS-encoded too; compile before the first one is due

    # -- state --------------------------------------------------------------

    def _power_on(self) -> None:
        self.session = False
        self.watchdog_s = 0.0  # armed by a HELLO that asks for it
        self.lit = False
        self.last_valid = self.clock()
        self.expected = 0
        self.in_gap = False
        self.back: np.ndarray | None = None
        self.cur_frame: int | None = None
        self.aborted_frame: int | None = None
        self.decoder.reset()

    def reset(self) -> bytes:
        """Simulate a controller reboot: all state lost, display dark, RESET announced."""
        with self._lock:
            self.stats.resets += 1
            self._power_on()
            self.front[:] = 0
            self.history.append(("reset", None, None))
            self._lock.notify_all()
            return L.frame_message(L.Message(L.MsgType.RESET, 0, 0, L.wire._RESET.pack(L.ResetCause.WATCHDOG, 0, 0)))

    def boot_message(self) -> bytes:
        return L.frame_message(L.Message(L.MsgType.RESET, 0, 0, L.wire._RESET.pack(L.ResetCause.POWER_ON, 0, 0)))

    def tick(self, now: float | None = None) -> None:
        """Link watchdog: blank when armed, something is shown, and no valid
        message arrived for ``watchdog_s`` (the host died or the cable is out).
        The session stays; the next frame shows normally."""
        with self._lock:
            now = self.clock() if now is None else now
            if self.watchdog_s and self.lit and now - self.last_valid > self.watchdog_s:
                self._blank_display()
                self.stats.watchdog_blanks += 1
                self._present("watchdog", None)

    def _blank_display(self) -> None:
        self.front[:] = 0
        if self.cur_frame is not None:
            self.aborted_frame = self.cur_frame
        self.back = None
        self.cur_frame = None
        self.lit = False

    def shown_rgb(self) -> np.ndarray:
        """What the display currently emits, as (H, W, 3) RGB."""
        with self._lock:
            return decode(self.front.copy(), self.fmt, self.width, self.height)

    def wait_frames(self, n: int, timeout: float) -> bool:
        """Block until ``n`` frames have been shown in total (or timeout)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.stats.frames_shown >= n, timeout)

    # -- input --------------------------------------------------------------

    def _inject(self, data: bytes) -> bytes:
        f = self.faults
        n = len(data)
        start = self.stats.bytes_in
        self.stats.bytes_in += n
        if not (f.drop_prob or f.corrupt_prob or f.drop_at or f.corrupt_at) or n == 0:
            return data
        arr = np.frombuffer(data, np.uint8).copy()
        idx = np.arange(start, start + n)
        corrupt = self._rng.random(n) < f.corrupt_prob if f.corrupt_prob else np.zeros(n, bool)
        if f.corrupt_at:
            corrupt |= np.isin(idx, list(f.corrupt_at))
        if corrupt.any():
            arr[corrupt] ^= self._rng.integers(1, 256, int(corrupt.sum()), dtype=np.uint8)
            self.stats.bytes_corrupted += int(corrupt.sum())
        drop = self._rng.random(n) < f.drop_prob if f.drop_prob else np.zeros(n, bool)
        if f.drop_at:
            drop |= np.isin(idx, list(f.drop_at))
        if drop.any():
            self.stats.bytes_dropped += int(drop.sum())
            arr = arr[~drop]
        return arr.tobytes()

    def receive(self, data: bytes) -> bytes:
        with self._lock:
            replies: list[bytes] = []
            resets = self.stats.resets
            for ev in self.decoder.feed(self._inject(bytes(data))):
                if self.stats.resets != resets:
                    break  # a reboot loses whatever else was in the receive buffer
                if isinstance(ev, L.Message):
                    self.last_valid = self.clock()  # any message that passed COBS and CRC feeds the watchdog
                if isinstance(ev, L.Rejected):
                    reason = L.NakReason.BAD_VERSION if ev.reason == "version" else L.NakReason.BAD_CRC
                    self.in_gap = True
                    replies.append(self._nak(0, L.UNKNOWN_SEQ, reason))
                    continue
                out = self._handle(ev)
                if out:
                    replies.append(out)
            keep = []
            for r in replies:
                if self.faults.drop_reply_prob and self._rng.random() < self.faults.drop_reply_prob:
                    self.stats.replies_dropped += 1
                else:
                    keep.append(r)
            return b"".join(keep)

    # -- replies ------------------------------------------------------------

    def _ack(self, mtype: int, seq: int) -> bytes:
        self.stats.acks += 1
        return L.frame_message(L.Message(L.MsgType.ACK, seq, 0, L.pack_ack(mtype, seq, self.expected)))

    def _nak(self, mtype: int, seq: int, reason: L.NakReason) -> bytes:
        name = L.NakReason(reason).name
        self.stats.naks[name] = self.stats.naks.get(name, 0) + 1
        return L.frame_message(L.Message(L.MsgType.NAK, seq, 0, L.pack_ack(mtype, seq, self.expected, reason)))

    # -- message handling ---------------------------------------------------

    def _handle(self, m: L.Message) -> bytes | None:
        T = L.MsgType
        if m.type == T.HELLO:
            if len(m.body) < 4:
                return self._nak(m.type, m.seq, L.NakReason.BAD_LENGTH)
            (nonce,) = L.wire._HELLO.unpack_from(m.body, 0)
            watchdog_ms = L.wire._HELLO_WATCHDOG.unpack_from(m.body, 0)[1] if len(m.body) >= L.wire._HELLO_WATCHDOG.size else 0
            self.watchdog_s = watchdog_ms / 1000.0
            self.session = True
            self.expected = m.seq
            self.in_gap = False
            self.back = None
            self.cur_frame = None
            reply = L.HelloReply(
                nonce, self.expected, self.width, self.height, self.max_payload, self.fmt.wire_code, L.PROTOCOL_VERSION
            )
            flags = L.FLAG_WATCHDOG if watchdog_ms else 0
            return L.frame_message(L.Message(T.HELLO_REPLY, m.seq, flags, L.pack_hello_reply(reply)))
        if m.type == T.PING:
            return L.frame_message(L.Message(T.PONG, m.seq, 0, m.body))
        if m.type == T.BLANK:
            self._blank_display()
            self.stats.blanks += 1
            self._present("blank", None)
            return self._ack(m.type, m.seq)
        if m.type == T.BRIGHTNESS:
            if len(m.body) < 1:
                return self._nak(m.type, m.seq, L.NakReason.BAD_LENGTH)
            self.brightness = m.body[0]
            return self._ack(m.type, m.seq)
        if m.type == T.FRAME:
            return self._handle_frame(m)
        return self._nak(m.type, m.seq, L.NakReason.UNKNOWN_TYPE)

    def _handle_frame(self, m: L.Message) -> bytes | None:
        f = self.faults
        n = self._frame_msgs
        self._frame_msgs += 1
        if n in f.reset_at_frame_msg or (f.reset_prob and self._rng.random() < f.reset_prob):
            # The reboot loses this message, the session and the partial frame.
            return self.reset()
        if not self.session:
            return self._nak(m.type, m.seq, L.NakReason.NO_SESSION)
        d = L.seq_diff(m.seq, self.expected)
        if d < 0:
            self.stats.duplicates += 1
            return self._ack(m.type, m.seq)  # re-ACK: our ACK may have been lost
        if d > 0:
            if self.in_gap:
                return None  # one NAK per gap, see the protocol document
            self.in_gap = True
            return self._nak(m.type, m.seq, L.NakReason.SEQ_GAP)
        self.in_gap = False
        self.expected = L.seq_add(self.expected, 1)  # consumed even if rejected below
        if len(m.body) > self.max_payload:  # max_payload bounds the whole body (docs/link-protocol.md)
            return self._nak(m.type, m.seq, L.NakReason.TOO_LARGE)
        try:
            h, data = L.parse_frame_body(m.body)
        except ValueError:
            return self._nak(m.type, m.seq, L.NakReason.BAD_LENGTH)
        if h.frame_id == self.aborted_frame:
            return self._ack(m.type, m.seq)
        reason = self._apply_chunk(h, data)
        if reason is not None:
            self.aborted_frame = h.frame_id
            self.back = None
            self.cur_frame = None
            return self._nak(m.type, m.seq, reason)
        if m.flags & L.FLAG_LAST:
            self.front = self.back
            self.back = None
            self.cur_frame = None
            self.lit = True
            self.stats.frames_shown += 1
            self._present("frame", h.frame_id)
        return self._ack(m.type, m.seq)

    def _apply_chunk(self, h: L.FrameChunkHeader, data: bytes) -> L.NakReason | None:
        if h.fmt != self.fmt.wire_code:
            return L.NakReason.BAD_FORMAT
        if h.w == 0 or h.h == 0 or h.x + h.w > self.width or h.y + h.h > self.height:
            return L.NakReason.BAD_REGION
        fmt = self.fmt
        if fmt is PixelFormat.MONO1 and (h.x % 8 or (h.w % 8 and h.x + h.w != self.width)):
            return L.NakReason.BAD_REGION
        rb = fmt.row_bytes(h.w)
        if h.offset + len(data) > rb * h.h:
            return L.NakReason.BAD_LENGTH
        if h.frame_id != self.cur_frame:
            self.back = self.front.copy()  # partial updates start from what is shown
            self.cur_frame = h.frame_id
        xb = h.x * fmt.bits_per_pixel // 8
        buf = np.frombuffer(data, np.uint8)
        if xb == 0 and rb == self.stride:
            flat = self.back.reshape(-1)
            base = h.y * self.stride + h.offset
            flat[base : base + buf.size] = buf
            return None
        pos, i = h.offset, 0
        while i < buf.size:
            row, col = divmod(pos, rb)
            take = min(rb - col, buf.size - i)
            self.back[h.y + row, xb + col : xb + col + take] = buf[i : i + take]
            i += take
            pos += take
        return None

    def _present(self, kind: str, frame_id: int | None) -> None:
        path = None
        if self.png_dir is not None:
            self._png_counter += 1
            name = f"{self._png_counter:06d}_{kind}" + (f"_{frame_id}" if frame_id is not None else "") + ".png"
            path = str(self.png_dir / name)
            rgb = decode(self.front, self.fmt, self.width, self.height)
            cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.history.append((kind, frame_id, path))
        self._lock.notify_all()
