"""``--backend auto`` on the CPU picks the fastest path that stays faithful here
(``edge/backends/select.py``): the decision table on the /proc/cpuinfo of three
real machine kinds (AVX2 only; AVX512-BF16 without AMX; AMX), and end to end on
this machine on real bundles: no record -> FP32 and the command that records
one; ``armscope accuracy`` (a real process) records BF16's gate and the timing
of every path on a copy of the demo bundle -> auto runs BF16 in the layout
measured fastest where this CPU has it, FP32 on a CPU without BF16 or with a
stale record, saying why; ``classify`` and the daemon's status report the choice."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from armscope.core.bundle import load_bundle
from armscope.core.preprocess import load_image, preprocess_frame
from armscope.edge.backends import fidelity, open_backend
from armscope.edge.backends.cpu_features import int8_exact
from armscope.edge.backends.select import Machine, choose, decide

from repo_paths import DEMO_BUNDLE as DEMO
from repo_paths import FRAMES_DIR as FRAMES
from repo_paths import REPO
CPUINFO = Path(__file__).resolve().parent / "data" / "cpuinfo"
AVX2 = (CPUINFO / "amd-ryzen-5950x-avx2.txt").read_text()
AVX512_BF16 = (CPUINFO / "amd-epyc-avx512-bf16.txt").read_text()
AMX = (CPUINFO / "intel-xeon-6972p-amx.txt").read_text()
OV = "2026.4.1"
SHA = "ab" * 32


def _bundle(precision: str = "fp32", root: str = "/bundles/b"):
    return SimpleNamespace(manifest={"precision": precision, "ensemble": {"sha256": SHA}}, root=Path(root))


def _record(unit: str, passed: bool = True, openvino: str = OV, sha: str = SHA, bf16_s: float = 0.283) -> dict:
    return {"key": fidelity.make_key(sha, openvino, unit), "passed": passed,
            "failed": [] if passed else ["top-1 agreement 96.43% < 99%"],
            "summary": {"n_images": 28, "top1_agreement": 1.0 if passed else 0.9643, "max_abs_delta_p": 3e-5},
            "speed": {"onnxruntime_fp32_s": 0.553, "openvino_bf16_s": bf16_s, "speedup": 0.553 / bf16_s}
            if passed else None,
            "images_from": "holdout"}


# ----------------------------------------------------------------- what the CPU has, from real cpuinfo


def test_cpuinfo_of_the_three_kinds_parses_to_their_units():
    machines = {name: Machine.from_cpuinfo(text, OV) for name, text in
                (("avx2", AVX2), ("avx512_bf16", AVX512_BF16), ("amx", AMX))}
    assert {k: m.bf16_unit for k, m in machines.items()} == {"avx2": None, "avx512_bf16": "avx512_bf16",
                                                             "amx": "amx_bf16"}
    assert {k: int8_exact("x86_64", set(m.flags))[0] for k, m in machines.items()} == {
        "avx2": False, "avx512_bf16": True, "amx": True}
    # the same flags on an Arm board are not x86 BF16 units
    assert Machine.from_cpuinfo(AMX, OV, arch="aarch64").bf16_unit is None


# ----------------------------------------------------------------- the decision table


@pytest.mark.parametrize("cpuinfo", [AVX2, AVX512_BF16, AMX], ids=["avx2", "avx512_bf16", "amx"])
def test_fp32_without_a_record_stays_fp32_and_says_how_to_record(cpuinfo):
    machine = Machine.from_cpuinfo(cpuinfo, OV)
    choice = decide(_bundle(), machine, [])
    assert (choice.backend, choice.precision) == ("onnxruntime", "fp32")
    if machine.bf16_unit is None:
        assert "no native BF16" in choice.why
    else:
        assert machine.bf16_unit in choice.why and "not recorded" in choice.why
        assert "armscope accuracy --bundle /bundles/b --backend openvino --cpu-precision bf16" in choice.why


@pytest.mark.parametrize("cpuinfo,unit", [(AVX512_BF16, "avx512_bf16"), (AMX, "amx_bf16")],
                         ids=["avx512_bf16", "amx"])
def test_fp32_with_a_passing_record_for_this_unit_and_openvino_runs_bf16(cpuinfo, unit):
    choice = decide(_bundle(), Machine.from_cpuinfo(cpuinfo, OV), [_record(unit)])
    assert (choice.backend, choice.precision, choice.cpu_precision) == ("openvino", "bf16", "bf16")
    assert choice.fidelity_record == "/bundles/b/fidelity/bf16-openvino.json"
    assert "passed the agreement gate" in choice.why and "28 images" in choice.why and "1.95x" in choice.why


def test_bf16_that_passed_the_gate_but_was_not_faster_stays_fp32():
    # e.g. the tiny demo ensemble: ONNX Runtime's concurrent members beat OpenVINO's merged BF16 graph
    choice = decide(_bundle(), Machine.from_cpuinfo(AVX512_BF16, OV), [_record("avx512_bf16", bf16_s=0.6)])
    assert (choice.backend, choice.precision) == ("onnxruntime", "fp32")
    assert "not faster here" in choice.why and "0.92x" in choice.why


def test_a_record_counts_only_for_its_ensemble_openvino_and_unit():
    epyc, xeon = Machine.from_cpuinfo(AVX512_BF16, OV), Machine.from_cpuinfo(AMX, OV)
    # measured on AVX512-BF16: says nothing for AMX, and the reverse
    for machine, other in ((xeon, "avx512_bf16"), (epyc, "amx_bf16")):
        choice = decide(_bundle(), machine, [_record(other)])
        assert choice.precision == "fp32" and f"BF16 unit {other}" in choice.why
    choice = decide(_bundle(), epyc, [_record("avx512_bf16", openvino="2025.3.0")])
    assert choice.precision == "fp32" and "OpenVINO 2025.3.0" in choice.why and f"OpenVINO {OV}" in choice.why
    choice = decide(_bundle(), epyc, [_record("avx512_bf16", sha="cd" * 32)])
    assert choice.precision == "fp32" and "another ensemble" in choice.why
    # records of both kinds side by side: each machine finds its own
    both = [_record("avx512_bf16"), _record("amx_bf16")]
    assert decide(_bundle(), epyc, both).precision == decide(_bundle(), xeon, both).precision == "bf16"


def test_a_failed_gate_keeps_fp32_and_names_the_failure():
    choice = decide(_bundle(), Machine.from_cpuinfo(AMX, OV), [_record("amx_bf16", passed=False)])
    assert (choice.backend, choice.precision) == ("onnxruntime", "fp32")
    assert "failed the agreement gate" in choice.why and "96.43% < 99%" in choice.why


def test_without_openvino_bf16_cpus_stay_on_onnxruntime_and_say_what_to_install():
    choice = decide(_bundle(), Machine.from_cpuinfo(AMX, None), [_record("amx_bf16")])
    assert (choice.backend, choice.precision) == ("onnxruntime", "fp32")
    assert "armscope[openvino]" in choice.why


def test_int8_and_fp16_bundles():
    table = {}
    for name, text in (("avx2", AVX2), ("avx512_bf16", AVX512_BF16), ("amx", AMX)):
        for openvino in (OV, None):
            machine = Machine.from_cpuinfo(text, openvino)
            for precision in ("int8", "fp16"):
                c = decide(_bundle(precision), machine, [])
                table[name, openvino is not None, precision] = (c.backend, c.precision)
    # INT8: OpenVINO where it is exact (VNNI/AMX) and installed; ONNX Runtime refuses it on AVX2
    assert table["avx2", True, "int8"] == table["avx2", False, "int8"] == ("onnxruntime", "int8")
    for kind in ("avx512_bf16", "amx"):
        assert table[kind, True, "int8"] == ("openvino", "int8")
        assert table[kind, False, "int8"] == ("onnxruntime", "int8")
    assert {v for k, v in table.items() if k[2] == "fp16"} == {("onnxruntime", "fp16")}
    why = decide(_bundle("int8"), Machine.from_cpuinfo(AMX, None), []).why
    assert "armscope[openvino]" in why


def test_an_unreadable_record_file_is_named_and_fp32_runs(tmp_path, caplog):
    root = tmp_path / "b"
    shutil.copytree(DEMO, root)
    (root / "fidelity").mkdir()
    (root / "fidelity" / "bf16-openvino.json").write_text("{not json")
    machine = Machine.from_cpuinfo(AVX512_BF16, OV)
    choice = choose(load_bundle(root), machine)
    assert (choice.precision, choice.warn) == ("fp32", True)
    assert "bf16-openvino.json: not a readable fidelity record" in choice.why


def _timed_record(unit: str, ort_s: float, merged_s: float, members_s: float | None) -> dict:
    """A passing record in the format ``measure_speed`` writes (both BF16 layouts timed)."""
    record = _record(unit)
    paths = {"onnxruntime fp32 members": ort_s, "openvino bf16 merged": merged_s}
    if members_s is not None:
        paths["openvino bf16 members"] = members_s
    best = min((k for k in paths if k.startswith("openvino")), key=paths.get)
    record["speed"] = {"paths_s": paths, "onnxruntime_fp32_s": ort_s, "openvino_bf16_s": paths[best],
                       "bf16_layout": best.rsplit(" ", 1)[1], "speedup": ort_s / paths[best], "rounds": 9}
    return record


def test_bf16_runs_in_the_layout_the_record_measured_fastest():
    epyc = Machine.from_cpuinfo(AVX512_BF16, OV)
    # the layout auto runs is the one timed fastest, not a fixed one
    members_fastest = [_timed_record("avx512_bf16", 0.200, 0.160, 0.120)]
    choice = decide(_bundle(), epyc, members_fastest)
    assert (choice.backend, choice.precision, choice.layout) == ("openvino", "bf16", "members")
    assert "members layout" in choice.why and "1.67x" in choice.why
    merged_fastest = [_timed_record("avx512_bf16", 0.208, 0.099, 0.152)]  # the demo ensemble, BENCHMARKS.md 6
    assert decide(_bundle(), epyc, merged_fastest).layout == "merged"
    # a layout asked for by hand is compared as it was timed
    assert decide(_bundle(), epyc, members_fastest, layout="merged").layout == "merged"
    slower_merged = [_timed_record("avx512_bf16", 0.200, 0.250, 0.120)]
    choice = decide(_bundle(), epyc, slower_merged, layout="merged")
    assert (choice.backend, choice.precision) == ("onnxruntime", "fp32") and "not faster here" in choice.why
    # a record made before both layouts were timed: its one BF16 figure is the merged graph's
    old = decide(_bundle(), epyc, [_record("avx512_bf16")], layout="members")
    assert old.precision == "fp32" and old.warn and "no timing of the members layout" in old.why
    assert decide(_bundle(), epyc, [_record("avx512_bf16")]).layout == "merged"


# ----------------------------------------------------------------- end to end on this machine, real bundles


def _auto(root: Path, caplog, **options):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="armscope.edge.backends"):
        backend = open_backend(load_bundle(root), "auto", **options)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backend:")]
    assert len(lines) == 1, lines  # one line says what runs and why
    return backend, lines[0]


def _accuracy(root: Path, out: Path):
    return subprocess.run([sys.executable, "-m", "armscope.cli", "accuracy", "--bundle", str(root), "--backend",
                           "openvino", "--cpu-precision", "bf16", "--images", str(FRAMES), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def _bf16_here() -> bool:
    here = Machine.here()
    if here.bf16_unit is None or here.openvino is None:
        return False
    from armscope.edge.backends.openvino_backend import cpu_capabilities

    return "BF16" in cpu_capabilities()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A copy of the demo bundle whose BF16 fidelity ``armscope accuracy`` (a real
    process) measured and recorded on this machine; skips where it cannot be."""
    if not _bf16_here():
        pytest.skip("no BF16 here (CPU or OpenVINO): BF16 cannot be measured (test_without_bf16_* covers it)")
    root = tmp_path_factory.mktemp("recorded") / "bundle"
    shutil.copytree(DEMO, root)
    out = _accuracy(root, root.parent / "report")
    assert out.returncode == 0, out.stderr
    path = root / "fidelity" / "bf16-openvino.json"
    assert f"recorded in {path}" in out.stdout and "speed, one frame, interleaved: " in out.stdout
    return root, path


