"""Fidelity records: a reduced inference precision measured once against FP32
on a bundle's hold-out images, kept beside the bundle for ``--backend auto``.

Why a record and not an assumption: BF16 keeps 8 bits of mantissa, so whether
it changes a decision or a heat map depends on the model and the images, not
on the CPU alone. ``auto`` therefore runs a bundle in BF16 only after BF16 has
passed the same agreement gate as an INT8 bundle (``armscope.calibration.agreement.gate``:
top-1 agreement, no positive->negative flip, Grad-CAM correlation) on that
bundle, which ``armscope accuracy --bundle B --backend openvino --cpu-precision
bf16 --images HOLDOUT --out REPORT`` measures and records here.

Why a sidecar file and not the manifest: the manifest is what a bundle is
(hashes of its graphs, its task), written once when it is made; a record is
written later, per machine kind, and must not change that identity. So it is
``BUNDLE/fidelity/<cpu_precision>-<backend>.json`` (e.g. ``bf16-openvino.json``),
one file per (precision, backend), holding a list of records::

    {"format": 1, "backend": "openvino", "cpu_precision": "bf16",
     "records": [{"key": {"ensemble_sha256": "...", "openvino": "2026.4.1",
                          "bf16_unit": "avx512_bf16"},
                  "passed": true, "failed": [], "summary": {...},
                  "speed": {"paths_s": {"onnxruntime fp32 members": 0.55, "openvino bf16 merged": 0.28,
                                        "openvino bf16 members": 0.31},
                            "onnxruntime_fp32_s": 0.55, "openvino_bf16_s": 0.28, "bf16_layout": "merged",
                            "speedup": 1.96, ...}, ...}]}

``speed`` times every path ``auto`` may run, interleaved in one run
(``armscope.edge.backends.select.measure_speed``); ``auto`` runs BF16 in the layout
timed fastest (``bf16_layout``), and only where that beat ONNX Runtime FP32.

A record counts only where its whole key matches: the same ensemble (its
sha256 in the manifest), the same OpenVINO version, and the same kind of BF16
unit (``amx_bf16`` or ``avx512_bf16``). Which operations a runtime lowers to
BF16 and how the unit accumulates can change with either, so a record made on
an AVX512-BF16 CPU says nothing about an AMX one: measure on each kind (their
records sit side by side in the file).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from armscope.core.errors import ArmscopeError

FORMAT = 1
DIRECTORY = "fidelity"
# (backend, cpu precision) pairs ``auto`` may pick after a passing record
RECORDED = (("openvino", "bf16"),)
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags, preferred first


def record_path(bundle_root: "str | os.PathLike", backend: str, cpu_precision: str) -> Path:
    return Path(bundle_root) / DIRECTORY / f"{cpu_precision}-{backend}.json"


def bf16_unit(flags) -> str | None:
    """The CPU's native BF16 unit from its /proc/cpuinfo flags: ``amx_bf16``
    (AMX tiles), ``avx512_bf16`` (AVX512-BF16 dot products), or None."""
    return next((unit for unit in BF16_UNITS if unit in flags), None)


def openvino_version() -> str | None:
    """The installed OpenVINO's version (None: not installed), from the package
    metadata so that looking does not import OpenVINO."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return None
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:  # a system install without pip metadata
        import openvino

        return openvino.__version__.split("-")[0]


def make_key(ensemble_sha256: str, openvino: str, unit: str) -> dict:
    return {"ensemble_sha256": ensemble_sha256, "openvino": openvino, "bf16_unit": unit}


def read_records(bundle_root: "str | os.PathLike", backend: str, cpu_precision: str) -> list[dict]:
    """The records in the bundle's file ([] when it has none). A file that is
    not a record file is an ArmscopeError naming it."""
    path = record_path(bundle_root, backend, cpu_precision)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArmscopeError(f"{path}: not a readable fidelity record ({exc}); delete it and measure again") from None
    records = data.get("records") if isinstance(data, dict) else None
    if (not isinstance(records, list) or data.get("format") != FORMAT
            or not all(isinstance(r, dict) and isinstance(r.get("key"), dict) and isinstance(r.get("passed"), bool)
                       for r in records)):
        raise ArmscopeError(f"{path}: expected {{\"format\": {FORMAT}, \"records\": [{{\"key\": {{...}}, "
                            "\"passed\": true|false, ...}]}; delete it and measure again")
    return records


def match(records: list[dict], key: dict) -> tuple[dict | None, str]:
    """The record for ``key`` and '' , or None and why none fits (for the log)."""
    for record in records:
        if record["key"] == key:
            return record, ""
    if not records:
        return None, "not recorded"
    names = {"ensemble_sha256": "another ensemble", "openvino": "OpenVINO", "bf16_unit": "BF16 unit"}
    seen = []
    for record in records:
        differs = [f"{names[k]} {record['key'].get(k)}" if k != "ensemble_sha256" else names[k]
                   for k in key if record["key"].get(k) != key[k]]
        seen.append(", ".join(differs))
    here = f"OpenVINO {key['openvino']}, BF16 unit {key['bf16_unit']}"
    return None, f"recorded only for {'; '.join(seen)} (here: {here})"


def write_record(bundle, backend: str, cpu_precision: str, key: dict, report: dict,
                 gate_limits: dict, speed: dict | None) -> Path:
    """Add (or replace, same key) the record of one ``armscope accuracy`` run of
    ``bundle`` itself on ``backend``/``cpu_precision`` against its FP32 reference,
    with ``speed`` (``armscope.edge.backends.select.measure_speed``; None where the gate failed)."""
    from armscope.core.cpus import cpu_name

    if (backend, cpu_precision) not in RECORDED:
        raise ArmscopeError(f"no fidelity record is kept for {backend} {cpu_precision}: only for "
                            + ", ".join(f"{b} {p}" for b, p in RECORDED))
    path = record_path(bundle.root, backend, cpu_precision)
    try:
        records = [r for r in read_records(bundle.root, backend, cpu_precision) if r["key"] != key]
    except ArmscopeError:
        records = []  # an unreadable file is replaced by the fresh measurement
    s = report["summary"]
    records.append({
        "key": key,
        "passed": not report["gate_reasons"],
        "failed": list(report["gate_reasons"]),
        "gate": gate_limits,
        "summary": {k: s[k] for k in ("n_images", "top1_agreement", "max_abs_delta_p", "mean_abs_delta_p",
                                      "decision_flips", "positive_to_negative_flips", "cam_pearson_mean",
                                      "cam_pearson_min", "cam_iou_mean")},
        "speed": speed,
        "images_from": report["images_from"],
        "reference": "the same bundle on ONNX Runtime FP32",
        "cpu": cpu_name(),
        "measured": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    })
    body = {"format": FORMAT, "backend": backend, "cpu_precision": cpu_precision, "records": records}
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise ArmscopeError(f"{path}: could not write the fidelity record ({exc.strerror or exc})") from None
    return path
