"""Per frame on the CPU, float32 feed against the uint8 front, in one
interleaved run: what the host does for a frame (``preprocess_frame``, or
only the centre crop) plus the backend's ``infer``, on the real frames of
samples/frames, for ONNX Runtime and OpenVINO.

Why both parts in one timed call: the front moves the resize from the host
into the graph; on a CPU both run on the same cores, so only the sum says
whether it pays. (On a GPU the point is the upload: 3 MB of uint8 instead of
4.9 MB of float32, and the resize on the device; not measured here.)

    PYTHONPATH=. python benchmarks/bench_front.py --bundle DIR_WITH_FRONT [--rounds 10] [--json out.json]

The bundle needs the front (``armscope front --bundle DIR --images samples/frames``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from armscope.core import front
from armscope.core.bundle import load_bundle
from armscope.core.cpus import cpu_name, usable_cpus
from armscope.core.preprocess import load_image, preprocess_frame
from armscope.edge.backends import open_backend
from armscope.bench.timing import interleaved, summarize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    spec = bundle.preprocessing
    frames = [load_image(p) for p in sorted((REPO / "samples" / "frames").glob("*.jpg"))]
    paths = [("onnxruntime", {}), ("onnxruntime", {"layout": "merged"})]
    if importlib.util.find_spec("openvino"):
        from armscope.edge.backends.openvino_backend import cpu_capabilities

        paths.append(("openvino", {}))
        if "BF16" in cpu_capabilities():
            paths.append(("openvino", {"cpu_precision": "bf16"}))
    backends, cases = [], {}
    for kind, options in paths:
        for feed in ("float32", "uint8"):
            backend = open_backend(bundle, kind, feed=feed, **options)
            backend.activate()
            backends.append(backend)
            info = backend.describe()
            name = f"{kind} {info.get('precision', 'fp32')} {info['layout']}, feed {feed}"
            prep = (lambda f: front.camera_crop(f, spec)[None]) if feed == "uint8" else \
                (lambda f: preprocess_frame(f, spec)[None])
            cases[name] = (lambda r, b=backend, prep=prep: b.infer(prep(frames[r % len(frames)])))
    load = [os.getloadavg()[0]]
    times = interleaved(cases, args.rounds, warmup=2)
    load.append(os.getloadavg()[0])
    for b in backends:
        b.deactivate()
    stats = {name: summarize(t) for name, t in times.items()}
    print(f"{cpu_name()}, {usable_cpus()} CPUs, load {load[0]:.2f} -> {load[1]:.2f}, {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, bundle {bundle.root.name}")
    print("\n| path | feed float32: preprocess_frame + infer | feed uint8: crop + infer (front in the graph) | uint8 / float32 |")
    print("|---|---|---|---|")
    for name in [n for n in stats if n.endswith("float32")]:
        u8 = name.replace("float32", "uint8")
        a, b = stats[name], stats[u8]
        print(f"| {name.rsplit(',', 1)[0]} | {a['median']:.1f} ms (min {a['min']:.1f}) | {b['median']:.1f} ms "
              f"(min {b['min']:.1f}) | {b['median'] / a['median']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"stats_ms": stats, "times_ms": times, "load": load}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
