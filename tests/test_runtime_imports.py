"""The runtime (armscope/core, gpu, edge, firmware_bridge, the CLI) must run without TensorFlow,
TensorRT or CUDA: importing every runtime module must not import them (nor
pygame, which only window:// needs)."""
from __future__ import annotations

import subprocess
import sys

from repo_paths import REPO


def test_runtime_modules_do_not_import_heavy_frameworks():
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for package in ("core", "gpu", "edge", "firmware_bridge")
        for p in (REPO / "armscope" / package).rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import armscope.cli, armscope.demo, armscope.bench.suite\n"
        "from armscope.cli import build_parser; build_parser()\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'tensorrt', 'pycuda', 'cuda', 'pygame') if m in sys.modules]\n"
        "print(len(sys.modules)); assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(modules) > 20
