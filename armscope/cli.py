"""The ``armscope`` command. Each subcommand imports its heavy modules only when
it runs, so ``armscope --help``, ``inspect`` and ``classify`` work without
TensorFlow, TensorRT or CUDA installed."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from armscope import __version__
from armscope.core.argtypes import number
from armscope.core.errors import ArmscopeError, output_file_problem
from armscope.edge.backends import BACKENDS, CPU_PRECISIONS


def _int_in(lo: int, hi: float = float("inf")):
    return number(lo, hi, integer=True)


def _check_output_file(path, option: str) -> None:
    if path and (problem := output_file_problem(path)) is not None:
        raise ArmscopeError(f"{option} {path}: {problem}")


def check_out_apart(out, inputs, option: str = "--out") -> None:
    """``armscope.core.bundle.check_out_apart``, imported when a command runs (it brings OpenCV and jsonschema)."""
    from armscope.core.bundle import check_out_apart as check

    check(out, inputs, option)


_THREADS = _int_in(1, 256)


def _crop_size(text: str) -> int:
    """--crop: 0 (no crop: whole images) or 16..16384 pixels."""
    return 0 if text.strip() == "0" else _int_in(16, 16384)(text)
_SEED = _int_in(0, 2**32 - 1)


def _cmd_train(args) -> int:
    from armscope.export.train import train

    members = train(Path(args.data_dir), Path(args.out), backbone=args.backbone, folds=args.folds,
                    epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    for path in members:
        print(path)
    return 0


def _cmd_export(args) -> int:
    from armscope.core.preprocess import Preprocessing
    from armscope.export.onnx_export import TaskSpec, export_bundle

    task = None
    if args.weights or args.architecture:
        if args.members:
            raise ArmscopeError("give members either as model files or as --weights, not both")
        if not (args.weights and args.architecture and args.input_scaling):
            raise ArmscopeError("--weights needs --architecture and --input-scaling (and the other way round)")
    elif not args.members:
        raise ArmscopeError("no members given: expected .keras/.h5 files or SavedModel directories, or --weights")
    resolved = [Path(m).resolve() for m in args.members or args.weights]
    if len(set(resolved)) < len(resolved):
        raise ArmscopeError("members: the same file is given twice; each ensemble member is a different model")
    if args.explain:
        if args.weights:
            raise ArmscopeError("--explain describes model files; a --weights member has no graph to explain")
        if _differing_members(args):
            from armscope.export.multi_export import explain as explain_multi

            print(explain_multi(_member_sources(args), trust_code=args.trust_code))
            return 0
        from armscope.export.onnx_export import explain

        print(explain([Path(p) for p in args.members], trust_code=args.trust_code))
        return 0
    if not args.out:
        raise ArmscopeError("--out is required (the bundle directory to create), unless --explain")
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
        if not all(classes):
            raise ArmscopeError(f"--classes {args.classes!r}: expected comma-separated non-empty class names")
        kind = args.task or ("binary" if len(classes) == 2 else "multiclass")
        positive = args.positive_class or (classes[-1] if kind == "binary" else None)
        threshold = args.threshold if args.threshold is not None else (0.5 if kind == "binary" else None)
        task = TaskSpec(kind, classes, positive, threshold)
        if args.threshold is not None:  # before minutes of conversion, not at the manifest check after them
            from armscope.core.decision import check_threshold

            check_threshold(args.threshold, task.to_manifest(), "--threshold")
    elif args.task or args.positive_class or args.threshold is not None:
        raise ArmscopeError("--task/--positive-class/--threshold need --classes")
    check_out_apart(args.out, args.members or args.weights)
    spec = Preprocessing(center_crop=0 if args.no_crop else args.crop, resize=640, interpolation=args.interpolation,
                         input=_input_spec(args))
    gate = _tissue_gate(args.tissue_gate) if args.tissue_gate else None
    if _differing_members(args):
        from armscope.export.multi_export import export_multi

        if args.weights or args.saliency or args.jobs != 1:
            raise ArmscopeError("--svm-head/--scaling/--input-size export members that differ; they do not combine "
                                "with --weights, --saliency or --jobs")
        out = export_multi(_member_sources(args), Path(args.out), task=task, name=args.name, preprocessing=spec,
                           input_size=args.input_size, opset=args.opset, force=args.force,
                           description=args.description, trust_code=args.trust_code, tissue_gate=gate)
        print(f"wrote bundle {out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="armscope-weights-") as scratch:
        members = [Path(p) for p in args.members]
        if args.weights:
            from armscope.export.weights_map import save_weights_members

            members = save_weights_members([Path(w) for w in args.weights], args.architecture, args.input_scaling,
                                           Path(scratch))
        out = export_bundle(members, Path(args.out), task=task, name=args.name,
                            preprocessing=spec, opset=args.opset, force=args.force, description=args.description,
                            jobs=args.jobs, trust_code=args.trust_code, saliency=args.saliency,
                            input_scaling=None if args.weights else args.input_scaling, tissue_gate=gate)
    print(f"wrote bundle {out}")
    return 0


def _differing_members(args) -> bool:
    """Members that differ in head, scaling or input size go through armscope.export.multi_export."""
    return bool(args.svm_head or args.scaling or args.input_size)


def _member_sources(args):
    """--svm-head MEMBER=HEAD and --scaling MEMBER=NAME, matched to the positional members by path."""
    from armscope.export.multi_export import MemberSource

    members = [Path(m) for m in args.members]
    by_path = {m.resolve(): i for i, m in enumerate(members)}
    heads, scalings = {}, {}
    for option, values, into in (("--svm-head", args.svm_head, heads), ("--scaling", args.scaling, scalings)):
        for text in values:
            member, sep, value = text.rpartition("=")
            if not sep or not member or not value:
                raise ArmscopeError(f"{option} {text!r}: expected MEMBER=VALUE, MEMBER one of the member files given")
            index = by_path.get(Path(member).resolve())
            if index is None:
                raise ArmscopeError(f"{option} {text!r}: {member} is not one of the members given "
                                    f"({', '.join(map(str, members))})")
            if index in into:
                raise ArmscopeError(f"{option}: {member} is given twice")
            into[index] = value
    default = args.input_scaling or "none"  # armscope.export.member_input takes --input-scaling's names too
    return [MemberSource(m, Path(heads[i]) if i in heads else None, scalings.get(i, default))
            for i, m in enumerate(members)]


def _input_spec(args):
    """--grey / --bit-depth / --window -> the manifest's preprocessing.input (None: camera frames as always)."""
    from armscope.core.preprocess import InputSpec, parse_window

    if not (args.grey or args.bit_depth or args.window):
        return None
    return InputSpec(kind="grey" if args.grey else "rgb", bit_depth_handling=args.bit_depth or "window",
                     window=parse_window(args.window) if args.window else None)


