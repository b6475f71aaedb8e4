"""The checks the ``armscope`` commands make on their values live in the domain modules,
so a Python caller gets the same refusal, with the same words, as the command line,
and nothing is written first (tests/test_cli_inputs.py has the command-line side)."""
from __future__ import annotations


import pytest

from armscope.core.errors import ArmscopeError, check_output_file

from repo_paths import DEMO_BUNDLE as BUNDLE
from repo_paths import FRAMES_DIR as FRAMES


def test_tissue_gate_text():
    from armscope.core.tissue import MRI_GATE, TissueGate, parse_gate

    assert parse_gate("mri") == MRI_GATE and parse_gate("mri") is not MRI_GATE
    block = parse_gate("min_focus=40,min_saturation=12.0")
    assert block == {"min_focus": 40.0, "min_saturation": 12} and isinstance(block["min_saturation"], int)
    assert TissueGate.from_manifest({"tissue_gate": block}).min_focus == 40.0
    with pytest.raises(ArmscopeError, match=r"--tissue-gate 'focus=3': expected mri or KEY=VALUE pairs"):
        parse_gate("focus=3")
    with pytest.raises(ArmscopeError, match=r"--tissue-gate 'min_focus=x': 'x' is not a number"):
        parse_gate("min_focus=x")


def test_frame_size_and_calibration_set_outputs(tmp_path):
    from armscope.calibration.calibration_set import build_calibration_set, parse_frame_size

    assert parse_frame_size("1600X1200") == (1600, 1200) and parse_frame_size("") is None
    with pytest.raises(ArmscopeError, match="expected WIDTHxHEIGHT"):
        parse_frame_size("1600")
    with pytest.raises(ArmscopeError, match="must be positive"):
        build_calibration_set([FRAMES], tmp_path / "c.npz", 2, frame_size="0x0")
    with pytest.raises(ArmscopeError, match="must not be, lie inside or contain an input"):
        build_calibration_set([tmp_path], tmp_path / "c.npz", 2)
    with pytest.raises(ArmscopeError, match="must not be, lie inside or contain an input"):
        build_calibration_set([FRAMES], BUNDLE / "c.npz", 2, bundle=BUNDLE)
    assert list(tmp_path.iterdir()) == []


def test_reports_and_reduced_bundles_never_replace_an_input(tmp_path):
    from armscope.calibration.accuracy import accuracy_report
    from armscope.calibration.quantize import make_reduced_bundle

    with pytest.raises(ArmscopeError, match=r"--out .*must not be, lie inside or contain an input"):
        accuracy_report(BUNDLE, None, [tmp_path], tmp_path, force=True, backend="openvino")
    with pytest.raises(ArmscopeError, match="must not be, lie inside or contain an input"):
        make_reduced_bundle(BUNDLE, BUNDLE / "int8", "int8", force=True)
    assert list(tmp_path.iterdir()) == [] and not (BUNDLE / "int8").exists()


def test_key_names_checked_before_any_key_is_written(tmp_path):
    from armscope.core.curve import write_keypairs

    for names, needle in ((["server", "../evil"], "plain names"), (["a", "a"], "distinct"), ([".hidden"], "plain")):
        with pytest.raises(ArmscopeError, match=needle):
            write_keypairs(tmp_path / "k", names)
    assert not (tmp_path / "k").exists()
    written = write_keypairs(tmp_path / "k", ["server", "client"])
    assert [p.name for pair in written for p in pair] == ["server.key", "server.key_secret", "client.key",
                                                          "client.key_secret"]
    with pytest.raises(ArmscopeError, match="already exists"):
        write_keypairs(tmp_path / "k", ["other", "client"])
    assert not (tmp_path / "k" / "other.key").exists()


def test_output_file_names(tmp_path):
    check_output_file(None, "--plot", suffix=".png")
    check_output_file(tmp_path / "h.PNG", "--plot", suffix=".png")
    with pytest.raises(ArmscopeError, match=r"--plot .*p.txt: expected a .png file name"):
        check_output_file(tmp_path / "p.txt", "--plot", suffix=".png")
    with pytest.raises(ArmscopeError, match="is a directory"):
        check_output_file(tmp_path, "--json")


def test_export_options_refused_before_any_model_is_read(tmp_path):
    from armscope.export.multi_export import member_sources
    from armscope.export.options import ExportOptions, run_export, task_spec

    member = tmp_path / "a.keras"
    member.write_bytes(b"never read")
    cases = [
        (ExportOptions(), "no members given"),
        (ExportOptions(members=[member, tmp_path / "." / "a.keras"], out=tmp_path / "o"), "the same file is given twice"),
        (ExportOptions(members=[member], weights=[member], out=tmp_path / "o"), "not both"),
        (ExportOptions(weights=[member], architecture="densenet-mini", out=tmp_path / "o"),
         "--weights needs --architecture and --input-scaling"),
        (ExportOptions(members=[member]), "--out is required"),
        (ExportOptions(members=[member], out=tmp_path, force=True), "must not be, lie inside or contain an input"),
        (ExportOptions(members=[member], out=tmp_path / "o", scaling=[f"{member}=unit"], saliency=True),
         "do not combine with --weights, --saliency or --jobs"),
        (ExportOptions(members=[member], out=tmp_path / "o", svm_head=[f"{tmp_path / 'b.keras'}=h.joblib"]),
         "is not one of the members given"),
        (ExportOptions(members=[member], out=tmp_path / "o", tissue_gate="min_focus=x"), "is not a number"),
    ]
    for options, needle in cases:
        with pytest.raises(ArmscopeError, match=needle):
            run_export(options)
    assert task_spec("a, b").to_manifest() == {"type": "binary", "classes": ["a", "b"], "positive_class": "b",
                                               "threshold": 0.5}
    with pytest.raises(ArmscopeError, match="need --classes"):
        task_spec(None, threshold=0.3)
    with pytest.raises(ArmscopeError, match=r"--classes 'a,,b'"):
        task_spec("a,,b")
    with pytest.raises(ArmscopeError, match="is given twice"):
        member_sources([member], scalings=[f"{member}=unit", f"{member}=torch"])
    sources = member_sources([member], scalings=[f"{member}=caffe"], default_scaling="unit")
    assert sources[0].scaling == "caffe" and member_sources([member], default_scaling="unit")[0].scaling == "unit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras"]
