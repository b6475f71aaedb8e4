"""Ensembles of members that differ: in input size, in input scaling, and in
their head (a Keras softmax/sigmoid classifier, or a Keras feature extractor
with a scikit-learn SVM head: the renal electron-microscopy system's
ResNet50 skip features + SVC beside a plain ResNet50).

Each member becomes one ONNX graph with the bundle's one input (N, S, S, 3):
resize and scaling inside (``armscope.export.member_input``), then its own layers, its
head (the SVM as TensorFlow ops, ``armscope.export.svm_head``) and its Grad-CAM, the
CAM resized in the graph to the bundle's map size where the member's differs,
and the SVM's classes put in the bundle's order. The members are then merged
and averaged exactly as a homogeneous ensemble (``armscope.export.merge``), so nothing
downstream of the export changes. Every member graph is checked against Keras
(and scikit-learn's ``predict_proba`` for an SVM head) before anything is
written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from armscope.core.bundle import sha256_file, staged_directory, write_manifest
from armscope.core.errors import ArmscopeError, require_module
from armscope.core.preprocess import Preprocessing
from armscope.export import member_input
from armscope.export.keras_io import load_member, quiet_libraries
from armscope.export.manifests import bundle_manifest, producer
from armscope.export.scalings import SCALINGS

log = logging.getLogger(__name__)

PARITY_LIMIT = 1e-4


@dataclass
class MemberSource:
    """One member as given on the command line."""

    path: Path
    svm_head: Path | None = None
    scaling: str = "none"


def member_sources(members: list[Path], svm_heads: list[str] = (), scalings: list[str] = (),
                   default_scaling: str = "none") -> list[MemberSource]:
    """``--svm-head MEMBER=HEAD`` and ``--scaling MEMBER=NAME`` matched to ``members`` by path
    (members without a --scaling get ``default_scaling``: ``--input-scaling``, else none)."""
    members = [Path(m) for m in members]
    by_path = {m.resolve(): i for i, m in enumerate(members)}
    heads, scales = {}, {}
    for option, values, into in (("--svm-head", svm_heads, heads), ("--scaling", scalings, scales)):
        for text in values:
            member, sep, value = text.rpartition("=")
            if not sep or not member or not value:
                raise ArmscopeError(f"{option} {text!r}: expected MEMBER=VALUE, MEMBER one of the member files given")
            index = by_path.get(Path(member).resolve())
            if index is None:
                raise ArmscopeError(f"{option} {text!r}: {member} is not one of the members given "
                                    f"({', '.join(map(str, members))})")
            if index in into:
                raise ArmscopeError(f"{option}: {member} is given twice")
            into[index] = value
    return [MemberSource(m, Path(heads[i]) if i in heads else None, scales.get(i, default_scaling))
            for i, m in enumerate(members)]


@dataclass(eq=False)
class LoadedMember:
    source: MemberSource
    model: object
    structure: object = None  # armscope.export.structure.ModelStructure (a Keras classifier)
    features: object = None  # armscope.export.feature_model.FeatureStructure (a feature extractor + SVM head)
    head: object = None  # armscope.export.svm_head.SvmHead
    order: list[int] = field(default_factory=list)  # bundle class c <- the member's output order[c]

    @property
    def input_size(self) -> int:
        return (self.features or self.structure).input_size

    @property
    def map_size(self) -> tuple[int, int]:
        return tuple((self.features or self.structure).map_size)

    @property
    def n_classes(self) -> int:
        return self.head.n_classes if self.head is not None else self.structure.n_classes

    def explain(self) -> str:
        text = self.features.explain(self.head) if self.head is not None else self.structure.explain()
        return text + f"\nscaling     {self.source.scaling}: {SCALINGS[self.source.scaling].means}"


def load_members(sources: list[MemberSource], trust_code: bool = False) -> list[LoadedMember]:
    """Load every member (and SVM head) and find what it is; refuse, naming the file, what cannot be deployed."""
    from armscope.export.feature_model import find_feature_structure
    from armscope.export.structure import find_structure
    from armscope.export.svm_head import load_svm_head

    loaded = []
    for src in sources:
        src.scaling = member_input.check_scaling(src.scaling, f"--scaling {src.path}")
        head = load_svm_head(src.svm_head, trust_code) if src.svm_head is not None else None
        model = load_member(src.path, trust_code=trust_code)
        with quiet_libraries():
            if head is None:
                member = LoadedMember(src, model, structure=find_structure(model, src.path))
                if member.structure.patch_heads:
                    raise ArmscopeError(f"{src.path}: a tiled model with per-patch heads; members that differ in "
                                        "input or head are whole-image models (export it with members like it)")
            else:
                member = LoadedMember(src, model, features=find_feature_structure(model, src.path), head=head)
                if head.n_features != member.features.n_features:
                    raise ArmscopeError(f"{src.svm_head}: the SVM expects {head.n_features} features but "
                                        f"{src.path} gives {member.features.n_features}")
        loaded.append(member)
    counts = {m.n_classes for m in loaded}
    if len(counts) > 1:
        raise ArmscopeError("members disagree on the number of classes: " + "; ".join(
            f"{m.source.path}: {m.n_classes}" for m in loaded))
    return loaded


def explain(sources: list[MemberSource], trust_code: bool = False) -> str:
    return "\n\n".join(m.explain() for m in load_members(sources, trust_code))


def _task(members: list[LoadedMember], task, sidecars: list[dict]):
    """The bundle's task, and each SVM member's class order mapped onto it."""
    from armscope.export.onnx_export import TaskSpec, _task_from_sidecars

    n = members[0].n_classes
    if task is None:
        named = [m.head.classes for m in members if m.head is not None
                 and not all(c.lstrip("-").isdigit() for c in m.head.classes)]
        if named and not any(s.get("classes") for s in sidecars):
            classes = named[0]
            task = TaskSpec(type="multiclass" if n > 2 else "binary", classes=classes,
                            positive_class=None if n > 2 else classes[-1], threshold=None if n > 2 else 0.5)
        else:
            task = _task_from_sidecars(sidecars, [m.source.path for m in members], n)
    if len(task.classes) != n:
        raise ArmscopeError(f"task classes {task.classes} ({len(task.classes)}) do not match the members' {n} outputs")
    for m in members:
        m.order = list(range(n))
        if m.head is None:
            continue
        if sorted(m.head.classes) == sorted(task.classes):
            m.order = [m.head.classes.index(c) for c in task.classes]
        elif m.head.classes != [str(i) for i in range(n)]:
            raise ArmscopeError(f"{m.source.svm_head}: the SVM's classes {m.head.classes} are neither the bundle's "
                                f"classes {task.classes} nor 0..{n - 1}; give --classes with its class names")
    return task


class MemberDeploy:
    """image (B, S, S, 3) -> the member's {probs, cam} in the bundle's class order and map size."""

    def __init__(self, member: LoadedMember, host_size: int, cam_size: tuple[int, int]):
        from armscope.export.deploy_graph import MemberGraph
        from armscope.export.feature_model import SvmMemberGraph

        self.member, self.host_size, self.cam_size = member, host_size, cam_size
        self.graph = (SvmMemberGraph(member.model, member.features, member.head) if member.head is not None
                      else MemberGraph(member.model, member.structure))

    def __call__(self, image) -> dict:
        import tensorflow as tf

        m = self.member
        x = member_input.to_member(image, self.host_size, m.input_size, m.source.scaling)
        out = self.graph(x)
        probs, cam = out["probs"], out["cam"]
        if m.order != list(range(len(m.order))):
            probs, cam = tf.gather(probs, m.order, axis=1), tf.gather(cam, m.order, axis=1)
        return {"probs": probs, "cam": member_input.resize_cam(cam, self.cam_size)}


def deploy_function(member: LoadedMember, host_size: int, cam_size: tuple[int, int]):
    import tensorflow as tf

    import armscope.export.tf2onnx_grads  # noqa: F401  (gradient ops of an in-graph Grad-CAM by GradientTape)

    deploy = MemberDeploy(member, host_size, cam_size)
    spec = tf.TensorSpec((None, host_size, host_size, 3), tf.float32, name="image")
    return tf.function(deploy, input_signature=[spec]), spec


def reference_probs(member: LoadedMember, image: np.ndarray, host_size: int) -> np.ndarray:
    """The member's probabilities from Keras (and scikit-learn's predict_proba for an SVM head), in bundle order."""
    from armscope.export.graph import sub_model
    from armscope.export.onnx_export import keras_probs

    x = np.asarray(member_input.to_member(image.astype(np.float32), host_size, member.input_size,
                                          member.source.scaling))
    if member.head is None:
        p = keras_probs(member.model, member.structure, x)
    else:
        features = np.asarray(sub_model(member.model, [member.model.outputs[0]], "armscope_features")(
            x, training=False))
        p = member.head.predict_proba(features)
    return p[:, member.order]


def _convert(members: list[LoadedMember], targets: list[Path], host_size: int, cam_size, opset: int) -> None:
    from armscope.export.convert import SharedConversionUnsupported, convert_members

    functions = {id(m.model): deploy_function(m, host_size, cam_size) for m in members}
    try:
        convert_members([m.model for m in members], targets, opset, build=lambda model: functions[id(model)])
    except SharedConversionUnsupported as exc:
        log.warning("%s: converting each member with tf2onnx directly", exc)
        for m, target in zip(members, targets):
            _convert_direct(*functions[id(m.model)], target, opset)


def _convert_direct(function, spec, target: Path, opset: int) -> None:
    tf2onnx = require_module("tf2onnx", "tf", "ONNX export")
    import onnx

    with quiet_libraries():
        model, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(target))


def _parity(session_path: Path, refs: np.ndarray, x: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(session_path), providers=["CPUExecutionProvider"])
    return float(np.max(np.abs(session.run(["probs"], {"image": x})[0] - refs)))


def _member_model_block(m: LoadedMember) -> dict:
    from armscope.export.feature_model import FEATURE_CAM
    from armscope.export.onnx_export import model_block
    from armscope.export.svm_head import SCORE

    if m.head is None:
        return model_block(m.structure)
    st, (h, w) = m.features, m.features.map_size
    return {
        "architecture": "whole-image-classifier", "backbone": st.backbone, "input_size": st.input_size,
        "map_size": h, "feature_layer": st.feature_layer, "feature_channels": st.channels,
        "features": {"size": st.n_features, "pooled": [{"layer": n, "slice": list(o)}
                                                       for n, o in zip(st.pooled_layers, st.offsets)]},
        "head": "svm", "svm": {"source": Path(m.head.source).name, "kind": "sklearn SVC, kernel rbf",
                               "support_vectors": int(len(m.head.support_vectors)), "gamma": m.head.gamma,
                               "classes": m.head.classes, "standard_scaler": m.head.mean is not None,
                               "probability": "Platt scaling per pair, then libsvm's iterative pairwise coupling "
                                              "(an ONNX Loop), as scikit-learn's predict_proba"},
        "cam": {"method": FEATURE_CAM,
                "definition": f"alpha_c = (d s_c / d v[{st.channel_slice.start}:{st.channel_slice.stop}]) / {h * w}, "
                              f"v the features, that slice the global average pool of {st.feature_layer!r}; "
                              "cam_c = relu(sum_d alpha_c,d A_d); the RBF kernel's derivative in closed form",
                "score": SCORE, "layout": f"N x C x {h} x {w}, raw (not normalised)"},
    }


def export_multi(sources: list[MemberSource], out_dir: Path, task=None, name: str | None = None,
                 preprocessing: Preprocessing = Preprocessing(), input_size: int | None = None,
                 opset: int = 17, force: bool = False, description: str = "", trust_code: bool = False,
                 tissue_gate: dict | None = None) -> Path:
    """Export members that may differ in input size, scaling and head; return the bundle directory."""
    import dataclasses

    from armscope.export.merge import merge_members
    from armscope.export.onnx_export import read_sidecar

    if not sources:
        raise ArmscopeError("no members given: expected one or more .keras/.h5 files or SavedModel directories")
    if opset < 17:
        raise ArmscopeError(f"--opset {opset}: expected 17 or newer")
    for module in ("tensorflow", "keras", "tf2onnx"):  # one clear error naming the [tf] extra where one is missing
        require_module(module, "tf", "ONNX export")
    import onnx
    import sklearn

    members = load_members(sources, trust_code)
    task = _task(members, task, [read_sidecar(m.source.path) for m in members])
    size = int(input_size or max(m.input_size for m in members))
    h = max(m.map_size[0] for m in members)
    w = max(m.map_size[1] for m in members)
    cam_size = (h, w)
    preprocessing = dataclasses.replace(preprocessing, resize=size)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=force) as stage:
        (stage / "members").mkdir()
        targets = [stage / "members" / f"member_{i}.onnx" for i in range(len(members))]
        _convert(members, targets, size, cam_size, opset)
        refs, entries = [], []
        for i, (m, target) in enumerate(zip(members, targets)):
            ref = reference_probs(m, x, size)
            refs.append(ref)
            entry = {"file": f"members/{target.name}", "sha256": sha256_file(target), "fold": i,
                     "source": m.source.path.name,
                     "preprocessing": member_input.manifest_block(size, m.input_size, m.source.scaling),
                     "model": _member_model_block(m),
                     "parity_max_abs_probs": _parity(target, ref, x)}
            if m.map_size != cam_size:
                entry["cam_resized"] = {"from": list(m.map_size), "to": list(cam_size), "method": "bilinear"}
            if m.head is not None:
                entry["head_source"] = Path(m.head.source).name
                entry["parity_reference"] = "scikit-learn predict_proba on the Keras model's features"
            entries.append(entry)
        ensemble = stage / "ensemble.onnx"
        onnx.save(merge_members([stage / e["file"] for e in entries]), str(ensemble))
        ensemble_parity = _parity(ensemble, np.mean(refs, axis=0), x)
        worst = max([e["parity_max_abs_probs"] for e in entries] + [ensemble_parity])
        if worst > PARITY_LIMIT:
            bad = [f"{e['source']}: {e['parity_max_abs_probs']:.2e}" for e in entries]
            raise ArmscopeError(f"ONNX graphs disagree with Keras/scikit-learn: max |delta probs| = {worst:.2e} > "
                                f"{PARITY_LIMIT:g} ({'; '.join(bad)}); not writing {out_dir}")
        scores = "; ".join(f"member {i} ({e['source']}): {e['model']['cam']['score']}" for i, e in enumerate(entries))
        model = {
            "architecture": "whole-image-classifier",
            "backbone": " + ".join(e["model"].get("backbone", "?") for e in entries),
            "input_size": size,
            **({"map_size": h} if h == w else {}),
            "members_differ": "see members[i].preprocessing and members[i].model",
            "cam": {"method": "each member's own Grad-CAM (members[i].model.cam), resized to "
                              f"{h}x{w} where a member's map differs, averaged",
                    "definition": "cam = mean over members of cam_member (bilinear-resized to the bundle's map)",
                    "score": scores, "layout": f"N x C x {h} x {w}, raw (not normalised)"},
        }
        manifest = bundle_manifest(
            name=name or out_dir.name, description=description, task=task.to_manifest(),
            preprocessing=preprocessing.to_manifest(), model=model, input_size=size,
            outputs=[{"name": "probs", "shape": ["N", len(task.classes)], "dtype": "float32"},
                     {"name": "cam", "shape": ["N", len(task.classes), h, w], "dtype": "float32"}],
            members=entries, ensemble=ensemble, ensemble_parity=ensemble_parity, opset=opset,
            producer_block=producer(**{"scikit-learn": sklearn.__version__}), tissue_gate=tissue_gate)
        write_manifest(stage, manifest)
    return out_dir
