"""The manifest an export writes (docs/bundle.md, "Bundle contract"), put
together in one place for every exporter.

Why one place: the homogeneous export (``onnx_export``) and the export of
members that differ (``multi_export``) describe their models differently
(the ``model``, ``outputs`` and per-member blocks), but the frame around them,
what every consumer reads (schema version, task, preprocessing, the single
``image`` input, the ensemble's file, sha256 and parity, precision, opset,
the versions that made it, the tissue gate), must be the same, field for field.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import armscope
from armscope.core.bundle import SCHEMA_VERSION, sha256_file


def producer(**extra: str) -> dict:
    """The versions of what converted the models: armscope, TensorFlow, Keras,
    tf2onnx and ONNX (all installed when an export runs), plus ``extra``."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    return {"armscope": armscope.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__, **extra}


def bundle_manifest(*, name: str, description: str, task: dict, preprocessing: dict, model: dict,
                    input_size: int, outputs: list[dict], members: list[dict], ensemble: Path,
                    ensemble_parity: float, opset: int, producer_block: dict,
                    tissue_gate: dict | None = None) -> dict:
    """manifest.json for an FP32 bundle whose merged graph is ``ensemble`` (in the stage)."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "description": description,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "preprocessing": preprocessing,
        "model": model,
        "inputs": [{"name": "image", "shape": ["N", input_size, input_size, 3], "dtype": "float32"}],
        "outputs": outputs,
        "members": members,
        "ensemble": {"file": ensemble.name, "sha256": sha256_file(ensemble), "parity_max_abs_probs": ensemble_parity},
        "precision": "fp32",
        "opset": opset,
        "producer": producer_block,
    }
    if tissue_gate:  # this modality's tissue/focus gate thresholds (armscope.core.tissue.TissueGate)
        manifest["tissue_gate"] = dict(tissue_gate)
    return manifest
