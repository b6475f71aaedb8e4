"""The capture thread: reads a frame source (``armscope.edge.sources``) into a
newest-wins slot, reconnecting with backoff.

Why a thread that overwrites: a camera produces frames faster than a CPU
ensemble classifies them. Queueing them would make the overlay lag further
behind the slide with every frame; the pathologist needs the overlay of what is
under the objective *now*. So capture runs on its own, each new frame replaces
the unread one (counted as dropped), and the pipeline always takes the newest.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from armscope.edge.sources import CorruptFrame, FrameSource, SourceLost, SourceSpec, open_source

log = logging.getLogger(__name__)


@dataclass
class Frame:
    """One captured frame and when it was taken."""

    id: int
    image: np.ndarray
    capture_mono: float
    capture_wall: float


class Capture(threading.Thread):
    """Reads a source into a :class:`armscope.edge.pipeline.LatestSlot`, reconnecting with backoff.

    ``on_signal(ok: bool, reason: str | None)`` is called when the source is
    lost or comes back, ``on_end()`` when a finite source ended (the daemon may
    exit). Counters: ``captured``, ``corrupt``, ``reconnects``; the slot counts drops.
    """

    def __init__(self, spec: SourceSpec, slot, stop: threading.Event, on_signal=None, on_end=None,
                 backoff_min: float = 0.5, backoff_max: float = 10.0, exit_on_end: bool = False,
                 on_frame=None):
        super().__init__(name="capture", daemon=True)
        self.spec, self.slot, self.stop = spec, slot, stop
        self.on_signal = on_signal or (lambda ok, reason: None)
        self.on_end = on_end or (lambda: None)
        self.on_frame = on_frame or (lambda frame: None)  # e.g. the capture-rate meter
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.exit_on_end = exit_on_end
        self.captured = self.corrupt = self.reconnects = 0
        self._corrupt_logged_at, self._corrupt_unlogged = -float("inf"), 0
        self.latest: Frame | None = None
        self.error: str | None = None

    def run(self) -> None:
        delay = self.backoff_min
        first = True
        try:
            while not self.stop.is_set():
                source = open_source(self.spec)
                source.stop = self.stop
                try:
                    source.open()
                except SourceLost as exc:
                    self._lost(str(exc), "open failed")
                    self.stop.wait(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                except Exception as exc:  # OpenCV/GStreamer errors must not kill the thread
                    log.exception("source %s: open raised", self.spec.uri)
                    self._lost(f"open raised {type(exc).__name__}: {exc}", "open failed")
                    self.stop.wait(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                if not first:
                    self.reconnects += 1
                first = False
                log.info("source %s opened", self.spec.uri)
                try:
                    ended = self._read_loop(source)
                finally:
                    source.close()
                if self.stop.is_set():
                    break
                if ended and self.spec.finite:
                    # Ended once: one no_signal (already sent), then exit or wait; never replayed,
                    # which would flicker the eyepiece between no_signal and running.
                    if self.exit_on_end:
                        self.on_end()
                    else:
                        self.stop.wait()
                    break
                delay = self.backoff_min if self.captured else delay
                self.stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)
        finally:
            self.slot.close()

    CORRUPT_LOG_INTERVAL_S = 5.0

    def _log_corrupt(self, exc: Exception) -> None:
        """One warning line per corrupt frame, at most one every few seconds (a folder of
        bad files must not flood the log); the next line says how many went unlogged."""
        now = time.monotonic()
        if now - self._corrupt_logged_at < self.CORRUPT_LOG_INTERVAL_S:
            self._corrupt_unlogged += 1
            return
        more = f" ({self._corrupt_unlogged} more since the last such line)" if self._corrupt_unlogged else ""
        log.warning("source %s: skipped a corrupt frame (%s)%s", self.spec.uri, exc, more)
        self._corrupt_logged_at, self._corrupt_unlogged = now, 0

    def _lost(self, message: str, reason: str) -> None:
        if self.error != message:
            log.warning("source %s: %s", self.spec.uri, message)
        self.error = message
        self.on_signal(False, reason)

    def _read_loop(self, source: FrameSource) -> bool:
        """Read until the source is lost or stop is set; True if it ended normally."""
        next_due = time.monotonic()
        signalled = False
        while not self.stop.is_set():
            if source.pace is not None:
                wait = next_due - time.monotonic()
                if wait > 0 and self.stop.wait(wait):
                    return False
                next_due = max(next_due + source.pace, time.monotonic() - source.pace)
            try:
                image = source.read()
            except CorruptFrame as exc:
                self.corrupt += 1
                self._log_corrupt(exc)
                continue
            except SourceLost as exc:
                self._lost(str(exc), str(exc))
                return str(exc) == "source ended"
            except Exception as exc:  # a driver error is a lost source, not a crash
                self._lost(f"read raised {type(exc).__name__}: {exc}", "read failed")
                return False
            mono, wall = time.monotonic(), time.time()
            self.captured += 1
            frame = Frame(self.captured, image, mono, wall)
            self.latest = frame
            self.on_frame(frame)
            self.slot.put(frame)
            if not signalled:
                self.error = None
                self.on_signal(True, None)
                signalled = True
        return False
