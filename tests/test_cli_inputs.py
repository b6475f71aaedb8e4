"""Bad input to the main ``armscope`` commands: refused by name, exit 2, before any work, with nothing
overwritten or left behind (from a sweep of realistic operator mistakes)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from armscope.core.bundle import check_out_apart, sha256_file
from armscope.cli import main
from armscope.core.errors import ArmscopeError

from repo_paths import DEMO_BUNDLE as BUNDLE
from repo_paths import FRAMES, REPO

FRAME = FRAMES[1]   # cmu1_frame_1.jpg


def _hashes(root: Path) -> dict:
    return {p.relative_to(root): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_outputs_that_would_overwrite_or_delete_an_input_are_refused(tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(BUNDLE, bundle)
    before = _hashes(bundle)
    calib = tmp_path / "calib.npz"
    calib.write_bytes(b"unused: refused before it is read")
    # quantize B --out B --force used to replace the FP32 source with the INT8 bundle
    assert main(["quantize", str(bundle), "--precision", "int8", "--calib", str(calib), "--out", str(bundle),
                 "--force"]) == 2
    assert "must not be, lie inside or contain an input" in capsys.readouterr().err
    assert main(["accuracy", "--bundle", str(bundle), "--images", str(tmp_path), "--out", str(tmp_path), "--force"]) == 2
    assert main(["classify", "--bundle", str(bundle), str(FRAME), "--overlay-dir", str(bundle / "ov")]) == 2
    assert _hashes(bundle) == before and not (bundle / "ov").exists()
    # export D/m.keras --out D --force deleted the Keras members
    members = tmp_path / "km"
    members.mkdir()
    (members / "member_0.keras").write_bytes(b"k")
    with pytest.raises(ArmscopeError, match="contain an input"):
        check_out_apart(members, [members / "member_0.keras"])
    check_out_apart(tmp_path / "elsewhere", [members / "member_0.keras", None])  # apart: no error


def test_unwritable_outputs_and_bad_numbers_exit_2_without_a_traceback(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    frame = str(FRAME)
    cases = [
        (["classify", "--bundle", str(BUNDLE), frame, "--json", str(tmp_path)], "is a directory"),
        (["classify", "--bundle", str(BUNDLE), frame, "--json", str(a_file / "r.json")], "is a file, not a directory"),
        (["classify", "--bundle", str(BUNDLE), frame, "--threads", "-1"], "argument --threads"),
        (["calibration-set", "--out", str(a_file / "c.npz"), "--size", "2", str(FRAME.parent)], "is a file"),
        (["calibration-set", "--out", str(tmp_path / "c.npz"), "--size", "2", "--frame-size", "0x0",
          str(FRAME.parent)], "must be positive"),
        (["calibration-set", "--out", str(tmp_path / "c.npz"), "--size", "2", "--seed", "-1", str(FRAME.parent)],
         "argument --seed"),
        (["bench", "--bundle", str(BUNDLE), "--source", "dir://x/", "--frames", "5", "--warmup", "-1"], "argument --warmup"),
        (["bench", "--bundle", str(BUNDLE), "--source", "dir://x/", "--frames", "5", "--plot", str(tmp_path / "p.txt")],
         "expected a .png"),
        (["keys", "--out", str(tmp_path / "k"), "--names", "../evil"], "plain names"),
        (["keys", "--out", str(tmp_path / "k"), "--names", "a", "a"], "distinct"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "k").exists() and not list(tmp_path.glob(".*tmp*"))  # nothing half-written
    np.save(tmp_path / "plain.npy", np.zeros(3))
    assert main(["quantize", str(BUNDLE), "--precision", "int8", "--calib", str(tmp_path / "plain.npy"),
                 "--out", str(tmp_path / "q")]) == 2
    assert "a single numpy array, not an armscope calibration set" in capsys.readouterr().err


def test_labels_csv_that_is_not_utf8_or_contradicts_itself(tmp_path):
    from armscope.calibration.accuracy import read_labels

    latin = tmp_path / "latin1.csv"
    latin.write_bytes("image,label\nfrançais.png,tumour\n".encode("latin-1"))
    with pytest.raises(ArmscopeError, match="not UTF-8 text"):
        read_labels(latin, ["other", "tumour"])
    twice = tmp_path / "twice.csv"
    twice.write_text("a.png,tumour\nb.png,other\na.png,other\n")
    with pytest.raises(ArmscopeError, match="line 3: 'a.png' is labelled 'tumour' earlier and 'other' here"):
        read_labels(twice, ["other", "tumour"])


def test_daemon_with_a_bad_curve_key_exits_instead_of_hanging(tmp_path):
    """The key error closed neither socket, so shutdown waited in context.term() forever."""
    bad = tmp_path / "server.key_secret"
    bad.write_text("not a key\n")
    proc = subprocess.run([sys.executable, "-m", "armscope.cli", "run", "--bundle", str(BUNDLE),
                           "--source", f"dir://{FRAME.parent}/?fps=2", "--publish", "tcp://127.0.0.1:5631",
                           "--control", "tcp://127.0.0.1:5632", "--curve-server-secret", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "no public-key line" in proc.stderr, proc.stderr[-2000:]


def test_source_fps_must_be_a_finite_positive_number():
    from armscope.edge.sources import parse_source

    for fps in ("nan", "inf", "0", "-1"):
        with pytest.raises(ArmscopeError, match=r"fps=.*expected a number in \(0, 1000\]"):
            parse_source(f"dir://frames/?fps={fps}")


def test_errors_inside_a_staged_output_name_the_output_not_its_temporary_directory(tmp_path):
    from armscope.core.bundle import staged_directory

    out = tmp_path / "bundle"
    with pytest.raises(ArmscopeError) as exc:
        with staged_directory(out) as stage:
            raise ArmscopeError(f"{stage / 'manifest.json'}: field task.classes: expected a list")
    assert str(exc.value) == f"{out / 'manifest.json'}: field task.classes: expected a list"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantize_refuses_op_types_the_graphs_do_not_have(tmp_path, capsys):
    """--op-types Bogus quantized nothing and still wrote an 'int8' bundle (after minutes of work)."""
    calib = tmp_path / "c.npz"
    calib.write_bytes(b"never read: the op types are checked first")
    assert main(["quantize", str(BUNDLE), "--precision", "int8", "--calib", str(calib), "--op-types", "Bogus,Conv",
                 "--out", str(tmp_path / "q")]) == 2
    assert "--op-types: 'Bogus' not in the member graphs (they have" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
