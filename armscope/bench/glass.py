"""Glass-to-glass latency: from a frame's capture to its overlay being seen on
the display by a camera, through the whole chain (capture -> preprocessing ->
inference -> overlay -> ZeroMQ -> bridge -> display -> camera).

The bridge runs with ``stamp=True``: the display shows the overlay's
``frame_id`` as a binary stamp in a corner (``armscope.core.stamp``). An observer
camera watches the display and decodes the stamp in every frame it takes; the
first time it sees frame F's stamp, F's overlay is visible. F's capture time is
in the overlay's header (``capture_mono``, the daemon's monotonic clock, the
same clock the observer stamps its frames with: one host). So

    glass-to-glass(F) = first observer frame showing F  -  capture_mono(F)

On this machine the display is ``png://`` and the observer is ``watch://``
(the newest PNG, as a camera on the screen would see it), both in this
process. On real hardware the display is the eyepiece's (``fb://``,
``serial://``) and the observer a camera pointed at it, on the same host:
``observer`` and ``roi`` (where the stamp lies in that camera's image); the
procedure is docs/latency.md. What the figure includes: everything from the
daemon receiving the frame to the observer's frame that shows it, including
the observer's frame interval (up to 1/fps late) and, for ``watch://``, the
PNG write; it leaves out the microscope camera's own exposure-to-delivery
latency (the daemon's clock starts when the frame arrives), which
docs/latency.md says how to add.

When the observer saw F: for ``watch://``, when its read began (it lists
the directory first); for a real camera, when ``read`` returned (the
exposure was earlier: the figure is then an upper bound by the camera's
delivery latency).
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path


from armscope.core import protocol, stamp
from armscope.core.errors import ArmscopeError
from armscope.bench.timing import summarize

log = logging.getLogger(__name__)


def scaled_box(display_size: tuple[int, int], image_shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """The stamp box in an observer image that shows the whole display, scaled to fit."""
    x, y, w, h = stamp.box(display_size)
    sx, sy = image_shape[1] / display_size[0], image_shape[0] / display_size[1]
    return x * sx, y * sy, w * sx, h * sy


def run_glass(config, out_dir: Path, frames: int = 20, warmup: int = 2, display_size=(1280, 720),
              observer: str | None = None, roi=None, observer_fps: float = 60.0, timeout_s: float = 300.0) -> dict:
    """Run daemon, stamping bridge and observer until ``frames`` overlays were seen
    (after ``warmup``). ``config``: the daemon's (bundle, source, backend, ...);
    its endpoints are replaced by free localhost ports."""
    from armscope.bench.daemon_latency import free_tcp_endpoint
    from armscope.edge.daemon import Daemon
    from armscope.edge.sources import CorruptFrame, SourceLost, open_source
    from armscope.firmware_bridge.bridge import Bridge
    from armscope.firmware_bridge.displays import PngDisplay

    config = config.replace(publish=free_tcp_endpoint(), control=free_tcp_endpoint(), max_frames=0)
    display_dir = Path(out_dir) / "glass-display"
    if display_dir.exists():
        shutil.rmtree(display_dir)
    display_dir.mkdir(parents=True)
    w, h = display_size
    observer = observer or f"watch://{display_dir}?fps={observer_fps:g}&width={w}&height={h}"
    watch = observer.startswith("watch://")
    headers: dict[int, dict] = {}
    seen: dict[int, float] = {}          # stamp value -> monotonic time first seen
    reads, undecoded = [0], [0]
    stop = threading.Event()

    def collect(sub):
        while not stop.is_set():
            msg = sub.recv(100)
            if msg is not None:
                headers[int(msg.header["frame_id"])] = msg.header

    def observe(source):
        box = None
        pace = source.pace or 0.0
        next_due = time.monotonic()
        while not stop.is_set():
            wait = next_due - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            next_due = max(next_due + pace, time.monotonic() - pace)
            t0 = time.monotonic()
            try:
                image = source.read()
            except CorruptFrame:
                continue
            except SourceLost as exc:
                log.warning("glass observer %s lost: %s", observer, exc)
                return
            t = t0 if watch else time.monotonic()
            reads[0] += 1
            box = box or (roi if roi is not None else scaled_box(display_size, image.shape))
            value = stamp.decode(image, box)
            if value is None:
                undecoded[0] += 1
            elif value not in seen:
                seen[value] = t

    daemon = Daemon(config)
    sub = protocol.Subscriber(config.publish, topics=[protocol.TOPIC_OVERLAY])
    display = PngDisplay(display_dir, width=w, height=h)
    bridge = Bridge(display, connect=config.publish, stamp=True, label=True, stats_interval=3600)
    source = open_source(observer)
    source.stop = stop
    threads = [threading.Thread(target=collect, args=(sub,), name="glass-sub", daemon=True),
               threading.Thread(target=bridge.run, name="glass-bridge", daemon=True)]
    wanted = warmup + frames
    try:
        source.open()
        bridge.start()
        for t in threads:
            t.start()
        observer_thread = threading.Thread(target=observe, args=(source,), name="glass-observer", daemon=True)
        observer_thread.start()
        daemon.start()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and len(_matched(seen, headers)) < wanted and observer_thread.is_alive():
            time.sleep(0.1)
    finally:
        stop.set()
        bridge.stop()
        daemon.shutdown()
        for t in threads:
            t.join(10)
        bridge.close()
        sub.close()
        source.close()
    matched = _matched(seen, headers)
    if len(matched) < warmup + 2:
        raise ArmscopeError(f"glass-to-glass: the observer ({observer}) saw {len(matched)} stamped overlays in "
                            f"{timeout_s:.0f} s ({reads[0]} frames read, {undecoded[0]} without a readable stamp, "
                            f"{len(headers)} overlays published); is the stamp inside its view (roi)?")
    matched = matched[warmup:warmup + frames]
    g2g = [seen[f % stamp.MODULUS] * 1000.0 - headers[f]["capture_mono"] * 1000.0 for f in matched]
    p2s = [seen[f % stamp.MODULUS] * 1000.0 - headers[f]["publish_mono"] * 1000.0 for f in matched]
    c2p = [(headers[f]["publish_mono"] - headers[f]["capture_mono"]) * 1000.0 for f in matched]
    written = _written_times(display, display_size)   # frame id mod 2^16 -> wall time its PNG was written
    p2w = [(written[f % stamp.MODULUS] - headers[f]["publish_wall"]) * 1000.0 for f in matched
           if f % stamp.MODULUS in written]
    first, last = matched[0], matched[-1]
    published = [f for f in headers if first <= f <= last]
    return {
        "display": f"png:// {w}x{h} (stamped)", "observer": observer,
        "observer_fps": observer_fps if watch else None,
        "frames": len(matched), "warmup": warmup,
        "glass_to_glass_ms": summarize(g2g), "samples_ms": [round(t, 3) for t in g2g],
        "capture_to_publish_ms": summarize(c2p),
        "publish_to_seen_ms": summarize(p2s),
        "publish_to_display_written_ms": summarize(p2w) if p2w else None,
        "published_in_window": len(published), "never_seen_in_window": len(set(published) - set(matched)),
        "observer_reads": reads[0], "observer_reads_without_stamp": undecoded[0],
        "daemon_stale_after_ms": headers[last].get("stale_after_ms"),
        "daemon_inference_ms": summarize([headers[f]["latency_ms"]["inference"] for f in matched
                                          if isinstance(headers[f].get("latency_ms"), dict)]),
        "backend": daemon.backend_info,
    }


def _matched(seen: dict[int, float], headers: dict[int, dict]) -> list[int]:
    """Frame ids published and seen, in order (a stamp is the frame id mod 2^16)."""
    return sorted(f for f in headers if f % stamp.MODULUS in seen and seen[f % stamp.MODULUS] >= headers[f]["capture_mono"])


def _written_times(display, display_size) -> dict[int, float]:
    """For png://: the stamp in each frame PNG the bridge wrote -> the file's modification
    time (wall clock, as the header's ``publish_wall``): the bridge's share of the latency."""
    import cv2

    out = {}
    for path in getattr(display, "paths", []):
        if not path.name.endswith("_frame.png"):
            continue
        image = cv2.imread(str(path))
        value = stamp.decode(image, stamp.box(display_size)) if image is not None else None
        if value is not None and value not in out:
            out[value] = path.stat().st_mtime_ns / 1e9
    return out
