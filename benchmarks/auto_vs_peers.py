"""``--backend auto`` on the CPU against the best peer runtime, in one
interleaved run on the same real frames.

Why a script and not a pytest-benchmark file: pytest-benchmark times one case
after another, and on a shared machine (several processes on 2 vCPUs) the
load moves by tens of percent minutes apart, so cases timed minutes apart are
not comparable. Here every round runs every path on every frame, the paths
back to back on each frame in a fresh random order, so load hits all paths
alike; medians are over all calls, and the ratio is also given per round.

Paths: armscope's default (``open_backend(bundle, "auto")``: after the
bundle's BF16 fidelity record, OpenVINO BF16 on a BF16 CPU, else ONNX Runtime
FP32), armscope's ONNX Runtime FP32 (what ``auto`` ran before), and the peers
as a user would run them without armscope on the bundle's ensemble ONNX:
OpenVINO's own API with its defaults, with the LATENCY hint at FP32 and at
BF16 (where the CPU has it), and a default ONNX Runtime ``InferenceSession``.
One more row, ``tuned:``, is OpenVINO's API at BF16 with the one change
armscope's backend makes (the input reshaped to one frame): not counted as a
peer, it shows how much of the difference that change is.
Each path's probabilities are compared with ONNX Runtime FP32 on every frame.

The bundle: one full-size tiled DenseNet-121 member (random weights: speed
does not depend on them), exported once into benchmarks/.cache (needs the
[tf] extra; about 10 minutes on 2 cores), or ``--bundle DIR``. Before timing,
the bundle's BF16 fidelity is measured and recorded as ``armscope accuracy``
does (``--holdout``, default samples/frames), unless a record for this
machine is already there: ``auto`` only runs BF16 after that.

    .venv/bin/python benchmarks/auto_vs_peers.py [--bundle DIR] [--rounds 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from armscope.core.bundle import load_bundle  # noqa: E402
from armscope.core.cpus import cpu_name, usable_cpus  # noqa: E402
from armscope.core.preprocess import load_image, preprocess_frame  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
MEMBER_BUNDLE = CACHE / "densenet121_x1_bundle"


def ensure_member_bundle() -> Path:
    """One full-size tiled DenseNet-121 member as a bundle (cached)."""
    if (MEMBER_BUNDLE / "manifest.json").is_file():
        return MEMBER_BUNDLE
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from armscope.export.architecture import ArchitectureSpec, build_tiled_model
    from armscope.export.onnx_export import TaskSpec, export_bundle

    member = CACHE / "densenet121_members" / "member_0.keras"
    if not member.is_file():
        member.parent.mkdir(parents=True, exist_ok=True)
        keras.utils.set_random_seed(0)
        build_tiled_model(ArchitectureSpec("densenet121", 2)).save(member)
    export_bundle([member], MEMBER_BUNDLE, TaskSpec("binary", ["other", "IIM"], "IIM", 0.3),
                  name="densenet121-x1-random", force=True)
    return MEMBER_BUNDLE


def ensure_bf16_record(bundle, holdout: list[Path], out: Path) -> str:
    """Record BF16's fidelity on this machine unless a record for it exists; the verdict, as text."""
    from armscope.calibration.accuracy import accuracy_report
    from armscope.edge.backends import fidelity
    from armscope.edge.backends.select import Machine

    machine = Machine.here()
    if machine.bf16_unit is None or machine.openvino is None:
        return "not measured: no BF16 unit or no OpenVINO here"
    key = fidelity.make_key(bundle.manifest["ensemble"]["sha256"], machine.openvino, machine.bf16_unit)
    record, _ = fidelity.match(fidelity.read_records(bundle.root, "openvino", "bf16"), key)
    if record is None:
        accuracy_report(bundle.root, None, holdout, out, backend="openvino", cpu_precision="bf16", force=True)
        record, _ = fidelity.match(fidelity.read_records(bundle.root, "openvino", "bf16"), key)
    s = record["summary"]
    return (f"{'passed' if record['passed'] else 'FAILED: ' + '; '.join(record['failed'])} on "
            f"{s['n_images']} images ({record['images_from']}): top-1 agreement {s['top1_agreement']:.2%}, "
            f"max |dp| {s['max_abs_delta_p']:.2g}, CAM r {s['cam_pearson_mean']:.4f}, {record['measured']}")


def armscope_path(bundle, kind: str, **options):
    from armscope.edge.backends import open_backend

    backend = open_backend(bundle, kind, **options)
    if not getattr(backend, "active", True):  # constructed, not yet active (InferenceBackend's lifecycle)
        backend.activate()
    info = backend.describe()
    return (lambda frame: backend.infer(frame)["probs"]), info, backend


def openvino_peer(bundle, config: dict | None, one_frame: bool = False):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(bundle.ensemble_path))
    if one_frame:  # what armscope's backend does: the input's batch fixed to 1
        model.reshape({"image": [1, bundle.input_size, bundle.input_size, 3]})
    compiled = core.compile_model(model, "CPU", config or {})
    request = compiled.create_infer_request()
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    info = {"openvino": ov.__version__, "config": config or "defaults",
            "settled_precision": hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint),
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT"))}

    def run(frame):
        return request.infer({"image": frame})[compiled.output("probs")]

    return run, info, None


