"""``armscope front``: add the uint8 front (``armscope.core.front``) to a bundle,
with its parity against the CPU preprocessing measured on real frames and
written into the manifest beside it.

Why measured per bundle and not assumed: the front computes OpenCV's own
weights, but OpenCV rounds some interpolations through fixed-point
arithmetic on uint8 (``linear``: an output level may differ by 1), and what
a one-level difference does to the probabilities and the Grad-CAM depends on
the model. So the command runs the bundle's merged graph on every image both
ways (``preprocess_frame`` + float32 input; the camera crop + the composed
uint8 graph) on ONNX Runtime and records the pixel, probability and CAM
differences in ``uint8_front.parity``; ``classify``/the daemon read it, and a
bundle whose front changes a decision is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from armscope.core import front
from armscope.core.bundle import MANIFEST, load_bundle, sha256_file
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import load_image, preprocess_frame


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def measure_parity(bundle, front_path: Path, images: list[Path]) -> dict:
    """The bundle's merged graph on ``images`` fed both ways: max |pixel| and
    share of differing input values, max |probability| difference, decision
    flips, and the Pearson correlation of each CAM (its minimum)."""
    spec = bundle.preprocessing
    outputs = [o for o in ("probs", "cam") if o in bundle.output_names]
    with tempfile.TemporaryDirectory(prefix="armscope-front-") as tmp:
        composed = front.compose(front_path, bundle.ensemble_path, Path(tmp) / "ensemble_uint8.onnx")
        reference, candidate, alone = (_session(bundle.ensemble_path), _session(composed), _session(front_path))
        pixel_max, pixel_share, dp, cam_r, flips = 0.0, [], 0.0, [], 0
        pos = bundle.classes.index(bundle.task["positive_class"]) if "positive_class" in bundle.task else None
        threshold = bundle.task.get("threshold", 0.5)
        for path in images:
            frame = load_image(path)
            x = preprocess_frame(frame, spec, source=str(path))[None]
            crop = front.camera_crop(frame, spec, source=str(path))[None]
            made = alone.run([front.OUTPUT], {front.INPUT: crop})[0]
            pixel_max = max(pixel_max, float(np.abs(made - x).max()))
            pixel_share.append(float((made != x).mean()))
            ref = dict(zip(outputs, reference.run(outputs, {"image": x})))
            got = dict(zip(outputs, candidate.run(outputs, {front.INPUT: crop})))
            dp = max(dp, float(np.abs(ref["probs"] - got["probs"]).max()))
            if pos is not None:
                flips += int((ref["probs"][0, pos] >= threshold) != (got["probs"][0, pos] >= threshold))
            else:
                flips += int(np.argmax(ref["probs"][0]) != np.argmax(got["probs"][0]))
            if "cam" in ref:
                for a, b in zip(ref["cam"][0], got["cam"][0]):
                    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
                    cam_r.append(1.0 if np.array_equal(a, b) else float(np.corrcoef(a, b)[0, 1]))
    return {"images": len(images), "images_from": sorted({str(Path(p).parent) for p in images}),
            "max_abs_pixel": pixel_max, "pixels_differing": max(pixel_share) if pixel_share else 0.0,
            "max_abs_delta_p": dp, "decision_flips": flips,
            "cam_pearson_min": min(cam_r) if cam_r else None, "runtime": "onnxruntime, merged graph"}


def add_front(bundle_dir: Path, images: list[Path], force: bool = False) -> dict:
    """Write ``front_uint8.onnx`` into the bundle and its ``uint8_front`` block
    (file, sha256, input, resize method, parity on ``images``) into the manifest."""
    if not images:
        raise ArmscopeError("--images: give real camera frames (e.g. samples/frames) to measure the front's parity on")
    bundle = load_bundle(bundle_dir)
    if front.entry(bundle) and not force:
        raise ArmscopeError(f"{bundle.root}: already has a uint8 front ({front.entry(bundle)['file']}); --force "
                            "replaces it")
    import onnx

    graph = onnx.load(str(bundle.ensemble_path), load_external_data=False)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    model, how = front.front_model(bundle.preprocessing, opset, graph.ir_version)
    path = bundle.root / front.FILE
    onnx.save(model, str(path))
    parity = measure_parity(bundle, path, images)
    if parity["decision_flips"]:
        path.unlink()
        raise ArmscopeError(f"{bundle.root}: the uint8 front changed {parity['decision_flips']} decision(s) on "
                            f"{parity['images']} images (max |dp| {parity['max_abs_delta_p']:.3g}); not added")
    spec = bundle.preprocessing
    block = {
        "file": front.FILE, "sha256": sha256_file(path),
        "input": {"name": front.INPUT, "shape": ["N", spec.center_crop, spec.center_crop, 3], "dtype": "uint8",
                  "channel_order": "BGR", "what": "the camera frame's centre crop, as captured"},
        "resize": {"method": spec.interpolation, "from": spec.center_crop, "to": spec.resize,
                   "implementation": how + ", then Round (half to even, as OpenCV's uint8 result) and Clip 0..255; "
                   "weights read off OpenCV's cv2.resize (not ONNX Resize, which has no INTER_AREA)"},
        "parity": parity,
    }
    manifest = json.loads((bundle.root / MANIFEST).read_text())
    manifest["uint8_front"] = block
    tmp = bundle.root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, bundle.root / MANIFEST)
    load_bundle(bundle.root)  # the manifest still validates and its hashes match
    return block
