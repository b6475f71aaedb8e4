"""Every stage of the pipeline alone, on real frames, interleaved round by
round: decode (strict JPEG decoding, ``armscope.core.imagefile``), the centre crop,
the resize, colour order and float conversion (together ``preprocess_frame``;
the 4x4 tiling into patches is inside the graph, so it is part of inference),
the overlay (protocol v2: the daemon's ``overlay_message`` of a real Grad-CAM,
the CAM as a few KB of data; beside it the opt-in v1 ``rendered`` bitmap,
``armscope.core.overlay.heat_rgba`` plus its raw RGBA payload), ZeroMQ publish
-> receive of each form (the daemon's ``Publisher`` on a ``pub_socket`` to a
``protocol.Subscriber``, one message at a time, over loopback TCP), and the
bridge's decode, render in display pixels, pixel conversion and link framing
(``armscope.firmware_bridge.bench.bridge_path`` into a 1280x720 RGB565 display
on the controller simulator, as ``armscope bridge bench`` times it), with the
v1 bitmap's total beside it.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from armscope.core import protocol
from armscope.core.imagefile import decode_image
from armscope.core.preprocess import INTERPOLATIONS, Preprocessing, preprocess_frame
from armscope.bench.timing import interleaved, summarize

DISPLAY = (1280, 720)


def preprocessing_cases(jpegs: list[bytes], spec: Preprocessing) -> dict:
    frames = [decode_image(b, f"frame {i}") for i, b in enumerate(jpegs)]
    pick = lambda i, seq: seq[i % len(seq)]   # noqa: E731 - the round's frame, the same for every stage
    crops = []
    for f in frames:
        h, w = f.shape[:2]
        t, left, c = (h - spec.center_crop) // 2, (w - spec.center_crop) // 2, spec.center_crop
        crops.append(np.ascontiguousarray(f[t:t + c, left:left + c]))
    resized = [cv2.resize(c, (spec.resize, spec.resize), interpolation=INTERPOLATIONS[spec.interpolation]) for c in crops]

    def crop(i):
        f = pick(i, frames)
        h, w = f.shape[:2]
        t, left, c = (h - spec.center_crop) // 2, (w - spec.center_crop) // 2, spec.center_crop
        return np.ascontiguousarray(f[t:t + c, left:left + c])

    return {
        "decode (JPEG, strict)": lambda i: decode_image(pick(i, jpegs), "frame"),
        "crop (centre, copy)": crop,
        "resize": lambda i: cv2.resize(pick(i, crops), (spec.resize, spec.resize),
                                       interpolation=INTERPOLATIONS[spec.interpolation]),
        "colour order + float32": lambda i: cv2.cvtColor(pick(i, resized), cv2.COLOR_BGR2RGB).astype(np.float32),
        "preprocess_frame (crop + resize + convert)": lambda i: preprocess_frame(pick(i, frames), spec),
    }


V2, V1 = "v2 overlay: CAM as data", "v1 rendered: raw RGBA"
RENDER_V2 = "render (v2 overlay: CAM payload + levels + focus box)"
RENDER_V1 = "render (v1 rendered: heat_rgba + raw payload)"
ZMQ_V2 = f"ZeroMQ publish -> receive ({V2})"
ZMQ_V1 = f"ZeroMQ publish -> receive ({V1})"
BRIDGE_TOTAL = "bridge total (decode + render + convert + encode)"
BRIDGE_TOTAL_V1 = "bridge total, v1 rendered (decode + warp + convert + encode)"


def _work(cam: np.ndarray, frame_id: int, size: int):
    """A classified frame as the daemon's render stage receives it (``edge.stages.Work``), for one real CAM."""
    from armscope.edge.capture import Frame
    from armscope.edge.stages import Work

    frame = Frame(frame_id, np.zeros((size, size, 3), np.uint8), time.monotonic(), time.time())
    return Work(frame=frame, box=(0, 0, size), measures={}, times={}, outputs={"probs": np.array([[0.3, 0.7]])},
                decision={"label": "b", "index": 1, "score": 0.7, "positive": True, "threshold": 0.5},
                cam=cam, cams=cam[None], cam_index=0)


def render_cases(cams: list[np.ndarray], size: int) -> dict:
    """The daemon's per-frame overlay work: the v2 message (``overlay_message``), and the v1 bitmap
    the opt-in ``rendered`` topic still draws (``heat_rgba``)."""
    from armscope.core.overlay import heat_rgba
    from armscope.edge.overlay_message import overlay_message

    works = [_work(cam, i, size) for i, cam in enumerate(cams)]
    return {RENDER_V2: lambda i: overlay_message(works[i % len(works)], ["a", "b"], max_alpha=0.6),
            RENDER_V1: lambda i: heat_rgba(cams[i % len(cams)], size).tobytes()}


def zmq_roundtrips(topic: bytes, header: dict, payload: bytes, n: int, timeout_s: float = 30.0) -> list[float]:
    """ms from the publish stamp to the subscriber's return, ``n`` messages one at a
    time, with the socket options the daemon and a subscriber of ``topic`` use."""
    import zmq

    from armscope.edge.publisher import Publisher, bind, pub_socket

    context = zmq.Context()
    rendered = topic == protocol.TOPIC_RENDERED
    sock = pub_socket(context, header["width"] if rendered else None)
    endpoint = bind(sock, "tcp://127.0.0.1:*", "publish")   # a port the OS chooses at bind: nothing can take it first
    pub = Publisher(sock, "bench-suite", stale_after_ms=600000)
    # a rendered subscriber takes a receive buffer for a bitmap (protocol.Subscriber's rcvbuf)
    sub = protocol.Subscriber(endpoint, topics=[topic], context=context,
                              **({"rcvbuf": len(payload) + 65536} if rendered else {}))

    def stamped(i):
        now_mono, now_wall = time.monotonic(), time.time()
        return dict(header, frame_id=i, capture_mono=now_mono, capture_wall=now_wall)

    times = []
    try:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:            # the slow joiner: until the subscription is live
            pub.send(topic, stamped(0), payload)
            if sub.recv(200) is not None:
                break
        for i in range(1, n + 1):
            pub.send(topic, stamped(i), payload)
            msg = sub.recv(int(timeout_s * 1000))
            got = time.monotonic()
            if msg is None:
                break
            times.append((got - float(msg.header["publish_mono"])) * 1000.0)
    finally:
        sub.close()
        pub.close()
        context.term()
    return times


