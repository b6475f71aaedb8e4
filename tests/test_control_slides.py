"""Slide commands on the daemon's real control socket: a refused ``slide start``
must leave the running slide exactly as it was (no record written early, no
frames lost, ``slide end`` still ends it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from armscope.core import protocol

from daemon_support import pick_bundle, running, wait_for

pytestmark = pytest.mark.e2e   # a real daemon on real sockets


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    return pick_bundle(request)


def ctl(daemon, command):
    return protocol.control_request(command, daemon.endpoints["control"], timeout_ms=5000)


def test_bad_slide_id_leaves_the_running_slide_alone(bundle_dir, camera_frames, tmp_path):
    slides_dir = tmp_path / "slides"
    with running(bundle_dir, f"image://{camera_frames[1]}?fps=8", tmp_path) as daemon:
        with protocol.Subscriber(daemon.endpoints["publish"], topics=["overlay"]) as sub:
            wait_for(sub, lambda m: True, 90)                  # the model is loaded and frames flow
            assert ctl(daemon, "slide start S-1")["ok"]
            wait_for(sub, lambda m: m.header["slide_id"] == "S-1", 30)
            for bad in ("bad/id", "../x", ".hidden"):
                reply = ctl(daemon, f"slide start {bad}")
                assert reply["ok"] is False and "slide id" in reply["error"], reply
            assert list(slides_dir.glob("*.json")) == [], "a refused start wrote the running slide's record"
            assert ctl(daemon, "status")["slide_id"] == "S-1"
            wait_for(sub, lambda m: m.header["slide_id"] == "S-1", 30)   # frames still count toward S-1
            ended = ctl(daemon, "slide end")
    assert ended["ok"], ended
    record = ended["slide"]
    assert record["slide_id"] == "S-1" and record["n_frames"] >= 2
    assert [p.name for p in slides_dir.glob("*.json")] == ["S-1.json"]
    assert json.loads((slides_dir / "S-1.json").read_text())["n_frames"] == record["n_frames"]
