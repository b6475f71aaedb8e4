"""Bundle manifest validation, hashes, inspect, and bad-bundle errors."""
from __future__ import annotations

import json
import shutil

import pytest

from armscope.core.bundle import load_bundle
from armscope.cli import main
from armscope.core.errors import ArmscopeError

pytest.importorskip("tensorflow")


@pytest.fixture
def bundle_copy(mini_bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(mini_bundle, target)
    return target


def test_manifest_describes_the_export(mini_bundle):
    bundle = load_bundle(mini_bundle)
    m = bundle.manifest
    assert m["schema_version"] == 2  # new exports; schema 1 bundles (samples/demo_bundle) load unchanged
    assert load_bundle("samples/demo_bundle").manifest["schema_version"] == 1
    assert m["task"] == {"type": "binary", "classes": ["other", "tumour"], "positive_class": "tumour", "threshold": 0.3}
    assert m["preprocessing"]["center_crop"] == 1024 and m["preprocessing"]["resize"] == 640
    assert m["preprocessing"]["interpolation"] == "area"
    assert [x["fold"] for x in m["members"]] == [0, 1]
    assert m["opset"] >= 17
    assert {"tensorflow", "keras", "tf2onnx", "onnx"} <= set(m["producer"])
    assert all(x["parity_max_abs_probs"] <= 1e-4 for x in m["members"])


def test_inspect_prints_and_verifies(mini_bundle, capsys):
    assert main(["inspect", str(mini_bundle)]) == 0
    out = capsys.readouterr().out
    assert "members/member_1.onnx" in out and "all verified" in out and "tumour" in out


def test_wrong_hash_names_the_file(bundle_copy, capsys):
    member = bundle_copy / "members" / "member_1.onnx"
    data = bytearray(member.read_bytes())
    data[-10] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(ArmscopeError, match=r"member_1\.onnx: sha256 .* does not match manifest.json field members\.1\.sha256"):
        load_bundle(bundle_copy)
    assert main(["inspect", str(bundle_copy)]) == 2
    assert "member_1.onnx" in capsys.readouterr().err


def test_missing_member_names_the_file(bundle_copy):
    (bundle_copy / "members" / "member_0.onnx").unlink()
    with pytest.raises(ArmscopeError, match=r"member_0\.onnx: missing; manifest.json field members\.0\.file"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["task"].update(threshold=1.5), r"field task\.threshold: 1\.5 is greater than the maximum of 1"),
        (lambda m: m["task"].pop("positive_class"), r"field task: 'positive_class' is a required property"),
        (lambda m: m["task"].update(positive_class="IIM"), r"field task\.positive_class: 'IIM' is not one of"),
        (lambda m: m["preprocessing"].update(resize=512), r"field inputs\.0\.shape"),
        (lambda m: m.update(schema_version=99), r"field schema_version: 99 is not supported"),
        (lambda m: m["members"][0].update(sha256="xyz"), r"field members\.0\.sha256"),
    ],
)
def test_invalid_manifest_fields_are_named(bundle_copy, edit, message):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArmscopeError, match=message):
        load_bundle(bundle_copy)


def test_nan_in_a_manifest_is_refused(bundle_copy):
    """Python's json reads NaN, and the schema's 0..1 range cannot catch it
    (NaN compares false): a NaN threshold would decide every field negative."""
    path = bundle_copy / "manifest.json"
    path.write_text(path.read_text().replace('"threshold": 0.3', '"threshold": NaN'))
    with pytest.raises(ArmscopeError, match=r"manifest\.json: NaN is not a JSON number"):
        load_bundle(bundle_copy)


def test_not_json_and_not_a_bundle(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArmscopeError, match="manifest.json: not valid JSON"):
        load_bundle(bundle_copy)
    with pytest.raises(ArmscopeError, match="manifest.json: missing"):
        load_bundle(tmp_path)


def test_graph_that_disagrees_with_manifest_is_refused(bundle_copy):
    from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend

    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["task"] = {"type": "multiclass", "classes": ["a", "b", "c"]}
    path.write_text(json.dumps(manifest))
    backend = OnnxRuntimeBackend(load_bundle(bundle_copy))   # cheap: the graphs open in activate()
    with pytest.raises(ArmscopeError, match=r"graph 'probs' has 2 classes, manifest task.classes has 3"):
        backend.activate()
