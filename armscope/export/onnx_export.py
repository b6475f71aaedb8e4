"""Keras members -> ONNX graphs (tf2onnx) -> a model bundle.

Per member one graph (tf2onnx), plus one merged graph (``armscope.export.merge``) that
averages the members inside the graph (one session, one pass). Each graph takes ``image`` (N, S, S, 3)
float32 RGB 0..255 (S: the model's own input size) and returns ``probs`` (N, C),
``cam`` (N, C, H, W) and, for tiled models with per-patch heads, ``patch_probs``
(N, P, C). What the model is (tiling, feature map, heads, Grad-CAM form) comes
from ``armscope.export.structure``. The bundle is written to a temporary directory and
renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from armscope.core.bundle import sha256_file, staged_directory, write_manifest
from armscope.core.errors import ArmscopeError, require_module
from armscope.core.preprocess import Preprocessing
from armscope.export import architecture as arch
from armscope.export.convert import SharedConversionUnsupported, convert_members
from armscope.export.keras_io import load_member, quiet_libraries
from armscope.export.manifests import bundle_manifest, producer
from armscope.export.merge import merge_members
from armscope.export.scalings import parse_scaling
from armscope.export.structure import GRADCAM_GRADIENT, PATCH_WEIGHTED, ModelStructure, find_structure

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


def convert_to_onnx(models, output_path: Path, opset: int = DEFAULT_OPSET,
                    structures: list[ModelStructure] | None = None, saliency: bool = False,
                    input_scaling: str | None = None) -> None:
    """Trace the deploy function over ``models`` and write it as ONNX (``structures``:
    what ``armscope.export.structure`` found for each, found again when not given)."""
    tf2onnx = require_module("tf2onnx", "tf", "ONNX export")
    import armscope.export.tf2onnx_grads  # noqa: F401  (registers the gradient ops an in-graph Grad-CAM needs)
    from armscope.export.deploy_graph import make_deploy_function

    import onnx

    deploy, spec = make_deploy_function(models, structures, saliency, scaling_of(input_scaling))
    with quiet_libraries():
        model, _ = tf2onnx.convert.from_function(deploy, input_signature=[spec], opset=opset)
    unknown = sorted({n.op_type for n in model.graph.node if not n.domain and not onnx.defs.has(n.op_type)})
    if unknown:
        raise ArmscopeError(f"{output_path.name}: tf2onnx could not convert TensorFlow ops {', '.join(unknown)} "
                            "of the deploy graph")
    # tf2onnx names the dynamic batch dimension 'unk__NNN'; call it N everywhere so
    # runtimes (TensorRT profiles, Triton configs) see one shared batch axis.
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(output_path))


def keras_probs(model, structure: ModelStructure, x: np.ndarray) -> np.ndarray:
    """The member's final probabilities from Keras itself, as the bundle gives them ([1 - p, p] for a sigmoid)."""
    from armscope.export.graph import sub_model

    p = np.asarray(sub_model(model, [structure.final.output], "armscope_probs")(x, training=False))
    return np.concatenate([1 - p, p], axis=-1) if structure.final.activation == "sigmoid" else p


def scaling_of(name: str | None):
    """--input-scaling NAME -> (scale, offset) per channel (``armscope.export.scalings``), or None for
    none; a scaling this graph cannot apply (one that reorders channels) is refused by name."""
    if name is None:
        return None
    found = parse_scaling(name, "--input-scaling")
    return None if found.identity else found.affine("--input-scaling")


def apply_scaling(x: np.ndarray, input_scaling: str | None) -> np.ndarray:
    """What the deploy graph feeds the model for a bundle input x (RGB 0..255)."""
    pair = scaling_of(input_scaling)
    if pair is None:
        return x
    return (x * np.asarray(pair[0], np.float32) + np.asarray(pair[1], np.float32)).astype(np.float32)


def _check_parity(models, structures, onnx_path: Path, seed: int = 0, input_scaling: str | None = None) -> float:
    """Max |probs| difference between Keras (averaged over members) and ONNX Runtime on one frame."""
    import onnxruntime as ort

    size = structures[0].input_size
    x = np.random.default_rng(seed).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    ref = np.mean([keras_probs(m, s, apply_scaling(x, input_scaling)) for m, s in zip(models, structures)], axis=0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"image": x})[0]
    return float(np.max(np.abs(ref - got)))


def load_and_analyse(member_paths: list[Path], trust_code: bool = False):
    """Load every member and find its structure; members must agree on input size and outputs."""
    models, structures = [], []
    for path in member_paths:
        model = load_member(path, trust_code=trust_code)
        with quiet_libraries():
            structures.append(find_structure(model, path))
        models.append(model)
    first = structures[0]
    for path, st in zip(member_paths[1:], structures[1:]):
        ours = (st.input_size, st.n_classes, bool(st.patch_heads), st.grid)
        theirs = (first.input_size, first.n_classes, bool(first.patch_heads), first.grid)
        if ours != theirs:
            raise ArmscopeError(
                f"{path}: (input size, classes, per-patch heads, grid) = {ours} differs from {member_paths[0]}'s "
                f"{theirs}; members of one ensemble must share input and outputs (for whole-image members of "
                f"other input sizes, give --input-size S: each then resizes in its own graph)")
    return models, structures


