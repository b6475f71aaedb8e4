"""Member formats (.keras, .h5, SavedModel) and bad models at export time."""
from __future__ import annotations

import numpy as np
import pytest

from armscope.cli import main
from armscope.core.errors import ArmscopeError

pytest.importorskip("tensorflow")


@pytest.mark.slow
def test_h5_and_savedmodel_load_to_the_same_model(mini_members, real_inputs, tmp_path):
    import keras

    from armscope.export.keras_io import load_member

    model = keras.models.load_model(mini_members[0])
    model.save(tmp_path / "m.h5")
    model.export(tmp_path / "sm", verbose=False)
    ref = model.predict(real_inputs[:2], verbose=0)["probs"]
    for path in (tmp_path / "m.h5", tmp_path / "sm"):
        got = load_member(path).predict(real_inputs[:2], verbose=0)["probs"]
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_unsupported_models_are_refused(tmp_path):
    import keras

    from armscope.export.keras_io import load_member
    from armscope.export.structure import find_structure

    inp = keras.Input((224, 224, 3))
    keras.Model(inp, keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(inp))).save(
        tmp_path / "small.keras")
    with pytest.raises(ArmscopeError, match=r"small\.keras: no supported classifier output: output 0 \('logits'\): "
                                            r"'logits' has activation 'linear'"):
        find_structure(load_member(tmp_path / "small.keras"), tmp_path / "small.keras")
    inp = keras.Input((640, 640, 3))
    probs = keras.layers.Dense(2, activation="softmax", name="probs")(keras.layers.GlobalAveragePooling2D()(inp))
    keras.Model(inp, probs).save(tmp_path / "nobackbone.keras")
    with pytest.raises(ArmscopeError, match=r"nobackbone\.keras: GlobalAveragePooling2D before 'probs' pools the "
                                            "input image itself"):
        find_structure(load_member(tmp_path / "nobackbone.keras"), tmp_path / "nobackbone.keras")
    (tmp_path / "corrupt.keras").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ArmscopeError, match=r"corrupt\.keras: could not be loaded as a Keras \.keras model"):
        load_member(tmp_path / "corrupt.keras")
    with pytest.raises(ArmscopeError, match="unsupported model file type '.pt'"):
        (tmp_path / "m.pt").write_bytes(b"x")
        load_member(tmp_path / "m.pt")


def test_failed_export_leaves_no_output(mini_members, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main(["export", "--out", str(out), str(mini_members[0]), str(tmp_path / "missing.keras")])
    assert code == 2
    assert "missing.keras: no such model file" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
    code = main(["export", "--out", str(out), "--classes", "a,b,c", str(mini_members[0])])
    assert code == 2 and "do not match the models' 2 outputs" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


@pytest.mark.slow
def test_train_command_writes_loadable_members(tmp_path, frame_paths):
    import shutil

    from armscope.export.keras_io import load_member
    from armscope.export.train import stratified_folds

    data = tmp_path / "data"
    for cls, frames in (("a", frame_paths[:2]), ("b", frame_paths[2:4])):
        (data / cls).mkdir(parents=True)
        for f in frames:
            shutil.copy(f, data / cls / f.name)
    assert main(["train", str(data), "--out", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "2",
                 "--folds", "2"]) == 0
    import json

    for i in range(2):
        side = json.loads((tmp_path / "m" / f"member_{i}.json").read_text())
        assert side["classes"] == ["a", "b"] and side["fold"] == i and side["n_val"] == 2
        load_member(tmp_path / "m" / f"member_{i}.keras")
    folds = stratified_folds(np.array([0] * 10 + [1] * 5), 5, seed=0)
    assert all(np.bincount(folds[:10]) == 2) and all(np.bincount(folds[10:]) == 1)
