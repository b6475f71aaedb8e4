"""When an overlay stops being valid on the bridge's own clock (docs/protocol.md 1.5).

Why this matters: the pathologist cannot tell an old heat map from a current
one, so an overlay must leave the eyepiece ``stale_after_ms`` after the
*capture* of the camera frame it was computed from, whatever happened on the
way (a daemon frozen after publishing, messages sitting in socket buffers,
a slow network). The daemon's and the bridge's clocks are compared by one of
these rules (``clock_mode``):

* ``mono`` (same host: ``auto`` picks it for loopback/ipc endpoints):
  ``capture_mono + stale``, CLOCK_MONOTONIC is the same clock on both sides.
* ``offset`` (another host, ``auto``'s choice there): the offset between the
  daemon's monotonic clock and the bridge's is estimated from every message
  (heartbeats arrive at 2 Hz whatever the pipeline does) as the *smallest*
  ``received - publish_mono`` seen in the last :data:`OFFSET_WINDOW_S`: that
  is the true offset plus the fastest transit. An overlay then expires at
  ``capture_mono + offset + stale``: time it spent queued or in transit
  beyond the fastest message counts against it, which rule ``receipt``
  cannot see. Reset when the daemon restarts (a new ``run_id``).
* ``wall`` (hosts with synchronised clocks, PTP/NTP): ``capture_wall + stale``.
* ``receipt`` (no clock comparison at all): only the rule below.

Every mode also applies ``received + stale - (publish_mono - capture_mono)``
(the age the capture had at publication, measured on the daemon's one clock,
valid on any host) and takes the earliest, so no mode is less safe than
``receipt``. ``stale`` is the header's ``stale_after_ms`` capped at the
bridge's ``max_stale_ms``.
"""
from __future__ import annotations

import collections
import ipaddress
import urllib.parse

CLOCK_MODES = ("auto", "receipt", "mono", "offset", "wall")
OFFSET_WINDOW_S = 30.0   # monotonic clocks drift by ppm: 30 s of them move the estimate by microseconds


def same_host_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// to a loopback address: then the
    daemon's CLOCK_MONOTONIC is the bridge's and ``publish_mono`` can be compared."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_mode(clock_mode: str, endpoint: str | None) -> str:
    if clock_mode not in CLOCK_MODES:
        raise ValueError(f"clock_mode {clock_mode!r}: expected one of {CLOCK_MODES}")
    if clock_mode != "auto":
        return clock_mode
    if endpoint is None:
        return "receipt"   # fed by hand (tests, replays): no clock to compare
    return "mono" if same_host_endpoint(endpoint) else "offset"


class OffsetEstimate:
    """The smallest ``received - publish_mono`` over the last ``window`` seconds
    of received messages (a monotone deque: O(1) per message)."""

    def __init__(self, window: float = OFFSET_WINDOW_S):
        self.window = float(window)
        self._samples: collections.deque = collections.deque()   # (received, offset), offsets increasing

    def reset(self) -> None:
        self._samples.clear()

    def observe(self, received: float, publish_mono: float) -> None:
        offset = received - publish_mono
        while self._samples and self._samples[-1][1] >= offset:
            self._samples.pop()
        self._samples.append((received, offset))
        while self._samples[0][0] < received - self.window:
            self._samples.popleft()

    @property
    def offset(self) -> float | None:
        return self._samples[0][1] if self._samples else None


def expiry(header: dict, received: float, stale: float, mode: str, *, now: float, wall_now: float,
           offset: float | None) -> float:
    """When an overlay with ``header`` received at ``received`` (bridge monotonic
    seconds) stops being valid, on the bridge's monotonic clock."""
    capture = float(header["capture_mono"])
    age_at_publish = max(0.0, float(header["publish_mono"]) - capture)
    when = received + stale - age_at_publish
    if mode == "mono":
        when = min(when, capture + stale)
    elif mode == "offset" and offset is not None:
        when = min(when, capture + offset + stale)
    elif mode == "wall":
        when = min(when, now + float(header["capture_wall"]) + stale - wall_now)
    return when
