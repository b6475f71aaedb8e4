"""Loading trained members as labs hold them: Keras 3 ``.keras``, Keras 2 /
tf.keras ``.h5``, and TF2 SavedModels (tf.keras ``model.save`` and Keras 3
``model.export()``).

Order of attempts, and why:
1. The file's configuration is read as JSON first (``armscope.export.model_config``):
   a ``Lambda`` layer or an object from outside Keras is refused by name unless
   ``trust_code`` is set, *before* anything is deserialized.
2. ``.keras`` and ``.h5`` load with Keras 3; an ``.h5`` written by tf.keras
   (Keras 2) that Keras 3 cannot rebuild (nested ``Functional`` backbones,
   older layer arguments) loads with ``tf_keras``, the Keras 2 package.
3. A SavedModel with ``keras_metadata.pb`` was written by tf.keras and loads
   with ``tf_keras``. One without it was written by Keras 3 ``export()``: it
   keeps variables and traced graphs but no layer structure, so it is rebuilt
   as an armscope architecture when its variables match one by name and shape,
   and refused otherwise, naming the ``--weights ... --architecture`` command
   that maps its variables onto a named architecture (``armscope.export.weights_map``).

What the loaded model *is* (tiling, feature map, heads) is decided by
``armscope.export.structure`` from its graph, not here.
"""
from __future__ import annotations

from pathlib import Path

from armscope.core.errors import ArmscopeError, require_module
from armscope.export import model_config
from armscope.export.quiet import quiet_libraries  # noqa: F401  (re-exported: the export modules import it from here)


def _keras():
    require_module("tensorflow", "tf", "Loading Keras models")
    return require_module("keras", "tf", "Loading Keras models")


def is_tf_keras(model) -> bool:
    """Whether ``model`` is a tf-keras (Keras 2) object rather than a Keras 3 one."""
    return type(model).__module__.startswith("tf_keras")


def keras_module_of(model):
    """The Keras package that built ``model`` (``keras`` or ``tf_keras``)."""
    if is_tf_keras(model):
        import tf_keras

        return tf_keras
    return _keras()


def load_member(path: str | Path, trust_code: bool = False):
    """Load one member (a Keras 3 or tf-keras model object); raise ArmscopeError naming the file."""
    _keras()
    path = Path(path)
    if not path.exists():
        raise ArmscopeError(f"{path}: no such model file or SavedModel directory")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ArmscopeError(f"{path}: a directory, but not a SavedModel (no saved_model.pb)")
    elif path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ArmscopeError(f"{path}: unsupported model file type {path.suffix!r}; expected .keras, .h5 or a "
                            "SavedModel directory")
    found = model_config.scan(model_config.read_config(path))
    if found.carries_code and not trust_code:
        model_config.refuse_code(path, found)
    with quiet_libraries():
        if path.is_dir():
            return _load_saved_model(path, trust_code)
        return _load_file(path, trust_code)


def _load_file(path: Path, trust_code: bool):
    keras = _keras()
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not trust_code)
    except Exception as exc:  # Keras raises many types for files it cannot rebuild
        keras3_error = f"{type(exc).__name__}: {_first_line(exc)}"
    if path.suffix == ".keras":
        raise ArmscopeError(f"{path}: could not be loaded as a Keras .keras model ({keras3_error})") from None
    try:
        return _load_tf_keras(path, trust_code)
    except ArmscopeError:
        raise
    except Exception as exc:
        raise ArmscopeError(
            f"{path}: could not be loaded as a Keras {path.suffix} model, neither by Keras 3 ({keras3_error}) "
            f"nor by tf-keras ({type(exc).__name__}: {_first_line(exc)})") from None


def _load_tf_keras(path: Path, trust_code: bool):
    tf_keras = require_module("tf_keras", "tf", f"Loading {path.name} (a tf.keras / Keras 2 model)")
    from tf_keras.src.saving import serialization_lib

    # tf-keras ignores safe_mode for .h5 and SavedModels; the scope makes its Lambda check apply anyway
    with serialization_lib.SafeModeScope(not trust_code):
        return tf_keras.models.load_model(str(path), compile=False)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def _load_saved_model(path: Path, trust_code: bool):
    if (path / "keras_metadata.pb").is_file():
        try:
            return _load_tf_keras(path, trust_code)
        except ArmscopeError:
            raise
        except Exception as exc:
            raise ArmscopeError(f"{path}: could not be loaded as a tf.keras SavedModel "
                                f"({type(exc).__name__}: {_first_line(exc)})") from None
    return _rebuild_exported(path)


def _rebuild_exported(path: Path):
    """A Keras 3 ``export()`` SavedModel: variables without layers. Rebuilt as an
    armscope architecture when its variables match one exactly."""
    tf = require_module("tensorflow", "tf", "Loading a SavedModel")
    from armscope.export import architecture as arch

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ArmscopeError(f"{path}: could not be loaded as a SavedModel ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from None
    variables = list(getattr(loaded, "variables", []))
    from armscope.export.scalings import ALIASES
    from armscope.export.weights_map import ARCHITECTURES

    unsupported = (f"{path}: a SavedModel without Keras layer structure (written by Keras 3 model.export() "
                   "or tf.saved_model.save), so its model cannot be rebuilt from it; export its weights onto "
                   f"the architecture they belong to: armscope export --weights {path} --architecture "
                   f"{'|'.join(ARCHITECTURES)} --input-scaling {'|'.join(ALIASES)} --out BUNDLE "
                   "(or export the model's .keras or .h5 file)")
    if not variables:
        raise ArmscopeError(unsupported + " (it has no variables)")
    by_name = {v.name.split(":")[0]: v for v in variables}
    head = by_name.get(f"{arch.FINAL_HEAD}/kernel")
    if head is None:
        raise ArmscopeError(unsupported)
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
    raise ArmscopeError(f"{unsupported} (its variables match no armscope architecture: tried "
                        f"{', '.join(arch.BACKBONES)} with {n_classes} classes)")
