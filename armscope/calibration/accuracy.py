"""How much a reduced-precision bundle (INT8 Q/DQ, FP16) differs from its FP32
source, on real frames, in the terms that matter at the eyepiece:

* top-1 agreement and max/mean |delta p| of the ensemble probabilities;
* decisions flipped at the manifest's clinical threshold (binary/cascade
  tasks), positive -> negative flips first: a missed positive is the costly
  error the paper's 0.3 threshold exists to avoid;
* AUC of both bundles when labels are given;
* the overlay: Pearson correlation of the Grad-CAM of the reference's decided
  class, and IoU of the AI-focused regions (``armscope.core.overlay.focus_mask``, cells
  above the median), per image and summarised.

``armscope accuracy`` writes report.md, report.json, per_image.csv and PNG
plots (drawn with OpenCV, so the base install suffices). ``armscope quantize``
uses the same numbers for its deployability gate. Measuring a bundle against
itself in OpenVINO BF16 (``--backend openvino --cpu-precision bf16``, no
``--candidate``) also records the gate's verdict beside the bundle
(``armscope.edge.backends.fidelity``), where ``--backend auto`` looks before it runs BF16.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from armscope.core.bundle import Bundle, load_bundle, refuse_cascade, staged_directory
from armscope.core.cpus import usable_cpus
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import FILE_SUFFIXES as IMAGE_SUFFIXES
from armscope.core.preprocess import Preprocessing, preprocess_frame, read_frame
from armscope.edge.backends import fidelity
from armscope.core.decision import decide
from armscope.core.overlay import focus_mask, normalise

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99  # top-1 agreement a deployable reduced-precision bundle must reach
# Mean Pearson r between its Grad-CAMs and FP32's: the heat map is what the pathologist sees,
# and agreeing labels can come with a different map (random-weight INT8 on saturating CPU
# kernels: 100% agreement, CAM r 0.73). Mean, not min: a near-flat 20x20 CAM's r is noise.
MIN_CAM_PEARSON = 0.95


# --------------------------------------------------------------------------- inputs

def read_labels(path: Path, classes: list[str]) -> dict[str, str]:
    """CSV with columns image,label (header optional); image is a file name or path."""
    path = Path(path)
    if not path.is_file():
        raise ArmscopeError(f"{path}: no such labels file")
    labels = {}
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except UnicodeDecodeError as exc:
        raise ArmscopeError(f"{path}: not UTF-8 text (byte {exc.start}); save the labels CSV as UTF-8") from None
    for row_no, row in enumerate(rows, 1):
        if not row or row[0].startswith("#"):
            continue
        if row_no == 1 and [c.strip().lower() for c in row[:2]] == ["image", "label"]:
            continue
        if len(row) < 2:
            raise ArmscopeError(f"{path}: line {row_no}: expected 'image,label', got {row}")
        image, label = row[0].strip(), row[1].strip()
        if label not in classes:
            raise ArmscopeError(f"{path}: line {row_no}: label {label!r} is not one of the bundle's "
                                f"classes {classes}")
        if labels.get(image, label) != label:
            raise ArmscopeError(f"{path}: line {row_no}: {image!r} is labelled {labels[image]!r} earlier and {label!r} here")
        labels[image] = label
    if not labels:
        raise ArmscopeError(f"{path}: no labels in this file")
    return labels


def list_images(inputs: list[Path]) -> list[Path]:
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                and not any(part.startswith(".") for part in p.relative_to(item).parts)))
        elif item.is_file():
            paths.append(item)
        else:
            raise ArmscopeError(f"{item}: no such file or directory")
    if not paths:
        raise ArmscopeError(f"{', '.join(map(str, inputs))}: no images (expected {', '.join(IMAGE_SUFFIXES)})")
    return paths


def load_eval_set(inputs: list[Path], spec: Preprocessing, classes: list[str],
                  labels_csv: Path | None = None) -> tuple[list[Path], np.ndarray, list[str] | None]:
    """Camera images -> model inputs with the daemon's preprocessing; labels from
    the CSV, else from class subfolder names when they are class names."""
    paths = list_images(inputs)
    batch = np.stack([preprocess_frame(read_frame(p, spec)[0], spec, source=str(p)) for p in paths])
    labels = None
    if labels_csv is not None:
        table = read_labels(labels_csv, classes)
        labels = []
        for p in paths:
            label = table.get(str(p), table.get(p.name))
            if label is None:
                raise ArmscopeError(f"{labels_csv}: no label for image {p} (by path or by name {p.name!r})")
            labels.append(label)
    elif all(p.parent.name in classes for p in paths):
        labels = [p.parent.name for p in paths]
    return paths, batch, labels


# --------------------------------------------------------------------------- running

def run_graph(path: Path, images: np.ndarray, threads: int | None = None, batch: int = 4,
              exact_qdq: bool = False) -> dict[str, np.ndarray]:
    """The outputs of one ensemble graph on ONNX Runtime (CPU), in small batches:
    probs and cam, and patch_probs where the graph has per-patch heads.
    ``exact_qdq``: Q/DQ computed exactly, not by this CPU's INT8 kernels
    (``armscope.edge.backends.cpu_features``)."""
    from armscope.edge.backends.base import OUTPUTS
    from armscope.edge.backends.onnxruntime_backend import open_session

    session = open_session(path, threads or usable_cpus(), exact_qdq=exact_qdq)
    present = {o.name for o in session.get_outputs()}
    names = [n for n in OUTPUTS if n in present]
    parts = [session.run(names, {"image": np.ascontiguousarray(images[i : i + batch], np.float32)})
             for i in range(0, len(images), batch)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def run_bundle(bundle: Bundle, images: np.ndarray, **kw) -> dict[str, np.ndarray]:
    return run_graph(bundle.ensemble_path, images, **kw)


def run_backend(bundle: Bundle, images: np.ndarray, backend: str, cpu_precision: str = "f32",
                threads: int | None = None, batch: int = 1) -> dict[str, np.ndarray]:
    """The bundle through a deployable backend (``armscope.edge.backends``), so what is
    measured is what will run: e.g. an INT8 bundle on OpenVINO, or the FP32
    bundle with OpenVINO's BF16 inference precision; one frame a call, as the
    daemon runs it (OpenVINO compiles a static one-frame graph for that)."""
    from armscope.edge.backends import open_backend

    # measured as it runs, even where INT8 is inexact on this CPU (the report shows the damage)
    options = {"layout": "merged", "cpu_precision": cpu_precision, "allow_inexact_int8": True}
    if threads:
        options["threads"] = threads
    with open_backend(bundle, backend, **options) as runner:
        parts = [runner.infer(images[i : i + batch]) for i in range(0, len(images), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


# --------------------------------------------------------------------------- metrics

def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney, ties count half); None without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare_outputs(ref: dict, cand: dict, task: dict, names: list[str],
                    labels: list[str] | None = None) -> dict:
    """Per-image rows and a summary (see module docstring)."""
    classes = task["classes"]
    binary = task["type"] in ("binary", "cascade")
    rows = []
    for i, name in enumerate(names):
        p_ref, p_cand = ref["probs"][i], cand["probs"][i]
        d_ref, d_cand = decide(p_ref, task), decide(p_cand, task)
        c = d_ref["index"]
        cam_ref, cam_cand = ref["cam"][i, c], cand["cam"][i, c]
        row = {
            "image": str(name),
            "label": labels[i] if labels else None,
            "ref_probs": [round(float(v), 6) for v in p_ref],
            "cand_probs": [round(float(v), 6) for v in p_cand],
            "max_abs_delta_p": float(np.max(np.abs(p_ref - p_cand))),
            "top1_ref": classes[int(np.argmax(p_ref))],
            "top1_cand": classes[int(np.argmax(p_cand))],
            "decision_ref": d_ref["label"],
            "decision_cand": d_cand["label"],
            "cam_class": classes[c],
            "cam_pearson": pearson(cam_ref, cam_cand),
            "cam_iou": iou(focus_mask(cam_ref), focus_mask(cam_cand)),
        }
        row["top1_agree"] = row["top1_ref"] == row["top1_cand"]
        if binary:
            row["flip"] = ("positive->negative" if d_ref["positive"] and not d_cand["positive"] else
                           "negative->positive" if d_cand["positive"] and not d_ref["positive"] else None)
        else:
            row["flip"] = f"{d_ref['label']}->{d_cand['label']}" if d_ref["label"] != d_cand["label"] else None
        rows.append(row)

    delta = np.abs(ref["probs"] - cand["probs"])
    flips = [r for r in rows if r["flip"]]
    flips.sort(key=lambda r: (r["flip"] != "positive->negative", r["image"]))
    pearsons = np.array([r["cam_pearson"] for r in rows])
    ious = np.array([r["cam_iou"] for r in rows])
    summary = {
        "n_images": len(rows),
        "top1_agreement": float(np.mean([r["top1_agree"] for r in rows])),
        "max_abs_delta_p": float(delta.max()),
        "mean_abs_delta_p": float(delta.mean()),
        "threshold": float(task["threshold"]) if binary else None,
        "positive_class": task.get("positive_class") if binary else None,
        "decision_flips": len(flips),
        "positive_to_negative_flips": sum(r["flip"] == "positive->negative" for r in flips),
        "negative_to_positive_flips": sum(r["flip"] == "negative->positive" for r in flips),
        "flipped_images": [{"image": r["image"], "flip": r["flip"]} for r in flips],
        "cam_pearson_mean": float(pearsons.mean()),
        "cam_pearson_min": float(pearsons.min()),
        "cam_iou_mean": float(ious.mean()),
        "cam_iou_min": float(ious.min()),
    }
    if labels:
        y = np.array([classes.index(label) for label in labels])
        if binary:
            pos = classes.index(task["positive_class"])
            summary["auc_ref"] = auc(ref["probs"][:, pos], y == pos)
            summary["auc_cand"] = auc(cand["probs"][:, pos], y == pos)
        else:
            per = [(auc(ref["probs"][:, k], y == k), auc(cand["probs"][:, k], y == k)) for k in range(len(classes))]
            per = [p for p in per if p[0] is not None]
            summary["auc_ref"] = float(np.mean([p[0] for p in per])) if per else None
            summary["auc_cand"] = float(np.mean([p[1] for p in per])) if per else None
        summary["labelled"] = len(labels)
    return {"summary": summary, "images": rows}


def gate(summary: dict, min_agreement: float = MIN_AGREEMENT, min_cam_pearson: float = MIN_CAM_PEARSON) -> list[str]:
    """Reasons a candidate must not be marked deployable (empty list: it may)."""
    reasons = []
    if summary["top1_agreement"] < min_agreement:
        reasons.append(f"top-1 agreement {summary['top1_agreement']:.2%} < {min_agreement:.0%}")
    if summary["cam_pearson_mean"] < min_cam_pearson:
        reasons.append(f"Grad-CAM Pearson r vs FP32, mean {summary['cam_pearson_mean']:.3f} < {min_cam_pearson}")
    if summary["positive_to_negative_flips"]:
        reasons.append(f"{summary['positive_to_negative_flips']} positive->negative decision flip(s) at "
                       f"threshold {summary['threshold']}")
    return reasons


# --------------------------------------------------------------------------- plots (OpenCV)

def _canvas(w=640, h=480):
    return np.full((h, w, 3), 255, np.uint8)


def _text(img, s, xy, scale=0.45, color=(0, 0, 0)):
    cv2.putText(img, s, xy, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def plot_scatter(x, y, title, xlabel, ylabel, threshold=None, size=480) -> np.ndarray:
    img = _canvas(size + 80, size + 80)
    x0, y0, s = 60, 20, size
    cv2.rectangle(img, (x0, y0), (x0 + s, y0 + s), (0, 0, 0), 1)
    cv2.line(img, (x0, y0 + s), (x0 + s, y0), (180, 180, 180), 1)
    if threshold is not None:
        t = int(threshold * s)
        cv2.line(img, (x0 + t, y0), (x0 + t, y0 + s), (0, 0, 200), 1)
        cv2.line(img, (x0, y0 + s - t), (x0 + s, y0 + s - t), (0, 0, 200), 1)
    for v in (0.0, 0.5, 1.0):
        _text(img, f"{v:.1f}", (x0 + int(v * s) - 10, y0 + s + 18))
        _text(img, f"{v:.1f}", (x0 - 35, y0 + s - int(v * s) + 5))
    for a, b in zip(x, y):
        cv2.circle(img, (x0 + int(np.clip(a, 0, 1) * s), y0 + s - int(np.clip(b, 0, 1) * s)), 4, (200, 80, 0), -1,
                   cv2.LINE_AA)
    _text(img, title, (x0, y0 + s + 40), 0.5)
    _text(img, f"x: {xlabel}   y: {ylabel}", (x0, y0 + s + 58))
    return img


def plot_bars(values: dict[str, list[float]], title: str, vmax: float | None = None) -> np.ndarray:
    """Grouped bars per image (one colour per series)."""
    colours = [(200, 80, 0), (0, 150, 0), (0, 0, 200)]
    n = max(len(v) for v in values.values())
    w = max(480, 40 + n * 14 * len(values))
    img = _canvas(w + 40, 360)
    x0, y0, h = 40, 20, 280
    top = vmax or max(1e-12, max(max(v) for v in values.values() if v))
    cv2.line(img, (x0, y0 + h), (x0 + w - 20, y0 + h), (0, 0, 0), 1)
    cv2.line(img, (x0, y0), (x0, y0 + h), (0, 0, 0), 1)
    _text(img, f"{top:.3g}", (2, y0 + 5), 0.35)
    _text(img, "0", (25, y0 + h), 0.35)
    bar = max(2, (w - 40) // max(1, n * len(values)) - 2)
    for k, (name, series) in enumerate(values.items()):
        for i, v in enumerate(series):
            x = x0 + 4 + (i * len(values) + k) * (bar + 2)
            cv2.rectangle(img, (x, y0 + h - int(np.clip(v / top, 0, 1) * h)), (x + bar, y0 + h), colours[k % 3], -1)
        _text(img, name, (x0 + 10 + 150 * k, y0 + h + 40), 0.45, colours[k % 3])
    _text(img, title, (x0, y0 + h + 20), 0.5)
    return img


def plot_cams(cam_ref: np.ndarray, cam_cand: np.ndarray, title: str, size=240) -> np.ndarray:
    tiles = []
    for cam in (cam_ref, cam_cand):
        heat = cv2.resize(normalise(cam), (size, size), interpolation=cv2.INTER_LINEAR)
        tile = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
        mask = cv2.resize(focus_mask(cam).astype(np.uint8) * 255, (size, size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, (255, 255, 255), 2)
        tiles.append(tile)
    img = _canvas(2 * size + 30, size + 50)
    img[10 : 10 + size, 10 : 10 + size] = tiles[0]
    img[10 : 10 + size, 20 + size : 20 + 2 * size] = tiles[1]
    _text(img, "reference", (10, size + 25))
    _text(img, "candidate", (20 + size, size + 25))
    _text(img, title, (10, size + 42), 0.4)
    return img


# --------------------------------------------------------------------------- report

def _fmt(v, spec=".4f"):
    return "n/a" if v is None else format(v, spec)


def render_markdown(report: dict) -> str:
    s, ref, cand = report["summary"], report["reference"], report["candidate"]
    ok = not report["gate_reasons"]
    lines = [
        f"# Accuracy: {cand['name']} ({cand['precision']}) vs {ref['name']} ({ref['precision']})",
        "",
        f"- reference: `{ref['path']}`",
        f"- candidate: `{cand['path']}` on {cand['runtime']['backend']}"
        + (f" (inference precision {cand['runtime']['cpu_precision']})" if "cpu_precision" in cand["runtime"] else "")
        + (" (exact Q/DQ: graph optimisations off)" if cand["runtime"].get("exact_qdq") else "")
        + "; reference on onnxruntime FP32",
        f"- images: {s['n_images']} ({report['images_from']}), preprocessing as the daemon "
        f"(`armscope.core.preprocess.preprocess_frame`)",
        f"- deployability gate (top-1 agreement >= {MIN_AGREEMENT:.0%}, no positive->negative flip, "
        f"mean Grad-CAM r >= {MIN_CAM_PEARSON}): "
        + ("**passes**" if ok else "**fails**: " + "; ".join(report["gate_reasons"])),
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
        f"| top-1 agreement | {s['top1_agreement']:.2%} |",
        f"| max abs delta p | {s['max_abs_delta_p']:.5f} |",
        f"| mean abs delta p | {s['mean_abs_delta_p']:.5f} |",
    ]
    if s["threshold"] is not None:
        lines += [
            f"| decisions flipped at threshold {s['threshold']} ({s['positive_class']}) | {s['decision_flips']} |",
            f"| positive->negative flips | {s['positive_to_negative_flips']} |",
            f"| negative->positive flips | {s['negative_to_positive_flips']} |",
        ]
    else:
        lines.append(f"| decisions changed | {s['decision_flips']} |")
    if "auc_ref" in s:
        lines += [f"| AUC reference ({s['labelled']} labelled) | {_fmt(s['auc_ref'])} |",
                  f"| AUC candidate | {_fmt(s['auc_cand'])} |"]
    lines += [
        f"| Grad-CAM Pearson r, mean (min) | {s['cam_pearson_mean']:.4f} ({s['cam_pearson_min']:.4f}) |",
        f"| focus-region IoU (above-median cells), mean (min) | {s['cam_iou_mean']:.4f} ({s['cam_iou_min']:.4f}) |",
        "",
        "## Flipped decisions (positive->negative first)",
        "",
    ]
    if s["flipped_images"]:
        lines += [f"- `{f['image']}`: {f['flip']}" for f in s["flipped_images"]]
    else:
        lines.append("none")
    lines += ["", "## Per image", "",
              "| image | label | ref probs | cand probs | max abs dp | decision ref -> cand | CAM r | CAM IoU |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["images"]:
        lines.append(
            f"| {Path(r['image']).name} | {r['label'] or ''} | {', '.join(f'{v:.4f}' for v in r['ref_probs'])} | "
            f"{', '.join(f'{v:.4f}' for v in r['cand_probs'])} | {r['max_abs_delta_p']:.5f} | "
            f"{r['decision_ref']} -> {r['decision_cand']}{' **FLIP**' if r['flip'] else ''} | "
            f"{r['cam_pearson']:.4f} | {r['cam_iou']:.3f} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def accuracy_report(reference: Path, candidate: Path | None, images: list[Path], out_dir: Path,
                    labels_csv: Path | None = None, force: bool = False, threads: int | None = None,
                    backend: str = "onnxruntime", cpu_precision: str = "f32", exact_qdq: bool = False) -> dict:
    """The candidate bundle (default: the reference itself) run on ``backend``
    with ``cpu_precision`` (OpenVINO), against the reference bundle on ONNX Runtime FP32."""
    ref_bundle = load_bundle(reference)
    cand_bundle = ref_bundle if candidate is None else load_bundle(candidate)
    for b in (ref_bundle, cand_bundle):
        refuse_cascade(b, "armscope accuracy")
    if candidate is None and backend == "onnxruntime":
        raise ArmscopeError("--candidate: give a reduced-precision bundle, or a --backend/--cpu-precision to "
                            "compare the reference bundle on")
    if ref_bundle.classes != cand_bundle.classes:
        raise ArmscopeError(f"{cand_bundle.root}: field task.classes {cand_bundle.classes} differ from the "
                            f"reference's {ref_bundle.classes}")
    if ref_bundle.preprocessing != cand_bundle.preprocessing:
        raise ArmscopeError(f"{cand_bundle.root}: field preprocessing differs from the reference's")
    paths, batch, labels = load_eval_set(images, ref_bundle.preprocessing, ref_bundle.classes, labels_csv)
    ref_out = run_bundle(ref_bundle, batch, threads=threads)
    if backend == "onnxruntime":
        cand_out = run_bundle(cand_bundle, batch, threads=threads, exact_qdq=exact_qdq)
    else:
        cand_out = run_backend(cand_bundle, batch, backend, cpu_precision, threads=threads)
    result = compare_outputs(ref_out, cand_out, ref_bundle.task, [str(p) for p in paths], labels)
    report = {
        "reference": {"path": str(ref_bundle.root), "name": ref_bundle.manifest["name"],
                      "precision": ref_bundle.manifest["precision"]},
        "candidate": {"path": str(cand_bundle.root), "name": cand_bundle.manifest["name"],
                      "precision": cand_bundle.manifest["precision"],
                      "runtime": {"backend": backend,
                                  **({"cpu_precision": cpu_precision} if backend == "openvino" else {}),
                                  **({"exact_qdq": True} if exact_qdq and backend == "onnxruntime" else {})},
                      "quantization": cand_bundle.manifest.get("quantization")},
        "images_from": ", ".join(map(str, images)),
        **result,
        "gate_reasons": gate(result["summary"]),
        "plots": [],
    }
    key = _fidelity_key(ref_bundle, backend, cpu_precision) if candidate is None else None
    if key is not None:
        report["fidelity_record"] = str(fidelity.record_path(ref_bundle.root, backend, cpu_precision))
    write_report(report, ref_out, cand_out, ref_bundle.task, Path(out_dir), force=force)
    if key is not None:
        from armscope.edge.backends.select import measure_speed

        # auto runs BF16 only where it is also faster: timed here, on the first image
        speed = None if report["gate_reasons"] else measure_speed(ref_bundle, batch[:1], threads=threads)
        fidelity.write_record(ref_bundle, backend, cpu_precision, key, report,
                              {"min_top1_agreement": MIN_AGREEMENT, "min_cam_pearson_mean": MIN_CAM_PEARSON,
                               "max_positive_to_negative_flips": 0}, speed)
        report["speed"] = speed
    return report


def _fidelity_key(bundle: Bundle, backend: str, cpu_precision: str) -> dict | None:
    """The key under which this measurement of ``bundle`` itself is recorded for
    ``--backend auto`` (``armscope.edge.backends.fidelity``), or None where none is kept."""
    if (backend, cpu_precision) not in fidelity.RECORDED:
        return None
    from armscope.edge.backends.cpu_features import cpu_flags

    return fidelity.make_key(bundle.manifest["ensemble"]["sha256"], fidelity.openvino_version(),
                             fidelity.bf16_unit(cpu_flags()))


def write_report(report: dict, ref_out: dict, cand_out: dict, task: dict, out_dir: Path, force: bool = False):
    classes = task["classes"]
    pos = classes.index(task["positive_class"]) if task["type"] in ("binary", "cascade") else int(
        np.argmax(ref_out["probs"].mean(axis=0)))
    rows = report["images"]
    with staged_directory(out_dir, overwrite=force) as stage:
        plots = {
            "probs_scatter.png": plot_scatter(ref_out["probs"][:, pos], cand_out["probs"][:, pos],
                                              f"p({classes[pos]}): reference vs candidate",
                                              "reference", "candidate", report["summary"]["threshold"]),
            "delta_p.png": plot_bars({"max |dp|": [r["max_abs_delta_p"] for r in rows]},
                                     "max |delta p| per image"),
            "cam_agreement.png": plot_bars({"CAM r": [r["cam_pearson"] for r in rows],
                                            "focus IoU": [r["cam_iou"] for r in rows]},
                                           "Grad-CAM agreement per image", vmax=1.0),
        }
        worst = int(np.argmin([r["cam_pearson"] for r in rows]))
        c = classes.index(rows[worst]["cam_class"])
        plots["cam_worst.png"] = plot_cams(ref_out["cam"][worst, c], cand_out["cam"][worst, c],
                                           f"lowest CAM r {rows[worst]['cam_pearson']:.3f}: "
                                           f"{Path(rows[worst]['image']).name}")
        for name, img in plots.items():
            if not cv2.imwrite(str(stage / name), img):
                raise ArmscopeError(f"{stage / name}: could not write the plot")
        report["plots"] = list(plots)
        (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (stage / "report.md").write_text(render_markdown(report))
        with open(stage / "per_image.csv", "w", newline="") as handle:
            fields = ["image", "label", "top1_ref", "top1_cand", "decision_ref", "decision_cand", "flip",
                      "max_abs_delta_p", "cam_class", "cam_pearson", "cam_iou"]
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
