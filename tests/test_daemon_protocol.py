"""docs/protocol.md held against the real daemon (in process: bundle, ONNX
Runtime, threads, ZeroMQ on 127.0.0.1, real H&E frames): the places where a
check written only from the doc once found the daemon elsewhere (snapshot
before any overlay, the saved header, ``stopping``'s reason, the echoed
``cmd``, ``focus_bbox`` against the drawn outline) and start-up, where a
subscriber must hear ``starting`` while the model loads, not the silence the
doc says means a dead daemon. Every wait is bounded."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from armscope.core import protocol
from armscope.core.schema_files import problem

from bridge_runtime_support import running_bridge
from daemon_support import OS_PORT, free_endpoint, pick_bundle, raw_request, running, wait_for
from repo_paths import DEMO_BUNDLE, TISSUE_BUNDLE

pytestmark = pytest.mark.e2e   # a real daemon on real sockets


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    return pick_bundle(request)


def ctl(daemon, command, timeout_ms=10000):
    reply = protocol.control_request(command, daemon.endpoints["control"], timeout_ms=timeout_ms)
    assert problem("control-reply", reply) is None, (command, reply, problem("control-reply", reply))
    return reply


def json_request(endpoint: str, frames: list[bytes], timeout_ms: int = 10000) -> dict:
    """One request of any frames on a fresh REQ socket; the reply parsed."""
    reply = raw_request(endpoint, frames, timeout_ms)
    assert reply is not None, f"no reply to {frames!r}"
    return json.loads(reply)


def test_ports_the_os_chose_are_reported_and_answer(bundle_dir, camera_frames, tmp_path, caplog):
    """Both sockets on ``tcp://127.0.0.1:*``: two ports the OS chose at bind (no
    port picked beforehand that another process could take), reported in
    ``Daemon.endpoints``, the log line and the ``status`` reply, and reachable there."""
    caplog.set_level(logging.INFO, logger="armscope.edge.daemon")
    with running(bundle_dir, f"image://{camera_frames[1]}?fps=5", tmp_path, publish=OS_PORT,
                 control=OS_PORT) as daemon:
        publish, control = daemon.endpoints["publish"], daemon.endpoints["control"]
        ports = {int(endpoint.removeprefix("tcp://127.0.0.1:")) for endpoint in (publish, control)}
        assert len(ports) == 2 and min(ports) > 0, daemon.endpoints
        assert f"publishing on {publish}, control on {control}, source " in caplog.text
        reply = ctl(daemon, "status")                       # sent to the reported control endpoint
        assert reply["endpoints"] == {"publish": publish, "control": control}
        with protocol.Subscriber(publish) as sub:
            heard, _ = wait_for(sub, lambda m: True, 30, topic="status")
        assert heard.header["model_id"] == reply["model_id"]


def test_snapshot_before_any_overlay_saves_the_frame_and_the_status(bundle_dir, camera_frames, tmp_path):
    """A field out of focus is never classified; a snapshot then is the camera
    frame and the status the daemon publishes (why there is no overlay)."""
    blurred = cv2.GaussianBlur(cv2.imread(str(camera_frames[1])), (0, 0), 9)
    source = tmp_path / "blurred.png"
    cv2.imwrite(str(source), blurred)
    with running(bundle_dir, f"image://{source}?fps=10", tmp_path) as daemon, \
            protocol.Subscriber(daemon.endpoints["publish"]) as sub:
        wait_for(sub, lambda m: m.header["state"] == "no_tissue" and m.header["heartbeat"], 60, topic="status")
        reply = ctl(daemon, "snapshot")
    assert reply["ok"], reply
    files = [Path(p) for p in reply["files"]]
    assert [p.name.split("_")[-1] for p in files] == ["frame.png", "header.json"]
    assert np.array_equal(cv2.imread(str(files[0])), blurred)
    header = json.loads(files[1].read_text())
    assert (header["topic"], header["state"], header["reason"]) == ("status", "no_tissue", "out_of_focus")
    # The header is a whole status message as published: a subscriber's decoder takes it.
    protocol.decode([b"status", json.dumps(header).encode(), b""])


def test_saved_header_stopping_reason_and_echoed_cmd(bundle_dir, camera_frames, tmp_path):
    sub = None
    try:
        with running(bundle_dir, f"image://{camera_frames[1]}?fps=10", tmp_path) as daemon:
            sub = protocol.Subscriber(daemon.endpoints["publish"])   # outlives the daemon: hears 'stopping'
            _, heard = wait_for(sub, lambda m: True, 60, topic="overlay")
            _, more = wait_for(sub, lambda m: True, 30, topic="overlay")   # the first is the daemon's last by now
            snap = ctl(daemon, "snapshot")
            saved = json.loads(Path(snap["files"][2]).read_text())
            _, rest = wait_for(sub, lambda m: m.header["seq"] >= saved["seq"], 30)
            seen = heard + more + rest
            # A request whose cmd is no string, or no request at all, still names what was sent, as a string.
            control = daemon.endpoints["control"]
            replies = [json_request(control, [frame]) for frame in
                       (b'{"cmd": 5}', b'{"cmd": null, "args": []}', b'{"cmd": ["status"]}', b"\xff\xfe", b"  ")]
            replies.append(json_request(control, [b"status", b"now"]))
        stopping, _ = wait_for(sub, lambda m: m.header["state"] == "stopping", 30, topic="status")
    finally:
        if sub is not None:
            sub.close()

    # The saved header is the header as published, schema, topic and payload_bytes included.
    published = {m.header["seq"]: m.header for m in seen}
    assert saved == published[saved["seq"]]
    assert saved["topic"] == "overlay" and saved["schema"] == protocol.SCHEMA_VERSION and "payload_bytes" in saved

    # stopping says why (docs/protocol.md 1.4).
    assert stopping.header["reason"] == "test over"

    for reply in replies:
        assert reply["ok"] is False and isinstance(reply["cmd"], str) and reply["error"], reply
        assert problem("control-reply", reply) is None, reply
    assert [r["cmd"] for r in replies[:3]] == ["5", "null", '["status"]']


def test_start_up_publishes_starting_while_the_model_loads(camera_frames, tmp_path):
    """Sockets bound and ``starting`` heartbeats from before the backends load
    (ONNX Runtime sessions and the stale window's timed inferences: seconds for
    the demo ensemble on 2 cores): a subscriber hears the daemon all along, the
    control socket answers, and an eyepiece bridge is blank for ``starting``,
    never "silent".

    The bundle is the demo cascade (two real ensembles: step one and the tissue
    step) on one inference thread, so the load (both ensembles' sessions and the
    timed inferences of step one plus a second step) lasts long enough to watch
    on any machine; the demo ensemble alone on two threads loads in 0.6 s on a
    quiet 2-core box, too short to tell."""
    from armscope.edge.cascade import assemble
    from armscope.firmware_bridge.bridge import Bridge
    from armscope.firmware_bridge.displays import PngDisplay

    bundle_dir = tmp_path / "cascade"
    assemble(DEMO_BUNDLE, {"other": TISSUE_BUNDLE}, bundle_dir)

    # A port known before the daemon exists: the subscriber and the bridge connect first, to hear
    # everything from the bind on (an OS-chosen port would be known only once bound).
    publish, hz = free_endpoint(), 20.0
    sub = protocol.Subscriber(publish)
    bridge = Bridge(PngDisplay(tmp_path / "eyepiece", width=320, height=240), connect=publish, stats_interval=0)
    marks = {}

    def watch(daemon):   # when the sockets were bound and when the backends were loaded, on this clock
        while "loaded" not in marks:
            if "bound" not in marks and daemon.publisher is not None:
                marks["bound"] = time.monotonic()
            if daemon.backend_ready.is_set():
                marks["loaded"] = time.monotonic()
            time.sleep(0.005)

    try:
        with running_bridge(bridge), \
                running(bundle_dir, f"image://{camera_frames[1]}?fps=5", tmp_path, publish=publish,
                        heartbeat_hz=hz, threads=1, wait_bound=False) as daemon:   # the watcher sees the bind itself
            watcher = threading.Thread(target=watch, args=(daemon,), daemon=True)
            watcher.start()
            first, _ = wait_for(sub, lambda m: True, 60, topic="status")
            asked = time.monotonic()
            reply = ctl(daemon, "status")
            answered = time.monotonic()
            deadline = time.monotonic() + 3      # the bridge's own SUB socket may connect a moment later
            while bridge.stats()["daemon"]["state"] is None and time.monotonic() < deadline:
                time.sleep(0.02)
            during_load = not daemon.backend_ready.is_set()
            during_load_bridge = bridge.stats()
            _, seen = wait_for(sub, lambda m: True, 60, topic="overlay")
            bridge_blanks = bridge.stats()["blanks"]
            watcher.join(5)
    finally:
        sub.close()
    bound, loaded = marks["bound"], marks["loaded"]
    assert loaded - bound > 0.8, f"the model loaded in {loaded - bound:.2f} s: too fast to tell; use a bigger bundle"
    assert first.header["state"] == "starting" and first.header["publish_mono"] < loaded, "silent while loading"
    assert reply["state"] == "starting" and answered - asked < 2.0 and answered < loaded, "control deaf while loading"
    # The bridge knows the daemon is starting, and shows nothing.
    assert during_load and during_load_bridge["displayed"] == "blank", during_load_bridge
    assert during_load_bridge["daemon"]["state"] == "starting", during_load_bridge["daemon"]
    # Heard all along: from a moment after the bind (the subscriber connects) to the end of the load.
    heard = [m for m in [first, *seen] if bound + 0.3 <= m.header["publish_mono"] <= loaded]
    assert all(m.topic == "status" and m.header["state"] == "starting" for m in heard)
    times = [bound + 0.3] + [m.header["publish_mono"] for m in heard] + [loaded]
    assert np.diff(times).max() < 1.0, f"{np.diff(times).max():.2f} s of silence while the model loaded"
    assert sum(m.header["heartbeat"] for m in heard) >= (loaded - bound - 0.3) * hz / 3
    assert bridge_blanks.get("silent", 0) == 0, bridge_blanks
