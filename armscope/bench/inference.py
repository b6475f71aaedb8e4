"""Inference per backend x precision x layout x ensemble size, armscope's
paths and the peers, interleaved on the same real frames.

Ensembles of 1, 3 and 5 members are sub-bundles of the bundle: its first k
members, hashes recomputed, and (given ``merge``, the CLI passes
``armscope.export.merge.merge_members``) a merged graph of those k, so both layouts
exist at every size. One size at a time is opened and timed (a full-size
5-member ensemble in every layout and runtime at once would not fit in a
small board's memory); within a size, every path runs once per round on the
round's frame, in rotating order (``timing.interleaved``). The peers and
armscope's default (``--backend auto``) run with the whole ensemble.

Grad-CAM's share: the merged ONNX Runtime graph is also run with only
``probs`` as an output (``onnx.utils.Extractor`` drops the CAM subgraph); the
difference is what the in-graph Grad-CAM costs.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from armscope.core.bundle import MANIFEST, Bundle, load_bundle, sha256_file
from armscope.bench import limits
from armscope.bench.peers import Runner, peers
from armscope.bench.timing import Settle, interleaved, summarize, warm_up

log = logging.getLogger(__name__)
# a TensorRT row runs on the GPU: the CPU's peak is not its limit, and the GPU's is not derived yet
GPU_PEAK = {"gflops": None, "derivation": "GPU peak FLOP/s not derived", "assumed": []}


def sub_bundle(bundle: Bundle, k: int, workdir: Path, merge=None) -> tuple[Bundle, bool]:
    """(bundle of the first ``k`` members, whether its ensemble.onnx merges exactly those k)."""
    n = len(bundle.member_paths)
    if k >= n:
        return bundle, True
    root = workdir / f"{bundle.root.name}-k{k}"
    if root.exists():
        shutil.rmtree(root)
    (root / "members").mkdir(parents=True)
    manifest = copy.deepcopy(bundle.manifest)
    manifest.pop("engines", None)   # TensorRT engines belong to the whole bundle's graphs
    manifest["members"] = manifest["members"][:k]
    for entry in manifest["members"]:
        src, dst = bundle.root / entry["file"], root / entry["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    ensemble = root / manifest["ensemble"]["file"]
    merged = merge is not None
    if merged:
        import onnx

        onnx.save(merge([bundle.root / m["file"] for m in manifest["members"]]), str(ensemble))
    else:   # only so the bundle loads: its merged layout is not timed at this size
        shutil.copyfile(bundle.ensemble_path, ensemble)
    manifest["ensemble"]["sha256"] = sha256_file(ensemble)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return load_bundle(root), merged


def probs_only_graph(bundle: Bundle, workdir: Path) -> Path:
    import onnx
    from onnx.utils import Extractor

    out = workdir / f"{bundle.root.name}-probs-only.onnx"
    model = Extractor(onnx.load(str(bundle.ensemble_path))).extract_model(["image"], ["probs"])
    onnx.save(model, str(out))
    return out


def ours(bundle: Bundle, backend: str, layout: str, precision: str = "f32") -> Runner:
    from armscope.edge.backends import open_backend

    options = {"layout": layout}
    if backend == "openvino":
        options["cpu_precision"] = precision
    if backend != "auto":
        options["allow_inexact_int8"] = True   # measured and flagged, not deployed (see "int8_exact")
    b = open_backend(bundle, backend, **options)
    b.activate()
    info = b.describe()
    label = "auto (armscope's default)" if backend == "auto" else f"{backend} {precision if backend == 'openvino' else ''}".strip()
    shown_precision = info.get("precision") or bundle.manifest.get("precision", "fp32")
    return Runner(f"ours: {label}, {info.get('layout', layout)}", "ours", lambda x: b.infer(x)["probs"], info,
                  close=b.deactivate, backend=info.get("backend", backend), precision=str(shown_precision).lower(),
                  layout=info.get("layout", layout), members=len(bundle.member_paths))


def _ort_probs_only(path: Path, members: int, precision: str) -> Runner:
    from armscope.core.cpus import usable_cpus
    from armscope.edge.backends.onnxruntime_backend import open_session

    session = open_session(path, usable_cpus())
    return Runner("ours: onnxruntime, merged, probs only (no Grad-CAM)", "ours",
                  lambda x: session.run(["probs"], {"image": x})[0], {"graph": path.name},
                  backend="onnxruntime", precision=precision, layout="merged-probs-only", members=members)


def cases_for_size(bundle: Bundle, k: int, workdir: Path, merge, cpu_bf16: bool, full: bool,
                   keras_members=None, quick: bool = False) -> tuple[list[Runner], list[dict]]:
    """The paths for ``k`` members of ``bundle``; ``full``: also the default, the
    Grad-CAM share and the peers. ``quick`` (CI): armscope's paths on ONNX Runtime
    only (the merged layout only with the whole ensemble), the peers without
    OpenVINO's second configuration: compiling graphs for OpenVINO is most of a
    small run's time."""
    sub, merged_ok = sub_bundle(bundle, k, workdir, None if quick and not full else merge)
    precision = bundle.manifest.get("precision", "fp32")
    have_ov = importlib.util.find_spec("openvino") is not None
    runners, skipped = [], []
    layouts = ["members"] + (["merged"] if k > 1 and merged_ok and (full or not quick) else [])
    if k > 1 and quick and not full:
        skipped.append({"name": f"merged layout, {k} members", "why": "not in --quick"})
    elif k > 1 and not merged_ok:
        skipped.append({"name": f"merged layout, {k} members", "why": "no merge function (run through 'armscope bench --suite')"})
    for layout in layouts:
        runners.append(ours(sub, "onnxruntime", layout))
        if have_ov and not quick:
            runners.append(ours(sub, "openvino", layout, "f32"))
            if cpu_bf16 and precision == "fp32" and not quick:
                runners.append(ours(sub, "openvino", layout, "bf16"))
    if quick and have_ov and k == 1:
        skipped.append({"name": "armscope's OpenVINO paths", "why": "not in --quick (the OpenVINO peer runs)"})
    if not have_ov:
        skipped.append({"name": "openvino", "why": "openvino is not installed (pip install 'armscope[openvino]')"})
    elif not cpu_bf16 and precision == "fp32" and not quick:
        skipped.append({"name": "openvino bf16", "why": "this CPU has no native BF16 (AVX512-BF16 or AMX)"})
    if full:
        runners.insert(0, ours(sub, "auto", "auto"))
        if k > 1 and merged_ok:
            runners.append(_ort_probs_only(probs_only_graph(sub, workdir), k, precision))
        if precision == "fp32":
            p, s = peers(sub, keras_members, quick, bf16=cpu_bf16)
            runners += p
            skipped += s
    for r in runners:
        r.fields["bundle"] = str(bundle.root)
    return runners, skipped


