"""Malformed messages never crash the bridge and are always a counted,
explained rejection that leaves the eyepiece blank (hypothesis fuzzing of
frames, headers and payloads), also over a real ZMQ socket."""
from __future__ import annotations

import json
import secrets

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_runtime_support import FakeDaemon, cam_of, running_bridge, wait_for
from armscope.firmware_bridge.bridge import Bridge
from armscope.firmware_bridge.displays import PngDisplay

SMALL = cam_of(0)   # a 16 x 16 CAM
BOX = (200, 100, 64)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    display = PngDisplay(tmp_path_factory.mktemp("fuzz"), width=40, height=30)
    bridge = Bridge(display, stats_interval=0, clock_mode="receipt")
    daemon = FakeDaemon(stale_after_ms=5000)
    bridge.start()
    yield bridge, daemon
    bridge.close()
    daemon.close()


def showing_fresh_overlay(bridge: Bridge, daemon: FakeDaemon) -> None:
    """Each example starts from a new daemon run with an overlay on screen."""
    daemon.run_id, daemon.seq, daemon.frame_id = secrets.token_hex(8), 0, 0
    bridge.feed(daemon.status_frames("running"))
    assert bridge.feed(daemon.overlay_frames(SMALL, box=BOX))
    assert bridge.displayed == "overlay"


def check_outcome(bridge: Bridge, before: dict, accepted: bool) -> None:
    after = bridge.stats()
    assert after["received"]["messages"] == before["received"]["messages"] + 1
    if accepted:
        assert after["accepted"] == before["accepted"] + 1 and after["rejected_total"] == before["rejected_total"]
    else:
        assert after["rejected_total"] == before["rejected_total"] + 1
        assert after["accepted"] == before["accepted"]
        reason = after["last_rejections"][-1]
        category, _, text = reason.partition(": ")
        # "malformed" would mean an exception other than ProtocolError escaped the validators
        assert category in ("framing", "header", "schema", "payload", "frame_id") and text, reason
        assert bridge.displayed == "blank"
        assert after["blanks"]["invalid"] == before["blanks"].get("invalid", 0) + 1


def valid_header(daemon: FakeDaemon, topic: str) -> tuple[dict, bytes]:
    frames = (daemon.overlay_frames(SMALL, box=BOX) if topic == "overlay" else daemon.status_frames("running"))
    return json.loads(frames[1]), frames[2]


@FUZZ
@given(topic=st.sampled_from(["overlay", "status"]), data=st.data())
def test_mutated_headers_are_accepted_or_cleanly_rejected(fed, topic, data):
    bridge, daemon = fed
    showing_fresh_overlay(bridge, daemon)
    header, payload = valid_header(daemon, topic)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        target = header
        if isinstance(header.get("region"), dict) and data.draw(st.booleans(), label="in region"):
            target = header["region"]
        key = data.draw(st.sampled_from(sorted(target) + ["extra"]), label="key")
        if data.draw(st.booleans(), label="delete") and key in target:
            del target[key]
        else:
            target[key] = data.draw(json_values, label="value")
    raw = json.dumps(header).encode()  # NaN/Infinity allowed here on purpose
    before = bridge.stats()
    accepted = bridge.feed([topic.encode(), raw, payload])
    check_outcome(bridge, before, accepted)


@FUZZ
@given(frames=st.lists(st.binary(max_size=64), max_size=5),
       topic=st.sampled_from([b"overlay", b"status", b"overlayx", b""]))
def test_random_frames_are_rejected(fed, frames, topic):
    bridge, daemon = fed
    showing_fresh_overlay(bridge, daemon)
    before = bridge.stats()
    accepted = bridge.feed([topic] + frames)
    assert not accepted
    check_outcome(bridge, before, accepted)


@FUZZ
@given(kind=st.sampled_from(["random", "truncated", "flipped", "nan", "inf", "claims_huge"]), data=st.data())
def test_cam_payloads_are_checked(fed, kind, data):
    """The v2 overlay's payload is the CAM: a wrong size, a header claiming a huge
    CAM, or non-finite values are refused (and blank); a flipped byte that still
    makes finite numbers is a CAM like any other."""
    bridge, daemon = fed
    showing_fresh_overlay(bridge, daemon)
    frames = daemon.overlay_frames(SMALL, box=BOX)
    header = json.loads(frames[1])
    payload = bytearray(frames[2])
    values = np.frombuffer(bytes(payload), "<f2").copy()
    if kind == "random":
        payload = bytearray(data.draw(st.binary(min_size=0, max_size=200)))
    elif kind == "truncated":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    elif kind == "flipped":
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= data.draw(st.integers(1, 255))
    elif kind in ("nan", "inf"):
        values[data.draw(st.integers(0, len(values) - 1))] = np.nan if kind == "nan" else np.inf
        payload = bytearray(values.tobytes())
    else:  # a header claiming a 256 x 256 x 1024 CAM over a small payload: refused on its size
        header["cam"].update(classes=1024, height=256, width=256)
    header["payload_bytes"] = len(payload)
    before = bridge.stats()
    accepted = bridge.feed([b"overlay", json.dumps(header).encode(), bytes(payload)])
    if kind in ("random", "truncated", "nan", "inf", "claims_huge"):
        assert not accepted
    check_outcome(bridge, before, accepted)


def test_malformed_messages_over_zmq_are_counted_and_the_bridge_keeps_going(tmp_path):
    display = PngDisplay(tmp_path, width=40, height=30)
    daemon = FakeDaemon(stale_after_ms=2000)
    bridge = Bridge(display, connect=daemon.endpoint, stats_interval=0)
    good = daemon.overlay_frames(SMALL, box=BOX)
    bad = [
        [b"overlay", b"{not json", b""],
        [b"overlay", b"[" * 100_000, b""],                 # nesting deep enough for RecursionError
        [b"overlay", b'{"schema": 1, "width": ' + b"9" * 5000 + b"}", b""],  # int too long to parse
        [b"status"],                                       # wrong frame count
        [b"status", json.dumps(dict(json.loads(daemon.status_frames()[1]), schema=1)).encode(), b""],  # v1
        [b"overlay", good[1], good[2][:-4]],               # payload shorter than its header says
    ]
    try:
        with running_bridge(bridge):
            def connected():
                return bridge.stats()["received"].get("status", 0) >= 1

            assert wait_for(connected, 8.0, action=lambda: daemon.status("running"))
            for frames in bad:
                daemon.send(frames)
            assert wait_for(lambda: bridge.stats()["rejected_total"] >= len(bad), 5.0), bridge.stats()
            s = bridge.stats()
            assert s["rejected_total"] == len(bad)
            assert s["rejected"]["schema"] == 1 and s["rejected"]["framing"] == 1 and s["rejected"]["payload"] == 1
            assert s["rejected"]["header"] == 3
            # still alive and showing valid overlays afterwards
            daemon.overlay(SMALL, box=BOX)
            daemon.status("running")
            assert wait_for(lambda: bridge.stats()["shown"] >= 1, 3.0)
    finally:
        daemon.close()