def _tissue_gate(text: str) -> dict:
    """--tissue-gate mri | KEY=VALUE,... -> the manifest's tissue_gate block."""
    from armscope.core.tissue import GATE_PRESETS, TissueGate

    if text in GATE_PRESETS:
        return dict(GATE_PRESETS[text])
    fields = TissueGate.__dataclass_fields__
    block = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ArmscopeError(f"--tissue-gate {text!r}: expected {' or '.join(GATE_PRESETS)} or KEY=VALUE pairs "
                                f"with KEY one of {', '.join(fields)}")
        try:
            number_value = float(value)
        except ValueError:
            raise ArmscopeError(f"--tissue-gate {item!r}: {value!r} is not a number") from None
        block[key] = int(number_value) if fields[key].type in (int, "int") else number_value
    return block


def _cmd_inspect(args) -> int:
    from armscope.core.bundle import load_bundle
    from armscope.edge.cascade import load_steps

    bundle = load_bundle(args.bundle)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2))
        return 0
    m = bundle.manifest
    task = m["task"]
    print(f"bundle      {bundle.root}")
    print(f"name        {m['name']}  (schema {m['schema_version']}, precision {m['precision']}, opset {m['opset']})")
    extra = f", positive {task['positive_class']!r} at threshold {task['threshold']}" if "threshold" in task else ""
    print(f"task        {task['type']}: {', '.join(task['classes'])}{extra}")
    steps = load_steps(bundle)  # what classify and the daemon would load, checked the same way
    for entry in task.get("steps", []):
        sub = steps[entry["when"]].bundle
        print(f"  then      when {entry['when']!r}: {entry['bundle']} ({sub.manifest['name']}, {sub.task['type']}: "
              f"{', '.join(sub.classes)}), hashes verified")
    pre = m["preprocessing"]
    print(f"input       centre crop {pre['center_crop']} -> resize {pre['resize']} ({pre['interpolation']}), "
          f"{pre['channel_order']} float32 0..255")
    print(_describe_model(m))
    print("outputs     " + ", ".join(f"{o['name']} {o['shape']}" for o in m["outputs"]))
    for member in m["members"]:
        print(f"member      {member['file']}  fold {member['fold']}  sha256 {member['sha256'][:16]}...  ok")
    print(f"ensemble    {m['ensemble']['file']}  sha256 {m['ensemble']['sha256'][:16]}...  ok")
    print("producer    " + ", ".join(f"{k} {v}" for k, v in m["producer"].items()))
    print("hashes      all verified")
    return 0


def _describe_model(manifest: dict) -> str:
    """inspect's model line: tiled models with their grid, whole-image ones with
    their input size; the CAM size from the cam output (N x C x H x W)."""
    model = manifest["model"]
    cam = next(o["shape"] for o in manifest["outputs"] if o["name"] == "cam")
    size = manifest["inputs"][0]["shape"][1]
    parts = [model["architecture"]]
    if "backbone" in model:
        parts.append(f"backbone {model['backbone']}")
    if model["architecture"] == "tiled-patch-classifier":
        parts.append(f"{model['grid']}x{model['grid']} patches of {model['patch_size']}")
    else:
        parts.append(f"input {size}x{size}")
    if "head" in model:
        parts.append(f"{model['head']} head")
    if "per_patch_heads" in model:
        parts.append(f"per-patch heads {model['per_patch_heads']}")
    parts.append(f"CAM {cam[2]}x{cam[3]}" + (f" of {model['feature_layer']}" if "feature_layer" in model else ""))
    return "model       " + ", ".join(parts)


