"""``armscope inspect``, ``cascade`` and ``classify``: looking at bundles and running them on images."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from armscope.cli.common import THREADS
from armscope.edge.backends import BACKENDS, CPU_PRECISIONS


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
    if m.get("description"):
        print(f"about       {' '.join(str(m['description']).split())}")
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
    if (front := m.get("uint8_front")) is not None:
        print(f"uint8 front {front['file']}  sha256 {front['sha256'][:16]}...  ok  (feed uint8: the camera crop in)")
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
    from armscope.edge.cascade import assemble, parse_steps

    then = parse_steps(args.then)
    bundle = assemble(Path(args.step_one), then, Path(args.out), force=args.force)
    steps = ", ".join(f"{s['when']} -> {s['bundle']}" for s in bundle.task["steps"])
    print(f"wrote cascade bundle {bundle.root}: {bundle.task['positive_class']!r} at {bundle.task['threshold']}; {steps}")
    return 0


def _cmd_classify(args) -> int:
    from armscope.core.errors import check_output_dir, check_output_file
    from armscope.edge.classify import classify_images

    # before the images are classified, named as given (not the temporary names the outputs are staged under)
    check_output_file(args.json, "--json")
    check_output_file(args.contact_sheet, "--contact-sheet")
    check_output_dir(args.overlay_dir, "--overlay-dir")
    window = None
    if args.window:
        from armscope.core.preprocess import parse_window

        window = parse_window(args.window)
    options = {"layout": args.layout, "cpu_precision": args.cpu_precision, "feed": args.feed}
    if args.threads:
        options["threads"] = args.threads
    report = classify_images(Path(args.bundle), [Path(p) for p in args.images],
                             json_out=Path(args.json) if args.json else None,
                             overlay_dir=Path(args.overlay_dir) if args.overlay_dir else None,
                             backend=args.backend, threshold=args.threshold, force=args.force, window=window,
                             contact_sheet=Path(args.contact_sheet) if args.contact_sheet else None, **options)
    from armscope.core.bundle import MANIFEST, description_line

    # the bundle's own word on what it is (e.g. DEMO ONLY): read after classify_images verified the bundle;
    # on stderr, so stdout stays the results table that scripts read
    if (about := description_line(json.loads((Path(args.bundle) / MANIFEST).read_text()))) is not None:
        print(about, file=sys.stderr)
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



def add_parsers(sub) -> None:
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
    p.add_argument("--threads", type=THREADS, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--feed", default="float32", choices=["float32", "uint8"],
                   help="uint8: give the backend the camera crop and let the bundle's uint8 front resize it in "
                        "the graph ('armscope front' adds one; TensorRT: engines from 'armscope build --feed uint8')")
    p.add_argument("--threshold", type=float, help="override the manifest's decision threshold")
    p.add_argument("--force", action="store_true", help="replace an existing overlay directory")
    p.set_defaults(func=_cmd_classify)
