"""Every stage of the pipeline alone, on real frames, interleaved round by
round: decode (strict JPEG decoding, ``armscope.core.imagefile``), the centre crop,
the resize, colour order and float conversion (together ``preprocess_frame``;
the 4x4 tiling into patches is inside the graph, so it is part of inference),
the overlay render (``armscope.core.overlay.heat_rgba`` of a real Grad-CAM, plus the raw
RGBA payload), ZeroMQ publish -> receive (the daemon's ``Publisher`` on a
``pub_socket`` to the bridge's ``protocol.Subscriber``, one raw overlay per
message, over loopback TCP), and the bridge's warp, pixel conversion and link
framing (``armscope.firmware_bridge.bench.bridge_path`` into a 1280x720 RGB565 display
on the controller simulator, as ``armscope bridge bench`` times it).
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


def render_cases(cams: list[np.ndarray], size: int) -> dict:
    from armscope.core.overlay import heat_rgba

    return {"render (heat_rgba + raw payload)": lambda i: heat_rgba(cams[i % len(cams)], size).tobytes()}


def zmq_roundtrips(overlay: np.ndarray, n: int, timeout_s: float = 30.0) -> list[float]:
    """ms from the publish stamp to the subscriber's return, ``n`` overlays one at a time."""
    import zmq

    from armscope.bench.daemon_latency import free_tcp_endpoint
    from armscope.edge.publisher import Publisher, bind, pub_socket

    endpoint = free_tcp_endpoint()
    context = zmq.Context()
    sock = pub_socket(context, overlay.shape[0])
    bind(sock, endpoint, "publish")
    pub = Publisher(sock, "bench-suite", stale_after_ms=600000)
    sub = protocol.Subscriber(endpoint, topics=[protocol.TOPIC_OVERLAY], context=context)
    h, w = overlay.shape[:2]
    payload = overlay.tobytes()

    def header(i):
        now_mono, now_wall = time.monotonic(), time.time()
        return {"frame_id": i, "capture_mono": now_mono, "capture_wall": now_wall, "classes": ["a", "b"],
                "probs": [0.5, 0.5], "decision": {"label": "a", "index": 0, "score": 0.5}, "width": w, "height": h,
                "format": protocol.FORMAT_RGBA8, "encoding": protocol.ENCODING_RAW,
                "region": {"x": 0, "y": 0, "size": w, "frame_width": w, "frame_height": h}}

    times = []
    try:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:            # the slow joiner: until the subscription is live
            pub.send(protocol.TOPIC_OVERLAY, header(0), payload)
            if sub.recv(200) is not None:
                break
        for i in range(1, n + 1):
            pub.send(protocol.TOPIC_OVERLAY, header(i), payload)
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


def bridge_stage_times(n: int, warmup: int = 3) -> dict[str, list[float]]:
    """ms per overlay of the bridge's stages (``armscope.firmware_bridge.bench.STAGES``) and their total."""
    from armscope.firmware_bridge.bench import STAGES, bridge_path, overlay_and_matrix
    from armscope.firmware_bridge.displays import open_display
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController
    from armscope.firmware_bridge.pixel_formats import PixelFormat

    w, h = DISPLAY
    names = {"render": "bridge warp (render_for)", "pack": "bridge convert (RGB565)",
             "frame": "bridge encode (COBS + CRC framing)"}
    labels = [names.get(s, f"bridge {s}") for s in STAGES]
    out = {label: [] for label in labels} | {"bridge total (warp + convert + encode)": []}
    with PtyController(ControllerCore(w, h, PixelFormat.parse("rgb565le"), max_payload=4096)) as sim:
        with open_display(f"serial://{sim.slave_path}?baud=921600&deadline=5&max_payload=4096") as display:
            display.blank()
            rgba, matrix = overlay_and_matrix("daemon", DISPLAY, None, (1600, 1200), 1024)
            for i in range(warmup + n):
                _, stage = bridge_path(rgba, matrix, display, seq0=i, clock=time.perf_counter)
                if i >= warmup:
                    for label, seconds in zip(labels, stage):
                        out[label].append(seconds * 1000.0)
                    out["bridge total (warp + convert + encode)"].append(sum(stage) * 1000.0)
    return out


def run_stages(frame_paths: list[Path], spec: Preprocessing, cams: list[np.ndarray], rounds: int) -> list[dict]:
    """One row per stage: {"stage", "ms": summary, "what"}."""
    jpegs = [Path(p).read_bytes() for p in frame_paths]
    cases = preprocessing_cases(jpegs, spec) | render_cases(cams, spec.center_crop)
    times = interleaved(cases, rounds, warmup=2)
    overlay = np.zeros((spec.center_crop, spec.center_crop, 4), np.uint8)
    times["ZeroMQ publish -> receive (raw RGBA overlay)"] = zmq_roundtrips(overlay, rounds)
    times |= bridge_stage_times(rounds)
    rows = []
    for name, values in times.items():
        if values:
            rows.append({"stage": name, "ms": summarize(values)})
    return rows
