"""``--backend auto`` on a CPU: which runtime it picks for which bundle, and that it says why."""
from __future__ import annotations

import logging

from armscope.core.bundle import load_bundle
from armscope.edge.backends import open_backend

from repo_paths import DEMO_BUNDLE as DEMO


def test_auto_on_this_machine_logs_the_runtime_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="armscope.edge.backends"):
        with open_backend(load_bundle(DEMO), "auto") as backend:
            assert backend.describe()["backend"] == "onnxruntime"
    # the demo bundle has no BF16 fidelity record, so FP32 whatever this CPU has
    # (the whole table: tests/test_backend_select.py)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("backend:"))
    assert line.startswith("backend: onnxruntime FP32 members on the CPU (") and "FP32: " in line
