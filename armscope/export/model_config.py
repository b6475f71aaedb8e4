"""Reading a model file's layer configuration *without* deserializing it, to
find what would run Python code from the file before anything runs.

A Keras ``Lambda`` layer stores Python bytecode (marshal) in the model's
configuration; rebuilding the layer executes it. tf-keras does not honour
``safe_mode`` for legacy ``.h5`` files (only for its own ``.keras`` format), and
Keras 3's safe mode has had bypasses, so the configuration is read here as plain
JSON first and a ``Lambda`` (or an object from a module outside Keras) is
refused by name unless the user trusts the file.

Where the configuration lives: ``.keras`` -> ``config.json`` in the zip;
legacy ``.h5`` -> the ``model_config`` attribute of the HDF5 root;
tf.keras SavedModel -> ``keras_metadata.pb`` (one JSON document per object).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from armscope.core.errors import ArmscopeError

CODE_LAYERS = ("Lambda",)
SAFE_MODULE_PREFIXES = ("keras", "tf_keras", "builtins")


@dataclass
class ConfigScan:
    """What the file's configuration holds that would run Python code from it."""

    lambdas: list[str] = field(default_factory=list)  # layer names
    foreign: list[str] = field(default_factory=list)  # "name (module.Class)" of objects outside Keras

    @property
    def carries_code(self) -> bool:
        return bool(self.lambdas or self.foreign)

    def describe(self) -> str:
        parts = []
        if self.lambdas:
            parts.append("Lambda layer" + ("s " if len(self.lambdas) > 1 else " ") + ", ".join(map(repr, self.lambdas)))
        if self.foreign:
            parts.append("objects from modules outside Keras: " + ", ".join(self.foreign))
        return "; ".join(parts)


def read_config(path: Path) -> list[dict]:
    """The JSON configuration document(s) of a model file; [] when there is none to read
    (a Keras 3 ``export()`` SavedModel holds no layer configuration, only traced graphs)."""
    try:
        if path.is_dir():
            return _saved_model_metadata(path)
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return [json.loads(archive.read("config.json"))]
        import h5py

        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get("model_config")
        if raw is None:
            raise ArmscopeError(f"{path}: an HDF5 file without a model configuration (a weights-only file? "
                                "expected a whole model saved with model.save)")
        return [json.loads(raw.decode() if isinstance(raw, bytes) else raw)]
    except ArmscopeError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        kind = "SavedModel" if path.is_dir() else f"Keras {path.suffix} model"
        raise ArmscopeError(f"{path}: could not be loaded as a {kind} (its configuration is unreadable: "
                            f"{type(exc).__name__}: {str(exc)[:200]})") from None


def _saved_model_metadata(path: Path) -> list[dict]:
    metadata = path / "keras_metadata.pb"
    if not metadata.is_file():
        return []
    from tf_keras.protobuf import saved_metadata_pb2

    proto = saved_metadata_pb2.SavedMetadata()
    proto.ParseFromString(metadata.read_bytes())
    documents = []
    for node in proto.nodes:
        try:
            documents.append(json.loads(node.metadata))
        except json.JSONDecodeError:
            continue
    return documents


def scan(documents: list[dict]) -> ConfigScan:
    """Find Lambda layers and objects from non-Keras modules anywhere in the documents
    (nested models, TimeDistributed-wrapped layers and layer arguments included)."""
    found = ConfigScan()

    def walk(node):
        if isinstance(node, dict):
            cls = node.get("class_name")
            if cls in CODE_LAYERS:
                config = node.get("config") if isinstance(node.get("config"), dict) else {}
                name = str(config.get("name") or node.get("name") or "?")
                if name not in found.lambdas:
                    found.lambdas.append(name)
            module = node.get("module")
            if isinstance(module, str) and cls and not module.startswith(SAFE_MODULE_PREFIXES):
                entry = f"{module}.{cls}"
                if entry not in found.foreign:
                    found.foreign.append(entry)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for document in documents:
        walk(document)
    return found


def refuse_code(path: Path, found: ConfigScan) -> None:
    raise ArmscopeError(
        f"{path}: the model file carries Python code ({found.describe()}); loading it would run that code. "
        "Refused by default: pass --trust-code only if you trust whoever made this file")
