"""numba and isal (the ``[serial]`` extra) are the serial link's alone: the
bridge and every other display run without them, ``serial://`` refuses with
one error naming the extra when numba is missing, and without isal the link
falls back to zlib's CRC and still delivers the same frame. Each case runs in
a fresh interpreter so that what gets imported is what a user's process
imports (``None`` in ``sys.modules`` makes an import fail, as if the package
were not installed)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from repo_paths import REPO
SERIAL_ONLY = ("numba", "llvmlite", "isal")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_png_display_and_the_bridge_import_neither_numba_nor_isal(tmp_path, frame_paths):
    out = _run(f"""
import sys
import cv2, numpy as np
import armscope.firmware_bridge.displays as displays
import armscope.firmware_bridge.bridge  # the bridge and its imports, the link's errors included
from armscope.firmware_bridge.link import LinkError, MAX_PAYLOAD_RANGE
bgr = cv2.resize(cv2.imread({str(frame_paths[0])!r}), (96, 64))
rgba = np.dstack([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.full((64, 96), 200, np.uint8)])
d = displays.open_display("png://{tmp_path}/eyepiece?width=96&height=64&format=rgb565le")
d.show(rgba); d.blank(); d.close()
print(len(displays.numbered_pngs("{tmp_path}/eyepiece")))
print(sorted(m for m in sys.modules if m.split(".")[0] in {SERIAL_ONLY!r}))
""")
    count, loaded = out.strip().splitlines()[-2:]
    assert count == "2"  # the frame and the blank really went out
    assert loaded == "[]", f"png:// loaded {loaded}"


def test_serial_display_without_numba_names_the_extra():
    out = _run("""
import sys
sys.modules["numba"] = None  # as if the [serial] extra were not installed
from armscope.firmware_bridge.displays import DisplayURIError, open_display
try:
    open_display("serial:///dev/armscope-no-such-port?baud=921600")
except DisplayURIError as exc:
    print("REFUSED", exc)
try:
    import armscope.firmware_bridge.link.chunks
except ImportError as exc:
    print("IMPORT", exc.name)
""")
    assert "REFUSED serial:///dev/armscope-no-such-port:" in out
    assert "pip install 'armscope[serial]'" in out
    assert "cannot open it as a serial port" not in out  # refused before the port was touched
    assert "IMPORT numba" in out


def test_serial_link_without_isal_falls_back_to_zlib_and_delivers_the_same_frame(frame_paths):
    pytest.importorskip("serial")
    code = f"""
import sys
BLOCK
import cv2, numpy as np
from armscope.firmware_bridge import pixel_formats as pf
from armscope.firmware_bridge.displays import open_display
from armscope.firmware_bridge.link import chunks
from armscope.firmware_bridge.simulator import ControllerCore, PtyController
bgr = cv2.resize(cv2.imread({str(frame_paths[1])!r}), (320, 240))
rgba = np.dstack([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.full((240, 320), 255, np.uint8)])
core = ControllerCore(320, 240, "rgb565le", max_payload=1024)
with PtyController(core) as sim:
    d = open_display(f"serial://{{sim.slave_path}}?baud=921600&deadline=10")
    report = d.show(rgba)
    assert np.array_equal(core.front, pf.encode(rgba, "rgb565le")), "the controller shows another picture"
    d.close()
print(chunks.CRC_PATH, "|", report.chunks, "|", sys.modules.get("isal") is not None)
"""
    without = _run(code.replace("BLOCK", 'sys.modules["isal"] = None')).strip().splitlines()[-1]
    with_isal = _run(code.replace("BLOCK", "")).strip().splitlines()[-1]
    assert without.startswith("zlib from Python, one call per chunk |") and without.endswith("| False")
    assert with_isal.startswith("ISA-L, in the encoder threads |") and with_isal.endswith("| True")
    assert int(without.split("|")[1]) == int(with_isal.split("|")[1]) > 100  # many chunks, same chunking
