"""What the bridge counts and reports: the reasons it blanks the eyepiece, its
counters, and the ``stats()`` snapshot built from them (logged every
``stats_interval``, on exit, and read by tests and ``armscope bridge``).

Why apart from the loop (``bridge.Bridge``): the counters only observe; no
decision about what the eyepiece shows reads them. Kept here, the loop's
module holds the decisions and nothing else, and the report's shape (its
keys are what operators and tests read) is defined in one place.
"""
from __future__ import annotations

import collections

from armscope.core import protocol

# Why the display was blanked (keys of stats()["blanks"]); "state:<state>" for daemon states.
BLANK_STARTUP = "startup"        # bridge starting: clear whatever the display held
BLANK_EXIT = "exit"              # bridge stopping (normal exit, SIGTERM, SIGINT, error)
BLANK_STALE = "stale"            # the shown overlay passed its stale_after_ms
BLANK_SILENT = "silent"          # no message at all for stale_after_ms: daemon presumed dead
BLANK_INVALID = "invalid"        # a message failed validation
BLANK_LINK = "link"              # the display link could not deliver a frame in time
BLANK_DISPLAY = "display"        # any other error while showing a frame
BLANK_RUN = "run_change"         # a new daemon run_id (the daemon restarted)
BLANK_REASONS = (BLANK_STARTUP, BLANK_EXIT, BLANK_STALE, BLANK_SILENT, BLANK_INVALID, BLANK_LINK,
                 BLANK_DISPLAY, BLANK_RUN) + tuple(f"state:{s}" for s in protocol.STATES if s != protocol.STATE_RUNNING)

LINK_REPORT_KEYS = ("resent_chunks", "naks", "timeouts", "resyncs")


class BridgeCounters:
    """The bridge's counters. ``received``: messages by topic (and ``messages``
    in all); ``rejected``: by reason category; ``blanks``: by
    :data:`BLANK_REASONS`; ``counts``: shown, accepted, superseded,
    expired_unshown, seq_gaps, ...; ``link``: frames, resent_chunks, naks,
    timeouts, resyncs, errors (serial links); the last rejections' text; the
    capture-to-display latency of what was shown (clock ``mono`` only)."""

    def __init__(self, started_at: float):
        self.started_at = started_at
        self.received = collections.Counter()
        self.rejected = collections.Counter()
        self.blanks = collections.Counter()
        self.counts = collections.Counter()
        self.link = collections.Counter()
        self.last_rejections: collections.deque = collections.deque(maxlen=20)
        self.last_shown_latency_ms: float | None = None
        self.max_shown_latency_ms: float | None = None   # the oldest capture ever shown, when it landed

    def add_link_report(self, report) -> None:
        """Count one frame's delivery report (a serial link's ``SendReport``; other displays report nothing)."""
        if report is None or not hasattr(report, "resent_chunks"):
            return
        self.link["frames"] += 1
        for key in LINK_REPORT_KEYS:
            self.link[key] += int(getattr(report, key))

    def shown_latency(self, ms: float) -> None:
        """Capture -> on the display of the overlay just shown, milliseconds."""
        self.last_shown_latency_ms = ms
        self.max_shown_latency_ms = max(self.max_shown_latency_ms or 0.0, ms)

    def snapshot(self, now: float, *, displayed: str, current, run_id, state, last_frame_id, last_message,
                 clock_mode: str) -> dict:
        """The ``stats()`` dict, JSON-serialisable. ``current``: the overlay shown
        (``msg``, ``received``) or None; the rest is what the loop knows of the
        daemon and the display. May raise RuntimeError if another thread grows
        a counter meanwhile (``Bridge.stats`` retries)."""
        counts = dict(self.counts)
        return {
            "uptime_s": round(now - self.started_at, 3),
            "displayed": displayed,
            "shown_frame_id": current.msg.header["frame_id"] if current is not None else None,
            "shown_age_ms": round((now - current.received) * 1000, 1) if current is not None else None,
            "daemon": {"run_id": run_id, "state": state, "last_frame_id": last_frame_id,
                       "silent_ms": None if last_message is None else round((now - last_message) * 1000, 1)},
            "clock_mode": clock_mode,
            "received": dict(self.received),
            "accepted": counts.pop("accepted", 0),
            "shown": counts.pop("shown", 0),
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "last_rejections": list(self.last_rejections)[-5:],
            "blanks": dict(self.blanks),
            "blanks_total": sum(self.blanks.values()),
            "link": dict(self.link),
            "capture_to_shown_ms": None if self.last_shown_latency_ms is None else round(self.last_shown_latency_ms, 1),
            "capture_to_shown_max_ms": (None if self.max_shown_latency_ms is None
                                        else round(self.max_shown_latency_ms, 1)),
            **counts,
        }
