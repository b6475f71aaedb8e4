"""The model bundle: a directory with ``manifest.json`` and ONNX graphs.

The manifest is the contract between the exporter (which has TensorFlow) and
the runtime (which must not need it): task, classes, preprocessing, graph
inputs/outputs, members with hashes. It is validated against a versioned JSON
Schema on every load, and every file's sha256 is checked, so a bundle that was
truncated, edited or mixed with another bundle's members fails loudly with the
file and field named instead of producing a wrong overlay in an eyepiece.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from armscope.core import schema_files
from armscope.core.errors import ArmscopeError, cannot_create
from armscope.core.preprocess import Preprocessing

SCHEMA_VERSION = 2
# schema 1 manifests load and mean what they meant; 2 adds per-member preprocessing,
# the input modality (preprocessing.input, center_crop 0) and the saliency output
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# The schema lives in armscope/core/schemas/manifest.json (armscope.core.schema_files): one file
# that the exporter, the runtime and any other tool validate with. Validators are built once.
MANIFEST_SCHEMA = schema_files.schema("manifest")

# The graph outputs the runtime reads, in the order backends return them, with the
# rank of each: probs (N, C), patch_probs (N, P, C), cam (N, C, H, W). patch_probs
# exists only for tiled models with per-patch heads; nothing downstream needs it.
# saliency (N, C, S, S): max over channels of |d score_c / d image|, optional.
REQUIRED_OUTPUTS = ("probs", "cam")
OPTIONAL_OUTPUTS = ("patch_probs", "saliency")
OUTPUT_ORDER = ("probs", "patch_probs", "cam", "saliency")
OUTPUT_RANKS = {"probs": 2, "patch_probs": 3, "cam": 4, "saliency": 4}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A loaded, validated bundle. Paths are absolute."""

    root: Path
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["task"]["classes"])

    @property
    def task(self) -> dict:
        return self.manifest["task"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_manifest(self.manifest["preprocessing"])

    @property
    def ensemble_path(self) -> Path:
        return self.root / self.manifest["ensemble"]["file"]

    @property
    def member_paths(self) -> list[Path]:
        return [self.root / m["file"] for m in self.manifest["members"]]

    @property
    def input_size(self) -> int:
        """S of the graph's (N, S, S, 3) input (validated equal to preprocessing.resize)."""
        return int(self.manifest["inputs"][0]["shape"][1])

    @property
    def output_names(self) -> tuple[str, ...]:
        """The outputs this bundle's graphs have and the runtime returns (``OUTPUT_ORDER``)."""
        declared = {o["name"] for o in self.manifest["outputs"]}
        return tuple(n for n in OUTPUT_ORDER if n in declared)

    def output_shape(self, name: str) -> list:
        for out in self.manifest["outputs"]:
            if out["name"] == name:
                return out["shape"]
        raise KeyError(name)


def validate_manifest(manifest: dict, path: Path) -> None:
    """Raise ArmscopeError naming the first invalid field (by schema, then cross-field rules)."""
    error = schema_files.first_error("manifest", manifest)
    if error is not None:
        raise ArmscopeError(f"{path}: field {schema_files.dotted(list(error.absolute_path))}: {error.message}")
    task = manifest["task"]
    if "positive_class" in task and task["positive_class"] not in task["classes"]:
        raise ArmscopeError(
            f"{path}: field task.positive_class: {task['positive_class']!r} is not one of task.classes {task['classes']}"
        )
    _check_io(manifest, path)
    _check_member_preprocessing(manifest, path)


def _check_member_preprocessing(manifest: dict, path: Path) -> None:
    """members[i].preprocessing is a schema 2 field, and a member that resizes says so."""
    size = manifest["inputs"][0]["shape"][1]
    for i, member in enumerate(manifest["members"]):
        pre = member.get("preprocessing")
        if pre is None:
            continue
        if manifest["schema_version"] < 2:
            raise ArmscopeError(f"{path}: field members.{i}.preprocessing: needs schema_version 2 "
                                f"(the manifest says {manifest['schema_version']})")
        if (pre["resize"] == "none") != (pre["input_size"] == size):
            raise ArmscopeError(f"{path}: field members.{i}.preprocessing.resize: {pre['resize']!r} with "
                                f"input_size {pre['input_size']} and the bundle's input {size}x{size} (expected "
                                "'none' exactly when they are equal)")


def _check_io(manifest: dict, path: Path) -> None:
    """The graph I/O the runtime relies on: one input ``image`` [N, S, S, 3]
    with S = preprocessing.resize (the runtime resizes every field to S), the
    required outputs with their ranks, and the model block's optional sizes
    agreeing with them."""
    inputs = manifest["inputs"]
    if [i["name"] for i in inputs] != ["image"]:
        raise ArmscopeError(f"{path}: field inputs: {[i['name'] for i in inputs]}, expected exactly one input 'image'")
    shape = inputs[0]["shape"]
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise ArmscopeError(f"{path}: field inputs.0.shape: {shape}, expected [N, S, S, 3] (square RGB, S an integer)")
    resize = manifest["preprocessing"]["resize"]
    if shape[1] != resize:
        raise ArmscopeError(
            f"{path}: field preprocessing.resize: {resize} does not match field inputs.0.shape {shape}; "
            f"the runtime resizes every field to preprocessing.resize, so it must equal the graph's input size "
            f"{shape[1]} (expected [N, {resize}, {resize}, 3] or resize {shape[1]})")
    outputs = {o["name"]: (i, o["shape"]) for i, o in enumerate(manifest["outputs"])}
    missing = [n for n in REQUIRED_OUTPUTS if n not in outputs]
    if missing:
        raise ArmscopeError(f"{path}: field outputs: missing {missing}, expected {list(REQUIRED_OUTPUTS)} "
                            f"(and optionally {list(OPTIONAL_OUTPUTS)})")
    for name, rank in OUTPUT_RANKS.items():
        if name in outputs and len(outputs[name][1]) != rank:
            i, out_shape = outputs[name]
            raise ArmscopeError(f"{path}: field outputs.{i}.shape: {name} {out_shape} has rank {len(out_shape)}, "
                                f"expected {rank} ({_LAYOUTS[name]})")
    model = manifest["model"]
    if model.get("input_size", shape[1]) != shape[1]:
        raise ArmscopeError(f"{path}: field model.input_size: {model['input_size']} does not match "
                            f"field inputs.0.shape {shape}")
    i, cam = outputs["cam"]
    if "map_size" in model and any(isinstance(d, int) and d != model["map_size"] for d in cam[2:]):
        raise ArmscopeError(f"{path}: field model.map_size: {model['map_size']} does not match "
                            f"field outputs.{i}.shape {cam} (cam is N x C x H x W)")
    if "saliency" in outputs:
        i, sal = outputs["saliency"]
        if sal[2:] != [shape[1], shape[2]] or sal[1] != cam[1]:
            raise ArmscopeError(f"{path}: field outputs.{i}.shape: saliency {sal}, expected [N, {cam[1]}, {shape[1]}, "
                                f"{shape[2]}] (one map per class at the input's size)")
    heads = model.get("per_patch_heads")
    if heads is not None and (heads == "none") == ("patch_probs" in outputs):
        raise ArmscopeError(f"{path}: field model.per_patch_heads: {heads!r}, but outputs "
                            f"{'have' if 'patch_probs' in outputs else 'lack'} patch_probs "
                            f"(present exactly when the model has per-patch heads)")


_LAYOUTS = {"probs": "N x C", "patch_probs": "N x P x C", "cam": "N x C x H x W", "saliency": "N x C x S x S"}


def _reject_constant(token: str):
    raise ValueError(f"{token} is not a JSON number (NaN and Infinity are not allowed; use a finite number)")


def load_bundle(root: str | Path, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle directory; every member file must exist and match its hash."""
    root = Path(root).resolve()
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise ArmscopeError(f"{root}: not a bundle directory (expected a directory with {MANIFEST})")
    if not manifest_path.is_file():
        raise ArmscopeError(f"{manifest_path}: missing; a bundle directory must contain {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArmscopeError(f"{manifest_path}: not valid JSON ({exc})") from None
    except ValueError as exc:  # NaN/Infinity: Python's json takes them, the schema's ranges cannot catch them
        raise ArmscopeError(f"{manifest_path}: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArmscopeError(f"{manifest_path}: expected a JSON object at the top level")
    if manifest.get("schema_version") not in (None, *SUPPORTED_SCHEMA_VERSIONS):
        raise ArmscopeError(
            f"{manifest_path}: field schema_version: {manifest.get('schema_version')!r} is not supported "
            f"by this armscope (supports {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); upgrade armscope or "
            "re-export the bundle"
        )
    validate_manifest(manifest, manifest_path)
    bundle = Bundle(root, manifest)
    entries = [("ensemble", manifest["ensemble"])] + [
        (f"members.{i}", m) for i, m in enumerate(manifest["members"])
    ] + [(f"engines.{i}", e) for i, e in enumerate(manifest.get("engines", []))]
    if "uint8_front" in manifest:  # the optional uint8 front (armscope.core.front)
        entries.append(("uint8_front", manifest["uint8_front"]))
    for field, entry in entries:
        path = root / entry["file"]
        if not path.is_file():
            raise ArmscopeError(f"{path}: missing; {MANIFEST} field {field}.file names it")
        if verify_hashes:
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise ArmscopeError(
                    f"{path}: sha256 {actual} does not match {MANIFEST} field {field}.sha256 "
                    f"{entry['sha256']} (file changed or belongs to another bundle)"
                )
    for i, step in enumerate(manifest["task"].get("steps", [])):
        sub = root / step["bundle"]
        if not (sub / MANIFEST).is_file():
            raise ArmscopeError(f"{manifest_path}: field task.steps.{i}.bundle: {sub} is not a bundle directory")
    return bundle


def refuse_cascade(bundle: Bundle, action: str) -> None:
    """Tools that make or measure one model (quantize, build, accuracy) work on
    the bundles a cascade joins, not on the cascade: it would touch step one
    only and leave the steps (``task.steps``) behind or unmeasured."""
    if bundle.task["type"] == "cascade":
        steps = ", ".join(f"{s['when']} -> {s['bundle']}" for s in bundle.task.get("steps", []))
        raise ArmscopeError(
            f"{bundle.root / MANIFEST}: field task.type: cascade ({steps}); {action} works on one model bundle: "
            f"run it on step one and on each step's bundle, then join the results with 'armscope cascade'")


def require_deployable(bundle: Bundle) -> Bundle:
    """Refuse a reduced-precision bundle that ``armscope quantize`` measured and
    marked not deployable: the daemon and ``classify`` must never put a model that
    failed its accuracy gate in front of a pathologist. (``armscope accuracy``
    evaluates such bundles and does not call this.)"""
    quant = bundle.manifest.get("quantization")
    if quant is not None and not quant["deployable"]:
        raise ArmscopeError(
            f"{bundle.root / MANIFEST}: field quantization.deployable is false: this {bundle.manifest['precision']} "
            f"bundle failed its accuracy gate against its FP32 source; see its accuracy report, re-quantize, "
            f"or pass --force to armscope quantize if you accept the measured differences"
        )
    return bundle


def write_manifest(root: Path, manifest: dict) -> None:
    validate_manifest(manifest, root / MANIFEST)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def description_line(manifest: dict) -> str | None:
    """The bundle's own description (e.g. "DEMO ONLY, not a diagnostic model ..."), one line, shown wherever the
    bundle classifies so no one mistakes a demo model for a diagnostic one."""
    text = " ".join(str(manifest.get("description") or "").split())
    return f"model {manifest.get('name', '?')}: {text}" if text else None


def check_out_apart(out: "Path | str", inputs, option: str = "--out") -> None:
    """Refuse an output path that is, lies inside or contains one of ``inputs``:
    writing it (and replacing it with --force) would overwrite or delete what
    the command reads, e.g. ``quantize B --out B --force`` replaced the FP32
    source with the INT8 bundle, and ``export D/m.keras --out D --force``
    deleted the Keras members."""
    out = Path(out).resolve()
    for path in inputs:
        if path is None:
            continue
        path = Path(path).resolve()
        if out == path or path in out.parents or out in path.parents:
            raise ArmscopeError(f"{option} {out}: must not be, lie inside or contain an input ({path})")


def _stage_beside(final: Path) -> Path:
    """A new, uniquely named sibling of ``final``, made as a plain mkdir makes one: the umask decides its mode
    (tempfile.mkdtemp makes 0700, which kept other lab accounts out of overlays and bundles)."""
    for _ in range(100):
        stage = final.with_name(f".{final.name}.{secrets.token_hex(4)}")
        try:
            stage.mkdir(mode=0o777)
            return stage
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(final))


@contextmanager
def staged_directory(final: Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``final``
    atomically (rename), on failure it is removed: nothing half-written is left."""
    final = Path(final).resolve()
    if final.exists() and not overwrite:
        if not final.is_dir() or any(final.iterdir()):
            raise ArmscopeError(f"{final}: already exists and is not empty (use --force to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = _stage_beside(final)
    except OSError as exc:
        raise cannot_create(final, exc) from None
    try:
        yield stage
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, ArmscopeError) and str(stage) in str(exc):
            exc.args = (str(exc).replace(str(stage), str(final)),)  # name the output asked for, not a gone temp dir
        raise
    if final.exists():
        trash = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.rename(final, trash)
        os.rename(stage, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(stage, final)