def test_without_a_record_auto_runs_fp32_and_logs_why(tmp_path, caplog):
    root = tmp_path / "bundle"
    shutil.copytree(DEMO, root)
    here = Machine.here()
    backend, line = _auto(root, caplog)
    with backend:
        assert backend.describe()["selected"] == {"backend": "onnxruntime", "precision": "fp32",
                                                  "layout": "members", "fidelity_record": None}
    assert line.startswith("backend: onnxruntime FP32 members on the CPU")
    if here.bf16_unit is None:
        assert "no native BF16" in line
    elif here.openvino is not None:  # missing record: the reason names the command that records one
        assert "not recorded" in line
        assert f"armscope accuracy --bundle {root} --backend openvino --cpu-precision bf16" in line


def test_without_bf16_here_the_measurement_is_refused(tmp_path):
    if _bf16_here():
        pytest.skip("this machine has BF16 (test_the_record_* covers it)")
    if Machine.here().openvino is None:
        pytest.skip("OpenVINO is not installed")
    root = tmp_path / "bundle"
    shutil.copytree(DEMO, root)
    out = _accuracy(root, tmp_path / "report")
    assert out.returncode != 0 and "no BF16 support" in out.stderr
    assert not (root / "fidelity").exists()


@pytest.mark.slow
def test_the_record_holds_the_gate_and_every_layout_timed(recorded):
    root, path = recorded
    here = Machine.here()
    record = json.loads(path.read_text())["records"][0]
    assert record["key"] == fidelity.make_key(load_bundle(root).manifest["ensemble"]["sha256"], here.openvino,
                                              here.bf16_unit)
    assert record["passed"], record["failed"]  # the demo ensemble in BF16: 100% agreement, |dp| ~1e-3
    assert record["summary"]["n_images"] == len(list(FRAMES.glob("*.jpg")))
    speed = record["speed"]
    assert set(speed["paths_s"]) == {"onnxruntime fp32 members", "openvino bf16 merged", "openvino bf16 members"}
    assert all(s > 0 for s in speed["paths_s"].values()) and speed["rounds"] >= 5
    bf16 = {k: v for k, v in speed["paths_s"].items() if k.startswith("openvino")}
    assert speed["bf16_layout"] == min(bf16, key=bf16.get).rsplit(" ", 1)[1]


