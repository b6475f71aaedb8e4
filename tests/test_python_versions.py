"""The code runs on the oldest Python that pyproject.toml admits.

Why: Jetsons run JetPack 6, whose Python is 3.10, while this project's
machines run 3.11; a 3.11-only module (``tomllib``) once kept ``armscope run``
from starting there at all. vermin reads the code and names every construct
and stdlib module newer than the target, honouring ``sys.version_info`` guards.
(The whole suite also passed under Python 3.10 with onnxruntime 1.23, once,
by hand: see the session notes.)"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from repo_paths import REPO
PACKAGES = ["armscope"]  # every package lives under armscope/

pytest.importorskip("vermin")


def _target() -> str:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'requires-python\s*=\s*">=\s*(\d+\.\d+)"', text)
    assert m, "pyproject.toml: requires-python should read \">=X.Y\""
    return m.group(1) + "-"  # vermin: this version or newer


def _vermin(*paths) -> subprocess.CompletedProcess:
    # vermin has no __main__; its console script calls vermin.main()
    return subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"-t={_target()}", "--violations", "--no-tips",
                           "--eval-annotations", *map(str, paths)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_the_packages_need_nothing_newer_than_requires_python():
    out = _vermin(*PACKAGES)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_check_names_a_newer_module(tmp_path):
    newer = tmp_path / "uses_311.py"
    newer.write_text("import tomllib\n")
    out = _vermin(newer)
    assert out.returncode != 0 and "tomllib" in out.stdout
    guarded = tmp_path / "guarded.py"
    guarded.write_text("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n    import tomli as tomllib\n")
    assert _vermin(guarded).returncode == 0
