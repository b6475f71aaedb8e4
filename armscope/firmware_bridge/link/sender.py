"""The host side of the link: sessions, control requests and Go-Back-N
delivery of frames.

Why this module exists
----------------------
A diagnostic overlay that arrives torn or stale is worse than none, so the
host either gets a frame acknowledged within its deadline or says it could
not (``LinkTimeout``/``LinkProtocolError``) and the caller blanks. This is the
state machine that does so over a lossy serial line: HELLO (re)handshakes
after a controller reset, unsequenced BLANK/BRIGHTNESS/PING requests, the
link watchdog's keepalive, and frame chunks in order with a Go-Back-N
sliding window (cumulative ACKs, NAK on gap/CRC error, resend on timeout),
because stop-and-wait would leave a USB link idle for a round trip per
chunk. Byte layout: ``wire``; chunking and COBS: ``chunks`` (compiled,
imported when the first ``LinkSender`` is made). At ~430 lines it stays
whole: ``LinkSender`` is one state machine (session, sequence numbers,
pending ACKs) that its session and delivery halves share.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Callable, Sequence

import numpy as np

from ..pixel_formats import PixelFormat
from .wire import (_BRIGHTNESS, _FATAL_NAKS, _HELLO, _HELLO_WATCHDOG, FLAG_WATCHDOG, MAX_SEQ, FrameDecoder,
                   LinkError, LinkProtocolError, LinkTimeout, Message, MsgType, NakReason, check_max_payload,
                   frame_message, parse_ack, parse_hello_reply, seq_add, seq_diff)

log = logging.getLogger(__name__)

__all__ = ["ControllerInfo", "SendReport", "LinkSender"]
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
        from . import chunks  # the compiled codec (numba, isal: the [serial] extra); ImportError naming it

        self._encode = chunks.encode_frame_chunks
        chunks.warm_up()

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
        enc = self._encode(
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