def zmq_cases(cam: np.ndarray, size: int, n: int) -> dict[str, list[float]]:
    """Both overlay forms of one real CAM over loopback TCP: the v2 ``overlay`` (a few KB) and the
    opt-in v1 ``rendered`` bitmap (``size`` squared RGBA)."""
    from armscope.edge.overlay_message import overlay_message, rendered_message

    work = _work(cam, 0, size)
    v2, v2_payload = overlay_message(work, ["a", "b"], max_alpha=0.6)
    v1, v1_payload, _ = rendered_message(work, ["a", "b"], size=size, max_alpha=0.6, encoding=protocol.ENCODING_RAW)
    return {ZMQ_V2: zmq_roundtrips(protocol.TOPIC_OVERLAY, v2, v2_payload, n),
            ZMQ_V1: zmq_roundtrips(protocol.TOPIC_RENDERED, v1, v1_payload, n)}


BRIDGE_ENCODE = "bridge encode (COBS + CRC framing)"


def bridge_stage_times(n: int, warmup: int = 3) -> tuple[dict[str, list[float]], dict[str, str]]:
    """ms per overlay of the bridge's stages (``armscope.firmware_bridge.bench.STAGES``, protocol v2)
    and their total, and the v1 ``rendered`` bitmap's total beside it; and {stage: why absent}.
    Without the ``[serial]`` extra (numba) the link's framing cannot run: the other stages are
    timed on a detached display of the same size and format, and the framing and the two
    totals (which include it) are absent, with the reason and the pip command."""
    from contextlib import nullcontext

    from armscope.firmware_bridge.bench import STAGES, bridge_path, sample_messages
    from armscope.firmware_bridge.displays import open_display
    from armscope.firmware_bridge.displays.serial import SerialDisplay, serial_extra_missing
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController
    from armscope.firmware_bridge.pixel_formats import PixelFormat

    w, h = DISPLAY
    names = {"decode": "bridge decode (v2 overlay: schema + CAM)", "render": "bridge render (v2: CAM in display px)",
             "pack": "bridge convert (RGB565)", "frame": BRIDGE_ENCODE}
    missing = serial_extra_missing()
    stages = STAGES if missing is None else tuple(s for s in STAGES if s != "frame")
    labels = [names.get(s, f"bridge {s}") for s in stages]
    out = {label: [] for label in labels}
    absent = {}
    if missing is None:
        out |= {BRIDGE_TOTAL: [], BRIDGE_TOTAL_V1: []}
    else:
        total = "includes the encode stage, absent without the [serial] extra: pip install 'armscope[serial]'"
        absent = {BRIDGE_ENCODE: missing, BRIDGE_TOTAL: total, BRIDGE_TOTAL_V1: total}
    fmt = PixelFormat.parse("rgb565le")
    with (PtyController(ControllerCore(w, h, fmt, max_payload=4096)) if missing is None else nullcontext()) as sim:
        display = (open_display(f"serial://{sim.slave_path}?baud=921600&deadline=5&max_payload=4096")
                   if missing is None else SerialDisplay.detached(w, h, fmt))
        with display:
            if missing is None:
                display.blank()
            messages, registration = sample_messages("daemon", DISPLAY, None, (1600, 1200), 1024)
            for i in range(warmup + n):   # v2 and v1 interleaved, so a busy machine slows both alike
                _, stage = bridge_path(messages["v2"], display, registration, seq0=i, clock=time.perf_counter,
                                       encode=missing is None)
                _, stage_v1 = bridge_path(messages["v1"], display, registration, seq0=i, clock=time.perf_counter,
                                          encode=missing is None)
                if i >= warmup:
                    for label, seconds in zip(labels, stage):
                        out[label].append(seconds * 1000.0)
                    if missing is None:
                        out[BRIDGE_TOTAL].append(sum(stage) * 1000.0)
                        out[BRIDGE_TOTAL_V1].append(sum(stage_v1) * 1000.0)
    return out, absent


def run_stages(frame_paths: list[Path], spec: Preprocessing, cams: list[np.ndarray], rounds: int) -> list[dict]:
    """One row per stage: {"stage", "ms": summary}, or {"stage", "ms": None, "absent": why} for a
    stage this install cannot run."""
    jpegs = [Path(p).read_bytes() for p in frame_paths]
    cases = preprocessing_cases(jpegs, spec) | render_cases(cams, spec.center_crop)
    times = interleaved(cases, rounds, warmup=2)
    times |= zmq_cases(cams[0], spec.center_crop, rounds)
    bridge, absent = bridge_stage_times(rounds)
    times |= bridge
    rows = []
    for name, values in times.items():
        if values:
            rows.append({"stage": name, "ms": summarize(values)})
    # what could not run on this install, with why (e.g. the [serial] extra's pip command)
    rows += [{"stage": name, "ms": None, "absent": why} for name, why in absent.items()]
    return rows
