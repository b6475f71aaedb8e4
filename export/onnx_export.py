"""Keras members -> ONNX graphs (tf2onnx) -> a model bundle.

Per member one graph (tf2onnx), plus one merged graph (``export.merge``) that
averages the members inside the graph (one session, one pass). Each graph takes ``image`` (N, 640, 640, 3)
float32 RGB 0..255 and returns ``probs`` (N, C), ``patch_probs`` (N, 16, C)
and ``cam`` (N, C, 20, 20). The bundle is written to a temporary directory and
renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import armscope
from armscope.bundle import SCHEMA_VERSION, sha256_file, staged_directory, write_manifest
from armscope.errors import ArmscopeError, require_module
from armscope.preprocess import Preprocessing
from export import architecture as arch
from export.keras_io import backbone_of, load_member, n_classes_of
from export.merge import merge_members

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


@dataclass
class TaskSpec:
    """What the bundle's ``task`` block says; built from CLI flags or training sidecars."""

    type: str
    classes: list[str]
    positive_class: str | None = None
    threshold: float | None = None
    steps: list[dict] = field(default_factory=list)

    def to_manifest(self) -> dict:
        block: dict = {"type": self.type, "classes": list(self.classes)}
        if self.positive_class is not None:
            block["positive_class"] = self.positive_class
        if self.threshold is not None:
            block["threshold"] = float(self.threshold)
        if self.steps:
            block["steps"] = self.steps
        return block


def read_sidecar(member: Path) -> dict:
    """Training metadata written next to a member by ``armscope train`` (may be absent)."""
    sidecar = member.with_suffix(".json") if member.is_file() else member / "armscope.json"
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise ArmscopeError(f"{sidecar}: not valid JSON ({exc})") from None


def convert_to_onnx(models, output_path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace the deploy function over ``models`` and write it as ONNX."""
    tf2onnx = require_module("tf2onnx", "tf", "ONNX export")
    from export.deploy_graph import make_deploy_function

    import onnx

    deploy, spec = make_deploy_function(models)
    model, _ = tf2onnx.convert.from_function(deploy, input_signature=[spec], opset=opset)
    # tf2onnx names the dynamic batch dimension 'unk__NNN'; call it N everywhere so
    # runtimes (TensorRT profiles, Triton configs) see one shared batch axis.
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(output_path))


def _check_parity(models, onnx_path: Path, seed: int = 0) -> float:
    """Max |probs| difference between Keras (averaged over members) and ONNX Runtime on one frame."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).uniform(0, 255, (1, arch.IMAGE_SIZE, arch.IMAGE_SIZE, 3)).astype(np.float32)
    ref = np.mean([m(x, training=False)["probs"].numpy() for m in models], axis=0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"image": x})[0]
    return float(np.max(np.abs(ref - got)))


