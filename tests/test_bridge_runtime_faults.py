"""Bridge runtime safety rules (docs/bridge.md), each provoked for real:
publisher death and silence, stale overlays, daemon states, frame ids going
backwards, publish-time staleness, and display-link faults injected by the
simulated controller (dropped/corrupted bytes, resets mid-frame, a dead link)."""
from __future__ import annotations

import contextlib
import time

import pytest

pytest.importorskip("serial")

from bridge_runtime_support import (  # noqa: E402
    DISPLAY, FakeDaemon, assert_close_image, cam_of, expected_display, publish_until, registration,
    running_bridge, wait_for,
)
from armscope.firmware_bridge.bridge import Bridge  # noqa: E402
from armscope.firmware_bridge.displays import PngDisplay, open_display  # noqa: E402
from armscope.firmware_bridge.simulator import ControllerCore, FaultPlan, PtyController  # noqa: E402

OVERLAY = cam_of(0)


@contextlib.contextmanager
def serial_setup(tmp_path, *, stale_ms=1500, faults=None, deadline=1.0, watchdog=1000):
    """Simulated controller on a pty + serial:// display + bridge thread + publisher."""
    core = ControllerCore(DISPLAY[0], DISPLAY[1], "rgb565le", faults=faults, max_payload=4096)
    pty = PtyController(core)
    path = pty.start()
    daemon = FakeDaemon(stale_after_ms=stale_ms)
    try:
        display = open_display(f"serial://{path}?baud=921600&deadline={deadline}&ack_timeout=0.1&watchdog={watchdog}")
        bridge = Bridge(display, connect=daemon.endpoint, registration=registration(), stats_interval=0)
        with running_bridge(bridge):
            yield core, bridge, daemon
    finally:
        daemon.close()
        pty.stop()


@contextlib.contextmanager
def png_setup(tmp_path, *, stale_ms=600):
    display = PngDisplay(tmp_path / "out", width=DISPLAY[0], height=DISPLAY[1])
    daemon = FakeDaemon(stale_after_ms=stale_ms)
    bridge = Bridge(display, connect=daemon.endpoint, registration=registration(), stats_interval=0)
    try:
        with running_bridge(bridge):
            yield display, bridge, daemon
    finally:
        daemon.close()


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def feed_bridge(tmp_path, clock=None, clock_mode="receipt", max_stale_ms=5000.0):
    display = PngDisplay(tmp_path / "fed", width=DISPLAY[0], height=DISPLAY[1])
    kw = {"clock": clock} if clock is not None else {}
    bridge = Bridge(display, registration=registration(), clock_mode=clock_mode, stats_interval=0,
                    max_stale_ms=max_stale_ms, **kw)
    bridge.start()
    return display, bridge


# ---------------------------------------------------------------- daemon side


