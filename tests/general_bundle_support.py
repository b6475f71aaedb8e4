"""General bundles (issue 17's contract) built without TensorFlow: small real
convolutional graphs written directly with ``onnx.helper``, a manifest per the
contract (``armscope.core.bundle.write_manifest``, sha256 of every graph), and a
numpy implementation of the same graph to check every runtime against.

A member: image (N, S, S, 3) float32 0..255 -> /255 - 0.5 -> NCHW -> Conv 3x3/2
-> ReLU -> MaxPool 2 -> Conv 3x3 (stride ``conv2_strides``) -> ReLU = feature map
A (N, K, H, W) -> global average pool -> Dense -> softmax, or one sigmoid unit
exported as probs [1 - p, p]. ``grid`` g > 0 makes it a tiled model instead: the
input is cut into g x g patches, the backbone runs on each (shared weights),
each patch's pooled features go through a shared per-patch head (``patch_probs``)
and the patch maps are reassembled into A for the final head.

The CAM is genuine Grad-CAM for a linear head after global average pooling:
dz_c/dA_k,ij = W[k, c] / (H W), so alpha_c,k = W[k, c] / (H W) and
cam_c = ReLU(sum_k alpha_c,k A_k). For a sigmoid unit the score differentiated
for class 1 (p) is its logit z, for class 0 (1 - p) it is -z.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import armscope
from armscope.core.bundle import SCHEMA_VERSION, sha256_file, write_manifest
from armscope.core.preprocess import Preprocessing

OPSET = 17
K1, K = 8, 12  # channels of the two convolutions


@dataclass(frozen=True)
class ModelSpec:
    size: int                      # S: the square input side
    classes: tuple[str, ...]
    head: str = "softmax"          # or "sigmoid": one unit, probs [1 - p, p]
    grid: int = 0                  # 0: whole image; g: g x g patches with per-patch heads
    conv2_strides: tuple[int, int] = (1, 1)

    @property
    def n_out(self) -> int:
        return 1 if self.head == "sigmoid" else len(self.classes)

    def map_shape(self) -> tuple[int, int]:
        side = self.size // self.grid if self.grid else self.size
        h = w = (side - 1) // 2 + 1      # conv 3x3 stride 2 pad 1
        h, w = h // 2, w // 2            # max pool 2
        sh, sw = self.conv2_strides      # conv 3x3 pad 1
        h, w = (h - 1) // sh + 1, (w - 1) // sw + 1
        g = self.grid or 1
        return h * g, w * g


def make_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.normal(0, np.sqrt(2.0 / fan_in), shape)).astype(np.float32)

    c = len(spec.classes)
    params = {
        "w1": he((K1, 3, 3, 3), 27), "b1": rng.normal(0, 0.05, K1).astype(np.float32),
        "w2": he((K, K1, 3, 3), K1 * 9), "b2": rng.normal(0, 0.05, K).astype(np.float32),
        "wh": rng.normal(0, 1.0, (K, spec.n_out)).astype(np.float32),
        "bh": rng.normal(0, 0.1, spec.n_out).astype(np.float32),
    }
    if spec.grid:
        params["wp"] = rng.normal(0, 1.0, (K, c)).astype(np.float32)
        params["bp"] = rng.normal(0, 0.1, c).astype(np.float32)
    return params


def cam_weights(spec: ModelSpec, params: dict) -> np.ndarray:
    """(K, C) Grad-CAM weights alpha: dscore_c/dA_k,ij, the same for every cell."""
    h, w = spec.map_shape()
    wh = params["wh"].astype(np.float64)
    weights = np.concatenate([-wh, wh], axis=1) if spec.head == "sigmoid" else wh
    return weights / (h * w)


# --------------------------------------------------------------------------- ONNX

def member_model(spec: ModelSpec, params: dict) -> onnx.ModelProto:
    s, g = spec.size, spec.grid
    init = [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in params.items()]
    const = {"inv255": np.array(1 / 255, np.float32), "half": np.array(0.5, np.float32),
             "wc": cam_weights(spec, params).astype(np.float32)}
    if spec.head == "sigmoid":
        const["one"] = np.array(1.0, np.float32)
    nodes = [
        helper.make_node("Mul", ["image", "inv255"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "half"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
    ]
    backbone_in = "nchw"
    if g:
        p = s // g
        const["tile_shape"] = np.array([-1, 3, g, p, g, p], np.int64)
        const["patch_shape"] = np.array([-1, 3, p, p], np.int64)
        nodes += [
            helper.make_node("Reshape", ["nchw", "tile_shape"], ["tiles6"]),
            helper.make_node("Transpose", ["tiles6"], ["tiles6t"], perm=[0, 2, 4, 1, 3, 5]),
            helper.make_node("Reshape", ["tiles6t", "patch_shape"], ["patches"]),
        ]
        backbone_in = "patches"
    nodes += [
        helper.make_node("Conv", [backbone_in, "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["m1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], strides=list(spec.conv2_strides), pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["features"]),
    ]
    fmap = "features"
    if g:
        h, w = spec.map_shape()
        hp, wp = h // g, w // g
        const["patch_logit_shape"] = np.array([-1, g * g, len(spec.classes)], np.int64)
        const["grid_shape"] = np.array([-1, g, g, K, hp, wp], np.int64)
        const["map_shape"] = np.array([-1, K, h, w], np.int64)
        nodes += [
            helper.make_node("GlobalAveragePool", ["features"], ["patch_gap"]),
            helper.make_node("Flatten", ["patch_gap"], ["patch_vec"]),
            helper.make_node("Gemm", ["patch_vec", "wp", "bp"], ["patch_logits_flat"]),
            helper.make_node("Reshape", ["patch_logits_flat", "patch_logit_shape"], ["patch_logits"]),
            helper.make_node("Softmax", ["patch_logits"], ["patch_probs"], axis=-1),
            helper.make_node("Reshape", ["features", "grid_shape"], ["grid6"]),
            helper.make_node("Transpose", ["grid6"], ["grid6t"], perm=[0, 3, 1, 4, 2, 5]),
            helper.make_node("Reshape", ["grid6t", "map_shape"], ["feature_map"]),
        ]
        fmap = "feature_map"
    nodes += [
        helper.make_node("GlobalAveragePool", [fmap], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["pooled"]),
        helper.make_node("Gemm", ["pooled", "wh", "bh"], ["logits"]),
    ]
    if spec.head == "sigmoid":
        nodes += [
            helper.make_node("Sigmoid", ["logits"], ["p"]),
            helper.make_node("Sub", ["one", "p"], ["q"]),
            helper.make_node("Concat", ["q", "p"], ["probs"], axis=1),
        ]
    else:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    nodes += [
        helper.make_node("Einsum", [fmap, "wc"], ["cam_raw"], equation="nkhw,kc->nchw"),
        helper.make_node("Relu", ["cam_raw"], ["cam"]),
    ]
    init += [numpy_helper.from_array(v, name) for name, v in const.items()]
    c = len(spec.classes)
    h, w = spec.map_shape()
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", c])]
    if g:
        outputs.append(helper.make_tensor_value_info("patch_probs", TensorProto.FLOAT, ["N", g * g, c]))
    outputs.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", c, h, w]))
    graph = helper.make_graph(
        nodes, "general_test_member",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", s, s, 3])], outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="armscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- numpy reference

def _conv(x, w, b, strides):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    return np.einsum("nchwij,kcij->nkhw", win, w) + b[None, :, None, None]


def _maxpool2(x):
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference(spec: ModelSpec, params: dict, images: np.ndarray) -> dict[str, np.ndarray]:
    """The member graph in float64 numpy: probs, cam, and patch_probs for tiled specs."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = (images.astype(np.float64) / 255 - 0.5).transpose(0, 3, 1, 2)
    n, g = len(images), spec.grid
    if g:
        side = spec.size // g
        x = x.reshape(n, 3, g, side, g, side).transpose(0, 2, 4, 1, 3, 5).reshape(n * g * g, 3, side, side)
    f = np.maximum(_conv(x, p["w1"], p["b1"], (2, 2)), 0)
    f = np.maximum(_conv(_maxpool2(f), p["w2"], p["b2"], spec.conv2_strides), 0)
    out = {}
    if g:
        patch_logits = f.mean(axis=(2, 3)) @ p["wp"] + p["bp"]
        out["patch_probs"] = _softmax(patch_logits.reshape(n, g * g, -1), -1)
        hp, wp = f.shape[2:]
        f = f.reshape(n, g, g, K, hp, wp).transpose(0, 3, 1, 4, 2, 5).reshape(n, K, g * hp, g * wp)
    logits = f.mean(axis=(2, 3)) @ p["wh"] + p["bh"]
    if spec.head == "sigmoid":
        prob = 1 / (1 + np.exp(-logits))
        out["probs"] = np.concatenate([1 - prob, prob], axis=1)
    else:
        out["probs"] = _softmax(logits, 1)
    out["cam"] = np.maximum(np.einsum("nkhw,kc->nchw", f, cam_weights(spec, params)), 0)
    return out


