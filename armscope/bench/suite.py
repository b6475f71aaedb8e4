"""The suite's run: one command, every measurement, one JSON (see the package docstring)."""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from armscope.core.bundle import load_bundle
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import IMAGE_SUFFIXES, load_image
from armscope.edge import pacing
from armscope.bench import bandwidth, limits, machine, report, sampling
from armscope.bench.timing import Settle

log = logging.getLogger(__name__)
SIZES = (1, 3, 5)
# warm-up until each path's time settles (timing.Settle); --quick (CI) a looser, shorter rule
SETTLE, SETTLE_QUICK = Settle(window=3, tolerance=0.05, cap=15), Settle(window=2, tolerance=0.10, cap=6)


def default_frames() -> list[Path]:
    root = Path(__file__).resolve().parents[2] / "samples" / "frames"
    return sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def real_cams(bundle, images) -> list[np.ndarray]:
    """The decided class's Grad-CAM of each frame, from a real inference (what the render stage draws)."""
    from armscope.core.preprocess import preprocess_frame
    from armscope.edge.backends import open_backend

    with open_backend(bundle, "onnxruntime") as backend:
        cams = []
        for im in images:
            out = backend.infer(preprocess_frame(im, bundle.preprocessing)[None])
            cams.append(out["cam"][0, int(np.argmax(out["probs"][0]))])
    return cams


