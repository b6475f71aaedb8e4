"""Loading trained members (Keras 3 ``.keras``, legacy ``.h5``, SavedModel) and
checking that each has the shape the deploy graph needs.

A SavedModel written by Keras 3 ``model.export()`` keeps variables but no layer
structure, so it is loaded by rebuilding each supported architecture and
accepting the one whose variables match by name and shape, in order.
"""
from __future__ import annotations

from pathlib import Path

from armscope.errors import ArmscopeError, require_module
from export import architecture as arch


def _keras():
    require_module("tensorflow", "tf", "Loading Keras models")
    return require_module("keras", "tf", "Loading Keras models")


def load_member(path: str | Path):
    """Load one trained member and validate it; raise ArmscopeError naming the file."""
    keras = _keras()
    path = Path(path)
    if not path.exists():
        raise ArmscopeError(f"{path}: no such model file or SavedModel directory")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ArmscopeError(f"{path}: a directory, but not a SavedModel (no saved_model.pb)")
        model = _load_saved_model(path)
    elif path.suffix in (".keras", ".h5", ".hdf5"):
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for corrupt files
            raise ArmscopeError(
                f"{path}: could not be loaded as a Keras {path.suffix} model ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
    else:
        raise ArmscopeError(f"{path}: unsupported model file type {path.suffix!r}; expected .keras, .h5 or a SavedModel directory")
    validate_member(model, path)
    return model


def validate_member(model, path) -> None:
    """Check the tiled-classifier contract: 640x640x3 input, a 20x20 feature map,
    a softmax Dense ``final_head`` right after global average pooling, and a
    (16, K, C) linear ``patch_heads``."""
    keras = _keras()

    def fail(what: str):
        raise ArmscopeError(f"{path}: not a supported tiled model: {what}")

    shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if shape != (arch.IMAGE_SIZE, arch.IMAGE_SIZE, 3):
        fail(f"input shape is {model.input_shape}, expected (None, 640, 640, 3)")
    names = {layer.name for layer in model.layers}
    for needed in (arch.FEATURE_MAP, arch.FINAL_HEAD, arch.PATCH_HEADS):
        if needed not in names:
            fail(f"no layer named {needed!r} (layers named by export.architecture are required)")
    fmap = model.get_layer(arch.FEATURE_MAP).output.shape
    if tuple(fmap[1:3]) != (arch.MAP_SIZE, arch.MAP_SIZE):
        fail(f"layer {arch.FEATURE_MAP!r} has shape {fmap}, expected (None, 20, 20, K)")
    head = model.get_layer(arch.FINAL_HEAD)
    if not isinstance(head, keras.layers.Dense) or head.get_config().get("activation") != "softmax":
        fail(f"layer {arch.FINAL_HEAD!r} must be a Dense layer with softmax activation (a GAP-linear head)")
    head_input = head.input
    producer = head_input._keras_history.operation if hasattr(head_input, "_keras_history") else None
    if not isinstance(producer, keras.layers.GlobalAveragePooling2D):
        fail(f"layer {arch.FINAL_HEAD!r} must follow GlobalAveragePooling2D of {arch.FEATURE_MAP!r}, found {type(producer).__name__}")
    kernel = model.get_layer(arch.PATCH_HEADS).kernel
    n_classes = head.units
    k = fmap[-1]
    if tuple(kernel.shape) != (arch.N_PATCHES, k, n_classes):
        fail(f"layer {arch.PATCH_HEADS!r} kernel is {tuple(kernel.shape)}, expected (16, {k}, {n_classes})")


def n_classes_of(model) -> int:
    return int(model.get_layer(arch.FINAL_HEAD).units)


def backbone_of(model) -> str:
    """The backbone name recorded in the model name by ``build_tiled_model`` ("custom" otherwise)."""
    name = model.name.removeprefix("tiled_")
    return name if name in arch.BACKBONES else "custom"


def _load_saved_model(path: Path):
    tf = require_module("tensorflow", "tf", "Loading a SavedModel")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ArmscopeError(f"{path}: could not be loaded as a SavedModel ({type(exc).__name__}: {str(exc)[:200]})") from None
    variables = list(getattr(loaded, "variables", []))
    if not variables:
        raise ArmscopeError(f"{path}: SavedModel has no variables; expected one written by Keras 3 model.export()")
    by_name = {v.name.split(":")[0]: v for v in variables}
    head = by_name.get(f"{arch.FINAL_HEAD}/kernel")
    if head is None:
        raise ArmscopeError(f"{path}: SavedModel has no variable '{arch.FINAL_HEAD}/kernel'; not a tiled armscope model")
    n_classes = int(head.shape[-1])
    for backbone in arch.BACKBONES:
        model = arch.build_tiled_model(arch.ArchitectureSpec(backbone, n_classes))
        if len(model.weights) != len(variables):
            continue
        if all(w.path == v.name.split(":")[0] and tuple(w.shape) == tuple(v.shape)
               for w, v in zip(model.weights, variables)):
            for w, v in zip(model.weights, variables):
                w.assign(v.numpy())
            return model
    raise ArmscopeError(
        f"{path}: SavedModel variables match no supported architecture "
        f"(tried {', '.join(arch.BACKBONES)} with {n_classes} classes)"
    )
