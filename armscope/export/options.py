"""``armscope export``'s options, checked and carried out in one place.

Why here and not in the CLI: which flags combine (``--weights`` with
``--architecture`` and ``--input-scaling``; ``--svm-head``/``--scaling`` not with
``--saliency``), what ``--classes`` makes of the task, which export path a set
of members takes: a Python caller building a bundle needs the same answers and
the same refusals as the command line, before minutes of conversion, not
after. ``run_export(ExportOptions(...))`` is that one way through; the
``armscope export`` handler only fills ``ExportOptions`` from its arguments and
prints what comes back.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from armscope.core.errors import ArmscopeError


@dataclass
class ExportOptions:
    """What ``armscope export`` was asked for, one field per flag (same names, ``-`` as ``_``)."""

    members: list = field(default_factory=list)      # .keras/.h5 files or SavedModel directories
    out: Path | str | None = None
    weights: list = field(default_factory=list)      # weights-only members (--weights)
    architecture: str | None = None
    input_scaling: str | None = None                 # a name of armscope.export.scalings
    explain: bool = False
    trust_code: bool = False
    svm_head: list = field(default_factory=list)     # MEMBER=HEAD.joblib
    scaling: list = field(default_factory=list)      # MEMBER=NAME
    input_size: int | None = None
    name: str | None = None
    description: str = ""
    classes: str | None = None                       # comma-separated
    task: str | None = None
    positive_class: str | None = None
    threshold: float | None = None
    crop: int = 1024
    no_crop: bool = False
    saliency: bool = False
    grey: bool = False
    bit_depth: str | None = None
    window: str | None = None
    tissue_gate: str | None = None                   # a preset name or KEY=VALUE,...
    interpolation: str = "area"
    opset: int = 17
    jobs: int = 1
    force: bool = False

    @classmethod
    def from_namespace(cls, namespace) -> "ExportOptions":
        """From parsed arguments (argparse) whose destinations have these names."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})

    @property
    def differing(self) -> bool:
        """Members that differ in head, scaling or input size go through ``armscope.export.multi_export``."""
        return bool(self.svm_head or self.scaling or self.input_size)


def run_export(o: ExportOptions) -> str:
    """Check ``o``, then explain the members or export the bundle; return what to print."""
    check_members(o)
    if o.explain:
        return _explain(o)
    if not o.out:
        raise ArmscopeError("--out is required (the bundle directory to create), unless --explain")
    if o.differing and (o.weights or o.saliency or o.jobs != 1):
        raise ArmscopeError("--svm-head/--scaling/--input-size export members that differ; they do not combine "
                            "with --weights, --saliency or --jobs")
    task = task_spec(o.classes, o.task, o.positive_class, o.threshold)
    from armscope.core.bundle import check_out_apart

    check_out_apart(o.out, o.members or o.weights)  # --force would delete a member
    spec = _preprocessing(o)
    gate = None
    if o.tissue_gate:
        from armscope.core.tissue import parse_gate

        gate = parse_gate(o.tissue_gate)
    if o.differing:
        from armscope.export.multi_export import export_multi

        out = export_multi(_sources(o), Path(o.out), task=task, name=o.name, preprocessing=spec,
                           input_size=o.input_size, opset=o.opset, force=o.force, description=o.description,
                           trust_code=o.trust_code, tissue_gate=gate)
        return f"wrote bundle {out}"
    from armscope.export.onnx_export import export_bundle

    with tempfile.TemporaryDirectory(prefix="armscope-weights-") as scratch:
        members = [Path(p) for p in o.members]
        if o.weights:
            from armscope.export.weights_map import save_weights_members

            members = save_weights_members([Path(w) for w in o.weights], o.architecture, o.input_scaling,
                                           Path(scratch))
        out = export_bundle(members, Path(o.out), task=task, name=o.name, preprocessing=spec, opset=o.opset,
                            force=o.force, description=o.description, jobs=o.jobs, trust_code=o.trust_code,
                            saliency=o.saliency, input_scaling=None if o.weights else o.input_scaling,
                            tissue_gate=gate)
    return f"wrote bundle {out}"