def run_suite(bundle_dir: str, out: Path, *, quick: bool = False, rounds: int | None = None,
              extra_bundles: list[str] = (), keras_members: list[str] | None = None, merge=None,
              frame_paths: list[Path] | None = None, source: str | None = None, glass_frames: int | None = None,
              pipeline_frames: int | None = None, benchmarks_md: Path | None = None, command: str = "") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # sub-bundles and glass-to-glass PNGs (~16 MB): scratch, never left beside the report
    scratch = tempfile.TemporaryDirectory(prefix="armscope-bench-")
    work = Path(scratch.name)
    rounds = rounds or (3 if quick else 10)
    bundle = load_bundle(bundle_dir)
    bundles = [bundle] + [load_bundle(b) for b in extra_bundles]
    frame_paths = [Path(p) for p in (frame_paths or default_frames())]
    images = [load_image(p) for p in frame_paths]
    source = source or f"image://{frame_paths[min(1, len(frame_paths) - 1)]}?fps=30"
    board = sampling.board_state()
    result = {"command": command or "armscope bench --suite", "quick": quick, "rounds": rounds,
              "bundle": str(bundle.root), "bundle_members": len(bundle.member_paths),
              "extra_bundles": [str(b.root) for b in bundles[1:]], "frames": [p.name for p in frame_paths],
              "machine": machine.describe(board), "board": board, "skipped": []}
    settle = SETTLE_QUICK if quick else SETTLE
    result["warmup_rule"] = settle.describe()
    sampler = sampling.Sampler().start()
    calls: dict[str, list[tuple[float, float]]] = {}
    try:
        t_start = time.monotonic()
        log.info("bench suite: memory bandwidth")
        result["bandwidth"] = bandwidth.measure(quick)
        from armscope.bench.stages import run_stages

        log.info("bench suite: stages")
        result["stages"] = run_stages(frame_paths, bundle.preprocessing, real_cams(bundle, images), max(rounds, 5))
        log.info("bench suite: inference")
        from armscope.bench.inference import run_matrix

        sizes = tuple(s for s in SIZES if s <= len(bundle.member_paths)) or (len(bundle.member_paths),)
        if len(bundle.member_paths) not in sizes:
            sizes += (len(bundle.member_paths),)
        rows, skipped = run_matrix(bundles, images, sizes, rounds, 1, work, merge=merge,
                                   keras_members=keras_members, quick=quick, settle=settle,
                                   on_call=lambda name, a, b: calls.setdefault(name, []).append((a, b)))
        result["inference"], result["skipped"] = rows, result["skipped"] + skipped
        result["comparison"] = comparison(rows, len(bundle.member_paths))
        frame_ms = result["comparison"]["ours_ms"]
        result["pacing"] = {"frame_ms": round(frame_ms, 1), "stale_after_ms": pacing.stale_window_ms(frame_ms),
                            "rule": "max(1500, ceil_100(3 x frame + 500)) (edge/pacing.py)"}
        from armscope.edge.config import load_config

        config = load_config(None, {"bundle": str(bundle.root), "source": source})
        from armscope.bench.daemon_latency import run_bench

        log.info("bench suite: the whole pipeline (daemon)")
        t0 = time.monotonic()
        result["pipeline"] = run_bench(config, frames=pipeline_frames or (4 if quick else 20), warmup=2)
        result["pipeline"]["interval"] = (t0, time.monotonic())
        from armscope.bench.glass import run_glass

        log.info("bench suite: glass-to-glass")
        t0 = time.monotonic()
        result["glass"] = run_glass(config, work, frames=glass_frames or (5 if quick else 30))
        result["glass"]["interval"] = (t0, time.monotonic())
        result["pacing"]["daemon_stale_after_ms"] = result["glass"]["daemon_stale_after_ms"]
        result["wall_s"] = round(time.monotonic() - t_start, 1)
    finally:
        sampler.stop()
        scratch.cleanup()
    result["power"] = sampler.summary()
    result["frames_per_joule"] = frames_per_joule(result, sampler, calls)
    result["peaks"] = {p: limits.cpu_peak(p) for p in ("fp32", "bf16", "int8", "fp16")}
    for r in rows:
        r["roofline"] = bandwidth.roofline(r, result["peaks"][r["peak_precision"]], result["bandwidth"])
    result["load_average_end"] = machine.load_average()
    result["series"] = {"glass-to-glass": result["glass"]["samples_ms"]}
    default = next((r for r in rows if r["name"].startswith("ours: auto")), None)
    if default:
        result["series"]["inference, armscope's default"] = default["samples_ms"]
    result["stack"] = stack(result)
    result["plots"] = report.plots(result, out)
    validate(result)
    (out / "suite.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_base = benchmarks_md.parent if benchmarks_md else out
    section = report.markdown(result, md_base)
    (out / "suite.md").write_text(section)
    if benchmarks_md is not None:
        report.update_benchmarks_md(benchmarks_md, section)
    return result


def comparison(rows: list[dict], n: int) -> dict:
    full = [r for r in rows if r["members"] == n]
    ours = next((r for r in full if r["name"].startswith("ours: auto")), None) or next(r for r in full if r["group"] == "ours")
    out = {"ours": ours["name"], "ours_ms": ours["ms"]["median"],
           "peers": [{"name": r["name"], "ms": r["ms"]["median"], "ratio": round(r["ms"]["median"] / ours["ms"]["median"], 3)}
                     for r in full if r["group"] == "peer"]}
    # what auto chose and why (the bundle's fidelity record decides BF16), and whether another of ours was faster
    out["auto"] = {k: ours["info"].get(k) for k in ("selected", "why")} if ours["name"].startswith("ours: auto") else None
    fastest = min((r for r in full if r["group"] == "ours" and r is not ours and "probs-only" not in r["layout"]),
                  key=lambda r: r["ms"]["median"], default=None)
    out["fastest_other_ours"] = {"name": fastest["name"], "ms": fastest["ms"]["median"]} if fastest else None
    best = min(out["peers"], key=lambda p: p["ms"], default=None)
    out["best_peer"] = best["name"] if best else None
    merged = next((r for r in full if r["layout"] == "merged" and r["backend"] == "onnxruntime" and r["group"] == "ours"), None)
    probs_only = next((r for r in full if r["layout"] == "merged-probs-only"), None)
    out["gradcam_share"] = round(1 - probs_only["ms"]["median"] / merged["ms"]["median"], 4) \
        if merged and probs_only else None
    return out


def stack(result: dict) -> dict:
    from armscope.bench import stages

    by = {r["stage"]: r["ms"]["median"] for r in result["stages"] if r["ms"]}   # absent stages: not in the stack
    parts = [("decode", by.get("decode (JPEG, strict)")),
             ("preprocess", by.get("preprocess_frame (crop + resize + convert)")),
             ("inference", result["comparison"]["ours_ms"]),
             ("render", by.get(stages.RENDER_V2)),
             ("ZeroMQ", by.get(stages.ZMQ_V2)),
             ("bridge", by.get(stages.BRIDGE_TOTAL))]
    return {"parts": [(k, v) for k, v in parts if v is not None],
            "glass_ms": result["glass"]["glass_to_glass_ms"]["median"]}


def frames_per_joule(result: dict, sampler, calls: dict) -> dict:
    """Frames per joule where power is known, beside each row's fps (``row["energy"]``, with the
    power it used or why it is absent) and for the pipeline; returns {label: fps/J} of those known.
    Which power: a Jetson's board input (tegrastats: CPU and GPU together); on a discrete GPU,
    NVML's board power for the GPU rows (the host CPU not included); RAPL's packages for CPU rows."""
    out = {}
    board = sampler.source == "tegrastats"
    gpu_power = sampler.source in ("nvml", "nvidia-smi")
    for r in result["inference"]:
        if board:
            key, what, why = "power_w", "board input power (tegrastats)", None
        elif bandwidth.is_gpu_row(r):
            key, what = ("power_w", f"GPU board power ({sampler.source}; the host CPU not included)") if gpu_power \
                else (None, None)
            why = None if gpu_power else f"no GPU power sensor read ({sampler.absent})"
        else:
            cpu_absent = sampler.cpu.absent["energy"]
            key, what = (None, None) if cpu_absent else ("cpu_power_w", "CPU packages (RAPL)")
            why = f"CPU energy absent: {cpu_absent}" + ("; the GPU's power does not cover a CPU path" if gpu_power else "") \
                if cpu_absent else None
        watts = sampler.mean_power_w(calls.get(f"{r['name']}|{r['members']}"), key) if key else None
        if key and watts is None:
            why = f"fewer than 3 {what} samples while this path's calls ran ({sampler.interval_ms} ms sampling)"
        r["energy"] = {"fps_per_joule": round(r["fps"] / watts, 4) if watts else None,
                       "power_w": round(watts, 3) if watts else None, "power_from": what if watts else None,
                       "absent": None if watts else why}
        if watts:
            out[f"{r['name']} ({r['members']})"] = r["energy"]["fps_per_joule"]
    pipe = result["pipeline"]
    parts = [("power_w", "board" if board else "GPU")] if board or gpu_power else []
    parts += [] if board or sampler.cpu.absent["energy"] else [("cpu_power_w", "CPU packages")]
    watts = [(w, label) for key, label in parts if (w := sampler.mean_power_w([pipe["interval"]], key))]
    if watts and len(watts) == len(parts) and pipe.get("fps"):
        out[f"daemon pipeline ({' + '.join(label for _, label in watts)})"] = round(pipe["fps"] / sum(w for w, _ in watts), 4)
    return out


def validate(result: dict) -> None:
    """Every figure a real measurement: n > 0 and finite. Raises, naming what is not."""
    problems = []

    def check(what: str, s: dict | None):
        if not s or not s.get("n") or not all(isinstance(s.get(k), (int, float)) and math.isfinite(s[k])
                                                 for k in ("median", "p95", "p99")):
            problems.append(what)

    for r in result["stages"]:
        if not r.get("absent"):          # a stage this install cannot run says why instead (run_stages)
            check(f"stage {r['stage']}", r["ms"])
    for r in result["inference"]:
        check(f"inference {r['name']} x{r['members']}", r["ms"])
    check("glass-to-glass", result["glass"]["glass_to_glass_ms"])
    if not result["pipeline"].get("fps"):
        problems.append("pipeline fps")
    if problems:
        raise ArmscopeError("bench suite: not measured: " + ", ".join(problems))
