"""The bridge runtime: daemon overlays (ZeroMQ) -> registered, converted -> eyepiece display.

Why this module exists
----------------------
The edge daemon publishes Grad-CAM overlays in *camera* pixels; the eyepiece
microdisplay needs them in *display* pixels and in its own pixel format, and
it must never show an overlay that is stale or wrong: the pathologist looks
through the eyepiece at the specimen and cannot tell an old heat map from a
current one.  This module is the loop that sits between the two, and its
design is driven by that safety requirement rather than by throughput:

* **Fail dark.**  On an additive microdisplay black is transparent, so
  "blank" is always the safe state.  The display is blanked on start-up,
  on exit (also SIGTERM/SIGINT, via :meth:`Bridge.stop`), and whenever any
  of the rules below fires.  Every blanking is counted with its reason
  (:data:`BLANK_REASONS`, :meth:`Bridge.stats`).
* **Every message is validated** (``armscope.core.protocol.decode``: the
  headers' JSON Schemas and the cross-key rules; ``validation``: the CAM's
  values; strictly increasing ``frame_id`` per ``run_id``).  A rejected
  message is counted with a reason and blanks the display: a stream that
  produced one malformed message is not trusted to have produced a correct
  overlay just before it.  A message of another protocol version is refused
  the same way, with one log line per version.
* **Overlays are shown only while the daemon says ``running``.**  Any other
  state blanks immediately and discards overlays published before it.  An
  overlay that arrives while the state is not (yet) ``running`` is *held*:
  the daemon publishes the first overlay after recovering and then the
  ``running`` status (edge/daemon.py), so the held overlay is shown as soon
  as that status arrives, if it is still fresh.  Before the first status
  the state is unknown and nothing is shown.
* **Rendered once, in display pixels** (protocol v2): the overlay arrives
  as its CAM (a few KB) and ``render.render_cam_for`` draws heat, outline
  and crop edge straight into the display's pixels after the registration;
  the label and the frame stamp are drawn beside it in the same frame.
* **Staleness** (``staleness``; docs/protocol.md 1.5): ``stale_after_ms``
  bounds the age of what the eyepiece shows *from the capture of the camera
  frame*; the clock rule (``clock_mode``: same host ``mono``, another host
  ``offset``, estimated from the heartbeats) judges it on the bridge's own
  monotonic clock.  ``stale_after_ms`` from the header is capped at
  ``max_stale_ms``.
* **Silence**: if no message of any topic arrives for ``stale_after_ms``
  (heartbeats are 2 Hz), the daemon is presumed dead and the display is
  blanked (reason ``silent``), whatever is on it.
* **Bounded waits.**  The loop polls the socket with a timeout of at most
  ``poll_interval`` (and never past the next expiry), so expiry is detected
  even when nothing arrives.  A frame sent over the serial link gets a
  deadline no later than the expiry of what is on screen now (the old frame
  stays visible until the new one's last chunk lands); if the link cannot
  deliver in time (``LinkTimeout``/``LinkError``) the display is blanked
  (reason ``link``).  A blank that fails is retried on every tick.

The loop is single-threaded on purpose: every decision about what the
eyepiece shows is made in one place, in order, with no locks.

Why this module is ~500 lines, over the project's ~400: what does not decide
has left it (``validation``, ``staleness``, ``render``, ``label``,
``stamping``, the counters and the stats report in ``bridge_stats``). What
remains is that one loop: ingest, apply, blank and watchdog read and write
the same few fields (state, pending, current, displayed), and every safety
rule above is an interplay of two or more of them; split across modules,
the rules could no longer be checked by reading one class.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from typing import Callable

import numpy as np

from armscope.core import protocol

from .bridge_stats import (
    BLANK_DISPLAY, BLANK_EXIT, BLANK_INVALID, BLANK_LINK, BLANK_REASONS, BLANK_RUN, BLANK_SILENT, BLANK_STALE,
    BLANK_STARTUP, BridgeCounters,
)
from .displays import Display, paste_on_black
from .label import add_label, label_text
from .link import LinkError
from .registration import Registration, slow_warp_warning
from .render import overlay_footprint, overlay_to_display_matrix, render_cam_for, render_for, render_for_display
from .stamping import add_stamp
from .staleness import CLOCK_MODES, OffsetEstimate, expiry, resolve_mode, same_host_endpoint
from .validation import check_message, reject_category

__all__ = [
    "Bridge",
    "BLANK_REASONS",
    "CLOCK_MODES",
    "check_message",
    "overlay_to_display_matrix",
    "overlay_footprint",
    "render_cam_for",
    "render_for",
    "render_for_display",
    "same_host_endpoint",
]

log = logging.getLogger(__name__)

_MIN_SEND_BUDGET_S = 0.02        # below this a frame cannot be delivered before what is shown expires
_DRAIN_LIMIT = 256               # messages per wake-up, so a flood cannot starve the watchdog


# ---------------------------------------------------------------- runtime


@dataclasses.dataclass
class _Overlay:
    msg: protocol.Message
    maps: np.ndarray  # the CAM maps (protocol.cam_array), rendered in display pixels when shown
    received: float   # bridge monotonic seconds
    expiry: float     # bridge monotonic seconds


class Bridge:
    """Subscribe to the daemon and drive one display, failing dark.

    ``display`` is an open :class:`~armscope.firmware_bridge.displays.Display`.  With
    ``connect`` the bridge owns a ``protocol.Subscriber`` (``curve`` as for
    it); without, messages are fed with :meth:`feed` (tests, replays).
    ``start()`` blanks the display; ``run()`` loops until :meth:`stop`;
    ``close()`` blanks and releases everything.  Not thread-safe except
    :meth:`stop` and :meth:`stats` (a consistent-enough snapshot).
    ``label``: write the decision (and a cascade's subtype) beside the
    overlay in display pixels (``armscope.firmware_bridge.label``); ``armscope bridge``
    turns it on unless ``--no-label``.
    ``stamp``: draw the overlay's ``frame_id`` in the display's bottom-left corner
    (``armscope.core.stamp``), for glass-to-glass latency measurement (``--stamp``, docs/latency.md).
    """

    def __init__(
        self,
        display: Display,
        *,
        connect: str | None = None,
        registration: Registration | None = None,
        curve: dict | None = None,
        context=None,
        poll_interval: float = 0.05,
        max_stale_ms: float = protocol.BRIDGE_MAX_STALE_MS,
        clock_mode: str = "auto",
        stats_interval: float = 10.0,
        label: bool = False,
        stamp: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        if not 0 < poll_interval <= 1.0:
            raise ValueError(f"poll_interval must be within (0, 1] s, got {poll_interval}")
        if not max_stale_ms > 0:
            raise ValueError(f"max_stale_ms must be > 0, got {max_stale_ms}")
        self.display = display
        self.connect = connect
        self.registration = registration
        self.curve = curve
        self.context = context
        self.poll_interval = float(poll_interval)
        self.max_stale_ms = float(max_stale_ms)
        self.max_stale_s = self.max_stale_ms / 1000.0
        self.clock_mode = resolve_mode(clock_mode, connect)
        self.offset = OffsetEstimate()     # clock "offset": daemon monotonic -> bridge monotonic
        self._refused_versions: set = set()
        self.stats_interval = float(stats_interval)
        self.label = bool(label)
        self.stamp = bool(stamp)   # frame_id drawn in a corner, for glass-to-glass measurement (armscope.core.stamp)
        self.clock = clock
        self.wall_clock = wall_clock
        if registration is not None and display.size is not None and tuple(display.size) != registration.display_size:
            raise ValueError(f"registration is for a {registration.display_size[0]}x{registration.display_size[1]} "
                             f"display, but the display is {display.size[0]}x{display.size[1]}")
        self._stop = threading.Event()
        self.subscriber: protocol.Subscriber | None = None
        # what the daemon told us
        self.run_id: str | None = None
        self.state: str | None = None      # None = no status seen yet (nothing is shown)
        self.last_frame_id: int | None = None
        self.last_seq: int | None = None
        self.last_message: float | None = None
        self.stale_s = self.max_stale_s    # silence window; the newest message's stale_after_ms once one arrived
        self.capped_run: str | None = None  # the daemon run whose stale_after_ms max_stale_ms caps (warned once)
        # what the display shows: "unknown" (start-up or a failed blank), "blank" or "overlay"
        self.displayed = "unknown"
        self.current: _Overlay | None = None
        self.pending: _Overlay | None = None
        self._blank_retry_reason: str | None = None
        self._silent = False
        self._closed = False
        # counters (bridge_stats): observed only, never read by a decision about what is shown
        self.started_at = self.clock()
        self.counters = BridgeCounters(self.started_at)
        self.received, self.rejected, self.blanks = self.counters.received, self.counters.rejected, self.counters.blanks
        self.counts, self.link = self.counters.counts, self.counters.link
        self._last_stats_log = self.started_at

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Blank the display (whatever it held is unknown), then connect."""
        self._blank(BLANK_STARTUP, force=True)
        if (warning := slow_warp_warning()) is not None:
            log.warning("bridge: %s", warning)
        if self.connect is not None and self.subscriber is None:
            self.subscriber = protocol.Subscriber(self.connect, context=self.context, curve=self.curve)
            log.info("bridge subscribed to %s (clock check: %s)", self.connect, self.clock_mode)

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from signal handlers and other threads)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, duration: float | None = None) -> None:
        """Loop until :meth:`stop` (or ``duration`` seconds); always blanks and closes on the way out."""
        if self.connect is None:
            raise ValueError("run() needs an endpoint (connect=...); use feed() without one")
        if self.subscriber is None:
            self.start()
        end = None if duration is None else self.clock() + duration
        try:
            while not self._stop.is_set():
                if end is not None and self.clock() >= end:
                    break
                self.step()
        finally:
            self.close()

    def step(self) -> None:
        """One loop iteration: wait (bounded), drain the socket, show the newest, watchdog."""
        import zmq

        sock = self.subscriber.socket
        timeout_ms = max(0, int(math.ceil(self._poll_timeout() * 1000)))
        if sock.poll(timeout_ms, zmq.POLLIN):
            for _ in range(_DRAIN_LIMIT):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._ingest(frames, self.clock())
        self._apply()
        self.tick()

    def close(self) -> None:
        """Blank (reason ``exit``) and release the display and the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        blanked = False
        try:
            blanked = self._blank(BLANK_EXIT, force=True)
        finally:
            try:
                if self.subscriber is not None:
                    self.subscriber.close()
            finally:
                self.subscriber = None
                self.display.close()
                if blanked:
                    log.info("bridge closed: display blanked and released (%d overlays shown)",
                             self.counts.get("shown", 0))
                else:
                    log.error("bridge closed, but the display could NOT be blanked: it may still show the last "
                              "overlay (armscope bridge blank --display URI)")

    def __enter__(self) -> "Bridge":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- input -----------------------------------------------------------------

    def feed(self, frames: list[bytes], received: float | None = None) -> bool:
        """Process one received multipart message as the loop does (validate,
        show if appropriate, watchdog). Returns True if it was accepted."""
        ok = self._ingest(frames, self.clock() if received is None else received)
        self._apply()
        self.tick()
        return ok

    def _reject(self, category: str, text: str) -> bool:
        self.rejected[category] += 1
        self.counters.last_rejections.append(f"{category}: {text}")
        total = sum(self.rejected.values())
        if category == "schema":  # another protocol version: one line per version, not per message
            if text not in self._refused_versions:
                self._refused_versions.add(text)
                log.warning("bridge: refusing messages of another protocol version (blank): %s", text)
        elif total <= 10 or total % 100 == 0:
            log.warning("bridge: rejected message #%d (%s): %s", total, category, text)
        # A stream that just produced a bad message is not trusted for what it sent before it.
        self.pending = None
        self._blank(BLANK_INVALID)
        return False

    def _ingest(self, frames: list[bytes], received: float) -> bool:
        self.received["messages"] += 1
        try:
            msg = protocol.decode(frames)
            maps = check_message(msg)
        except Exception as exc:  # ProtocolError, and anything a malformed message might still trigger
            return self._reject(reject_category(exc), str(exc)[:300])
        h = msg.header
        self.received[msg.topic] += 1
        self.last_message = received
        self.stale_s = min(float(h["stale_after_ms"]) / 1000.0, self.max_stale_s)
        if h["stale_after_ms"] > self.max_stale_ms and self.capped_run != h["run_id"]:
            self.capped_run = h["run_id"]   # safe (blank sooner), but the pathologist sees gaps: say so once a run
            log.warning("bridge: the daemon keeps overlays valid %.10g ms (its stale_after_ms), --max-stale-ms caps them "
                        "at %.10g ms: the eyepiece goes dark between overlays that come slower than that; raise "
                        "--max-stale-ms if overlays that old are acceptable", h["stale_after_ms"], self.max_stale_ms)
        if h["run_id"] != self.run_id:
            if self.run_id is not None:
                self.counts["run_changes"] += 1
                log.info("bridge: daemon run changed %s -> %s", self.run_id, h["run_id"])
                self.pending = None
                self._blank(BLANK_RUN)
            self.run_id, self.last_frame_id, self.last_seq, self.state = h["run_id"], None, None, None
            self.offset.reset()   # another process: its monotonic clock may be another machine's
        self.offset.observe(received, float(h["publish_mono"]))
        if self.last_seq is not None:
            gap = h["seq"] - self.last_seq - 1
            if gap > 0:
                self.counts["seq_gaps"] += gap
            elif gap < 0:
                self.counts["seq_out_of_order"] += 1
        self.last_seq = h["seq"]
        if msg.is_overlay:
            return self._ingest_overlay(msg, maps, received)
        self.counts["accepted"] += 1
        state = h["state"]
        if state != self.state:
            log.info("bridge: daemon state %s%s", state, f" ({h.get('reason')})" if h.get("reason") else "")
        self.state = state
        if state != protocol.STATE_RUNNING:
            # Overlays published before this status are void.
            if self.pending is not None:
                self.counts["discarded_by_state"] += 1
            self.pending = None
            self._blank(f"state:{state}")
        return True

    def _ingest_overlay(self, msg: protocol.Message, maps: np.ndarray, received: float) -> bool:
        h = msg.header
        fid = h["frame_id"]
        if self.last_frame_id is not None and fid <= self.last_frame_id:
            return self._reject("frame_id", f"frame_id {fid} after {self.last_frame_id} in run {self.run_id}")
        self.last_frame_id = fid
        self.counts["accepted"] += 1
        if self.pending is not None:
            self.counts["superseded"] += 1
        self.pending = _Overlay(msg, maps, received, self._expiry(msg, received))
        return True

    def _expiry(self, msg: protocol.Message, received: float) -> float:
        """When this overlay stops being valid, on the bridge's monotonic clock (``staleness``)."""
        stale = min(float(msg.header["stale_after_ms"]) / 1000.0, self.max_stale_s)
        return expiry(msg.header, received, stale, self.clock_mode, now=self.clock(), wall_now=self.wall_clock(),
                      offset=self.offset.offset)

    # -- output ----------------------------------------------------------------

    def _display_size(self, overlay: _Overlay) -> tuple[int, int]:
        if self.display.size is not None:
            return tuple(self.display.size)
        if self.registration is not None:
            return self.registration.display_size
        r = overlay.msg.header["region"]
        return r["frame_width"], r["frame_height"]

    def _apply(self) -> None:
        """Show the pending overlay if the daemon is running and it is still fresh."""
        ov = self.pending
        if ov is None or self.state != protocol.STATE_RUNNING:
            return
        self.pending = None
        now = self.clock()
        if now >= ov.expiry:
            self.counts["expired_unshown"] += 1
            return
        # The old overlay stays on screen until the new one's last chunk lands,
        # so delivery must finish before the old one expires.
        if self.displayed == "overlay" and self.current is not None and self.current.expiry - now < _MIN_SEND_BUDGET_S:
            self._blank(BLANK_STALE)
        limit = ov.expiry
        if self.displayed != "blank" and self.current is not None:
            limit = min(limit, self.current.expiry)
        budget = limit - now
        if budget < _MIN_SEND_BUDGET_S:
            self.counts["expired_unshown"] += 1
            return
        try:
            h = ov.msg.header
            size = self._display_size(ov)
            rgb, region = render_cam_for(self.display, h, ov.maps, self.registration, size)
            if self.label:
                rgb, region = add_label(rgb, region, label_text(h), size, align=self.display.align)
            if self.stamp:
                rgb, region = add_stamp(rgb, region, int(h["frame_id"]), size, align=self.display.align)
            if self.display.size is None:  # e.g. png:// without a size: hand it the whole picture
                rgb, region = paste_on_black(rgb, region[0], region[1], *size), None
            report = self.display.show(rgb, region=region, deadline=budget)
        except LinkError as exc:
            self.link["errors"] += 1
            rep = getattr(exc, "report", None)
            self.counters.add_link_report(rep)
            log.warning("bridge: display link failed for frame %s: %s", ov.msg.header["frame_id"], exc)
            self.displayed = "unknown"  # a partial frame may be pending on the controller
            self._blank(BLANK_LINK)
            return
        except Exception as exc:
            self.counts["display_errors"] += 1
            log.error("bridge: display error for frame %s: %r", ov.msg.header["frame_id"], exc)
            self.displayed = "unknown"
            self._blank(BLANK_DISPLAY)
            return
        self.counters.add_link_report(report)
        self.current = ov
        self.displayed = "overlay"
        self.counts["shown"] += 1
        if self.clock_mode == "mono":
            self.counters.shown_latency((self.clock() - float(ov.msg.header["capture_mono"])) * 1000.0)

    def _blank(self, reason: str, force: bool = False) -> bool:
        """Blank unless already blank (``force``: always). Counts the reason.
        On failure the display state becomes unknown and :meth:`tick` retries."""
        self.current = None
        if self.displayed == "blank" and not force:
            return True
        self.blanks[reason] += 1
        log.info("bridge: blank (%s)", reason)
        return self._do_blank(reason)

    def _do_blank(self, reason: str) -> bool:
        try:
            self.display.blank()
        except Exception as exc:
            self.counts["blank_failures"] += 1
            self.displayed = "unknown"
            self._blank_retry_reason = reason
            log.error("bridge: blank (%s) failed: %r; retrying", reason, exc)
            return False
        self.displayed = "blank"
        self._blank_retry_reason = None
        return True

    # -- watchdog ------------------------------------------------------------

    def _poll_timeout(self) -> float:
        """Seconds to wait for messages: at most ``poll_interval``, never past the next expiry."""
        now = self.clock()
        t = self.poll_interval
        if self.displayed == "overlay" and self.current is not None:
            t = min(t, self.current.expiry - now)
            if self.last_message is not None:
                t = min(t, self.last_message + self.stale_s - now)
        return max(0.0, t)

    def tick(self, now: float | None = None) -> None:
        """Watchdog: blank when the daemon went silent or the shown overlay expired;
        retry a failed blank; feed the display's own watchdog (``keepalive``);
        log the counters every ``stats_interval``."""
        now = self.clock() if now is None else now
        if self.displayed == "unknown" and self._blank_retry_reason is not None:
            self.counts["blank_retries"] += 1
            self._do_blank(self._blank_retry_reason)
        silent = self.last_message is None or now - self.last_message > self.stale_s
        if silent and self.last_message is not None and not self._silent:
            self.counts["silences"] += 1
            log.warning("bridge: no message from the daemon for %.0f ms", (now - self.last_message) * 1000)
        self._silent = silent
        if self.displayed == "overlay":
            if silent:
                self._blank(BLANK_SILENT)
            elif self.current is None or now >= self.current.expiry:
                self._blank(BLANK_STALE)
        if self.pending is not None and now >= self.pending.expiry:
            self.counts["expired_unshown"] += 1
            self.pending = None
        try:
            self.display.keepalive()  # the controller's own watchdog blanks if this loop stops
        except Exception as exc:
            self.counts["keepalive_failures"] += 1
            log.warning("bridge: display keepalive failed: %r", exc)
        if self.display.quit_requested and not self.stopping:
            log.info("bridge: the display was closed by its user; stopping")
            self.stop()
        if self.stats_interval > 0 and now - self._last_stats_log >= self.stats_interval:
            self._last_stats_log = now
            log.info("bridge stats: %s", json.dumps(self.stats(), default=str))

    # -- counters --------------------------------------------------------------

    def stats(self) -> dict:
        """Counters and state, JSON-serialisable. ``blanks`` is keyed by reason.
        Safe to call from another thread (retried if a counter grows meanwhile)."""
        for _ in range(5):
            try:
                return self._stats()
            except RuntimeError:  # "dictionary changed size during iteration"
                time.sleep(0.001)
        return self._stats()

    def _stats(self) -> dict:
        return self.counters.snapshot(self.clock(), displayed=self.displayed, current=self.current,
                                      run_id=self.run_id, state=self.state, last_frame_id=self.last_frame_id,
                                      last_message=self.last_message, clock_mode=self.clock_mode)
