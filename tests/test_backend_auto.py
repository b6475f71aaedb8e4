"""``--backend auto`` on a CPU: which runtime it picks for which bundle, and that it says why."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from armscope.bundle import load_bundle
from edge.backends import cpu_backend_for, open_backend

DEMO = Path(__file__).resolve().parents[1] / "samples" / "demo_bundle"


def _bundle(precision: str):
    return SimpleNamespace(manifest={"precision": precision})


def test_fp32_bundles_run_on_onnxruntime_whatever_the_cpu():
    for openvino in (False, True):
        for exact in (False, True):
            assert cpu_backend_for(_bundle("fp32"), openvino, exact)[0] == "onnxruntime"


def test_int8_bundles_go_to_openvino_only_where_it_is_installed_and_int8_is_exact():
    # measured on a VNNI/AMX Xeon: ONNX Runtime's INT8 slower than its FP32, OpenVINO's 1.8-2.4x faster
    assert cpu_backend_for(_bundle("int8"), True, True)[0] == "openvino"
    kind, why = cpu_backend_for(_bundle("int8"), False, True)
    assert kind == "onnxruntime" and "armscope[openvino]" in why  # says how to get the faster one
    # where INT8 is inexact both runtimes refuse the bundle; ONNX Runtime's refusal is the one documented
    assert cpu_backend_for(_bundle("int8"), True, False)[0] == "onnxruntime"


def test_auto_on_this_machine_logs_the_runtime_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="edge.backends"):
        with open_backend(load_bundle(DEMO), "auto") as backend:
            assert backend.describe()["backend"] == "onnxruntime"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("backend:"))
    assert line.startswith("backend: onnxruntime on the CPU (") and "default CPU runtime" in line
