"""Offline classification of camera-sized images with a bundle: per-image and
slide-level (mean over the images, as in the paper) probabilities, decisions,
and Grad-CAM overlay PNGs for review.

The same safety rule as the daemon: an image without in-focus tissue (blank
glass, a white or grey frame, a blurred field; ``armscope.core.tissue.TissueGate`` with
the bundle's thresholds; for an MRI bundle a slice of air) or a damaged image
file gets "no decision" with the reason, never a diagnosis, and is left out of
the slide mean.

Files are read by ``armscope.core.preprocess.read_frame`` (PNG/JPEG/TIFF/BMP, 16-bit,
DICOM), converted as the bundle's manifest says. Whole-image bundles (no centre
crop) and bundles with a saliency output get their explanations drawn by
``armscope.edge.review`` on the original image with a caption; ``contact_sheet`` puts all
images on one PNG."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np

from armscope.core.bundle import Bundle, load_bundle, require_deployable, staged_directory
from armscope.core.errors import ArmscopeError
from armscope.core.imagefile import CorruptImage, NotAnImage
from armscope.core.preprocess import crop_box, gate_region, preprocess_frame, read_frame
from armscope.edge.backends import open_backend
from armscope.edge.cascade import SubtypeMeans, load_steps
from armscope.core.decision import check_threshold, decide
from armscope.core.overlay import blend_on_frame
from armscope.core.tissue import TissueGate

log = logging.getLogger(__name__)


def _probs_dict(classes, probs) -> dict:
    return {c: round(float(p), 6) for c, p in zip(classes, probs)}


class Classifier:
    """A bundle with its backend, plus the second steps of a cascade task
    (``armscope.edge.cascade``) with theirs. The backends are activated on the thread
    that constructs the classifier, which is the one that runs it (a CUDA
    context is current per thread); ``close`` frees them."""

    def __init__(self, bundle: Bundle, backend: str = "auto", **backend_options):
        self.bundle = bundle
        self.cascade = load_steps(bundle)  # checked before any backend opens
        self.backend = open_backend(bundle, backend, **backend_options)
        self.steps: dict[str, Classifier] = {}
        try:
            self.backend.activate()
            for when, step in self.cascade.items():
                self.steps[when] = Classifier(step.bundle, backend, **backend_options)
        except BaseException:
            self.close()
            raise

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.backend.infer(batch)

    def decide(self, probs: np.ndarray, threshold: float | None = None) -> dict:
        return decide(probs, self.bundle.task, threshold)

    def close(self):
        self.backend.close()
        for sub in self.steps.values():
            sub.close()


REASON_CORRUPT = "corrupt_image"
EXCLUDED_NOTE = "images without a decision (no tissue, out of focus, corrupt) are left out of the slide mean"


def _gate(path: Path, spec, gate: TissueGate, window=None,
          feed: str = "float32") -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """(frame, model input, gate result) for one image. The daemon's gate decides
    whether it gets a decision; a damaged image file (``armscope.core.imagefile``,
    ``armscope.core.dicomfile``) gets none either, and neither does a file whose
    bytes are no image at all (empty, text, a copy cut off before its header):
    among camera images that is a damaged frame, as the daemon counts it, and one
    such file must not stop the others being classified. A path that is missing,
    a directory or unreadable, and an image smaller than the crop, are what the
    user asked for being wrong, so they raise, naming the file."""
    try:
        frame, info = read_frame(path, spec, window)
    except (CorruptImage, NotAnImage) as exc:
        return None, None, {"reason": REASON_CORRUPT, "detail": str(exc), "measures": None, "input": None}
    if feed == "uint8":  # the camera crop as it is: the bundle's uint8 front resizes it in the graph
        from armscope.core.front import camera_crop

        batch = camera_crop(frame, spec, source=str(path))
    else:
        batch = preprocess_frame(frame, spec, source=str(path))
    measures = gate.measure(gate_region(frame, spec))
    reason = gate.verdict(measures)
    detail = None if reason is None else gate.explain(reason, measures)
    return frame, batch, {"reason": reason, "detail": detail, "measures": measures, "input": info}


def check_outputs(bundle_dir, images, json_out=None, overlay_dir=None, contact_sheet=None) -> None:
    """Refuse, before any work, outputs that would overwrite or sit inside an input, or that
    cannot be written (the option named as the CLI spells it)."""
    from armscope.core.bundle import check_out_apart
    from armscope.core.errors import output_file_problem

    inputs = [bundle_dir, *images]
    if overlay_dir:
        check_out_apart(overlay_dir, inputs, "--overlay-dir")
    for path, option in ((contact_sheet, "--contact-sheet"), (json_out, "--json")):
        if not path:
            continue
        check_out_apart(path, inputs, option)
        if (problem := output_file_problem(path)) is not None:
            raise ArmscopeError(f"{option} {path}: {problem}")
        if option == "--contact-sheet" and Path(path).suffix.lower() != ".png":
            raise ArmscopeError(f"--contact-sheet {path}: expected a .png file name")


def classify_images(
    bundle_dir: Path,
    images: list[Path],
    json_out: Path | None = None,
    overlay_dir: Path | None = None,
    backend: str = "auto",
    threshold: float | None = None,
    force: bool = False,
    window: tuple[float, float] | None = None,
    contact_sheet: Path | None = None,
    **backend_options,
) -> dict:
    """Classify ``images`` as one slide. Every image is read and checked before
    any inference, so a bad file fails the run before anything is written.
    Images without in-focus tissue, and damaged image files, get no decision
    (as in the daemon) and are left out of the slide mean."""
    if not images:
        raise ArmscopeError("no images given")
    check_outputs(bundle_dir, images, json_out, overlay_dir, contact_sheet)
    bundle = require_deployable(load_bundle(bundle_dir))
    if threshold is not None:
        threshold = check_threshold(threshold, bundle.task, "--threshold")
    spec = bundle.preprocessing
    gate = TissueGate.from_manifest(bundle.manifest)
    feed = backend_options.get("feed", "float32")
    if feed != "float32":
        from armscope.core.front import require

        require(bundle, feed)  # before any image is read
    checked = [_gate(Path(p), spec, gate, window, feed) for p in images]
    kept = [i for i, (_, _, g) in enumerate(checked) if g["reason"] is None]
    classifier = Classifier(bundle, backend, **backend_options)
    try:
        batch = np.stack([checked[i][1] for i in kept]) if kept else None
        done, cams = _run(classifier, batch, [images[i] for i in kept], threshold) if kept else ([], [])
    finally:
        classifier.close()
    results, by_index = [], dict(zip(kept, zip(done, cams)))
    for i, path in enumerate(images):
        g = checked[i][2]
        if i in by_index:
            results.append({**by_index[i][0], "gate": g["measures"], "input": g["input"]})
        else:
            results.append({"image": str(path), "probs": None, "decision": None,
                            "no_decision": {"reason": g["reason"], "detail": g["detail"]}, "gate": g["measures"],
                            "input": g["input"]})
    slide = {"n_images": len(images), "n_classified": len(kept),
             "excluded": [r["image"] for r in results if r["decision"] is None], "note": EXCLUDED_NOTE}
    slide_decision = None
    if kept:
        slide_probs = np.mean([r["_probs"] for r in done], axis=0)
        slide_decision = classifier.decide(slide_probs, threshold)
        slide.update(probs=_probs_dict(bundle.classes, slide_probs), decision=slide_decision)
    else:
        slide.update(probs=None, decision=None,
                     no_decision={"reason": "no_classified_image", "detail": "no image was classified: "
                                  + ", ".join(sorted({r["no_decision"]["reason"] for r in results}))})
    report = {
        "bundle": bundle.manifest["name"],
        "backend": classifier.backend.describe(),
        "classes": bundle.classes,
        "tissue_gate": {f: getattr(gate, f) for f in gate.__dataclass_fields__},
        "images": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "slide": slide,
    }
    if classifier.cascade:
        # as the daemon's slide records: the slide decision's second step, over the images step one sent there
        means = SubtypeMeans(classifier.cascade)
        for r in done:
            if r.get("subtype") is not None:
                means.add(r["subtype"]["when"], r["subtype"]["probs"])
        slide["subtype"] = means.result(slide_decision["label"] if slide_decision else None)
        slide["images_per_step"] = means.counts()
    review = spec.center_crop == 0 or "saliency" in bundle.output_names
    if overlay_dir is not None and review:
        with staged_directory(Path(overlay_dir), overwrite=force) as stage:
            for i, (result, maps) in zip(kept, zip(done, cams)):
                for kind, image in _explanations(bundle, checked[i][0], {**result, "input": checked[i][2]["input"]},
                                                 maps):
                    target = stage / f"{Path(images[i]).stem}_{'overlay' if kind == 'Grad-CAM' else 'saliency'}.png"
                    _write_png(target, image)
    elif overlay_dir is not None:
        with staged_directory(Path(overlay_dir), overwrite=force) as stage:
            for i, (result, maps) in zip(kept, zip(done, cams)):
                cam = maps["cam"]
                frame, path = checked[i][0], images[i]
                # each class with its own probability, as the eyepiece label (armscope.firmware_bridge.label)
                d = result["decision"]
                label = f"{d['label']} {result['probs'][d['label']]:.2f}"
                if result.get("subtype") is not None:
                    sub = result["subtype"]
                    label += f" > {sub['decision']['label']} {sub['probs'][sub['decision']['index']]:.2f}"
                out = blend_on_frame(frame, cam, crop_box(frame.shape, spec), label)
                target = stage / f"{Path(path).stem}_overlay.png"
                if not cv2.imwrite(str(target), out):
                    raise ArmscopeError(f"{target}: could not write the overlay PNG")
    if contact_sheet is not None:
        _write_contact_sheet(Path(contact_sheet), bundle, images, checked, dict(zip(kept, zip(done, cams))))
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_out.with_name(f".{json_out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(json_out)
    return report


def _run(classifier: Classifier, batch: np.ndarray, images: list[Path], threshold):
    outputs = classifier.run(batch)
    classes = classifier.bundle.classes
    results, cams = [], []
    for i, path in enumerate(images):
        probs = outputs["probs"][i]
        decision = classifier.decide(probs, threshold)
        result = {"image": str(path), "probs": _probs_dict(classes, probs), "decision": decision, "_probs": probs}
        maps = {"cam": outputs["cam"][i, decision["index"]],
                "saliency": outputs["saliency"][i, decision["index"]] if "saliency" in outputs else None}
        sub = classifier.steps.get(decision["label"])
        if sub is not None:  # the same preprocessed field (armscope.edge.cascade checked the preprocessing matches)
            sub_out = sub.run(batch[i : i + 1])
            result["subtype"] = classifier.cascade[decision["label"]].result(sub_out["probs"][0])
            index = result["subtype"]["decision"]["index"]
            maps = {"cam": sub_out["cam"][0, index],
                    "saliency": sub_out["saliency"][0, index] if "saliency" in sub_out else None}
        results.append(result)
        cams.append(maps)
    return results, cams


def _write_png(target: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(target), image):
        raise ArmscopeError(f"{target}: could not write the PNG")


def _headline(bundle: Bundle, result: dict) -> tuple[str, bool]:
    """'tuber  p = 0.87 (threshold 0.50)' and whether the decision is the positive class."""
    d = result["decision"]
    task = bundle.task
    label = d["label"]
    text = f"{label}  p = {result['probs'][label]:.2f}"
    if "positive_class" in task:
        pos = task["positive_class"]
        text = f"{label}  p({pos}) = {result['probs'][pos]:.2f}, threshold {d.get('threshold', task['threshold']):.2f}"
    if result.get("subtype") is not None:
        sub = result["subtype"]
        text += f" > {sub['decision']['label']} {sub['probs'][sub['decision']['index']]:.2f}"
    return text, label == task.get("positive_class", label)


def _explanations(bundle: Bundle, frame: np.ndarray, result: dict, maps: dict):
    """(kind, image) pairs for one classified image: Grad-CAM, and saliency when the bundle has it."""
    from armscope.edge.review import explanation_image

    box = crop_box(frame.shape, bundle.preprocessing)
    headline, positive = _headline(bundle, result)
    name = Path(result["image"]).name
    source = result.get("input") or {}
    how = f"{source.get('format', '')} {source.get('bit_depth', 8)}-bit, {source.get('conversion', '')}"
    target = result["decision"]["label"]
    out = [("Grad-CAM", explanation_image(frame, box, "Grad-CAM", maps["cam"], headline,
                                          f"Grad-CAM of '{target}' | {name} | {how}", positive))]
    if maps.get("saliency") is not None:
        out.append(("saliency", explanation_image(frame, box, "saliency", maps["saliency"], headline,
                                                  f"saliency |d score/d pixel| of '{target}' | {name} | {how}",
                                                  positive)))
    return out


def _write_contact_sheet(target: Path, bundle: Bundle, images, checked, by_index: dict) -> None:
    """All images on one PNG: each classified one with its explanations, the others
    greyed with the reason they got no decision. Written to a temporary name, then
    renamed into place."""
    from armscope.edge.review import contact_sheet, decision_colour, explanation_panel, greyed

    cells = []
    for i, path in enumerate(images):
        frame, _, g = checked[i]
        name = Path(path).name
        if i in by_index:
            result, maps = by_index[i]
            headline, positive = _headline(bundle, result)
            box = crop_box(frame.shape, bundle.preprocessing)
            panels = [("Grad-CAM", explanation_panel(frame, box, "Grad-CAM", maps["cam"])[0])]
            if maps.get("saliency") is not None:
                panels.append(("saliency", explanation_panel(frame, box, "saliency", maps["saliency"])[0]))
            cells.append({"title": name, "headline": headline, "colour": decision_colour(positive),
                          "panels": panels})
        else:
            detail = (g["detail"] or "").replace(str(path), "").lstrip(": ")
            detail = detail if len(detail) <= 60 else detail[:57] + "..."
            cells.append({"title": f"{name}: {detail}", "headline": f"no decision: {g['reason']}",
                          "colour": (0, 200, 255), "panels": [("not classified", greyed(frame))]})
    maps_drawn = "Grad-CAM and saliency" if "saliency" in bundle.output_names else "Grad-CAM"
    sheet = contact_sheet(cells, title=f"{bundle.manifest['name']}: {len(images)} images, "
                                       f"{len(by_index)} classified ({maps_drawn} of the decided class)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp.png")
    _write_png(tmp, sheet)
    tmp.replace(target)