def explain(member_paths: list[Path], trust_code: bool = False) -> str:
    """What ``export`` would find in each member, without exporting."""
    texts = []
    for path in member_paths:
        model = load_member(path, trust_code=trust_code)
        with quiet_libraries():
            texts.append(find_structure(model, path).explain())
    return "\n\n".join(texts)


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
    trust_code: bool = False,
    saliency: bool = False,
    input_scaling: str | None = None,
    tissue_gate: dict | None = None,
) -> Path:
    """Export members to a bundle directory and return its path. Members sharing
    one graph are converted once (``armscope.export.convert``: seconds per member, not
    minutes); ``jobs`` > 1 converts members in that many worker processes where
    that shared conversion cannot take the graph (tf2onnx per member)."""
    if jobs < 1:
        raise ArmscopeError(f"--jobs {jobs}: expected 1 or more")
    if opset < 17:
        raise ArmscopeError(f"--opset {opset}: expected 17 or newer")
    if not member_paths:
        raise ArmscopeError("no members given: expected one or more .keras/.h5 files or SavedModel directories")
    for module in ("tensorflow", "keras", "tf2onnx"):  # one clear error naming the [tf] extra where one is missing
        require_module(module, "tf", "ONNX export")
    import onnx

    member_paths = [Path(p) for p in member_paths]
    models, structures = load_and_analyse(member_paths, trust_code)
    sidecars = [read_sidecar(p) for p in member_paths]
    st = structures[0]
    n_classes = st.n_classes
    scaling_of(input_scaling)  # an unknown name fails before minutes of conversion
    if saliency:
        for path, found in zip(member_paths, structures):
            if found.tiled or found.final.layout != "map":
                raise ArmscopeError(f"--saliency: supported for whole-image models; {path} is tiled "
                                    f"({found.grid}x{found.grid} patches)")
    preprocessing = dataclasses.replace(preprocessing, resize=st.input_size)
    task = task or _task_from_sidecars(sidecars, member_paths, n_classes)
    if len(task.classes) != n_classes:
        raise ArmscopeError(
            f"task classes {task.classes} ({len(task.classes)}) do not match the models' {n_classes} outputs"
        )
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=force) as stage:
        (stage / "members").mkdir()
        targets = [stage / "members" / f"member_{i}.onnx" for i in range(len(models))]
        try:  # one tf2onnx conversion per distinct graph, each member's weights bound (armscope.export.convert)
            convert_members(models, targets, opset, build=_deploy_builder(models, structures, saliency, input_scaling))
        except SharedConversionUnsupported as exc:
            log.warning("%s: converting each member on its own", exc)
            if jobs > 1 and len(models) > 1:
                _convert_in_workers(member_paths, targets, opset, jobs, trust_code, saliency, input_scaling)
            else:
                for i, (model, target) in enumerate(zip(models, targets)):
                    log.info("converting member %d/%d: %s", i + 1, len(models), member_paths[i])
                    convert_to_onnx([model], target, opset, [structures[i]], saliency, input_scaling)
        members = []
        for i, (path, model, side, target) in enumerate(zip(member_paths, models, sidecars, targets)):
            members.append({
                "file": f"members/{target.name}",
                "sha256": sha256_file(target),
                "fold": int(side.get("fold", i)),
                "source": path.name,
                "parity_max_abs_probs": _check_parity([model], [structures[i]], target, input_scaling=input_scaling),
            })
        ensemble = stage / "ensemble.onnx"
        log.info("merging %d member graphs into the ensemble graph", len(models))
        onnx.save(merge_members([stage / m["file"] for m in members]), str(ensemble))
        ensemble_parity = _check_parity(models, structures, ensemble, input_scaling=input_scaling)
        pre_block = preprocessing.to_manifest()
        if scaling_of(input_scaling) is not None:
            found = parse_scaling(input_scaling, "--input-scaling")  # recorded by its --input-scaling name
            pre_block["scaling"] = {"name": found.recorded_name, "formula": found.means,
                                    "where": "prepended in the graph at export (--input-scaling): the model "
                                             "was trained on scaled pixels; the bundle takes RGB 0..255"}
        model_info = model_block(st)
        outputs_info = output_block(st)
        if saliency:
            model_info["saliency"] = {
                "method": "vanilla gradient (in graph)",
                "definition": "saliency_c = max over RGB channels of |d score_c / d image|, image = the bundle input "
                              "(RGB 0..255, before any in-graph scaling), at the input size",
                "score": st.score, "layout": f"N x C x {st.input_size} x {st.input_size}, raw (not normalised)"}
            outputs_info.append({"name": "saliency", "shape": ["N", n_classes, st.input_size, st.input_size],
                                 "dtype": "float32"})
        manifest = bundle_manifest(
            name=name or out_dir.name, description=description, task=task.to_manifest(), preprocessing=pre_block,
            model=model_info, input_size=st.input_size, outputs=outputs_info, members=members, ensemble=ensemble,
            ensemble_parity=ensemble_parity, opset=opset, producer_block=producer(), tissue_gate=tissue_gate)
        worst = max([m["parity_max_abs_probs"] for m in members] + [ensemble_parity])
        if worst > 1e-4:
            raise ArmscopeError(
                f"ONNX graphs disagree with Keras: max |delta probs| = {worst:.2e} > 1e-4; not writing {out_dir}"
            )
        write_manifest(stage, manifest)
    return out_dir