@pytest.mark.slow
def test_a_record_present_runs_what_it_measured_fastest(recorded, caplog):
    root, path = recorded
    speed = json.loads(path.read_text())["records"][0]["speed"]
    backend, line = _auto(root, caplog)
    bundle = load_bundle(root)
    frame = preprocess_frame(load_image(FRAMES / "cmu1_frame_1.jpg"), bundle.preprocessing)[None]
    with backend:
        info = backend.describe()
        got = backend.infer(frame)
    if speed["speedup"] > 1.0:
        layout = speed["bf16_layout"]
        assert (info["backend"], info["precision"], info["layout"]) == ("openvino", "bf16", layout)
        assert info["selected"] == {"backend": "openvino", "precision": "bf16", "layout": layout,
                                    "fidelity_record": str(path)}
        assert line.startswith(f"backend: openvino BF16 {layout} on the CPU (") and "passed the agreement gate" in line
        with open_backend(bundle, "onnxruntime") as reference:
            assert np.abs(got["probs"] - reference.infer(frame)["probs"]).max() < 0.01
    else:  # measured on a loaded machine, BF16 can come out slower: then FP32, saying so
        assert info["selected"]["precision"] == "fp32" and "was not faster here" in line


@pytest.mark.slow
def test_the_layout_comes_from_the_record(recorded, caplog, tmp_path):
    # the same real record, its timings set so that per-member BF16 requests were the fastest:
    # auto must then run those, not the merged graph
    root, path = recorded
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    data = json.loads(path.read_text())
    data["records"][0]["speed"] |= {"paths_s": {"onnxruntime fp32 members": 0.2, "openvino bf16 merged": 0.15,
                                                "openvino bf16 members": 0.1}, "onnxruntime_fp32_s": 0.2}
    (copy / "fidelity" / "bf16-openvino.json").write_text(json.dumps(data))
    backend, line = _auto(copy, caplog)
    with backend:
        info = backend.describe()
        assert (info["backend"], info["precision"], info["layout"], info["requests"]) == (
            "openvino", "bf16", "members", len(load_bundle(copy).member_paths))
    assert line.startswith("backend: openvino BF16 members on the CPU (") and "2.00x" in line
    backend, line = _auto(copy, caplog, layout="merged")  # asked for by hand: honoured, compared as timed
    with backend:
        assert backend.describe()["layout"] == "merged" and backend.describe()["precision"] == "bf16"
    assert "1.33x" in line


