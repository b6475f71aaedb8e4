"""The base install (no ``[serial]`` extra: numba absent) runs what does not need
the serial link, and says in one line what does: ``armscope bench --suite``
measures every stage but the link's framing, which it reports absent with the
reason and the pip command; ``bridge simulate`` and the offline ``bridge bench``
refuse in one line, exit 2. Each case runs in a fresh interpreter with numba
blocked (``None`` in ``sys.modules``, as tests/test_bridge_serial_extra.py does),
so what is imported is what a user's process imports."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repo_paths import DEMO_BUNDLE, REPO

PIP = "pip install 'armscope[serial]'"


def cli_without_numba(*argv, timeout=120):
    code = ("import sys; sys.modules['numba'] = None\n"
            "from armscope.cli import main\n"
            f"sys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv", [["bridge", "simulate", "--pty", "--width", "320", "--height", "240"],
                                  ["bridge", "bench", "--frames", "20"]])
def test_serial_link_commands_refuse_in_one_line(argv):
    proc = cli_without_numba(*argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and PIP in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""   # refused before any work (no pty path printed)


def test_bridge_bench_on_a_png_display_needs_no_numba(tmp_path):
    proc = cli_without_numba("bridge", "bench", "--frames", "2", "--warmup", "0",
                             "--display", f"png://{tmp_path}/eyepiece?width=320&height=240")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "v2 overlay" in proc.stdout


@pytest.mark.slow
def test_quick_suite_without_numba_reports_the_encode_stage_absent(tmp_path):
    out = tmp_path / "suite"
    proc = cli_without_numba("bench", "--suite", "--quick", "--bundle", str(DEMO_BUNDLE), "--out", str(out),
                             timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = json.loads((out / "suite.json").read_text())
    stages = {r["stage"]: r for r in result["stages"]}
    encode = stages["bridge encode (COBS + CRC framing)"]
    assert encode["ms"] is None and "numba" in encode["absent"] and PIP in encode["absent"]
    for name in ("bridge decode (v2 overlay: schema + CAM)", "bridge render (v2: CAM in display px)",
                 "bridge convert (RGB565)", "decode (JPEG, strict)", "ZeroMQ publish -> receive (v2 overlay: CAM as data)"):
        assert stages[name]["ms"]["n"] > 0 and stages[name]["ms"]["median"] > 0, name
    assert result["inference"] and result["pipeline"]["fps"] > 0
    assert result["glass"]["glass_to_glass_ms"]["n"] > 0
    table = (out / "suite.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| bridge encode (COBS + CRC framing)"))
    assert "absent" in row and PIP in row