def export_bundle(
    member_paths: list[Path],
    out_dir: Path,
    task: TaskSpec | None = None,
    name: str | None = None,
    preprocessing: Preprocessing = Preprocessing(),
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    description: str = "",
    jobs: int = 1,
) -> Path:
    """Export members to a bundle directory and return its path. ``jobs`` > 1
    converts members in that many worker processes (tf2onnx's graph optimiser is
    single-threaded Python: minutes per DenseNet-121 member)."""
    if jobs < 1:
        raise ArmscopeError(f"--jobs {jobs}: expected 1 or more")
    if opset < 17:
        raise ArmscopeError(f"--opset {opset}: expected 17 or newer")
    if not member_paths:
        raise ArmscopeError("no members given: expected one or more .keras/.h5 files or SavedModel directories")
    tf = require_module("tensorflow", "tf", "ONNX export")
    keras = require_module("keras", "tf", "ONNX export")
    tf2onnx = require_module("tf2onnx", "tf", "ONNX export")
    import onnx

    member_paths = [Path(p) for p in member_paths]
    models = [load_member(p) for p in member_paths]
    sidecars = [read_sidecar(p) for p in member_paths]
    counts = {n_classes_of(m) for m in models}
    if len(counts) != 1:
        raise ArmscopeError(
            "members disagree on the number of classes: "
            + ", ".join(f"{p}: {n_classes_of(m)}" for p, m in zip(member_paths, models))
        )
    n_classes = counts.pop()
    task = task or _task_from_sidecars(sidecars, member_paths, n_classes)
    if len(task.classes) != n_classes:
        raise ArmscopeError(
            f"task classes {task.classes} ({len(task.classes)}) do not match the models' {n_classes} outputs"
        )
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=force) as stage:
        (stage / "members").mkdir()
        targets = [stage / "members" / f"member_{i}.onnx" for i in range(len(models))]
        if jobs > 1 and len(models) > 1:
            _convert_in_workers(member_paths, targets, opset, jobs)
        else:
            for i, (model, target) in enumerate(zip(models, targets)):
                log.info("converting member %d/%d: %s", i + 1, len(models), member_paths[i])
                convert_to_onnx([model], target, opset)
        members = []
        for i, (path, model, side, target) in enumerate(zip(member_paths, models, sidecars, targets)):
            members.append({
                "file": f"members/{target.name}",
                "sha256": sha256_file(target),
                "fold": int(side.get("fold", i)),
                "source": path.name,
                "parity_max_abs_probs": _check_parity([model], target),
            })
        ensemble = stage / "ensemble.onnx"
        log.info("merging %d member graphs into the ensemble graph", len(models))
        onnx.save(merge_members([stage / m["file"] for m in members]), str(ensemble))
        ensemble_parity = _check_parity(models, ensemble)
        channels = int(models[0].get_layer(arch.FEATURE_MAP).output.shape[-1])
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name or out_dir.name,
            "description": description,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "task": task.to_manifest(),
            "preprocessing": preprocessing.to_manifest(),
            "model": {
                "architecture": "tiled-patch-classifier",
                "backbone": backbone_of(models[0]),
                "patch_size": arch.PATCH_SIZE,
                "grid": arch.GRID,
                "map_size": arch.MAP_SIZE,
                "feature_channels": channels,
                "cam": {
                    "method": "patch-weighted Grad-CAM (closed form, in graph)",
                    "definition": "alpha_c = mean_20x20( sum_k p_k^c/sum_i p_i^c * dz_k^c/dA ); cam_c = relu(sum_d alpha_c,d A_d)",
                    "layout": "N x C x 20 x 20, raw (not normalised)",
                },
            },
            "inputs": [{"name": "image", "shape": ["N", arch.IMAGE_SIZE, arch.IMAGE_SIZE, 3], "dtype": "float32"}],
            "outputs": [
                {"name": "probs", "shape": ["N", n_classes], "dtype": "float32"},
                {"name": "patch_probs", "shape": ["N", arch.N_PATCHES, n_classes], "dtype": "float32"},
                {"name": "cam", "shape": ["N", n_classes, arch.MAP_SIZE, arch.MAP_SIZE], "dtype": "float32"},
            ],
            "members": members,
            "ensemble": {"file": ensemble.name, "sha256": sha256_file(ensemble),
                         "parity_max_abs_probs": ensemble_parity},
            "precision": "fp32",
            "opset": opset,
            "producer": {
                "armscope": armscope.__version__,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "tf2onnx": tf2onnx.__version__,
                "onnx": onnx.__version__,
            },
        }
        worst = max([m["parity_max_abs_probs"] for m in members] + [ensemble_parity])
        if worst > 1e-4:
            raise ArmscopeError(
                f"ONNX graphs disagree with Keras: max |delta probs| = {worst:.2e} > 1e-4; not writing {out_dir}"
            )
        write_manifest(stage, manifest)
    return out_dir


def _convert_member_file(path: str, target: str, opset: int) -> str:
    """Worker-process entry point: load one member and convert it."""
    convert_to_onnx([load_member(path)], Path(target), opset)
    return target


def _convert_in_workers(paths: list[Path], targets: list[Path], opset: int, jobs: int) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log.info("converting %d members in %d worker processes", len(paths), jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_convert_member_file, str(p), str(t), opset) for p, t in zip(paths, targets)]
        for path, future in zip(paths, futures):
            try:
                future.result()
            except ArmscopeError:
                raise
            except Exception as exc:
                raise ArmscopeError(f"{path}: conversion failed in a worker process ({type(exc).__name__}: "
                                    f"{str(exc)[:200]})") from None


def _task_from_sidecars(sidecars: list[dict], paths: list[Path], n_classes: int) -> TaskSpec:
    classes = [s.get("classes") for s in sidecars]
    known = [c for c in classes if c]
    if known and any(c != known[0] for c in known):
        raise ArmscopeError(
            "members were trained on different class lists: "
            + "; ".join(f"{p}: {c}" for p, c in zip(paths, classes) if c)
        )
    names = known[0] if known else [f"class_{i}" for i in range(n_classes)]
    return TaskSpec(type="multiclass" if n_classes > 2 else "binary", classes=names,
                    positive_class=None if n_classes > 2 else names[-1],
                    threshold=None if n_classes > 2 else 0.5)
