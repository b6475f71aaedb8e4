"""The tiled patch classifier of the muscle-biopsy study, as a Keras 3 model.

640x640 RGB in -> a 4x4 grid of 160x160 patches -> one shared DenseNet backbone
(5x5 map per patch) -> the 16 maps reassembled into one 20x20 map -> GAP ->
softmax ``final_head`` (the prediction), plus one linear head per patch
(``patch_heads``, an EinsumDense with a (16, K, C) kernel) used for the training
loss and for the patch-weighted Grad-CAM.

Only built-in Keras layers are used, so a saved model loads anywhere Keras 3
runs, without custom objects. The exporter finds the parts it needs by the layer
names defined here (``backbone``, ``final_head``, ``patch_heads``).
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

IMAGE_SIZE = 640
PATCH_SIZE = 160
GRID = 4
N_PATCHES = GRID * GRID
MAP_SIZE = 20  # 4 patches x 5x5 feature cells

# Layer names the exporter relies on.
BACKBONE = "backbone"
FINAL_HEAD = "final_head"
PATCH_HEADS = "patch_heads"
PATCH_PROBS = "patch_probs"
FEATURE_MAP = "feature_map"

BACKBONES = ("densenet121", "densenet-mini")


@dataclass(frozen=True)
class ArchitectureSpec:
    backbone: str
    n_classes: int


def _dense_block(x, n_layers: int, growth: int, name: str):
    for i in range(n_layers):
        y = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_{i}_bn0")(x)
        y = layers.Activation("relu", name=f"{name}_{i}_relu0")(y)
        y = layers.Conv2D(4 * growth, 1, use_bias=False, name=f"{name}_{i}_conv1")(y)
        y = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_{i}_bn1")(y)
        y = layers.Activation("relu", name=f"{name}_{i}_relu1")(y)
        y = layers.Conv2D(growth, 3, padding="same", use_bias=False, name=f"{name}_{i}_conv2")(y)
        x = layers.Concatenate(name=f"{name}_{i}_concat")([x, y])
    return x


def _transition(x, name: str):
    channels = x.shape[-1] // 2
    x = layers.BatchNormalization(epsilon=1.001e-5, name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_conv")(x)
    return layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def densenet_mini(input_shape=(PATCH_SIZE, PATCH_SIZE, 3)) -> keras.Model:
    """A DenseNet of the DenseNet-121 family (same stem, dense blocks, transitions,
    stride 32), with blocks [2, 2, 2, 2] and growth 12: ~0.1 M parameters, for tests
    and the demo bundle. Keras does not export its generic DenseNet builder, hence
    this short copy of the published structure."""
    inp = keras.Input(input_shape)
    x = layers.ZeroPadding2D(3)(inp)
    x = layers.Conv2D(32, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.BatchNormalization(epsilon=1.001e-5, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for b in range(4):
        x = _dense_block(x, 2, 12, name=f"conv{b + 2}")
        if b < 3:
            x = _transition(x, name=f"pool{b + 2}")
    x = layers.BatchNormalization(epsilon=1.001e-5, name="bn")(x)
    x = layers.Activation("relu", name="relu")(x)
    return keras.Model(inp, x, name=BACKBONE)


def make_backbone(name: str) -> keras.Model:
    """A patch backbone: (160, 160, 3) in [-1, 1] -> (5, 5, K)."""
    if name == "densenet121":
        base = keras.applications.DenseNet121(
            include_top=False, weights=None, input_shape=(PATCH_SIZE, PATCH_SIZE, 3)
        )
        return keras.Model(base.input, base.output, name=BACKBONE)
    if name == "densenet-mini":
        return densenet_mini()
    raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")


def build_tiled_model(spec: ArchitectureSpec) -> keras.Model:
    """The training/reference model. Input: float32 RGB 0..255, (640, 640, 3).
    Outputs: ``final_head`` probabilities (C,) and ``patch_probs`` (16, C)."""
    if spec.n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {spec.n_classes}")
    backbone = make_backbone(spec.backbone)
    channels = backbone.output.shape[-1]
    cells = backbone.output.shape[1]

    image = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(image)
    # Tiling: (640, 640, 3) -> (4, 160, 4, 160, 3) -> (4, 4, 160, 160, 3) -> (16, 160, 160, 3)
    x = layers.Reshape((GRID, PATCH_SIZE, GRID, PATCH_SIZE, 3), name="tile_split")(x)
    x = layers.Permute((1, 3, 2, 4, 5), name="tile_order")(x)
    x = layers.Reshape((N_PATCHES, PATCH_SIZE, PATCH_SIZE, 3), name="patches")(x)
    maps = layers.TimeDistributed(backbone, name="patch_backbone")(x)  # (16, 5, 5, K)
    # Reassembly: (16, 5, 5, K) -> (4, 4, 5, 5, K) -> (4, 5, 4, 5, K) -> (20, 20, K)
    y = layers.Reshape((GRID, GRID, cells, cells, channels), name="map_split")(maps)
    y = layers.Permute((1, 3, 2, 4, 5), name="map_order")(y)
    feature_map = layers.Reshape((GRID * cells, GRID * cells, channels), name=FEATURE_MAP)(y)
    pooled = layers.GlobalAveragePooling2D(name="gap")(feature_map)
    probs = layers.Dense(spec.n_classes, activation="softmax", name=FINAL_HEAD)(pooled)

    patch_pooled = layers.TimeDistributed(layers.GlobalAveragePooling2D(), name="patch_gap")(maps)
    patch_logits = layers.EinsumDense(
        "bpk,pkc->bpc", output_shape=(N_PATCHES, spec.n_classes), bias_axes="pc", name=PATCH_HEADS
    )(patch_pooled)
    patch_probs = layers.Softmax(axis=-1, name=PATCH_PROBS)(patch_logits)
    return keras.Model(image, {"probs": probs, "patch_probs": patch_probs}, name=f"tiled_{spec.backbone}")


def make_whole_backbone(name: str, size: int) -> keras.Model:
    """A whole-image backbone at ``size`` x ``size``: keras.applications' DenseNet121
    or InceptionV3 (ImageNet layout, no top), or the test-sized DenseNet."""
    shape = (size, size, 3)
    if name == "densenet121":
        base = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=shape)
    elif name == "inceptionv3":
        base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=shape)
    elif name == "densenet-mini":
        return densenet_mini(shape)
    else:
        raise ValueError(f"unknown backbone {name!r}: expected densenet121, inceptionv3 or densenet-mini")
    return keras.Model(base.input, base.output, name=BACKBONE)


def build_whole_image_model(backbone_name: str, n_classes: int, size: int) -> keras.Model:
    """The common lab classifier without tiling: image (S, S, 3) RGB 0..255 -> ``scale``
    -> backbone -> GAP -> ``final_head`` Dense (softmax over C >= 2, or one sigmoid unit
    when C = 1). Output ``{"probs": ...}``; the exporter finds the rest from the graph."""
    backbone = make_whole_backbone(backbone_name, size)
    image = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(image)
    x = layers.GlobalAveragePooling2D(name="gap")(backbone(x))
    probs = layers.Dense(n_classes, activation="sigmoid" if n_classes == 1 else "softmax", name=FINAL_HEAD)(x)
    return keras.Model(image, {"probs": probs}, name=f"whole_{backbone_name}")
