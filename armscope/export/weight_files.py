"""Reading the trained tensors out of a lab's file, for the weights-only path
(``armscope.export.weights_map``): a Keras 2 / tf.keras ``.h5`` (HDF5 datasets) or a TF2
SavedModel directory (Keras 3 ``model.export()``, ``tf.saved_model.save``).

Why a SavedModel goes this way: one written by Keras 3 ``export()`` or
``tf.saved_model.save`` keeps variables and traced graphs but no Keras layer
structure, so it cannot be rebuilt as a model; its variables can still be
placed into an architecture armscope builds. No function of the file is called
here: ``tf.saved_model.load`` imports the traced graphs without running them and
only the variables' values are read.

What the names hold: Keras 3 names a variable after its *layer* only
(``conv1_conv/kernel:0``, no nested-model path), so names can repeat when two
nested models hold layers named alike; the tensors are therefore returned in the
model's own order (Keras 3 ``export()``: ``model.weights`` order; otherwise a
depth-first walk of the saved object graph, layer by layer), which
``armscope.export.weights_map`` falls back on when names do not decide.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError, require_module


@dataclass
class FileTensor:
    name: str          # as stored, e.g. "densenet121/conv1/conv/kernel:0"
    layer_key: str     # layer part, "/" read as "_", nested-model prefix dropped: "conv1_conv"
    var: str           # "kernel", "bias", "gamma", ...
    value: np.ndarray
    used: bool = False


def is_saved_model(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "saved_model.pb").is_file()


def read_tensors(path: Path) -> list[FileTensor]:
    """The weight tensors of a ``.h5`` file or a SavedModel directory, in the file's order."""
    path = Path(path)
    if path.is_dir():
        if not is_saved_model(path):
            raise ArmscopeError(f"--weights {path}: a directory, but not a SavedModel (no saved_model.pb)")
        return read_saved_model_tensors(path)
    if not path.is_file():
        raise ArmscopeError(f"--weights {path}: no such file or SavedModel directory")
    if path.suffix not in (".h5", ".hdf5"):
        raise ArmscopeError(f"--weights {path}: expected a Keras 2 .h5 file or a SavedModel directory")
    return read_h5_tensors(path)


def read_h5_tensors(path: Path) -> list[FileTensor]:
    """Every weight tensor of a Keras 2 / tf.keras ``.h5`` (a whole model or
    ``save_weights``), in the file's layer order."""
    h5py = require_module("h5py", "tf", "Reading .h5 weights")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ArmscopeError(f"{path}: not an HDF5 file ({exc})") from None
    with handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" not in root.attrs:
            raise ArmscopeError(f"{path}: no Keras 2 weights in it (no 'layer_names' attribute); expected a .h5 "
                                "written by Keras 2 / tf.keras model.save() or save_weights()")
        tensors = []
        for raw_layer in root.attrs["layer_names"]:
            layer = raw_layer.decode() if isinstance(raw_layer, bytes) else str(raw_layer)
            group = root[layer]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
            prefix = layer + "/"
            nested = len(names) > 1 and all(n.startswith(prefix) for n in names)
            for name in names:
                local = name[len(prefix):] if nested else name
                parts = local.split(":")[0].split("/")
                if len(parts) < 2:
                    parts = [layer] + parts
                tensors.append(FileTensor(f"{layer}/{name}" if not name.startswith(prefix) else name,
                                          "_".join(parts[:-1]), parts[-1], np.asarray(group[name])))
    if not tensors:
        raise ArmscopeError(f"{path}: the file holds no weight tensors")
    return tensors


def _tensor(name: str, value: np.ndarray) -> FileTensor:
    parts = name.split(":")[0].split("/")
    if len(parts) < 2:
        parts = ["?"] + parts
    return FileTensor(name, "_".join(parts[:-1]), parts[-1], value)


def _load(path: Path):
    tf = require_module("tensorflow", "tf", "Reading a SavedModel's variables")
    from armscope.export.quiet import quiet_libraries

    with quiet_libraries():
        try:
            return tf, tf.saved_model.load(str(path))
        except Exception as exc:  # TensorFlow raises many types for directories it cannot read
            text = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ArmscopeError(f"{path}: could not be read as a SavedModel ({type(exc).__name__}: {text})") from None


def _variables_in_order(tf, loaded) -> list:
    """Keras 3 ``export()`` keeps ``variables`` (the model's weight order); otherwise
    a depth-first walk of the object graph, each variable once."""
    listed = getattr(loaded, "variables", None)
    if listed:
        return list(listed)
    found, seen = [], set()

    def walk(obj, depth):
        if id(obj) in seen or depth > 64:
            return
        seen.add(id(obj))
        if isinstance(obj, tf.Variable):
            found.append(obj)
            return
        for child in tf.train.TrackableView(obj).children(obj).values():
            walk(child, depth + 1)

    walk(loaded, 0)
    return found


def read_saved_model_tensors(path: Path) -> list[FileTensor]:
    """The variables of a SavedModel (names as stored, values), in the model's order."""
    tf, loaded = _load(path)
    variables = [v for v in _variables_in_order(tf, loaded) if v.dtype.is_floating]
    if not variables:
        raise ArmscopeError(f"{path}: the SavedModel holds no weight variables")
    return [_tensor(v.name, v.numpy()) for v in variables]


def input_size_of(path: Path) -> int | None:
    """The square input size S the lab's model was saved with (SavedModel: its serving
    signature; .h5: the model configuration's input shape), or None when the file does
    not say (a ``save_weights`` file, a signature without a fixed size)."""
    path = Path(path)
    shapes = []
    if path.is_dir():
        tf, loaded = _load(path)
        signature = getattr(loaded, "signatures", {}).get("serving_default")
        if signature is not None:
            shapes = [tuple(s.shape) for s in tf.nest.flatten(signature.structured_input_signature)
                      if hasattr(s, "shape")]
    else:
        h5py = require_module("h5py", "tf", "Reading .h5 weights")
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
        if raw is None:
            return None
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw).get("config", {})
        for layer in config.get("layers", []):
            if layer.get("class_name") == "InputLayer":
                cfg = layer.get("config", {})
                shape = cfg.get("batch_input_shape") or cfg.get("batch_shape")
                if shape:
                    shapes.append(tuple(shape))
    squares = {s[1] for s in shapes if len(s) == 4 and s[1] is not None and s[1] == s[2] and s[3] == 3}
    return squares.pop() if len(squares) == 1 else None
