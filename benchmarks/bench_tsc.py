"""What one MRI slice costs with the tuberous-sclerosis system on the CPU (the
published standalone app takes about a minute per image).

The model is full size: keras.applications.InceptionV3(weights=None) at 224 x 224
with GAP + Dense(1, sigmoid), random weights (speed does not depend on them),
exported once as the TSC bundle is (--input-scaling unit --no-crop --grey
--saliency --tissue-gate mri) and cached in benchmarks/.cache/tsc_inceptionv3.
Timed: ``armscope classify``'s own function (``armscope.edge.classify.classify_images``) on
real DICOM slices (pydicom's MR_small.dcm and CT_small.dcm, 4 of each): reading,
windowing, the gate, preprocessing, backend start, one pass giving probs,
Grad-CAM and saliency, with and without the overlay PNGs; per image = the call / 8.
And the backend's pass alone on one slice (what the daemon pays per frame).

Run:  python -m pytest benchmarks/bench_tsc.py --benchmark-only
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.conftest import CACHE

IMAGES = 8


@pytest.fixture(scope="module")
def tsc_bundle() -> Path:
    bundle = CACHE / "tsc_inceptionv3" / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    import keras

    from armscope.cli import main

    keras.utils.set_random_seed(0)
    base = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(224, 224, 3))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    model = keras.Model(base.input, keras.layers.Dense(1, activation="sigmoid", name="tuber")(x))
    source = CACHE / "tsc_inceptionv3" / "tsc_inceptionv3.keras"
    source.parent.mkdir(parents=True, exist_ok=True)
    model.save(source)
    assert main(["export", str(source), "--out", str(bundle), "--classes", "no_tuber,tuber", "--input-scaling",
                 "unit", "--no-crop", "--grey", "--saliency", "--tissue-gate", "mri", "--force"]) == 0
    return bundle


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[Path]:
    from pydicom.data import get_testdata_file

    folder = tmp_path_factory.mktemp("slices")
    paths = []
    for i in range(IMAGES):
        name = ("MR_small.dcm", "CT_small.dcm")[i % 2]
        paths.append(folder / f"{i}_{name}")
        shutil.copy(get_testdata_file(name), paths[-1])
    return paths


@pytest.mark.benchmark(group="tsc-per-image", min_rounds=3, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("overlays", [False, True], ids=["decisions", "with-overlays"])
def test_classify_slices(benchmark, tsc_bundle, slices, tmp_path, overlays):
    from armscope.edge.classify import classify_images

    runs = iter(range(10_000))

    def classify():
        out = tmp_path / f"overlays_{next(runs)}" if overlays else None
        return classify_images(tsc_bundle, slices, overlay_dir=out, backend="onnxruntime")

    report = benchmark(classify)
    assert report["slide"]["n_classified"] == IMAGES
    benchmark.extra_info["images_per_call"] = IMAGES
    benchmark.extra_info["per_image_s_mean"] = benchmark.stats.stats.mean / IMAGES


@pytest.mark.benchmark(group="tsc-inference", min_rounds=10, warmup=True, warmup_iterations=2)
def test_one_pass_probs_cam_saliency(benchmark, tsc_bundle, slices):
    from armscope.core.bundle import load_bundle
    from armscope.core.preprocess import preprocess_frame, read_frame
    from armscope.edge.backends import open_backend

    bundle = load_bundle(tsc_bundle)
    spec = bundle.preprocessing
    x = preprocess_frame(read_frame(slices[0], spec)[0], spec)[None]
    backend = open_backend(bundle, "onnxruntime")
    backend.activate()
    try:
        out = benchmark(backend.infer, x)
    finally:
        backend.close()
    assert out["saliency"].shape == (1, 2, 224, 224) and np.isfinite(out["probs"]).all()