def check_members(o: ExportOptions) -> None:
    """The members and the flags that say how they are read: which combine, and which
    scaling names each path can apply (``armscope.export.scalings``)."""
    from armscope.export.scalings import parse_scaling

    if o.weights or o.architecture:
        if o.members:
            raise ArmscopeError("give members either as model files or as --weights, not both")
        if not (o.weights and o.architecture and o.input_scaling):
            raise ArmscopeError("--weights needs --architecture and --input-scaling (and the other way round)")
    elif not o.members:
        raise ArmscopeError("no members given: expected .keras/.h5 files or SavedModel directories, or --weights")
    resolved = [Path(m).resolve() for m in o.members or o.weights]
    if len(set(resolved)) < len(resolved):
        raise ArmscopeError("members: the same file is given twice; each ensemble member is a different model")
    if o.input_scaling is not None:
        scaling = parse_scaling(o.input_scaling, "--input-scaling")
        if not o.differing:  # one graph for all members (or --weights): a multiply-add per channel only
            scaling.affine("--input-scaling")
    if o.differing and not o.weights:
        _sources(o)  # every MEMBER=VALUE names a member, every scaling name is known


def task_spec(classes: str | None, kind: str | None = None, positive_class: str | None = None,
              threshold: float | None = None):
    """``--classes`` (and ``--task``/``--positive-class``/``--threshold``) -> the bundle's task,
    or None to take it from the training sidecars."""
    if classes is None:
        if kind or positive_class or threshold is not None:
            raise ArmscopeError("--task/--positive-class/--threshold need --classes")
        return None
    from armscope.export.onnx_export import TaskSpec

    names = [c.strip() for c in classes.split(",")]
    if not all(names):
        raise ArmscopeError(f"--classes {classes!r}: expected comma-separated non-empty class names")
    kind = kind or ("binary" if len(names) == 2 else "multiclass")
    positive = positive_class or (names[-1] if kind == "binary" else None)
    task = TaskSpec(kind, names, positive, threshold if threshold is not None else (0.5 if kind == "binary" else None))
    if threshold is not None:  # before minutes of conversion, not at the manifest check after them
        from armscope.core.decision import check_threshold

        check_threshold(threshold, task.to_manifest(), "--threshold")
    return task


def _explain(o: ExportOptions) -> str:
    if o.weights:
        raise ArmscopeError("--explain describes model files; a --weights member has no graph to explain")
    if o.differing:
        from armscope.export.multi_export import explain as explain_multi

        return explain_multi(_sources(o), trust_code=o.trust_code)
    from armscope.export.onnx_export import explain

    return explain([Path(p) for p in o.members], trust_code=o.trust_code)


def _sources(o: ExportOptions):
    """--svm-head and --scaling per member; --input-scaling is the scaling of members without one."""
    from armscope.export.member_input import check_scaling
    from armscope.export.multi_export import member_sources

    sources = member_sources(o.members, o.svm_head, o.scaling, o.input_scaling or "none")
    for source in sources:
        source.scaling = check_scaling(source.scaling, f"--scaling {source.path}")
    return sources


def _preprocessing(o: ExportOptions):
    """--crop/--no-crop, --interpolation and --grey/--bit-depth/--window -> the manifest's preprocessing."""
    from armscope.core.preprocess import InputSpec, Preprocessing, parse_window

    spec = None
    if o.grey or o.bit_depth or o.window:
        spec = InputSpec(kind="grey" if o.grey else "rgb", bit_depth_handling=o.bit_depth or "window",
                         window=parse_window(o.window) if o.window else None)
    return Preprocessing(center_crop=0 if o.no_crop else o.crop, resize=640, interpolation=o.interpolation,
                         input=spec)
