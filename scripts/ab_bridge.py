"""Same-process A/B of the bridge hot path against an older commit.

Why: on a shared virtual machine the same benchmark's median can move by +-40% between
runs minutes apart, so comparing two pytest-benchmark runs says little about a
20-60% change. This imports ``firmware_bridge`` from ``BASE`` (via ``git
archive``) beside the working tree's, drives each on its own pty controller
simulator, and alternates them in rounds, so both see the same machine.

    python scripts/ab_bridge.py 33c41f1            # RGB565 LE and MONO1
    python scripts/ab_bridge.py 33c41f1 --rounds 8 --format mono1

Times warp + convert + frame encode of an overlay of
``benchmarks/bench_bridge.py`` (``--overlay fullscreen``, the default, or
``daemon``) as the bridge of each version does it; prints per-round medians
and the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_base(rev: str, into: Path):
    """``firmware_bridge`` as of ``rev``, importable as package ``fb_base``."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "armscope/firmware_bridge"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    (into / "armscope/firmware_bridge").rename(into / "fb_base")
    sys.path.insert(0, str(into))
    return {m: importlib.import_module(f"fb_base.{m}") for m in ("bridge", "link", "displays", "simulator")}


def run_path(mods, display, rgba, matrix, size):
    b, link = mods["bridge"], mods["link"]
    if hasattr(b, "render_for"):
        image, region = b.render_for(display, rgba, matrix, size)
    else:  # before the bridge rendered per display
        image, region = b.render_for_display(rgba, matrix, size)
    data, send = display.prepare(image, region)
    return link.encode_frame_chunks(data, seq0=0, frame_id=1, region=send, fmt=display.fmt, max_payload=4096)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="git revision to compare against")
    ap.add_argument("--format", action="append", choices=["rgb565le", "mono1"], help="default: both")
    ap.add_argument("--overlay", choices=["fullscreen", "daemon"], default="fullscreen",
                    help="benchmarks/bench_bridge.py's overlay to time (default fullscreen)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=60, help="timed calls per round and version")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    import bench_bridge as bb

    cur = {m: importlib.import_module(f"firmware_bridge.{m}") for m in ("bridge", "link", "displays", "simulator")}
    from armscope.firmware_bridge.bench import overlay_and_matrix
    from armscope.firmware_bridge.registration import Registration

    size = (bb.W, bb.H)
    reg = Registration(bb.CAMERA_TO_DISPLAY, size, 0.0)
    rgba, matrix = overlay_and_matrix(args.overlay, size, reg, bb.CAMERA, bb.CROP)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, Path(tmp))
        for fmt in args.format or ["rgb565le", "mono1"]:
            sims, displays = [], {}
            try:
                for name, mods in (("base", base), ("current", cur)):
                    sim = mods["simulator"].PtyController(mods["simulator"].ControllerCore(*size, fmt, max_payload=4096))
                    sims.append(sim)
                    d = mods["displays"].open_display(f"serial://{sim.start()}?baud=921600&deadline=5")
                    d.blank()
                    displays[name] = (mods, d)
                medians = {"base": [], "current": []}
                for _ in range(args.rounds):
                    for name, (mods, d) in displays.items():
                        for _ in range(5):
                            run_path(mods, d, rgba, matrix, size)
                        ts = []
                        for _ in range(args.calls):
                            t0 = time.perf_counter()
                            run_path(mods, d, rgba, matrix, size)
                            ts.append(time.perf_counter() - t0)
                        medians[name].append(float(np.median(ts)) * 1e3)
                ratios = np.array(medians["base"]) / np.array(medians["current"])
                print(f"{fmt}: base {args.base} medians (ms) {np.round(medians['base'], 2).tolist()}")
                print(f"{fmt}: current     medians (ms) {np.round(medians['current'], 2).tolist()}")
                print(f"{fmt}: base/current per round {np.round(ratios, 2).tolist()}, median {np.median(ratios):.2f}x")
            finally:
                for _, d in displays.values():
                    d.close()
                for sim in sims:
                    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