def _cmd_cascade(args) -> int:
    from armscope.edge.cascade import assemble

    then = {}
    for item in args.then:
        when, sep, path = item.partition("=")
        if not sep or not when or not path:
            raise ArmscopeError(f"--then {item!r}: expected CLASS=BUNDLE_DIR, e.g. --then IIM=bundles/iim-subtypes")
        if when in then:
            raise ArmscopeError(f"--then {item!r}: a step for {when!r} is already given")
        then[when] = Path(path)
    bundle = assemble(Path(args.step_one), then, Path(args.out), force=args.force)
    steps = ", ".join(f"{s['when']} -> {s['bundle']}" for s in bundle.task["steps"])
    print(f"wrote cascade bundle {bundle.root}: {bundle.task['positive_class']!r} at {bundle.task['threshold']}; {steps}")
    return 0


def _cmd_classify(args) -> int:
    from armscope.edge.classify import classify_images

    inputs = [args.bundle, *args.images]
    if args.overlay_dir:
        check_out_apart(args.overlay_dir, inputs, "--overlay-dir")
    if args.contact_sheet:
        check_out_apart(args.contact_sheet, inputs, "--contact-sheet")
        _check_output_file(args.contact_sheet, "--contact-sheet")
        if Path(args.contact_sheet).suffix.lower() != ".png":
            raise ArmscopeError(f"--contact-sheet {args.contact_sheet}: expected a .png file name")
    window = None
    if args.window:
        from armscope.core.preprocess import parse_window

        window = parse_window(args.window)
    if args.json:
        check_out_apart(args.json, inputs, "--json")
        _check_output_file(args.json, "--json")
    options = {"layout": args.layout, "cpu_precision": args.cpu_precision}
    if args.threads:
        options["threads"] = args.threads
    report = classify_images(Path(args.bundle), [Path(p) for p in args.images],
                             json_out=Path(args.json) if args.json else None,
                             overlay_dir=Path(args.overlay_dir) if args.overlay_dir else None,
                             backend=args.backend, threshold=args.threshold, force=args.force, window=window,
                             contact_sheet=Path(args.contact_sheet) if args.contact_sheet else None, **options)
    classes = report["classes"]
    width = max(len(Path(r["image"]).name) for r in report["images"])
    print(f"{'image':<{width}}  " + "  ".join(f"{c:>10}" for c in classes) + "  decision")

    def row(name: str, entry: dict, suffix: str = "") -> str:
        if entry["decision"] is None:   # the tissue gate or a damaged file: no diagnosis
            nd = entry["no_decision"]
            return (f"{name:<{width}}  " + "  ".join(f"{'-':>10}" for _ in classes)
                    + f"  no decision: {nd['reason']} ({nd['detail']})")
        return (f"{name:<{width}}  " + "  ".join(f"{entry['probs'][c]:>10.4f}" for c in classes)
                + f"  {entry['decision']['label']}" + suffix)

    for r in report["images"]:
        print(row(Path(r["image"]).name, r, f" -> {r['subtype']['decision']['label']}" if r.get("subtype") else ""))
    slide = report["slide"]
    print(row("slide (mean)", slide,
              f" -> {slide['subtype']['decision']['label']} (over {slide['subtype']['n_fields']} images)"
              if slide.get("subtype") else ""))
    if slide["n_classified"] < slide["n_images"]:
        print(f"{slide['n_images'] - slide['n_classified']} of {slide['n_images']} images had no decision and are "
              "left out of the slide mean")
    if args.overlay_dir:
        print(f"overlays in {args.overlay_dir}")
    if args.contact_sheet:
        print(f"contact sheet {args.contact_sheet}")
    return 0


def _cmd_bridge(args) -> int:
    from armscope.firmware_bridge import cli as bridge_cli

    return bridge_cli.main(args.rest)


def _cmd_run(args) -> int:
    from armscope.edge.config import from_args
    from armscope.edge.daemon import run_daemon

    return run_daemon(from_args(args))


def _cmd_bench(args) -> int:
    from armscope.bench.daemon_latency import run_bench
    from armscope.edge.config import from_args

    if args.suite:
        return _cmd_bench_suite(args)
    if args.out or args.quick or args.benchmarks_md:
        raise ArmscopeError("--out, --quick and --benchmarks-md belong to --suite")
    _check_output_file(args.json, "--json")
    _check_output_file(args.plot, "--plot")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise ArmscopeError(f"--plot {args.plot}: expected a .png file name")
    report = run_bench(from_args(args), frames=args.frames, json_out=args.json, plot=args.plot,
                       warmup=args.warmup)
    e2e = report["latency_ms"]["capture_to_publish"]
    print(f"{report['frames']} overlays in {report['wall_s']:.1f} s: {report['fps']:.2f} fps; capture->publish "
          f"p50 {e2e['p50']} ms, p95 {e2e['p95']} ms, p99 {e2e['p99']} ms; pure inference p50 "
          f"{report['latency_ms']['inference']['p50']} ms")
    for path in report["files"]:
        print(f"wrote {path}")
    return 0


