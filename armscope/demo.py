"""``armscope demo``: the whole chain in one command, on the CPU.

daemon (bundled real H&E frames -> tiled ensemble -> Grad-CAM overlay -> ZeroMQ)
-> eyepiece bridge (validation, staleness, pixel conversion) -> ``png://`` display,
plus a subscriber that prints each overlay's decision and latency as it arrives.
All three talk over real ZeroMQ sockets on 127.0.0.1, exactly as on a microscope;
only the display is a folder of PNGs (what the microdisplay would emit, black =
transparent) instead of a framebuffer or a serial link.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np

from armscope.core import protocol
from armscope.core.bundle import description_line
from armscope.core.errors import ArmscopeError
from armscope.bench.daemon_latency import free_tcp_endpoint
from armscope.edge.config import load_config

CHECKOUT = Path(__file__).resolve().parents[1]   # a source checkout's root: samples/ lies beside armscope/


def in_checkout(path: str) -> str:
    """``path`` as given where it exists here (the CWD), else the checkout's copy where that exists: the demo's
    defaults name the repository's samples/, which ``armscope demo`` run from another directory must still find."""
    if Path(path).is_absolute() or Path(path).exists() or not (CHECKOUT / path).exists():
        return path
    return str(CHECKOUT / path)


def source_in_checkout(uri: str) -> str:
    """A dir://, file:// or image:// source with a relative path, resolved as ``in_checkout`` resolves paths."""
    scheme, sep, rest = uri.partition("://")
    path, query_sep, query = rest.partition("?")
    if not sep or scheme.lower() not in ("dir", "file", "image", "watch") or not path:
        return uri
    bare = path.rstrip("/") or path
    found = in_checkout(bare)
    if found == bare:
        return uri
    return f"{scheme}://{found}{'/' if path.endswith('/') else ''}{query_sep}{query}"


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what creating it would create), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def run_demo(bundle: str, source: str, overlays: int, out: Path, timeout_s: float,
             threads: int = 0, print_fn=print) -> dict:
    """Run daemon + bridge until ``overlays`` overlays were shown in the eyepiece (or timeout)."""
    from armscope.edge.daemon import Daemon
    from armscope.firmware_bridge.bridge import Bridge
    from armscope.firmware_bridge.displays import PngDisplay, numbered_pngs

    if overlays < 1:
        raise ArmscopeError(f"--overlays {overlays}: expected 1 or more")
    bundle, source = in_checkout(bundle), source_in_checkout(source)
    config = load_config(None, {
        "bundle": bundle, "source": source, "threads": threads,
        "publish": free_tcp_endpoint(), "control": free_tcp_endpoint(),
        "slides_dir": str(out / "slides"), "snapshot_dir": str(out / "snapshots"),
    })
    created = _first_missing(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        daemon = Daemon(config)
    except BaseException:  # a bad bundle or source: leave no empty output folders behind
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    if (about := description_line(daemon.bundle.manifest)) is not None:
        print_fn(about)
    subscriber = protocol.Subscriber(config.publish, topics=[protocol.TOPIC_OVERLAY, protocol.TOPIC_STATUS])
    for old in numbered_pngs(out / "eyepiece"):  # the previous demo's images: this run's must not mix with them
        old.unlink()
    display = PngDisplay(out / "eyepiece")
    bridge = Bridge(display, connect=config.publish, stats_interval=3600, label=True)
    bridge_thread = threading.Thread(target=bridge.run, kwargs={"duration": timeout_s}, name="bridge", daemon=True)
    latencies: list[float] = []
    try:
        bridge.start()
        bridge_thread.start()
        daemon.start()
        print_fn(f"daemon: {daemon.backend.describe()} | source {source} | publishing on {config.publish}")
        deadline = time.monotonic() + timeout_s
        last_state = None
        printed = 0
        # Until the eyepiece showed them and this printer (a subscriber of its own, which may
        # receive an overlay after the bridge did) has listed as many.
        while time.monotonic() < deadline and (bridge.stats()["shown"] < overlays or printed < overlays):
            message = subscriber.recv(timeout_ms=200)
            if message is None:
                continue
            h = message.header
            if message.topic == "status":
                if h["state"] != last_state:
                    print_fn(f"status: {h['state']}" + (f" ({h['reason']})" if h.get("reason") else ""))
                    last_state = h["state"]
                continue
            latency = message.latency_ms()
            latencies.append(latency)
            d = h["decision"]
            sub = h.get("subtype")
            then = f" > {sub['decision']['label']} p={sub['decision']['score']:.3f}" if sub else ""
            print_fn(f"overlay frame {h['frame_id']:>4}: {d['label']:<8} p={d['score']:.3f} "
                     f"(threshold {d.get('threshold', '-')}){then}  capture->publish {latency:7.1f} ms")
            printed += 1
    finally:
        bridge.stop()
        bridge_thread.join(10)
        daemon.shutdown()
        bridge.close()
        subscriber.close()
    stats = bridge.stats()
    if stats["shown"] < overlays:
        raise ArmscopeError(f"demo: only {stats['shown']} of {overlays} overlays reached the eyepiece "
                            f"within {timeout_s:.0f} s (bridge: {stats['blanks']})")
    summary = {
        "overlays_shown": stats["shown"],
        "blanks": stats["blanks"],
        "rejected": stats["rejected_total"],
        "capture_to_publish_ms_p50": round(float(np.median(latencies)), 1) if latencies else None,
        "eyepiece_pngs": str(out / "eyepiece"),
    }
    print_fn(f"eyepiece: {stats['shown']} overlays shown, blanks by reason {stats['blanks']}, "
             f"{stats['rejected_total']} messages rejected; display images in {out / 'eyepiece'}")
    return summary