def run_matrix(bundles: list[Bundle], images: list[np.ndarray], sizes, rounds: int, warmup: int, workdir: Path, merge=None,
               keras_members=None, budget_s: float | None = None, on_call=None,
               quick: bool = False, settle: Settle | None = None) -> tuple[list[dict], list[dict]]:
    """Rows (one per path and size, with timing, FLOPs, bytes, limit) and skipped paths.
    ``images``: the real camera frames (BGR), preprocessed as each bundle says;
    ``on_call(name, t0, t1)`` (optional) sees every timed call (power attribution);
    ``settle``: warm up until each path settles (``timing.warm_up``) instead of ``warmup`` calls."""
    from armscope.edge.backends.cpu_features import int8_exact
    from armscope.edge.backends.openvino_backend import cpu_capabilities

    have_ov = importlib.util.find_spec("openvino") is not None
    cpu_bf16 = have_ov and "BF16" in cpu_capabilities()
    exact, why_int8 = int8_exact()
    rows, skipped = [], []
    reference_bundle = bundles[0]
    prepared: dict[str, list[np.ndarray]] = {}

    def frames_for(bundle: Bundle) -> list[np.ndarray]:
        from armscope.core.preprocess import preprocess_frame

        key = str(bundle.root)
        if key not in prepared:
            prepared[key] = [np.ascontiguousarray(preprocess_frame(im, bundle.preprocessing)[None]) for im in images]
        return prepared[key]

    for k in sizes:
        runners, group_skipped = [], []
        for bundle in bundles:
            if k > len(bundle.member_paths):
                group_skipped.append({"name": f"{bundle.root.name}, {k} members", "why": f"the bundle has {len(bundle.member_paths)}"})
                continue
            full = bundle is reference_bundle and k == max(s for s in sizes if s <= len(bundle.member_paths))
            r, s = cases_for_size(bundle, k, workdir, merge, cpu_bf16, full, keras_members, quick)
            runners += r
            group_skipped += s
        skipped += group_skipped
        if not runners:
            continue
        frames = {id(r): frames_for(_bundle_of(r, bundles)) for r in runners}
        reference = None
        try:
            outputs = {r.name: np.asarray(r.run(frames[id(r)][0])) for r in runners}
            reference = outputs[runners[1].name if runners[0].name.startswith("ours: auto") else runners[0].name]

            def case(r):
                def call(i, r=r):
                    batch = frames[id(r)][i % len(frames[id(r)])]
                    if on_call is None:
                        return r.run(batch)
                    import time
                    t0 = time.monotonic()
                    r.run(batch)
                    on_call(f"{r.name}|{k}", t0, time.monotonic())
                return call

            log.info("bench suite: %d paths with %d member(s), %d rounds", len(runners), k, rounds)
            cases = {f"{r.name}|{k}": case(r) for r in runners}
            warm = warm_up(cases, settle) if settle is not None else \
                {name: {"rounds": warmup, "settled": None, "drift": None, "rule": "fixed count"} for name in cases}
            times = interleaved(cases, rounds, 0 if settle is not None else warmup, budget_s)
        finally:
            for r in runners:
                r.close()
        for r in runners:
            cost = limits.ensemble_cost(_bundle_of(r, bundles).member_paths[:k])
            stats = summarize(times[f"{r.name}|{k}"])
            precision = r.fields.get("precision", "fp32")
            peak_precision = {"bf16": "bf16", "int8": "int8", "fp16": "fp16"}.get(precision, "fp32")
            row = {"name": r.name, "group": r.group, **r.fields, "members": k, "ms": stats,
                   "samples_ms": [round(t, 3) for t in times[f"{r.name}|{k}"]],
                   "fps": round(1000.0 / stats["median"], 3), "info": _jsonable(r.info),
                   "warmup": warm[f"{r.name}|{k}"],
                   "flops_per_frame": cost["flops"], "weight_bytes": cost["weight_bytes"],
                   "activation_bytes": cost["activation_bytes_written"] + cost["activation_bytes_read"],
                   "bytes_per_frame": cost["bytes_per_frame"],
                   "limit": limits.against_limit(cost["flops"], stats["median"], GPU_PEAK if r.fields.get("backend") == "tensorrt"
                                                 else limits.cpu_peak(peak_precision)),
                   "peak_precision": peak_precision,
                   "max_abs_dp_vs_reference": round(float(np.abs(outputs[r.name] - reference).max()), 7)
                   if reference is not None and outputs[r.name].shape == reference.shape else None}
            if precision == "int8":
                row["int8_exact_here"], row["int8_why"] = exact, why_int8
            rows.append(row)
    return rows, skipped


def _bundle_of(runner: Runner, bundles: list[Bundle]) -> Bundle:
    return next(b for b in bundles if str(b.root) == runner.fields.get("bundle", str(bundles[0].root))) \
        if "bundle" in runner.fields else bundles[0]


def _jsonable(info: dict) -> dict:
    return json.loads(json.dumps(info, default=str))
