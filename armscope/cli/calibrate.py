"""``armscope calibration-set``, ``quantize``, ``build``, ``front`` and ``accuracy``: reduced-precision bundles and TensorRT engines, measured against FP32."""
from __future__ import annotations

import sys
from pathlib import Path

from armscope.cli.common import SEED, THREADS, int_in
from armscope.edge.backends import BACKENDS, CPU_PRECISIONS

def _cmd_calibration_set(args) -> int:
    from armscope.calibration.calibration_set import build_calibration_set

    m = build_calibration_set([Path(p) for p in args.inputs], Path(args.out), args.size,
                              bundle=Path(args.bundle) if args.bundle else None, frame_size=args.frame_size,
                              per_video=args.per_video, seed=args.seed, force=args.force)
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(m["skipped"].items())) or "none"
    print(f"wrote {args.out}: {m['size']} frames from {len(m['per_source'])} source(s)"
          + (f", classes {m['per_class']}" if m["classes"] else "") + f"; skipped: {skipped}")
    return 0


def _cmd_quantize(args) -> int:
    from armscope.calibration.quantize import make_reduced_bundle

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
                          holdout=[Path(p) for p in args.holdout or []] or None, layout=args.layout,
                          feed=args.feed)
    print(result["message"])
    return 0


def _cmd_front(args) -> int:
    from armscope.calibration.accuracy import list_images
    from armscope.export.uint8_front import add_front

    block = add_front(Path(args.bundle), list_images([Path(p) for p in args.images]), force=args.force)
    par = block["parity"]
    print(f"wrote {Path(args.bundle) / block['file']}: {block['input']['dtype']} {block['input']['shape']} "
          f"{block['input']['channel_order']} -> the model input; resize {block['resize']['method']} "
          f"({block['resize']['implementation']})")
    print(f"parity with the CPU preprocessing on {par['images']} images: max |pixel| {par['max_abs_pixel']:g}, "
          f"max |dp| {par['max_abs_delta_p']:.2g}, CAM r min {par['cam_pearson_min']}, decision flips "
          f"{par['decision_flips']}; recorded in the manifest (uint8_front)")
    return 0


def _cmd_accuracy(args) -> int:
    from armscope.calibration.accuracy import accuracy_report

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
            print("speed, one frame, interleaved: " + ", ".join(
                f"{name} {s * 1000:.0f} ms" for name, s in sorted(speed["paths_s"].items(), key=lambda kv: kv[1]))
                  + f" (BF16 {speed['bf16_layout']}: {speed['speedup']:.2f}x ONNX Runtime FP32)")
            from armscope.core.cpus import usable_cpus

            busy = max(speed.get("load_average_1min") or [0.0])
            if busy > usable_cpus():
                print(f"note: timed while the machine was busy (1-minute load {busy:.1f} on {usable_cpus()} CPUs): "
                      "which path is fastest can change with the load (BENCHMARKS.md section 4); record again "
                      "with the machine as it will run", file=sys.stderr)
        faster = bool(speed) and speed["speedup"] > 1.0
        print(f"recorded in {report['fidelity_record']}: --backend auto "
              + ("may now run this bundle in BF16 on CPUs like this one" if faster
                 else "keeps this bundle in FP32 (" + ("gate failed" if report["gate_reasons"] else
                                                       "BF16 not faster here") + ")"))
    return 0



def add_parsers(sub) -> None:
    p = sub.add_parser("calibration-set", help="sample preprocessed calibration frames from images/videos (INT8)")
    p.add_argument("inputs", nargs="+", help="image/video files or directories (class subfolders are strata)")
    p.add_argument("--out", required=True, help="CALIB.npz to write")
    p.add_argument("--size", type=int_in(1), required=True, help="number of usable frames to sample")
    p.add_argument("--bundle", help="take the preprocessing from this bundle (default: 1024 crop -> 640, area)")
    p.add_argument("--frame-size", help="cut WIDTHxHEIGHT camera-sized windows from larger still images")
    p.add_argument("--per-video", type=int_in(1), default=64, help="candidate frames per video, evenly spaced")
    p.add_argument("--seed", type=SEED, default=0)
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
                                   "hash, precision, TensorRT version, GPU, DLA core, feed), where 'run' and 'classify "
                                   "--backend auto' with the same BUNDLE find them; the last build that fits the "
                                   "device is the one that runs.")
    p.add_argument("bundle")
    p.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"])
    p.add_argument("--calib", help="CALIB.npz: to make the Q/DQ bundle, or for --int8-mode implicit")
    p.add_argument("--int8-mode", default="explicit", choices=["explicit", "implicit"],
                   help="explicit: Q/DQ ONNX; implicit: IInt8EntropyCalibrator2 (TensorRT 10.x/JetPack only)")
    p.add_argument("--workspace", type=int_in(1), default=2048, help="builder workspace, MB")
    p.add_argument("--dla", type=int, help="DLA core (Jetson Xavier/Orin), with GPU fallback")
    p.add_argument("--max-batch", type=int_in(1, 4096), default=1)
    p.add_argument("--layout", default="members", choices=["members", "merged"],
                   help="members (default): one engine per member, what the TensorRT backend runs by default; "
                        "merged: one engine for the merged ensemble (for --layout merged at run time)")
    p.add_argument("--feed", default="float32", choices=["float32", "uint8"],
                   help="uint8: engines that take the camera crop as uint8 through the bundle's uint8 front "
                        "('armscope front'), resized on the GPU; for 'run --feed uint8' (kept beside float32 sets)")
    p.add_argument("--out", help="where a derived FP16/INT8 bundle goes (default BUNDLE-PRECISION; reused if it "
                                 "was made from BUNDLE, unless --force)")
    p.add_argument("--holdout", nargs="+", help="hold-out images for the derived FP16/INT8 bundle's accuracy gate "
                                                "(needed when build makes that bundle)")
    p.add_argument("--force", action="store_true", help="replace an existing derived bundle")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("front", help="add the uint8 front to a bundle (the camera crop in, resized in the graph), "
                       "its parity with the CPU preprocessing measured on real frames")
    p.add_argument("--bundle", required=True, help="bundle directory (changed in place: front_uint8.onnx + manifest)")
    p.add_argument("--images", nargs="+", required=True, help="real camera frames (files or directories)")
    p.add_argument("--force", action="store_true", help="replace an existing front")
    p.set_defaults(func=_cmd_front)

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
    p.add_argument("--threads", type=THREADS)
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.set_defaults(func=_cmd_accuracy)