def ensemble_reference(spec: ModelSpec, params: list[dict], images: np.ndarray) -> dict[str, np.ndarray]:
    outs = [reference(spec, p, images) for p in params]
    return {k: np.mean([o[k] for o in outs], axis=0) for k in outs[0]}


# --------------------------------------------------------------------------- bundle

def binary_task(classes, positive=None, threshold=0.5) -> dict:
    return {"type": "binary", "classes": list(classes), "positive_class": positive or classes[-1],
            "threshold": threshold}


def write_general_bundle(root: Path, spec: ModelSpec, seeds=(0, 1), task: dict | None = None,
                         name: str | None = None, center_crop: int = 1024) -> tuple[Path, list[dict]]:
    """A complete bundle at ``root`` (members, ensemble merged by ``armscope.export.merge``
    as the exporter does, manifest per the contract). Returns (root, member params)."""
    from armscope.export.merge import merge_members

    root = Path(root)
    (root / "members").mkdir(parents=True)
    params, members = [], []
    for i, seed in enumerate(seeds):
        params.append(make_params(spec, seed))
        path = root / "members" / f"member_{i}.onnx"
        onnx.save(member_model(spec, params[-1]), str(path))
        members.append({"file": f"members/{path.name}", "sha256": sha256_file(path), "fold": i})
    ensemble = root / "ensemble.onnx"
    onnx.save(merge_members([root / m["file"] for m in members]), str(ensemble))
    c = len(spec.classes)
    h, w = spec.map_shape()
    tiled = spec.grid > 0
    score = ("logit z of the single sigmoid unit for class 1 (p), -z for class 0 (1 - p)"
             if spec.head == "sigmoid" else "the class logit z_c (before softmax)")
    model = {
        "architecture": "tiled-patch-classifier" if tiled else "whole-image-classifier",
        "backbone": "test-cnn-2conv",
        "input_size": spec.size,
        "feature_layer": "feature_map" if tiled else "features",
        "head": spec.head,
        "per_patch_heads": "shared" if tiled else "none",
        "cam": {"method": "Grad-CAM (closed form, in graph)",
                "definition": "alpha_c,k = mean_ij dscore_c/dA_k,ij = W[k,c]/(H W); cam_c = relu(sum_k alpha_c,k A_k)",
                "score": score},
    }
    if tiled:
        model.update(patch_size=spec.size // spec.grid, grid=spec.grid, map_size=h)
    outputs = [{"name": "probs", "shape": ["N", c], "dtype": "float32"}]
    if tiled:
        outputs.append({"name": "patch_probs", "shape": ["N", spec.grid ** 2, c], "dtype": "float32"})
    outputs.append({"name": "cam", "shape": ["N", c, h, w], "dtype": "float32"})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": name or root.name,
        "description": f"test bundle: {model['architecture']}, S={spec.size}, {spec.head}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task or ({"type": "multiclass", "classes": list(spec.classes)} if c > 2
                         else binary_task(spec.classes)),
        "preprocessing": Preprocessing(center_crop=center_crop, resize=spec.size).to_manifest(),
        "model": model,
        "inputs": [{"name": "image", "shape": ["N", spec.size, spec.size, 3], "dtype": "float32"}],
        "outputs": outputs,
        "members": members,
        "ensemble": {"file": ensemble.name, "sha256": sha256_file(ensemble)},
        "precision": "fp32",
        "opset": OPSET,
        "producer": {"armscope": armscope.__version__, "onnx": onnx.__version__,
                     "builder": "tests/general_bundle_support.py"},
    }
    write_manifest(root, manifest)
    return root, params