def _cmd_bench_suite(args) -> int:
    """``armscope bench --suite``: every stage, the inference matrix with peers and limits,
    the pipeline, glass-to-glass, power; JSON + BENCHMARKS.md section + plots (armscope.bench)."""
    import shlex
    import sys

    from armscope.bench.suite import run_suite
    from armscope.export.merge import merge_members  # onnx only: sub-ensembles of 1 and 3 members get merged graphs too

    if not args.out:
        raise ArmscopeError("--suite needs --out DIR (the JSON, tables and plots go there)")
    result = run_suite(args.bundle or "samples/demo_bundle", Path(args.out), quick=args.quick, rounds=args.rounds,
                       extra_bundles=args.extra_bundle or [], keras_members=args.keras, merge=merge_members,
                       source=args.source, benchmarks_md=Path(args.benchmarks_md) if args.benchmarks_md else None,
                       command="armscope bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    c, g = result["comparison"], result["glass"]
    print(f"{result['machine']['cpu']}, {result['machine']['usable_cpus']} CPUs, load {result['machine']['load_average_start']}"
          f" -> {result['load_average_end']}")
    print(f"default ({c['ours']}): {c['ours_ms']:.1f} ms per frame; peers: "
          + ", ".join(f"{p['name']} {p['ratio']:.2f}x" for p in c["peers"]))
    print(f"pipeline {result['pipeline']['fps']} fps; glass-to-glass median {g['glass_to_glass_ms']['median']:.0f} ms, "
          f"p95 {g['glass_to_glass_ms']['p95']:.0f} ms ({g['frames']} overlays); stale window "
          f"{result['pacing']['stale_after_ms']} ms from {result['pacing']['frame_ms']:.0f} ms per frame")
    print(f"wrote {Path(args.out) / 'suite.json'}, {Path(args.out) / 'suite.md'}"
          + (f", {args.benchmarks_md}" if args.benchmarks_md else "")
          + "".join(f", {f}" for f in result["plots"]["files"]))
    return 0


def _cmd_demo(args) -> int:
    from armscope.demo import run_demo

    run_demo(args.bundle, args.source, args.overlays, Path(args.out), args.timeout, threads=args.threads)
    return 0


def _cmd_keys(args) -> int:
    from armscope.core.protocol import write_keypair

    for name in args.names:  # all checked before any file is written
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or args.names.count(name) > 1:
            raise ArmscopeError(f"--names {name!r}: expected distinct plain names (letters, digits, _ . -), "
                                "each written as NAME.key and NAME.key_secret inside --out")
        for path in (Path(args.out) / f"{name}.key", Path(args.out) / f"{name}.key_secret"):
            if path.exists() and not args.force:
                raise ArmscopeError(f"{path}: already exists (use --force to replace it)")
    for name in args.names:
        public, secret = write_keypair(Path(args.out), name, force=args.force)
        print(f"wrote {public} (public) and {secret} (secret, mode 0600)")
    return 0


def _frame_size(text: str | None):
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ArmscopeError(f"--frame-size {text!r}: expected WIDTHxHEIGHT, e.g. 1600x1200") from None
    if w < 1 or h < 1:
        raise ArmscopeError(f"--frame-size {text!r}: width and height must be positive")
    return w, h


def _cmd_calibration_set(args) -> int:
    from armscope.core.bundle import load_bundle
    from armscope.calibration.calibration_set import build_calibration_set

    check_out_apart(args.out, [*args.inputs, args.bundle])
    _check_output_file(args.out, "--out")
    bundle = load_bundle(args.bundle) if args.bundle else None
    spec = bundle.preprocessing if bundle else None
    gate = None
    if bundle is not None and bundle.manifest.get("tissue_gate"):  # the bundle's modality (e.g. MRI: air)
        from armscope.core.tissue import TissueGate

        gate = TissueGate.from_manifest(bundle.manifest)
    m = build_calibration_set([Path(p) for p in args.inputs], Path(args.out), args.size, spec=spec, gate=gate,
                              frame_size=_frame_size(args.frame_size), per_video=args.per_video,
                              seed=args.seed, force=args.force)
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(m["skipped"].items())) or "none"
    print(f"wrote {args.out}: {m['size']} frames from {len(m['per_source'])} source(s)"
          + (f", classes {m['per_class']}" if m["classes"] else "") + f"; skipped: {skipped}")
    return 0