def onnxruntime_peer(bundle):
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.ensemble_path), providers=["CPUExecutionProvider"])
    return (lambda frame: session.run(["probs"], {"image": frame})[0]), {"onnxruntime": ort.__version__}, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="bundle directory (default: one full-size DenseNet-121 member, cached)")
    ap.add_argument("--frames", nargs="+", default=[str(REPO / "samples" / "frames")])
    ap.add_argument("--holdout", nargs="+", default=[str(REPO / "samples" / "frames")],
                    help="hold-out images for the BF16 fidelity record")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every timing here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    bundle = load_bundle(args.bundle or ensure_member_bundle())
    verdict = ensure_bf16_record(bundle, [Path(p) for p in args.holdout], CACHE / "auto_vs_peers_accuracy")
    print(f"BF16 fidelity record: {verdict}", flush=True)
    from armscope.calibration.accuracy import list_images

    paths = list_images([Path(p) for p in args.frames])
    frames = [np.ascontiguousarray(preprocess_frame(load_image(p), bundle.preprocessing)[None]) for p in paths]

    import importlib.util

    runners = {"armscope auto (default)": armscope_path(bundle, "auto"),
               "armscope onnxruntime FP32 (auto before)": armscope_path(bundle, "onnxruntime"),
               "peer: ONNX Runtime, default InferenceSession": onnxruntime_peer(bundle)}
    if importlib.util.find_spec("openvino"):
        from armscope.edge.backends.openvino_backend import cpu_capabilities

        runners["peer: OpenVINO API, defaults"] = openvino_peer(bundle, None)
        runners["peer: OpenVINO API, f32, LATENCY"] = openvino_peer(
            bundle, {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        if "BF16" in cpu_capabilities():
            runners["peer: OpenVINO API, bf16, LATENCY"] = openvino_peer(
                bundle, {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"})
            # not a peer as users run it: the same with armscope's one change, to show where the gap comes from
            runners["tuned: OpenVINO API, bf16, LATENCY, reshaped to 1 frame"] = openvino_peer(
                bundle, {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}, one_frame=True)
    reference = [runners["armscope onnxruntime FP32 (auto before)"][0](f) for f in frames]
    delta = {name: max(float(np.abs(run(f) - ref).max()) for f, ref in zip(frames, reference))
             for name, (run, _, _) in runners.items()}
    for name, (run, _, _) in runners.items():
        for _ in range(args.warmup):
            run(frames[0])

    rng = random.Random(args.seed)
    times = {name: [] for name in runners}
    per_round = []
    load = [os.getloadavg()[0]]
    start = time.time()
    for r in range(args.rounds):
        this_round = {name: [] for name in runners}
        for frame in frames:  # every path on this frame back to back, in a fresh random order
            order = list(runners)
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                runners[name][0](frame)
                this_round[name].append(time.perf_counter() - t0)
        for name, t in this_round.items():
            times[name] += t
        this_round = {name: float(np.median(t)) for name, t in this_round.items()}
        per_round.append(this_round)
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split(' (')[0]} {v * 1000:.0f}"
                                                         for n, v in this_round.items()) + " ms", flush=True)
    wall = time.time() - start

    median = {name: float(np.median(t)) for name, t in times.items()}
    peers = [n for n in runners if n.startswith("peer:")]
    best_peer = min(peers, key=median.get)
    default = "armscope auto (default)"
    round_ratios = [r[best_peer] / r[default] for r in per_round]
    flags = set(open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()) if \
        os.path.exists("/proc/cpuinfo") else set()
    header = {
        "cpu": cpu_name(), "usable_cpus": usable_cpus(),
        "cpu_units": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8",
                                                      "avx512_vnni", "avx_vnni")),
        "bundle": str(bundle.root), "members": len(bundle.member_paths), "frames": [str(p) for p in paths],
        "rounds": args.rounds, "wall_s": round(wall, 1), "load_avg_1min": load, "bf16_record": verdict,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print("\n" + json.dumps(header, indent=1))
    print("\n| path | median | min | best peer / path | max abs dp vs ORT FP32 |\n|---|---|---|---|---|")
    for name in sorted(runners, key=median.get):
        print(f"| {name} | {median[name] * 1000:.1f} ms | {min(times[name]) * 1000:.1f} ms | "
              f"{median[best_peer] / median[name]:.2f}x | {delta[name]:.1e} |")
    fastest = {name: min(t) for name, t in times.items()}
    print(f"\ndefault vs best peer ({best_peer}): {median[best_peer] / median[default]:.2f}x on medians, "
          f"{min(fastest[p] for p in peers) / fastest[default]:.2f}x on minimums (best peer by minimum: "
          f"{min(peers, key=fastest.get)}); "
          f"per round {min(round_ratios):.2f}-{max(round_ratios):.2f}x (median {np.median(round_ratios):.2f}x)")
    print(f"default path: {runners[default][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header, "median_s": median, "min_s": {
            n: min(t) for n, t in times.items()}, "max_abs_dp_vs_ort_fp32": delta, "best_peer": best_peer,
            "per_round_median_s": per_round, "times_s": times,
            "info": {n: r[1] for n, r in runners.items()}}, indent=1, default=str) + "\n")
    for _, _, backend in runners.values():
        if backend is not None:
            backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
