"""The benchmark suite stays alive: a reduced real run (``armscope bench --suite
--quick`` on the demo bundle and the real CMU-1 frames, a real daemon, bridge,
png:// display and watch:// observer), its JSON's structure, every figure a
real measurement (n > 0, finite), and the BENCHMARKS.md section regenerated
from that JSON between its markers. Also the frame stamp and the Jetson tools'
output parsers on the formats NVIDIA documents."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from armscope.core import stamp
from armscope.bench import report, sampling

from repo_paths import DEMO_BUNDLE, FRAMES, REPO


def _real_summary(s) -> bool:
    return (isinstance(s, dict) and s.get("n", 0) > 0
            and all(isinstance(s[k], (int, float)) and math.isfinite(s[k]) for k in ("median", "p95", "p99", "min")))


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nhand-written text before\n\n{report.BEGIN}\nold table 123.4 ms\n{report.END}\n\n"
                  "hand-written text after\n")
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, "-m", "armscope.cli", "bench", "--suite", "--quick", "--bundle",
                           str(DEMO_BUNDLE), "--out", str(out), "--benchmarks-md", str(md)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "suite.json").read_text())

    m = result["machine"]
    assert m["cpu"] and m["usable_cpus"] >= 1 and m["versions"]["onnxruntime"] and m["load_average_start"]
    stages = {r["stage"]: r["ms"] for r in result["stages"]}
    for name in ("decode (JPEG, strict)", "preprocess_frame (crop + resize + convert)",
                 "render (v2 overlay: CAM payload + levels + focus box)",
                 "render (v1 rendered: heat_rgba + raw payload)",
                 "ZeroMQ publish -> receive (v2 overlay: CAM as data)",
                 "ZeroMQ publish -> receive (v1 rendered: raw RGBA)",
                 "bridge decode (v2 overlay: schema + CAM)", "bridge render (v2: CAM in display px)",
                 "bridge total (decode + render + convert + encode)",
                 "bridge total, v1 rendered (decode + warp + convert + encode)"):
        assert _real_summary(stages[name]), name
    rows = result["inference"]
    assert {r["members"] for r in rows} == {1, 3, 5}
    assert all(_real_summary(r["ms"]) and len(r["samples_ms"]) == r["ms"]["n"] for r in rows)
    assert all(r["flops_per_frame"] > 0 and r["limit"]["gflops_achieved"] > 0 for r in rows)
    # flops grow with the ensemble: the count comes from the members' graphs
    by_k = {r["members"]: r["flops_per_frame"] for r in rows if r["backend"] == "onnxruntime" and r["group"] == "ours"}
    assert by_k[5] > by_k[3] > by_k[1]
    peers = [r for r in rows if r["group"] == "peer"]
    assert any("ONNX Runtime" in r["name"] for r in peers)
    assert all(math.isfinite(p["ratio"]) and p["ratio"] > 0 for p in result["comparison"]["peers"])
    # what auto ran and why, and the best peer named (the demo bundle has no BF16 record: FP32, saying why)
    c = result["comparison"]
    assert c["auto"]["selected"]["backend"] == "onnxruntime" and "FP32" in c["auto"]["why"]
    assert c["best_peer"] in [p["name"] for p in c["peers"]] and "default vs the best peer" in md.read_text()
    assert all(r["max_abs_dp_vs_reference"] is not None and r["max_abs_dp_vs_reference"] < 0.05 for r in rows)
    assert result["peaks"]["fp32"]["gflops"] and "estimate" in result["peaks"]["fp32"]["derivation"]
    assert result["pipeline"]["fps"] > 0 and result["pipeline"]["frames"] >= 2
    assert result["pacing"]["stale_after_ms"] >= 1500 and result["pacing"]["frame_ms"] > 0
    g = result["glass"]
    assert _real_summary(g["glass_to_glass_ms"]) and g["frames"] >= 2
    # the loop is causal: an overlay is seen after it was published, published after capture
    assert g["glass_to_glass_ms"]["min"] > g["capture_to_publish_ms"]["min"] > 0
    assert result["power"]["source"] or result["power"]["absent"]
    assert any(s["name"] == "peer: Keras predict" for s in result["skipped"])
    # warm-up by the settle rule, its rounds recorded per row
    rule = result["warmup_rule"]
    assert all(2 * rule["window"] <= r["warmup"]["rounds"] <= rule["cap"] and isinstance(r["warmup"]["settled"], bool)
               for r in rows)
    # the memory limit: a measured bandwidth on arrays past the caches, bytes per frame from the graphs
    cpu_bw = result["bandwidth"]["cpu"]
    assert cpu_bw["gbs"] > 0 and cpu_bw["gbs_median"] <= cpu_bw["gbs"]
    llc = cpu_bw["last_level_cache"].get("total_bytes")
    assert cpu_bw["notes"] or (llc and cpu_bw["array_bytes"] >= 4 * llc)
    assert result["bandwidth"]["gpu"].get("gbs") or result["bandwidth"]["gpu"]["absent"]
    for r in rows:
        roof = r["roofline"]
        assert r["bytes_per_frame"] > r["weight_bytes"] > 0 and roof["gbs_achieved"] > 0
        assert roof["binds"] in ("memory", "compute") or roof["why"]
        assert 0 < roof["fraction_of_bandwidth"]
        # frames per joule beside fps, or why not
        assert (r["energy"]["fps_per_joule"] or 0) > 0 or r["energy"]["absent"]
    cpu = result["power"]["cpu"]
    assert all(cpu[k].get("absent") or cpu[k].get(v) for k, v in
               (("frequency", "mean_mhz"), ("temperature", "max_c"), ("energy", "joules")))

    text = md.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "hand-written text before" in text and "hand-written text after" in text and "old table" not in text
    section = text.split(report.BEGIN)[1].split(report.END)[0]
    assert section.strip() == (out / "suite.md").read_text().strip()
    assert f"{g['glass_to_glass_ms']['median']:.1f}" in section and m["cpu"] in section
    assert f"**{cpu_bw['gbs']} GB/s**" in section and "| fps/J | warm-up |" in section and "% of BW | binds |" in section
    assert "CPU sensors during the run" in section


def test_stamp_round_trip_through_a_camera_view():
    """Drawn on a display, scaled into a camera frame over a real H&E field (an eyepiece
    adds the display's light to the slide's), the stamp reads back; nothing reads as a value."""
    import cv2

    size = (1280, 720)
    tissue = cv2.imread(str(FRAMES[0]))   # cmu1_frame_0.jpg
    box = stamp.box(size)
    for value in (0, 1, 4660, 65535, 70000):
        display = np.zeros((size[1], size[0], 3), np.uint8)
        stamp.draw(display, value, box[:2], stamp.cell_size(size))
        assert stamp.decode(display, box) == value % stamp.MODULUS
        seen = cv2.resize(display, (tissue.shape[1], tissue.shape[0]), interpolation=cv2.INTER_AREA)
        view = np.clip(tissue.astype(np.int32) * 0.7 + seen, 0, 255).astype(np.uint8)
        sx, sy = tissue.shape[1] / size[0], tissue.shape[0] / size[1]
        assert stamp.decode(view, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)) == value % stamp.MODULUS
    assert stamp.decode(np.zeros((size[1], size[0], 3), np.uint8), box) is None       # a blank display
    assert stamp.decode(tissue, (10, 10, 240, 80)) is None                            # tissue, no stamp


def test_jetson_tool_parsers_on_documented_formats():
    orin = ("RAM 2448/7765MB (lfb 1x4MB) SWAP 0/3882MB (cached 0MB) CPU [10%@1190,2%@1190,off,4%@1190] "
            "EMC_FREQ 0% GR3D_FREQ 45% cpu@45.5C soc2@44.5C tj@46C VDD_IN 4525mW/4525mW "
            "VDD_CPU_GPU_CV 503mW/503mW VDD_SOC 1411mW/1411mW")
    s = sampling.parse_tegrastats(orin)
    assert s["power_w"] == 4.525 and s["power_from"] == "VDD_IN" and s["temps_c"]["tj"] == 46.0
    assert s["gpu_util"] == 45.0 and "RAM" not in s["rails_mw"]
    nano = ("RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) CPU [24%@1224,15%@1224] EMC_FREQ 0% "
            "GR3D_FREQ 0% PLL@21C CPU@25C POM_5V_IN 2545/2547 POM_5V_GPU 0/0 POM_5V_CPU 549/529")
    assert sampling.parse_tegrastats(nano)["power_w"] == 2.545
    assert sampling.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"mode": "MAXN", "id": 0}
    clocks = sampling.parse_jetson_clocks(
        "cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600\n"
        "GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000\n"
        "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1\n")
    assert clocks["pinned"] is True and clocks["emc_override"] is True
    assert sampling.parse_jetson_clocks("cpu0: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=2201600 "
                                        "CurrentFreq=729600\n")["pinned"] is False