def _cmd_quantize(args) -> int:
    from armscope.calibration.quantize import make_reduced_bundle

    check_out_apart(args.out, [args.bundle, args.calib, args.labels, *(args.holdout or [])])
    block = make_reduced_bundle(
        Path(args.bundle), Path(args.out), args.precision, calib=Path(args.calib) if args.calib else None,
        method=args.method, keep_fp32=args.keep_fp32, holdout=[Path(p) for p in args.holdout or []] or None,
        labels_csv=Path(args.labels) if args.labels else None, tool=args.tool,
        op_types=[t.strip() for t in args.op_types.split(",")] if args.op_types else None,
        per_channel=not args.per_tensor, force=args.force, force_deployable=args.force_deployable)
    for name, v in block["variants"].items():
        s = v["summary"]
        print(f"{name:<40} top-1 agreement {s['top1_agreement']:.2%}  max|dp| {s['max_abs_delta_p']:.4f}  "
              f"flips pos->neg {s['positive_to_negative_flips']}  CAM r {s['cam_pearson_mean']:.3f}")
    print(f"wrote {args.precision} bundle {args.out} (variant {block['variant']}, evaluated on "
          f"{block['evaluated_on']})")
    if not block["deployable"]:
        print(f"armscope quantize: NOT deployable: {'; '.join(block['gate']['failed'])} "
              "(manifest quantization.deployable false; --force-deployable marks it deployable anyway)", file=sys.stderr)
        return 3
    if block["forced"]:
        print("deployable: forced with --force-deployable despite: " + "; ".join(block["gate"]["failed"]),
              file=sys.stderr)
    return 0


def _cmd_build(args) -> int:
    from armscope.calibration.trt_build import build_bundle

    result = build_bundle(Path(args.bundle), args.precision, calib=Path(args.calib) if args.calib else None,
                          workspace_mb=args.workspace, dla_core=args.dla, out=Path(args.out) if args.out else None,
                          int8_mode=args.int8_mode, max_batch=args.max_batch, force=args.force,
                          holdout=[Path(p) for p in args.holdout or []] or None, layout=args.layout)
    print(result["message"])
    return 0


