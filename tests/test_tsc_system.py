"""The tuberous-sclerosis MRI system end to end (issue 19): an InceptionV3-shaped
whole-image binary classifier trained on 0..1 pixels (narrow stand-in, seeded)
exported with --input-scaling unit --no-crop --grey --saliency --tissue-gate mri;
parity of probabilities, in-graph Grad-CAM and in-graph saliency against Keras and
tf.GradientTape on real MR/CT slices (pydicom's test files) and real H&E tiles;
classify of DICOM, 16-bit PNG/TIFF and 8-bit grey files with overlays and a
contact sheet; the gate refusing a slice of air; a damaged and a non-image file;
the daemon; FP16/INT8 through the precision gate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from armscope.cli import main

pytest.importorskip("tensorflow")
pydicom = pytest.importorskip("pydicom")
pytestmark = pytest.mark.tf

from repo_paths import NCT_TILES as HE


def mr_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


@pytest.fixture(scope="module")
def tsc(tmp_path_factory):
    """The narrow TSC model and its bundle, exported once by the CLI as a lab would."""
    import tsc_support

    root = tmp_path_factory.mktemp("tsc")
    model = tsc_support.tsc_inception(seed=3)
    model.save(root / "tsc.keras")
    bundle = root / "bundle"
    assert main(["export", str(root / "tsc.keras"), "--out", str(bundle), "--classes", "no_tuber,tuber",
                 "--input-scaling", "unit", "--no-crop", "--grey", "--saliency", "--tissue-gate", "mri",
                 "--interpolation", "linear"]) == 0
    return model, bundle, root


def slices(root: Path) -> dict[str, Path]:
    """Real images in the forms MRI users hold them: DICOM (MR, CT), the MR slice's stored
    16-bit values as PNG and TIFF, its windowed 8-bit grey JPEG; a slice of air (the MR
    file's header and window, its pixels replaced by Rayleigh background noise); a
    truncated DICOM (pydicom's MR_truncated.dcm); a text file named .dcm."""
    d = root / "slices"
    if d.exists():
        return {p.name: p for p in d.iterdir()}
    d.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm", "MR_truncated.dcm"):
        shutil.copy(mr_file(name), d / name)
    ds = pydicom.dcmread(mr_file("MR_small.dcm"))
    stored = ds.pixel_array.astype(np.uint16)
    assert cv2.imwrite(str(d / "mr16.png"), stored) and cv2.imwrite(str(d / "mr16.tif"), stored)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    windowed = np.clip(np.rint(((stored - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(d / "mr8.jpg"), windowed, [cv2.IMWRITE_JPEG_QUALITY, 95])
    air = ds.copy()
    noise = np.random.default_rng(0).rayleigh(25.0, stored.shape).astype(np.uint16)
    air.PixelData = noise.tobytes()
    air.save_as(d / "air.dcm")
    (d / "notes.dcm").write_text("not a DICOM file\n")
    return {p.name: p for p in d.iterdir()}


def model_inputs(paths, spec) -> np.ndarray:
    from armscope.core.preprocess import preprocess_frame, read_frame

    return np.stack([preprocess_frame(read_frame(p, spec)[0], spec) for p in paths])


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_export_parity_probs_cam_saliency_on_real_slices(tsc):
    """probs <= 1e-4 vs Keras; CAM and saliency corr >= 0.999 vs tf.GradientTape on the
    original model, on real MR/CT DICOM and grey H&E; OpenVINO returns the same outputs."""
    from armscope.core.bundle import load_bundle
    from armscope.edge.backends import open_backend
    from armscope.export.gradcam_reference import reference_cam, reference_saliency
    from armscope.export.onnx_export import apply_scaling, keras_probs, scaling_of
    from armscope.export.structure import find_structure

    model, bundle_dir, _ = tsc
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m["schema_version"] == 2 and m["preprocessing"]["center_crop"] == 0
    assert m["preprocessing"]["input"]["kind"] == "grey" and m["preprocessing"]["scaling"]["name"] == "unit"
    assert m["model"]["architecture"] == "whole-image-classifier" and m["model"]["head"] == "sigmoid"
    assert bundle.output_names == ("probs", "cam", "saliency") and bundle.output_shape("saliency")[2:] == [224, 224]
    assert m["tissue_gate"]["min_brightness"] > 0
    x = model_inputs([mr_file("MR_small.dcm"), mr_file("CT_small.dcm"), HE[0]], bundle.preprocessing)
    assert x.shape == (3, 224, 224, 3) and np.array_equal(x[..., 0], x[..., 2])  # grey replicated
    st = find_structure(model, model.name)
    backend = open_backend(bundle, "onnxruntime")
    backend.activate()
    try:
        got = backend.infer(x)
    finally:
        backend.close()
    scaled = apply_scaling(x, "unit")
    assert np.max(np.abs(got["probs"] - keras_probs(model, st, scaled))) <= 1e-4
    assert len({round(float(p), 3) for p in got["probs"][:, 1]}) == 3  # the slices differ: not a constant model
    for n in range(len(x)):
        cam_ref = reference_cam(model, scaled[n], st)
        sal_ref = reference_saliency(model, x[n], st, scaling_of("unit"))
        for c in range(2):
            if cam_ref[c].max() > 0:
                assert corr(got["cam"][n, c], cam_ref[c]) >= 0.999, (n, c)
            assert corr(got["saliency"][n, c], sal_ref[c]) >= 0.999, (n, c)
            # same scale too, not only correlated (a max pool's exact ties may route a few pixels' gradient
            # to another equally maximal cell, so compare totals, not every pixel)
            assert abs(got["saliency"][n, c].sum() / sal_ref[c].sum() - 1) < 1e-2
    backend = open_backend(bundle, "openvino", layout="merged")
    backend.activate()
    try:
        ov = backend.infer(x)
    finally:
        backend.close()
    assert np.max(np.abs(ov["probs"] - got["probs"])) <= 1e-4
    assert min(corr(ov["saliency"][n, 1], got["saliency"][n, 1]) for n in range(len(x))) >= 0.999


def test_classify_dicom_16bit_grey_with_overlays_and_contact_sheet(tsc, capsys):
    """One window (the file's own 600/1600, given explicitly so the PNG/TIFF get it too):
    the DICOM, its 16-bit PNG and TIFF classify identically; the 8-bit JPEG closely; the
    slice of air and the truncated DICOM get no decision; overlays at the original
    resolution (64 px shown x8) with a caption band; one contact sheet."""
    _, bundle, root = tsc
    files = slices(root)
    names = ["MR_small.dcm", "mr16.png", "mr16.tif", "mr8.jpg", "CT_small.dcm", "air.dcm", "MR_truncated.dcm"]
    out = root / "classified"
    code = main(["classify", "--bundle", str(bundle), "--window", "600,1600", "--json", str(out / "r.json"),
                 "--overlay-dir", str(out / "overlays"), "--contact-sheet", str(out / "sheet.png"),
                 *[str(files[n]) for n in names]])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "r.json").read_text())
    by = {Path(r["image"]).name: r for r in report["images"]}
    p = {n: by[n]["probs"]["tuber"] for n in names[:5]}
    assert p["MR_small.dcm"] == p["mr16.png"] == p["mr16.tif"]
    assert abs(p["mr8.jpg"] - p["MR_small.dcm"]) < 0.02
    assert by["MR_small.dcm"]["input"] == {"format": "DICOM", "bit_depth": 16, "conversion": "window 600/1600 (given)"}
    assert by["air.dcm"]["decision"] is None and by["air.dcm"]["no_decision"]["reason"] == "no_tissue"
    assert by["MR_truncated.dcm"]["no_decision"]["reason"] == "corrupt_image"
    assert "MR_truncated.dcm" in by["MR_truncated.dcm"]["no_decision"]["detail"]
    assert report["slide"]["n_classified"] == 5
    for stem, side in (("MR_small", 64), ("mr16", 64), ("CT_small", 128)):
        for kind in ("overlay", "saliency"):
            image = cv2.imread(str(out / "overlays" / f"{stem}_{kind}.png"))
            zoom = -(-512 // side)
            assert image.shape[1] == side * zoom and image.shape[0] > side * zoom  # the image plus a caption band
    original = cv2.resize(cv2.imread(str(files["mr8.jpg"])), None, fx=8, fy=8, interpolation=cv2.INTER_NEAREST)
    shown = cv2.imread(str(out / "overlays" / "mr8_saliency.png"))[-512:]
    assert 2 < np.abs(shown.astype(int) - original).mean() < 120  # blended over the slice, not replacing it
    sheet = cv2.imread(str(out / "sheet.png"))
    assert sheet is not None and sheet.shape[1] >= 1000 and sheet.shape[0] >= 600
    assert "no decision: no_tissue" in printed and "no decision: corrupt_image" in printed


def test_files_that_are_not_images_are_refused(tsc, capsys):
    """A file whose bytes are no image is a damaged image (no decision, the others classified, as
    the daemon counts a corrupt frame); a path that does not exist is a typo: one error, exit 2."""
    _, bundle, root = tsc
    files = slices(root)
    assert main(["classify", "--bundle", str(bundle), str(files["MR_small.dcm"]), str(files["notes.dcm"])]) == 0
    printed = capsys.readouterr()
    row = next(line for line in printed.out.splitlines() if line.startswith("notes.dcm"))
    assert "no decision: corrupt_image" in row and "Traceback" not in printed.err
    assert any(line.startswith("MR_small.dcm") and "no decision" not in line for line in printed.out.splitlines())
    bad = root / "missing.dcm"
    assert main(["classify", "--bundle", str(bundle), str(files["MR_small.dcm"]), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["classify", "--bundle", str(bundle), "--window", "600,-5", str(files["MR_small.dcm"])]) == 2
    assert "--window '600,-5'" in capsys.readouterr().err


def test_daemon_runs_the_tsc_bundle_on_grey_slices(tsc, tmp_path):
    from armscope.core import protocol
    from daemon_support import running, wait_for

    _, bundle, root = tsc
    frame = tmp_path / "slice.png"
    assert cv2.imwrite(str(frame), cv2.imread(str(slices(root)["mr8.jpg"])))
    with running(bundle, f"image://{frame}?fps=4", tmp_path, backend="onnxruntime") as daemon:
        with protocol.Subscriber(daemon.endpoints["publish"], topics=["overlay"]) as sub:
            message, _ = wait_for(sub, lambda m: True, 60)
    c = message.header["cam"]   # protocol v2: the CAM as data over the whole (square) slice
    maps = protocol.cam_array(message)
    assert maps.shape == (c["classes"], c["height"], c["width"]) and maps[c["index"]].max() > 0 and c["peak"] > 0
    assert message.header["region"] == {"frame_width": 64, "frame_height": 64, "x": 0, "y": 0, "size": 64}
    assert c["box"] == {"x": 0, "y": 0, "size": 64}


def test_fp16_and_int8_through_the_precision_gate(tsc, capsys):
    """Calibration with the bundle's MRI gate and preprocessing, FP16 and INT8 bundles
    measured on a disjoint hold-out; the saliency survives reduced precision."""
    from armscope.core.bundle import load_bundle
    from armscope.edge.backends import open_backend

    _, bundle, root = tsc
    files = slices(root)
    calib_dir, hold_dir = root / "calib", root / "holdout"
    calib_dir.mkdir(exist_ok=True)
    hold_dir.mkdir(exist_ok=True)
    for p in HE[:5] + [files["MR_small.dcm"]]:
        shutil.copy(p, calib_dir / p.name)
    for p in HE[5:9] + [files["CT_small.dcm"], files["mr16.png"]]:
        shutil.copy(p, hold_dir / p.name)
    assert main(["calibration-set", str(calib_dir), "--bundle", str(bundle), "--size", "6",
                 "--out", str(root / "calib.npz")]) == 0
    x = model_inputs(sorted(hold_dir.iterdir()), load_bundle(bundle).preprocessing)
    reference = _infer(open_backend, load_bundle(bundle), x)
    for precision, extra in (("fp16", []), ("int8", ["--calib", str(root / "calib.npz")])):
        out = root / f"bundle-{precision}"
        code = main(["quantize", str(bundle), "--out", str(out), "--precision", precision,
                     "--holdout", str(hold_dir), *extra])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        reduced = load_bundle(out)
        assert reduced.manifest["quantization"]["deployable"] is True
        assert reduced.output_names == ("probs", "cam", "saliency")
        got = _infer(open_backend, reduced, x, exact=precision == "int8")
        assert np.max(np.abs(got["probs"] - reference["probs"])) < 0.05
        cam_r = min(corr(got["cam"][n, 1], reference["cam"][n, 1]) for n in range(len(x)))
        sal_r = min(corr(got["saliency"][n, 1], reference["saliency"][n, 1]) for n in range(len(x)))
        print(f"{precision}: CAM r min {cam_r:.4f}, saliency r min {sal_r:.4f}")
        assert cam_r >= 0.99
        if precision == "fp16":
            # gradients of ~1e-6 per pixel value are FP16 subnormals: measured r 0.976 here
            assert sal_r >= 0.95
        # INT8: quantised activations move the ReLU masks and max-pool winners the backward pass
        # follows; measured r 0.50 here. Not asserted: INT8 saliency is not faithful (README).


def _infer(open_backend, bundle, x, exact=False):
    if exact:  # the INT8 graph computed exactly (what TensorRT and VNNI/AMX CPUs compute)
        from armscope.calibration.accuracy import run_bundle

        return run_bundle(bundle, x, exact_qdq=True)
    backend = open_backend(bundle, "onnxruntime")
    backend.activate()
    try:
        return backend.infer(x)
    finally:
        backend.close()