@pytest.mark.slow
def test_a_cpu_without_bf16_never_runs_bf16_even_with_a_passing_record(recorded):
    root, _ = recorded
    bundle = load_bundle(root)
    here = Machine.here()
    for cpuinfo, why in ((AVX2, "no native BF16"), (AMX, "BF16 unit avx512_bf16")):
        choice = choose(bundle, Machine.from_cpuinfo(cpuinfo, here.openvino))
        assert (choice.backend, choice.precision) == ("onnxruntime", "fp32") and why in choice.why


@pytest.mark.slow
def test_a_stale_record_runs_fp32_and_says_why(recorded, caplog, tmp_path):
    root, path = recorded
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    data = json.loads(path.read_text())
    data["records"][0]["key"]["openvino"] = "1999.0.0"   # a newer OpenVINO since it was measured
    (copy / "fidelity" / "bf16-openvino.json").write_text(json.dumps(data))
    backend, line = _auto(copy, caplog)
    with backend:
        assert backend.describe()["selected"]["precision"] == "fp32"
    assert line.startswith("backend: onnxruntime FP32 members on the CPU") and "recorded only for OpenVINO 1999.0.0" in line


@pytest.mark.slow
def test_classify_and_the_daemon_status_report_the_choice(recorded, tmp_path):
    from daemon_support import running

    from armscope.core import protocol

    root, _ = recorded
    want = open_backend(load_bundle(root), "auto").selection["selected"]
    report = tmp_path / "classify.json"
    out = subprocess.run([sys.executable, "-m", "armscope.cli", "classify", str(FRAMES / "cmu1_frame_1.jpg"),
                          "--bundle", str(root), "--json", str(report)], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(report.read_text())["backend"]["selected"] == want
    with running(root, f"dir://{FRAMES}/?fps=2&loop=1", tmp_path) as daemon:
        status = protocol.control_request("status", daemon.endpoints["control"], timeout_ms=30000)
    assert status["backend"]["selected"] == want and status["backend"]["requested"] == "auto"
    assert "agreement gate" in status["backend"]["why"] or "not faster" in status["backend"]["why"]