def test_publisher_death_blanks_the_eyepiece_within_the_stale_window(tmp_path):
    stale = 0.5
    with serial_setup(tmp_path, stale_ms=int(stale * 1000)) as (core, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        assert core.history[-1][0] == "frame" and core.shown_rgb().any()
        daemon.close()  # the daemon dies: no more overlays, no more heartbeats
        t_dead = time.monotonic()
        assert wait_for(lambda: core.history[-1][0] == "blank", 3.0)
        elapsed = time.monotonic() - t_dead
        assert not core.shown_rgb().any()
        s = bridge.stats()
        assert s["blanks"].get("stale", 0) + s["blanks"].get("silent", 0) == 1, s["blanks"]
    # the last message was received before t_dead, so the blank is due within `stale`
    assert elapsed < stale + 0.35, elapsed


def test_overlays_stop_while_heartbeats_continue_blank_as_stale(tmp_path):
    with png_setup(tmp_path, stale_ms=400) as (display, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        t_last_overlay = time.monotonic()  # no overlay is published after this point
        blanked_at = []

        def heartbeat():
            daemon.status("running")
            time.sleep(0.05)

        def blank():
            if bridge.stats()["displayed"] == "blank":
                blanked_at.append(time.monotonic())
                return True
            return False

        assert wait_for(blank, 2.0, action=heartbeat)
        s = bridge.stats()
        assert s["blanks"] == {"startup": 1, "stale": 1}, s["blanks"]
        assert s["daemon"]["silent_ms"] < 200  # heartbeats kept arriving
    assert blanked_at[0] - t_last_overlay < 0.4 + 0.3
    assert display.paths[-1].name.endswith("_blank.png")


def test_silent_daemon_blanks_with_reason_silent(tmp_path):
    clock = FakeClock()
    display, bridge = feed_bridge(tmp_path, clock=clock)
    daemon = FakeDaemon(stale_after_ms=500)
    try:
        bridge.feed(daemon.status_frames("running"))
        clock.t += 0.1
        # the last message the daemon ever sends; captured as it was published, so only silence can blank it
        assert bridge.feed(daemon.overlay_frames(OVERLAY, capture_age_s=0.0))
        assert bridge.displayed == "overlay"
        clock.t += 0.49
        bridge.tick()
        assert bridge.displayed == "overlay"  # not early
        clock.t += 0.02
        bridge.tick()
        assert bridge.displayed == "blank" and bridge.stats()["blanks"]["silent"] == 1
        assert bridge.stats()["silences"] == 1
    finally:
        bridge.close()
        daemon.close()


@pytest.mark.parametrize("state", ["no_signal", "paused", "no_tissue", "stopping", "starting"])
def test_daemon_states_blank_and_hold_overlays_until_running(tmp_path, state):
    with png_setup(tmp_path, stale_ms=1500) as (display, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        t0 = time.monotonic()
        daemon.status(state, heartbeat=False, reason="source ended" if state == "no_signal" else None)
        assert wait_for(lambda: bridge.stats()["displayed"] == "blank", 1.0)
        assert time.monotonic() - t0 < 0.3
        assert bridge.stats()["blanks"][f"state:{state}"] == 1
        shown = bridge.stats()["shown"]
        # overlays while the state is not running (e.g. one in flight when paused) are held, not shown
        for _ in range(6):
            daemon.overlay(OVERLAY)
            daemon.status(state)
            time.sleep(0.05)
        time.sleep(0.1)
        s = bridge.stats()
        assert s["shown"] == shown and s["displayed"] == "blank"
        assert display.paths[-1].name.endswith("_blank.png")
        # back to running: the held overlay (published just before "running") is shown
        daemon.overlay(OVERLAY)
        daemon.status("running", heartbeat=False)
        assert wait_for(lambda: bridge.stats()["shown"] == shown + 1, 1.0)
        assert bridge.stats()["blanks"][f"state:{state}"] == 1  # heartbeats of the same state do not re-count


def test_frame_ids_going_backwards_are_rejected_and_blank(tmp_path):
    display, bridge = feed_bridge(tmp_path)
    daemon = FakeDaemon(stale_after_ms=1500)
    try:
        bridge.feed(daemon.status_frames("running"))
        assert bridge.feed(daemon.overlay_frames(OVERLAY, frame_id=10))
        assert bridge.displayed == "overlay"
        for bad in (5, 10):  # backwards, then repeated
            assert not bridge.feed(daemon.overlay_frames(OVERLAY, frame_id=bad))
            assert bridge.displayed == "blank" and display.paths[-1].name.endswith("_blank.png")
        s = bridge.stats()
        assert s["rejected"] == {"frame_id": 2} and s["blanks"]["invalid"] == 1
        assert "frame_id 10 after 10" in s["last_rejections"][-1]
        assert bridge.feed(daemon.overlay_frames(OVERLAY, frame_id=11))
        assert bridge.displayed == "overlay"
        # a restarted daemon (new run_id) starts again at 1: accepted, after blanking and a new "running"
        restarted = FakeDaemon(stale_after_ms=1500)
        try:
            assert bridge.feed(restarted.overlay_frames(OVERLAY, frame_id=1))
            assert bridge.displayed == "blank" and bridge.stats()["blanks"]["run_change"] == 1
            bridge.feed(restarted.status_frames("running"))
            assert bridge.displayed == "overlay" and bridge.stats()["shown_frame_id"] == 1
        finally:
            restarted.close()
    finally:
        bridge.close()
        daemon.close()


def test_staleness_counts_from_the_capture(tmp_path):
    """stale_after_ms bounds the age of what is shown from the camera capture
    (docs/protocol.md 1.5). clock "mono": an overlay captured 0.8 s ago (a daemon
    frozen after publishing, or a queue) is stale on receipt; "receipt" cannot see
    that, but does see the age the daemon itself measured at publish."""
    daemon = FakeDaemon(stale_after_ms=500)
    try:
        for mode, shown in (("mono", 0), ("receipt", 1), ("wall", 0)):
            display, bridge = feed_bridge(tmp_path / mode, clock_mode=mode)
            bridge.feed(daemon.status_frames("running"))
            t, w = time.monotonic(), time.time()
            old = daemon.overlay_frames(OVERLAY, publish_mono=t - 0.75, capture_mono=t - 0.8,
                                        publish_wall=w - 0.75, capture_wall=w - 0.8)
            bridge.feed(old)
            assert bridge.stats()["shown"] == shown, mode
            if shown == 0:
                assert bridge.stats()["expired_unshown"] == 1
            bridge.close()
        # Any clock mode: captured 0.4 s before it was published (a frozen daemon's frame)
        # and received at once: shown, and blanked 0.1 s after receipt, not 0.5 s.
        for mode in ("receipt", "mono"):
            display, bridge = feed_bridge(tmp_path / f"aged-{mode}", clock_mode=mode)
            bridge.feed(daemon.status_frames("running"))
            t = time.monotonic()
            bridge.feed(daemon.overlay_frames(OVERLAY, publish_mono=t, capture_mono=t - 0.4), received=t)
            assert bridge.displayed == "overlay", mode
            bridge.tick(now=t + 0.05)
            assert bridge.displayed == "overlay", mode
            bridge.tick(now=t + 0.11)
            assert bridge.displayed == "blank" and bridge.stats()["blanks"]["stale"] == 1, mode
            bridge.close()
        # captured 0.3 s ago on this host: shown, and blanked 0.2 s after receipt (not 0.5 s)
        display, bridge = feed_bridge(tmp_path / "late", clock_mode="mono")
        bridge.feed(daemon.status_frames("running"))
        t = time.monotonic()
        bridge.feed(daemon.overlay_frames(OVERLAY, publish_mono=t - 0.3, capture_mono=t - 0.3), received=t)
        assert bridge.displayed == "overlay"
        bridge.tick(now=t + 0.15)
        assert bridge.displayed == "overlay"
        bridge.tick(now=t + 0.25)
        assert bridge.displayed == "blank" and bridge.stats()["blanks"]["stale"] == 1
        bridge.close()
    finally:
        daemon.close()


def test_header_stale_after_ms_is_capped(tmp_path, caplog):
    """The bridge's --max-stale-ms wins over a longer daemon window (blank sooner: safe),
    and says so once per daemon run, since the pathologist will see the eyepiece go dark."""
    clock = FakeClock()
    display, bridge = feed_bridge(tmp_path, clock=clock, max_stale_ms=800)
    daemon = FakeDaemon(stale_after_ms=3_600_000)  # a daemon asking for an hour
    try:
        with caplog.at_level("WARNING", logger="armscope.firmware_bridge.bridge"):
            bridge.feed(daemon.status_frames("running"))
            bridge.feed(daemon.overlay_frames(OVERLAY))
            bridge.feed(daemon.status_frames("running"))
        capped = [r for r in caplog.records if "caps them at 800 ms" in r.getMessage()]
        assert len(capped) == 1 and "3600000 ms" in capped[0].getMessage()
        assert bridge.displayed == "overlay"
        clock.t += 0.81
        bridge.tick()
        assert bridge.displayed == "blank"
    finally:
        bridge.close()
        daemon.close()


def test_a_window_equal_to_the_cap_is_not_called_capped(tmp_path, caplog):
    display, bridge = feed_bridge(tmp_path, max_stale_ms=1001)
    daemon = FakeDaemon(stale_after_ms=1001)   # 1001 / 1000 * 1000 is not 1001 in floating point
    try:
        with caplog.at_level("WARNING", logger="armscope.firmware_bridge.bridge"):
            bridge.feed(daemon.status_frames("running"))
            bridge.feed(daemon.overlay_frames(OVERLAY))
        assert bridge.displayed == "overlay"
        assert not [r for r in caplog.records if "caps them" in r.getMessage()]
    finally:
        bridge.close()
        daemon.close()


# ---------------------------------------------------------------- display link


def test_dropped_and_corrupted_link_bytes_are_recovered(tmp_path):
    # Controller input byte indices: start-up BLANK and HELLO are < 100 bytes, then a
    # partial update of the overlay's footprint, ~19 kB (the whole display would be 39 kB).
    faults = FaultPlan(drop_at={2_000, 11_000}, corrupt_at={6_000, 15_000})
    with serial_setup(tmp_path, faults=faults) as (core, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        assert_close_image(core.shown_rgb(), expected_display(OVERLAY, "rgb565le"))
        s = bridge.stats()
        assert core.stats.bytes_dropped == 2 and core.stats.bytes_corrupted == 2
        assert s["link"]["resent_chunks"] > 0 and s["link"]["naks"] > 0
        assert "link" not in s["blanks"]


def test_controller_reset_mid_frame_resends_the_frame(tmp_path):
    faults = FaultPlan(reset_at_frame_msg={2})  # the 3rd FRAME chunk (of about 5) reboots the controller
    with serial_setup(tmp_path, faults=faults) as (core, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        assert core.stats.resets == 1
        assert_close_image(core.shown_rgb(), expected_display(OVERLAY, "rgb565le"))
        assert bridge.stats()["link"]["resyncs"] == 1


def test_link_that_cannot_deliver_blanks_with_reason_link(tmp_path):
    with serial_setup(tmp_path, deadline=1.0) as (core, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        core.faults = FaultPlan(reset_prob=1.0)  # every FRAME chunk now reboots the controller
        other = cam_of(30)
        assert publish_until(daemon, lambda: bridge.stats()["blanks"].get("link", 0) >= 1, other, timeout=6)
        assert wait_for(lambda: core.history[-1][0] == "blank", 2.0)
        s = bridge.stats()
        assert s["link"]["errors"] >= 1 and s["link"]["resyncs"] >= 3
        assert not core.shown_rgb().any()
        core.faults = FaultPlan()  # the link heals: overlays come back
        shown = bridge.stats()["shown"]
        assert publish_until(daemon, lambda: bridge.stats()["shown"] > shown and bridge.stats()["displayed"] == "overlay",
                             other, timeout=6)
        assert_close_image(core.shown_rgb(), expected_display(other, "rgb565le"))


def test_dead_link_blank_is_retried_until_it_lands(tmp_path):
    # A controller without the link watchdog (watchdog=0) keeps its picture
    # while it hears nothing: then only the bridge's retried blank clears it.
    with serial_setup(tmp_path, deadline=0.5, stale_ms=1500, watchdog=0) as (core, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        core.faults = FaultPlan(drop_prob=1.0)  # the controller hears nothing any more
        assert publish_until(daemon, lambda: bridge.stats().get("blank_failures", 0) >= 1, cam_of(30),
                             timeout=8)
        s = bridge.stats()
        assert s["displayed"] == "unknown" and s["blanks"].get("link", 0) + s["blanks"].get("stale", 0) >= 1
        # physically the controller still shows the old frame: only the link can clear it
        assert core.history[-1][0] == "frame"
        daemon.close()  # nothing new to show ...
        # ... once every overlay already published (some may still wait in the bridge's socket
        # while it is busy failing on the dead link) is older than stale_ms: one still fresh is
        # rightly shown when the link comes back, which made this test racy.
        time.sleep(1.6)
        core.faults = FaultPlan()  # only the retried blank can reach the controller now
        assert wait_for(lambda: core.history[-1][0] == "blank", 3.0)
        assert wait_for(lambda: bridge.stats()["displayed"] == "blank", 1.0)
        assert bridge.stats()["blank_retries"] >= 1
        assert not core.shown_rgb().any()


def test_dead_link_controller_watchdog_blanks_by_itself(tmp_path):
    """Same dead link with the default 1000 ms link watchdog: the controller
    goes dark on its own, before the bridge's blank can get through."""
    with serial_setup(tmp_path, deadline=0.5, stale_ms=3000) as (core, bridge, daemon):
        assert publish_until(daemon, lambda: bridge.stats()["shown"] >= 1, OVERLAY)
        core.faults = FaultPlan(drop_prob=1.0)
        assert wait_for(lambda: core.stats.watchdog_blanks == 1, 3.0)
        assert core.history[-1][0] == "watchdog" and not core.shown_rgb().any()
