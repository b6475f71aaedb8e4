"""The benchmark suite's limits and sensors, each on real inputs: the CPU sensors
and the cache sizes read from a sysfs tree laid out as Linux lays it out (real
files, in a temporary directory: this machine's own /sys may expose none of
them), the bytes a frame moves counted on a real ONNX graph, the warm-up rule on
real timed calls, and the roofline's decision."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from armscope.bench import bandwidth, cpusensors, limits
from armscope.bench.timing import Settle, warm_up


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _fake_sys(root: Path, energy_uj: int = 1_000_000) -> Path:
    cpus = root / "devices" / "system" / "cpu"
    for i, khz in enumerate((2_400_000, 3_600_000)):
        _write(cpus / f"cpu{i}" / "cpufreq" / "scaling_cur_freq", str(khz))
    _write(root / "class" / "thermal" / "thermal_zone0" / "type", "x86_pkg_temp")
    _write(root / "class" / "thermal" / "thermal_zone0" / "temp", "51000")
    mon = root / "class" / "hwmon" / "hwmon3"
    _write(mon / "name", "k10temp")
    _write(mon / "temp1_input", "63250")
    _write(mon / "temp1_label", "Tctl")
    for name, d in (("package-0", "intel-rapl:0"), ("psys", "intel-rapl:1")):
        _write(root / "class" / "powercap" / d / "name", name)
        _write(root / "class" / "powercap" / d / "energy_uj", str(energy_uj))
        _write(root / "class" / "powercap" / d / "max_energy_range_uj", "262143328850")
    _write(root / "class" / "powercap" / "intel-rapl:0:0" / "name", "core")   # a subdomain: inside the package
    _write(root / "class" / "powercap" / "intel-rapl:0:0" / "energy_uj", "5")
    return root


def test_cpu_sensors_read_sysfs_and_derive_package_power(tmp_path):
    root = _fake_sys(tmp_path)
    sensors = cpusensors.CpuSensors(root)
    assert sensors.absent == {"frequency": None, "temperature": None, "energy": None}
    first = sensors.read()
    assert first["cpu_mhz"] == [2400.0, 3600.0]
    assert first["temps_c"] == {"thermal_zone0/x86_pkg_temp": 51.0, "k10temp/Tctl": 63.25}
    assert first["energy_uj"] == {"package-0": 1_000_000}           # psys and the core subdomain left out
    # 2 s later the package used 30 J; then the counter wrapped at its range having used 10 J more
    _write(root / "class" / "powercap" / "intel-rapl:0" / "energy_uj", "31000000")
    second = sensors.read()
    _write(root / "class" / "powercap" / "intel-rapl:0" / "energy_uj", str(10_000_000 - (262143328850 - 31_000_000)))
    third = sensors.read()
    samples = cpusensors.with_power([(100.0, first), (102.0, second), (103.0, third)], sensors.ranges())
    assert "cpu_power_w" not in samples[0][1]
    assert samples[1][1]["cpu_power_w"] == pytest.approx(15.0)
    assert samples[2][1]["cpu_power_w"] == pytest.approx(10.0)
    summary = cpusensors.summarize(sensors, samples, 200)
    assert summary["frequency"]["mean_mhz"] == 3000.0 and summary["frequency"]["absent"] is None
    assert summary["temperature"]["max_c"] == 63.25 and summary["temperature"]["first_c"] == 63.25
    assert summary["energy"]["mean_power_w"] == pytest.approx(12.5) and summary["energy"]["joules"] == pytest.approx(37.5)


def test_cpu_sensors_say_why_absent(tmp_path):
    empty = cpusensors.CpuSensors(tmp_path)
    assert all(empty.absent[k] for k in ("frequency", "temperature", "energy"))
    assert "RAPL" in empty.absent["energy"] and "cpufreq" in empty.absent["frequency"]
    summary = cpusensors.summarize(empty, [], 200)
    assert all(summary[k]["absent"] for k in ("frequency", "temperature", "energy"))
    if os.geteuid() != 0:   # root reads a mode-000 file anyway
        root = _fake_sys(tmp_path / "locked")
        (root / "class" / "powercap" / "intel-rapl:0" / "energy_uj").chmod(0)
        locked = cpusensors.CpuSensors(root)
        assert "root" in locked.absent["energy"] and "package-0" in locked.absent["energy"]
        assert locked.absent["frequency"] is None


def test_last_level_cache_sums_distinct_instances(tmp_path):
    cpus = tmp_path / "cpu"
    for cpu, ccx in ((0, "0-7"), (1, "0-7"), (8, "8-15")):
        base = cpus / f"cpu{cpu}" / "cache"
        for index, (level, kind, size, shared) in enumerate(((1, "Instruction", "32K", str(cpu)), (1, "Data", "48K", str(cpu)),
                                                             (2, "Unified", "1024K", str(cpu)), (3, "Unified", "32768K", ccx))):
            for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                _write(base / f"index{index}" / name, str(value))
    cache = bandwidth.last_level_cache(cpus)
    assert cache["level"] == 3 and cache["instances"] == 2 and cache["total_bytes"] == 64 << 20
    assert "absent" in bandwidth.last_level_cache(tmp_path / "nothing")


def test_bytes_per_frame_counted_on_an_onnx_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Sigmoid", ["c"], ["s"]),                       # c has two consumers
             helper.make_node("Add", ["r", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    cost = limits.graph_cost(str(path))
    tensor = 4 * 8 * 8 * 4                       # every activation: 4 channels x 8 x 8 float32
    assert cost["flops"] == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert cost["weight_bytes"] == 4 * 3 * 3 * 3 * 4
    assert cost["activation_bytes_written"] == 4 * tensor                     # c, r, s, y
    assert cost["activation_bytes_read"] == 3 * 8 * 8 * 4 + 2 * tensor + 2 * tensor   # x by Conv; c twice; r and s
    total = limits.ensemble_cost([path, path])
    assert total["bytes_per_frame"] == 2 * (cost["weight_bytes"] + cost["activation_bytes_written"]
                                            + cost["activation_bytes_read"])


def test_warm_up_runs_until_the_time_settles_and_stops_at_the_cap():
    """Real timed calls: one path slow for its first two calls then steady; one alternating for ever."""
    calls = {"settling": 0, "alternating": 0}

    def settling(_):
        calls["settling"] += 1
        time.sleep({1: 0.30, 2: 0.20}.get(calls["settling"], 0.03))

    def alternating(_):
        calls["alternating"] += 1
        time.sleep(0.03 if calls["alternating"] % 2 else 0.30)

    rule = Settle(window=3, tolerance=0.5, cap=8)
    warm = warm_up({"settling": settling, "alternating": alternating}, rule)
    # median of calls 4-6 (0.03) vs calls 1-3 (0.20): not yet; calls 5-7 vs 2-4: settled after 7
    assert warm["settling"]["rounds"] == 7 and warm["settling"]["settled"] is True
    assert calls["settling"] == 7                                        # left the rotation once settled
    assert warm["alternating"]["rounds"] == 8 and warm["alternating"]["settled"] is False
    assert warm["alternating"]["drift"] > 1 and len(warm["alternating"]["ms"]) == 8
    assert "at most 8 rounds" in rule.describe()["rule"]


def test_roofline_decides_which_limit_binds():
    row = {"backend": "onnxruntime", "ms": {"median": 100.0}, "flops_per_frame": 4e9, "bytes_per_frame": 1e9,
           "limit": {"gflops_achieved": 40.0}}
    bw = {"cpu": {"gbs": 20.0}, "gpu": {"absent": "no NVIDIA GPU here"}}
    low = bandwidth.roofline(row, {"gflops": 400.0}, bw)     # balance 20 FLOP/B > intensity 4: memory
    assert low["binds"] == "memory" and low["intensity_flop_per_byte"] == 4.0
    assert low["gbs_achieved"] == 10.0 and low["fraction_of_bandwidth"] == 0.5
    assert low["fraction_of_attainable"] == 0.5                # attainable 4 x 20 = 80 GFLOP/s
    assert bandwidth.roofline(row, {"gflops": 40.0}, bw)["binds"] == "compute"    # balance 2 < 4
    undecided = bandwidth.roofline(row, {"gflops": None}, bw)
    assert undecided["binds"] is None and undecided["fraction_of_bandwidth"] == 0.5 and "peak" in undecided["why"]
    gpu = bandwidth.roofline({**row, "backend": "tensorrt"}, {"gflops": 400.0}, bw)
    assert gpu["binds"] is None and "no NVIDIA GPU" in gpu["why"] and gpu["bandwidth_from"] == "gpu"


def test_frames_per_joule_from_the_jetson_and_nvml_samples():
    """The suite's attribution of power to rows, fed the samples its tegrastats and nvidia-smi
    readers parse from the tools' documented lines (no such board here)."""
    from armscope.bench import sampling
    from armscope.bench.suite import frames_per_joule

    orin = ("RAM 2448/7765MB (lfb 1x4MB) CPU [10%@1190,2%@1190] GR3D_FREQ 45% cpu@45.5C tj@46C "
            "VDD_IN {mw}mW/4525mW VDD_CPU_GPU_CV 503mW/503mW")
    cpu_row = {"name": "ours: onnxruntime, members", "members": 5, "fps": 5.0, "backend": "onnxruntime"}
    trt_row = {"name": "ours: auto (armscope's default), members", "members": 5, "fps": 50.0, "backend": "tensorrt"}
    calls = {"ours: onnxruntime, members|5": [(0.0, 1.0)], "ours: auto (armscope's default), members|5": [(2.0, 3.0)]}

    def result():
        return {"inference": [dict(cpu_row), dict(trt_row)], "pipeline": {"fps": 20.0, "interval": (0.0, 3.0)}}

    jetson = sampling.Sampler()
    jetson.source = "tegrastats"
    jetson.cpu.absent["energy"] = "no RAPL on a Jetson"
    for i, mw in enumerate((4000, 4000, 4000, 4000, 6000, 6000, 6000)):
        jetson.samples.append((i * 0.5, sampling.parse_tegrastats(orin.format(mw=mw))))
    res = result()
    known = frames_per_joule(res, jetson, calls)
    cpu, trt = res["inference"]
    assert cpu["energy"]["power_w"] == 4.0 and cpu["energy"]["fps_per_joule"] == pytest.approx(5.0 / 4.0, abs=1e-4)
    assert trt["energy"]["power_w"] == 6.0 and trt["energy"]["fps_per_joule"] == pytest.approx(50.0 / 6.0, abs=1e-4)
    assert "board input" in trt["energy"]["power_from"]
    assert known["daemon pipeline (board)"] == pytest.approx(20.0 / (34.0 / 7), abs=1e-4)   # mean of 4,4,4,4,6,6,6 W

    nvml = sampling.Sampler()
    nvml.source = "nvidia-smi"
    nvml.cpu.absent["energy"] = "no RAPL domains here"
    for i in range(7):
        nvml.samples.append((i * 0.5, sampling._parse_smi("250.5, 61, 1980, 97")))
    res = result()
    known = frames_per_joule(res, nvml, calls)
    cpu, trt = res["inference"]
    assert trt["energy"]["fps_per_joule"] == pytest.approx(50.0 / 250.5, abs=1e-4) and "host CPU not included" in trt["energy"]["power_from"]
    assert cpu["energy"]["fps_per_joule"] is None and "GPU's power does not cover a CPU path" in cpu["energy"]["absent"]
    assert list(known) == ["ours: auto (armscope's default), members (5)", "daemon pipeline (GPU)"]
