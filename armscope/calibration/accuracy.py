"""How much a reduced-precision bundle (INT8 Q/DQ, FP16) differs from its FP32
source, on real frames, in the terms that matter at the eyepiece:

top-1 agreement, |delta p|, decision flips at the clinical threshold, AUC,
Grad-CAM Pearson r and focus IoU (defined, with the deployability gate, in
``armscope.calibration.agreement``). This module reads the images, runs both
bundles and writes the report: report.md, report.json, per_image.csv and PNG
charts (``armscope.calibration.charts``, with matplotlib from the ``plots`` extra;
without it the charts are left out and the report says so). ``armscope quantize``
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

import numpy as np

from armscope.core.bundle import Bundle, check_out_apart, load_bundle, refuse_cascade, staged_directory
from armscope.core.cpus import usable_cpus
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import FILE_SUFFIXES as IMAGE_SUFFIXES
from armscope.core.preprocess import Preprocessing, preprocess_frame, read_frame
from armscope.edge.backends import fidelity
from armscope.calibration import charts
from armscope.calibration.agreement import MIN_AGREEMENT, MIN_CAM_PEARSON, auc, compare_outputs, gate, iou, pearson

# The agreement measures and the gate, where quantize and the tests have always found them
__all__ = ["MIN_AGREEMENT", "MIN_CAM_PEARSON", "accuracy_report", "auc", "compare_outputs", "gate", "iou",
           "list_images", "load_eval_set", "pearson", "read_labels", "run_backend", "run_bundle", "run_graph",
           "write_report"]

log = logging.getLogger(__name__)


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
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    if report.get("plots_skipped"):
        lines.append(report["plots_skipped"])
    lines.append("")
    return "\n".join(lines)


def accuracy_report(reference: Path, candidate: Path | None, images: list[Path], out_dir: Path,
                    labels_csv: Path | None = None, force: bool = False, threads: int | None = None,
                    backend: str = "onnxruntime", cpu_precision: str = "f32", exact_qdq: bool = False) -> dict:
    """The candidate bundle (default: the reference itself) run on ``backend``
    with ``cpu_precision`` (OpenVINO), against the reference bundle on ONNX Runtime FP32."""
    check_out_apart(out_dir, [reference, candidate, labels_csv, *images])  # --force would delete an input
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
    """report.json, report.md, per_image.csv and the charts, all or nothing (staged)."""
    rows = report["images"]
    with staged_directory(out_dir, overwrite=force) as stage:
        skipped = charts.matplotlib_missing()
        if skipped is None:
            report["plots"] = charts.write_charts(stage, report, ref_out, cand_out, task)
        else:
            log.warning("armscope accuracy: %s", skipped)
            report["plots"], report["plots_skipped"] = [], skipped
        (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (stage / "report.md").write_text(render_markdown(report))
        with open(stage / "per_image.csv", "w", newline="") as handle:
            fields = ["image", "label", "top1_ref", "top1_cand", "decision_ref", "decision_cand", "flip",
                      "max_abs_delta_p", "cam_class", "cam_pearson", "cam_iou"]
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