def _is_armscope_model(st: ModelStructure) -> bool:
    """Built by ``armscope train``: its bundles keep the manifest they always had."""
    return (st.backbone in arch.BACKBONES and st.tiled and st.cam_form == PATCH_WEIGHTED
            and st.input_size == arch.IMAGE_SIZE and st.grid == arch.GRID and st.map_size == (arch.MAP_SIZE,) * 2)


def model_block(st: ModelStructure) -> dict:
    """manifest["model"] per the bundle contract (docs/bundle.md, "Bundle contract")."""
    h, w = st.map_size
    if _is_armscope_model(st):
        return {
            "architecture": "tiled-patch-classifier",
            "backbone": st.backbone,
            "patch_size": arch.PATCH_SIZE,
            "grid": arch.GRID,
            "map_size": arch.MAP_SIZE,
            "feature_channels": st.channels,
            "cam": {
                "method": "patch-weighted Grad-CAM (closed form, in graph)",
                "definition": "alpha_c = mean_20x20( sum_k p_k^c/sum_i p_i^c * dz_k^c/dA ); cam_c = relu(sum_d alpha_c,d A_d)",
                "layout": "N x C x 20 x 20, raw (not normalised)",
            },
        }
    if st.cam_form == PATCH_WEIGHTED:
        definition = (f"alpha_c = mean_{h}x{w}( sum_k p_k^c/sum_i p_i^c * dz_k^c/dA ) over the per-patch heads; "
                      "cam_c = relu(sum_d alpha_c,d A_d)")
    else:
        definition = (f"alpha_c = mean_{h}x{w}( dy^c/dA ) for the final head; cam_c = relu(sum_d alpha_c,d A_d)"
                      + ("; dy^c/dA computed by a gradient inside the graph" if st.cam_form == GRADCAM_GRADIENT else
                         f"; closed form: alpha_c = W[:, c] / {h * w}"))
    block = {
        "architecture": "tiled-patch-classifier" if st.tiled else "whole-image-classifier",
        "backbone": st.backbone,
        "input_size": st.input_size,
        "map_size": h,
        "feature_layer": st.feature_layer,
        "feature_channels": st.channels,
        "head": st.final.activation,
        "per_patch_heads": st.per_patch,
        "cam": {"method": st.cam_form, "definition": definition, "score": st.score,
                "layout": f"N x C x {h} x {w}, raw (not normalised)"},
    }
    if st.final.activation == "sigmoid":
        block["probs"] = "[1 - p, p] from the single sigmoid unit p"
    if st.tiled:
        block.update({"patch_size": st.patch_size, "grid": st.grid})
    return block


def output_block(st: ModelStructure) -> list[dict]:
    h, w = st.map_size
    c = st.n_classes
    outputs = [{"name": "probs", "shape": ["N", c], "dtype": "float32"}]
    if st.patch_heads:
        outputs.append({"name": "patch_probs", "shape": ["N", st.grid * st.grid, c], "dtype": "float32"})
    outputs.append({"name": "cam", "shape": ["N", c, h, w], "dtype": "float32"})
    return outputs


def _deploy_builder(models, structures, saliency: bool = False, input_scaling: str | None = None):
    """model -> its deploy function, with the structure already found for it."""
    from armscope.export.deploy_graph import make_deploy_function

    found = {id(m): st for m, st in zip(models, structures)}
    scaling = scaling_of(input_scaling)
    return lambda model: make_deploy_function([model], [found[id(model)]], saliency, scaling)


def _convert_member_file(path: str, target: str, opset: int, trust_code: bool = False, saliency: bool = False,
                         input_scaling: str | None = None) -> str:
    """Worker-process entry point: load one member and convert it."""
    convert_to_onnx([load_member(path, trust_code=trust_code)], Path(target), opset, saliency=saliency,
                    input_scaling=input_scaling)
    return target


def _convert_in_workers(paths: list[Path], targets: list[Path], opset: int, jobs: int,
                        trust_code: bool = False, saliency: bool = False, input_scaling: str | None = None) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log.info("converting %d members in %d worker processes", len(paths), jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_convert_member_file, str(p), str(t), opset, trust_code, saliency, input_scaling)
                   for p, t in zip(paths, targets)]
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
