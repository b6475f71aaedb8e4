"""What one image costs with the renal electron-microscopy multi-model on the CPU.

Full size: member one keras.applications.ResNet50(weights=None) as a skip-feature
extractor (global average pools of conv3_block4_out, conv4_block6_out and
conv5_block3_out, concatenated: 3840 features) with a scikit-learn
SVC(kernel="rbf", probability=True) head trained here on those features of
crops of the real NCT-CRC-HE-100K tiles (three tissue groups; random backbone
weights: speed does not depend on them, and the SVC gets real support vectors);
member two a plain ResNet50 softmax classifier; both 224 x 224, caffe scaling in
the graph. Exported once as the lab would (``armscope export ... --svm-head``)
and cached in benchmarks/.cache/renal_resnet50.
Timed: ``armscope classify``'s own function on the nine real tiles (reading, the
gate, preprocessing, backend start, one pass of both members with the SVM's
coupling loop and both Grad-CAMs), with and without overlays; per image = the
call / 9. And the backend's pass alone on one tile (what the daemon pays per frame).

Run:  python -m pytest benchmarks/bench_renal.py --benchmark-only
"""
from __future__ import annotations

import sys
from pathlib import Path

import joblib
import pytest

from benchmarks.conftest import CACHE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import resnet_zoo_support as rz  # noqa: E402

SKIPS = ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out")


@pytest.fixture(scope="module")
def renal_bundle() -> Path:
    folder = CACHE / "renal_resnet50"
    bundle = folder / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    import keras

    from armscope.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(224, 224, 3))
    pools = [keras.layers.GlobalAveragePooling2D(name=f"gap_{n}")(base.get_layer(n).output) for n in SKIPS]
    features = keras.Model(base.input, keras.layers.Concatenate(name="skip_features")(pools), name="resnet50_skip")
    keras.utils.set_random_seed(1)
    plain = keras.applications.ResNet50(weights=None, classes=3, classifier_activation="softmax")
    svm = rz.train_svm(features, REPO, rz.THREE, per_tile=8)
    paths = {"features": folder / "resnet50_skip.keras", "plain": folder / "resnet50_plain.keras",
             "svm": folder / "svm.joblib"}
    features.save(paths["features"])
    plain.save(paths["plain"])
    joblib.dump(svm, paths["svm"])
    f, p = paths["features"], paths["plain"]
    assert main(["export", str(f), str(p), "--svm-head", f"{f}={paths['svm']}", "--scaling", f"{f}=caffe",
                 "--scaling", f"{p}=caffe", "--trust-code", "--classes", "epithelial,stromal,other",
                 "--crop", "224", "--tissue-gate", "min_focus=40", "--out", str(bundle), "--force"]) == 0
    return bundle


@pytest.fixture(scope="module")
def tiles() -> list[Path]:
    return list(rz.tile_paths(REPO).values())


@pytest.mark.benchmark(group="renal-per-image", min_rounds=3, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("overlays", [False, True], ids=["decisions", "with-overlays"])
def test_classify_tiles(benchmark, renal_bundle, tiles, tmp_path, overlays):
    from armscope.edge.classify import classify_images

    runs = iter(range(10_000))

    def classify():
        out = tmp_path / f"overlays_{next(runs)}" if overlays else None
        return classify_images(renal_bundle, tiles, overlay_dir=out, backend="onnxruntime")

    report = benchmark(classify)
    classified = report["slide"]["n_classified"]
    assert classified >= len(tiles) - 2  # the gate may refuse the background and fat tiles
    benchmark.extra_info["images_per_call"] = len(tiles)
    benchmark.extra_info["classified_per_call"] = classified
    benchmark.extra_info["per_image_s_mean"] = benchmark.stats.stats.mean / len(tiles)


@pytest.mark.benchmark(group="renal-inference", min_rounds=10, warmup=True, warmup_iterations=2)
def test_one_pass_both_members(benchmark, renal_bundle, tiles):
    from armscope.core.bundle import load_bundle
    from armscope.core.preprocess import load_image, preprocess_frame
    from armscope.edge.backends import open_backend

    bundle = load_bundle(renal_bundle)
    x = preprocess_frame(load_image(tiles[-1]), bundle.preprocessing)[None]
    backend = open_backend(bundle, "onnxruntime")
    backend.activate()
    try:
        out = benchmark(backend.infer, x)
    finally:
        backend.close()
    assert out["cam"].shape == (1, 3, 7, 7) and abs(float(out["probs"].sum()) - 1) < 1e-4