def _cmd_accuracy(args) -> int:
    from armscope.calibration.accuracy import accuracy_report

    check_out_apart(args.out, [args.bundle, args.candidate, args.labels, *args.images])
    report = accuracy_report(Path(args.bundle), Path(args.candidate) if args.candidate else None,
                             [Path(p) for p in args.images], Path(args.out),
                             labels_csv=Path(args.labels) if args.labels else None, force=args.force,
                             threads=args.threads, backend=args.backend, cpu_precision=args.cpu_precision,
                             exact_qdq=args.exact_qdq)
    s = report["summary"]
    print(f"{s['n_images']} images: top-1 agreement {s['top1_agreement']:.2%}, max|dp| {s['max_abs_delta_p']:.4f}, "
          f"mean|dp| {s['mean_abs_delta_p']:.5f}, flips {s['decision_flips']} "
          f"({s['positive_to_negative_flips']} positive->negative), CAM r {s['cam_pearson_mean']:.4f}, "
          f"focus IoU {s['cam_iou_mean']:.3f}")
    if report["candidate"]["precision"] == "int8" and not args.exact_qdq and args.backend != "tensorrt":
        from armscope.edge.backends.cpu_features import int8_exact

        exact, why = int8_exact()
        if not exact:
            print(f"note: measured with this CPU's INT8 kernels, which are inexact here ({why}); "
                  "--exact-qdq measures the bundle itself", file=sys.stderr)
    print(f"report in {Path(args.out) / 'report.md'}"
          + ("" if not report["gate_reasons"] else f" (gate fails: {'; '.join(report['gate_reasons'])})"))
    if report.get("fidelity_record"):
        speed = report.get("speed")
        if speed:
            print(f"speed, one frame: OpenVINO BF16 {speed['openvino_bf16_s'] * 1000:.0f} ms, ONNX Runtime FP32 "
                  f"{speed['onnxruntime_fp32_s'] * 1000:.0f} ms ({speed['speedup']:.2f}x)")
        faster = bool(speed) and speed["speedup"] > 1.0
        print(f"recorded in {report['fidelity_record']}: --backend auto "
              + ("may now run this bundle in BF16 on CPUs like this one" if faster
                 else "keeps this bundle in FP32 (" + ("gate failed" if report["gate_reasons"] else
                                                       "BF16 not faster here") + ")"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armscope",
        description="Edge deployment toolkit for AR microscopes: Keras ensembles -> ONNX/TensorRT bundles with "
                    "in-graph Grad-CAM, the edge daemon, and the eyepiece bridge. Start with 'armscope demo'.")
    parser.add_argument("--version", action="version", version=f"armscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a member or a K-fold ensemble on a folder of class subfolders (needs [tf])")
    p.add_argument("data_dir")
    p.add_argument("--out", required=True, help="directory for member_N.keras and their .json sidecars")
    p.add_argument("--backbone", default="densenet-mini", choices=["densenet121", "densenet-mini"])
    p.add_argument("--folds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=_SEED, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("armscope.export", help="Keras members -> ONNX bundle with in-graph tiling and Grad-CAM (needs [tf])")
    p.add_argument("members", nargs="*", help=".keras, .h5 or SavedModel directories, one per ensemble member")
    p.add_argument("--weights", action="append", default=[], metavar="FILE.h5",
                   help="weights-only member (repeat per member): a Keras 2 .h5 whose graph cannot be rebuilt; its "
                        "tensors are mapped by name and shape onto --architecture, every match is printed, and a "
                        "partial or ambiguous match is refused. No code from the file runs")
    p.add_argument("--architecture", help="with --weights: the architecture the weights belong to "
                                          "(tiled-densenet121, tiled-densenet-mini)")
    p.add_argument("--input-scaling", choices=["symmetric", "unit", "imagenet"],
                   help="how the model expects RGB 0..255 scaled (symmetric: -1..1, unit: 0..1, imagenet: /255 then "
                        "ImageNet mean/std); required with --weights (weights cannot tell); for model files trained "
                        "on pre-scaled pixels it is prepended in the graph (the manifest says so)")
    p.add_argument("--out", help="bundle directory to create (required unless --explain)")
    p.add_argument("--explain", action="store_true",
                   help="print what each member is (input size, tiling, backbone, feature map, head, per-patch "
                        "heads, final output) and which Grad-CAM form applies, without exporting")
    p.add_argument("--trust-code", action="store_true",
                   help="allow running Python code stored in the model file (Keras Lambda layers and objects "
                        "from outside Keras run their code while the model loads and runs); refused by default")
    p.add_argument("--svm-head", action="append", default=[], metavar="MEMBER=HEAD.joblib",
                   help="MEMBER is a feature extractor (its output: global average pools of feature maps, "
                        "concatenated) and HEAD.joblib its scikit-learn SVC(kernel='rbf', probability=True), alone "
                        "or after a StandardScaler; put in the graph with Platt scaling and libsvm's pairwise "
                        "coupling. A joblib file is a pickle: needs --trust-code. Repeat per member")
    p.add_argument("--scaling", action="append", default=[], metavar="MEMBER=NAME",
                   help="how MEMBER was trained to see RGB 0..255, put in its graph: x/255, x/127.5-1, caffe "
                        "(keras.applications ResNet50's preprocess_input), torch, none (default: the model scales "
                        "itself); recorded in members[i].preprocessing. Repeat per member")
    p.add_argument("--input-size", type=_int_in(16, 8192), metavar="S",
                   help="the bundle's one input S x S (default: the largest member's); a member of another size "
                        "is resized in its own graph (bilinear)")
    p.add_argument("--name")
    p.add_argument("--description", default="")
    p.add_argument("--classes", help="comma-separated class names (default: from the training sidecars)")
    p.add_argument("--task", choices=["binary", "multiclass"])
    p.add_argument("--positive-class")
    p.add_argument("--threshold", type=float, help="decision threshold on the positive class (binary tasks)")
    p.add_argument("--crop", type=_crop_size, default=1024,
                   help="centre crop of the camera frame, pixels; 0: none, the whole image padded to a square")
    p.add_argument("--no-crop", action="store_true", help="whole images (an MRI slice): same as --crop 0")
    p.add_argument("--saliency", action="store_true",
                   help="add a vanilla saliency output (max over channels of |d score / d image| at the input size, "
                        "computed in the graph; whole-image models): about one more backward pass per image")
    p.add_argument("--grey", action="store_true",
                   help="the model was trained on greyscale images replicated to 3 channels (MRI slices): colour "
                        "inputs are turned grey")
    p.add_argument("--bit-depth", choices=["window", "minmax", "scale"],
                   help="how images of more than 8 bits (16-bit PNG/TIFF, DICOM) became 8 bits in training: "
                        "window (--window, else the DICOM file's, else min/max; the default), minmax, scale (x/65535)")
    p.add_argument("--window", metavar="CENTRE,WIDTH", help="the window/level the model was trained with "
                                                            "(default: each DICOM file's own)")
    p.add_argument("--tissue-gate", metavar="mri|KEY=VALUE,...",
                   help="the gate's thresholds for this modality, written to the manifest: 'mri' (air is background, "
                        "armscope.core.tissue.MRI_GATE) or e.g. min_tissue_fraction=0.1,min_brightness=45")
    p.add_argument("--interpolation", default="area", choices=["area", "linear", "cubic", "nearest"])
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--jobs", type=int, default=1, help="members whose graphs cannot share one conversion "
                   "(armscope.export.convert falls back to tf2onnx per member) are converted in this many worker processes")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("inspect", help="print a bundle's manifest and verify every file hash")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("cascade", help="the paper's two steps: a binary bundle whose decision selects a second "
                       "bundle (e.g. IIM -> subtypes), as one self-contained bundle")
    p.add_argument("step_one", help="the binary step-one bundle (positive class and threshold, e.g. IIM vs other at 0.3)")
    p.add_argument("--then", action="append", required=True, metavar="CLASS=BUNDLE_DIR",
                   help="the bundle that classifies a field step one decided as CLASS (repeat per class); "
                        "it must preprocess as step one does")
    p.add_argument("--out", required=True, help="cascade bundle directory to create (the inputs are copied into it)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.set_defaults(func=_cmd_cascade)

    p = sub.add_parser("classify", help="classify camera images with a bundle; slide-level mean; overlays",
                       description="Classify camera images as one slide. As in the daemon, an image without "
                                   "in-focus tissue (blank glass, a white or grey frame, a blurred field) or a "
                                   "damaged image file gets 'no decision' with the reason and is left out of "
                                   "the slide mean; the gate's thresholds are the bundle's (manifest "
                                   "tissue_gate) or the defaults.")
    p.add_argument("images", nargs="+")
    p.add_argument("--bundle", required=True)
    p.add_argument("--json", help="write the per-image and slide results here")
    p.add_argument("--overlay-dir", help="write Grad-CAM overlay PNGs (and saliency PNGs, when the bundle has them) "
                                         "into this (new) directory, over each original image")
    p.add_argument("--contact-sheet", metavar="OUT.png", help="write one PNG with every image's explanations "
                                                              "(and the images without a decision, with the reason)")
    p.add_argument("--window", metavar="CENTRE,WIDTH",
                   help="window/level for DICOM and 16-bit images, instead of the bundle's or the file's")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="auto: TensorRT where the bundle has engines for this GPU, else onnxruntime (openvino "
                        "for INT8 bundles on VNNI/AMX CPUs, and BF16 for FP32 bundles whose BF16 fidelity is recorded, "
                        "on CPUs with BF16, when installed: faster there; edge/backends/select.py); "
                        "openvino: the other CPU runtime (pip install armscope[openvino])")
    p.add_argument("--cpu-precision", default="f32", choices=list(CPU_PRECISIONS),
                   help="openvino only: inference precision (bf16 needs AVX512-BF16 or AMX; check it with "
                        "'armscope accuracy' first). auto chooses its own: BF16 where the CPU has it and "
                        "'armscope accuracy --backend openvino --cpu-precision bf16' recorded a passing gate")
    p.add_argument("--layout", default="auto", choices=["auto", "merged", "members"],
                   help="concurrent per-member sessions or one merged-ensemble session; auto (default): "
                        "members for ONNX Runtime and TensorRT, merged for OpenVINO (the faster each, BENCHMARKS.md)")
    p.add_argument("--threads", type=_THREADS, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--threshold", type=float, help="override the manifest's decision threshold")
    p.add_argument("--force", action="store_true", help="replace an existing overlay directory")
    p.set_defaults(func=_cmd_classify)

    # Everything after "bridge" goes to armscope.firmware_bridge.cli.main, which has its own
    # parsers; prefix_chars="+" stops this one from claiming --options for itself.
    p = sub.add_parser("bridge", prefix_chars="+", add_help=False,
                       help="eyepiece side: 'bridge [run] --connect EP --display URI' (daemon -> display), "
                       "'bridge simulate' (display controller on a pty), 'bridge register' (camera->display "
                       "homography); 'bridge --help' for details")
    p.add_argument("rest", nargs="*")
    p.set_defaults(func=_cmd_bridge)

    p = sub.add_parser("calibration-set", help="sample preprocessed calibration frames from images/videos (INT8)")
    p.add_argument("inputs", nargs="+", help="image/video files or directories (class subfolders are strata)")
    p.add_argument("--out", required=True, help="CALIB.npz to write")
    p.add_argument("--size", type=_int_in(1), required=True, help="number of usable frames to sample")
    p.add_argument("--bundle", help="take the preprocessing from this bundle (default: 1024 crop -> 640, area)")
    p.add_argument("--frame-size", help="cut WIDTHxHEIGHT camera-sized windows from larger still images")
    p.add_argument("--per-video", type=_int_in(1), default=64, help="candidate frames per video, evenly spaced")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_calibration_set)

    p = sub.add_parser("quantize", help="INT8 (Q/DQ) or FP16 bundle from an FP32 bundle, measured against it")
    p.add_argument("bundle", help="the FP32 bundle")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--precision", default="int8", choices=["int8", "fp16"])
    p.add_argument("--calib", help="CALIB.npz from 'armscope calibration-set' (int8)")
    p.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--keep-fp32", default="auto",
                   help="auto (measure all-INT8 and first_conv,heads,cam in FP32; keep the better), none, "
                        "or a comma list of first_conv, heads, cam")
    p.add_argument("--holdout", nargs="+", help="hold-out camera images/dirs for the deployability gate")
    p.add_argument("--labels", help="CSV image,label for the hold-out (AUC)")
    p.add_argument("--tool", default="ort", choices=["ort", "modelopt"])
    p.add_argument("--op-types", help="ops to quantize (default Conv,MatMul,Gemm)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--force-deployable", action="store_true",
                   help="mark the bundle deployable even if it fails the accuracy gate (recorded as forced)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("build", help="TensorRT engines for a bundle on this GPU (prepares FP16/Q-DQ ONNX without one)",
                       description="Build TensorRT engines on this device into BUNDLE/engines/<key>/ (key: bundle "
                                   "hash, precision, TensorRT version, GPU, DLA core), where 'run' and 'classify "
                                   "--backend auto' with the same BUNDLE find them; the last build that fits the "
                                   "device is the one that runs.")
    p.add_argument("bundle")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"])
    p.add_argument("--calib", help="CALIB.npz: to make the Q/DQ bundle, or for --int8-mode implicit")
    p.add_argument("--int8-mode", default="explicit", choices=["explicit", "implicit"],
                   help="explicit: Q/DQ ONNX; implicit: IInt8EntropyCalibrator2 (TensorRT 10.x/JetPack only)")
    p.add_argument("--workspace", type=_int_in(1), default=2048, help="builder workspace, MB")
    p.add_argument("--dla", type=int, help="DLA core (Jetson Xavier/Orin), with GPU fallback")
    p.add_argument("--max-batch", type=_int_in(1, 4096), default=1)
    p.add_argument("--layout", default="members", choices=["members", "merged"],
                   help="members (default): one engine per member, what the TensorRT backend runs by default; "
                        "merged: one engine for the merged ensemble (for --layout merged at run time)")
    p.add_argument("--out", help="where a derived FP16/INT8 bundle goes (default BUNDLE-PRECISION; reused if it "
                                 "was made from BUNDLE, unless --force)")
    p.add_argument("--holdout", nargs="+", help="hold-out images for the derived bundle's gate")
    p.add_argument("--force", action="store_true", help="replace an existing derived bundle")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("accuracy", help="report: reduced-precision bundle vs its FP32 bundle on real images")
    p.add_argument("--bundle", required=True, help="the FP32 reference bundle")
    p.add_argument("--candidate", help="the INT8/FP16 bundle (default: --bundle itself, on --backend)")
    p.add_argument("--backend", default="onnxruntime", choices=[b for b in BACKENDS if b != "auto"],
                   help="run the candidate on this backend (what will be deployed); the reference runs on "
                        "onnxruntime FP32")
    p.add_argument("--cpu-precision", default="f32", choices=list(CPU_PRECISIONS),
                   help="openvino inference precision for the candidate, e.g. bf16; without --candidate, bf16's "
                        "gate verdict is recorded in BUNDLE/fidelity/ for --backend auto")
    p.add_argument("--exact-qdq", action="store_true",
                   help="onnxruntime: compute the candidate's Q/DQ exactly (as TensorRT and VNNI/AMX CPUs do), "
                        "not with this CPU's INT8 kernels")
    p.add_argument("--images", required=True, nargs="+", help="camera images or directories")
    p.add_argument("--labels", help="CSV image,label (AUC)")
    p.add_argument("--out", required=True, help="report directory to create")
    p.add_argument("--threads", type=_THREADS)
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.set_defaults(func=_cmd_accuracy)

    from armscope.edge.config import add_arguments

    p = sub.add_parser("run", help="the real-time edge daemon: camera -> ensemble -> Grad-CAM overlays on ZeroMQ")
    add_arguments(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="end-to-end latency and fps of the daemon pipeline on a config's source")
    add_arguments(p)
    p.add_argument("--frames", type=_int_in(1), default=50, help="overlays to measure (after warm-up)")
    p.add_argument("--warmup", type=_int_in(0), default=3, help="overlays to discard first")
    p.add_argument("--json", dest="json", help="write the report here")
    p.add_argument("--plot", help="write a latency histogram PNG here")
    p.add_argument("--suite", action="store_true",
                   help="the whole benchmark suite: every stage, inference per backend x precision x layout x "
                   "ensemble size (1, 3, 5) with peers and the CPU's limit, the pipeline, glass-to-glass latency, "
                   "power where known (docs/latency.md)")
    p.add_argument("--out", help="--suite: directory for suite.json, suite.md and plots")
    p.add_argument("--quick", action="store_true", help="--suite: a reduced run (fewer paths and rounds; CI)")
    p.add_argument("--rounds", type=_int_in(2), help="--suite: interleaved rounds per path (default 10, quick 3)")
    p.add_argument("--extra-bundle", action="append", help="--suite: also time this bundle (e.g. its INT8 or FP16 form)")
    p.add_argument("--keras", nargs="+", help="--suite: the Keras members, for the Keras predict peer (needs [tf])")
    p.add_argument("--benchmarks-md", help="--suite: regenerate the suite's section of this BENCHMARKS.md")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="daemon + eyepiece bridge on the bundled real H&E frames, on the CPU: "
                       "prints decisions and latency, writes what the eyepiece display shows")
    p.add_argument("--bundle", default="samples/demo_bundle")
    p.add_argument("--source", default="dir://samples/frames/?fps=2&loop=1", help="camera URI (see 'run --help')")
    p.add_argument("--overlays", type=int, default=8, help="stop after this many overlays reached the eyepiece")
    p.add_argument("--out", default="out/demo", help="eyepiece PNGs go to OUT/eyepiece")
    p.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds")
    p.add_argument("--threads", type=_int_in(0, 256), default=0, help="inference threads (0 = all cores)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("keys", help="make CurveZMQ keypairs for the daemon's sockets (server, client)")
    p.add_argument("--out", required=True, help="directory for NAME.key and NAME.key_secret")
    p.add_argument("--names", nargs="+", default=["server", "client"])
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=_cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2): returned, as from the commands themselves
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return rc
    except ArmscopeError as exc:
        print(f"armscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` or a pager that quit: not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet
        # (the recipe in Python's signal module documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as exc:
        # An output or input path the system refused (permission, a file where a directory is needed, a
        # directory where a file is): name it, as every other bad input is named, instead of a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"armscope {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
