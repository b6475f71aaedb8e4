"""One scaling vocabulary for ``export --input-scaling`` and ``--scaling MEMBER=NAME``
(armscope.export.scalings): the same names and help on both flags, a scaling a path
cannot apply refused by the flag's name before any model is read, and the two flags
giving the same graph on a narrow seeded model (real H&E tiles)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from armscope.cli import build_parser, main
from armscope.core.errors import ArmscopeError
from armscope.export.scalings import ALIASES, HELP, SCALINGS, parse_scaling

from repo_paths import NCT_TILES as HE
SIZE = 48


def test_both_flags_take_every_name_and_print_one_help():
    for name, alias in ALIASES.items():
        assert parse_scaling(name, "--input-scaling") is parse_scaling(alias, "--scaling m.keras")
    assert {parse_scaling(n, "--scaling").name for n in [*SCALINGS, *ALIASES]} == set(SCALINGS)
    with pytest.raises(ArmscopeError, match=r"--scaling m.keras 'bgr': expected one of none, x/127.5-1"):
        parse_scaling("bgr", "--scaling m.keras")
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    helps = {a.dest: a.help for a in export._actions}
    assert HELP in helps["input_scaling"] and HELP in helps["scaling"]


def test_a_scaling_a_path_cannot_apply_is_refused_naming_the_flag(tmp_path, capsys):
    member = tmp_path / "m.keras"
    member.write_bytes(b"never read: refused before loading")
    out = tmp_path / "out"
    cases = [
        ([str(member), "--input-scaling", "caffe"], "--input-scaling caffe: swaps RGB -> BGR"),
        (["--weights", str(tmp_path / "w.h5"), "--architecture", "densenet-mini", "--input-scaling", "caffe"],
         "--input-scaling caffe: swaps RGB -> BGR"),
        ([str(member), "--input-scaling", "bgr"], "--input-scaling 'bgr': expected one of"),
        ([str(member), "--scaling", f"{member}=bgr"], f"--scaling {member}: scaling 'bgr': expected one of"),
    ]
    for args, needle in cases:
        assert main(["export", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
        assert not out.exists()
    assert main(["export", str(member), "--input-scaling", "caffe", "--out", str(out)]) == 2
    assert "give it per member with --scaling MEMBER=caffe" in capsys.readouterr().err  # the way that works


def _narrow_model(seed: int):
    """Keras 3 whole-image CNN trained on pre-scaled pixels (no scaling layer of its own)."""
    import keras

    from keras_zoo_support import randomise

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((SIZE, SIZE, 3))
    x = L.Conv2D(6, 3, strides=2, activation="relu")(inp)
    x = L.Conv2D(8, 3, strides=2, activation="relu", name="last_conv")(x)
    model = keras.Model(inp, L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(x)))
    randomise(model, seed)
    return model


def _tiles(n: int) -> np.ndarray:
    assert len(HE) >= n, "expected the real H&E tiles (nct-crc-he-100k)"
    images = [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in HE[:: len(HE) // n][:n]]
    return np.stack([cv2.resize(i, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for i in images]).astype(np.float32)


@pytest.mark.tf
@pytest.mark.parametrize("old_name, name", [("unit", "x/255"), ("imagenet", "torch")])
def test_input_scaling_and_scaling_give_the_same_graph(tmp_path, old_name, name):
    pytest.importorskip("tensorflow")
    import onnxruntime as ort

    model = _narrow_model(seed=4)
    path = tmp_path / "narrow.keras"
    model.save(path)
    common = ["--classes", "a,b,c", "--no-crop"]
    assert main(["export", str(path), "--input-scaling", old_name, *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["export", str(path), "--scaling", f"{path}={name}", *common, "--out", str(tmp_path / "per")]) == 0
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    per = json.loads((tmp_path / "per" / "manifest.json").read_text())
    assert one["preprocessing"]["scaling"]["name"] == old_name  # the names manifests always recorded
    assert per["members"][0]["preprocessing"]["scaling"] == name

    x = _tiles(4)
    outputs = [ort.InferenceSession(str(tmp_path / b / "ensemble.onnx"), providers=["CPUExecutionProvider"])
               .run(["probs", "cam"], {"image": x}) for b in ("one", "per")]
    (p1, c1), (p2, c2) = outputs
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    np.testing.assert_allclose(c1, c2, atol=1e-4 * max(1.0, float(np.abs(c1).max())))
    # and both are what Keras gives on the scaled pixels, which differ from the unscaled ones
    expected = np.asarray(model(SCALINGS[name].numpy(x), training=False))
    np.testing.assert_allclose(p1, expected, atol=1e-5)
    assert np.abs(np.asarray(model(x, training=False)) - expected).max() > 1e-3
