"""``armscope train`` and ``armscope export``: Keras members in, an ONNX bundle out (both need the [tf] extra)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from armscope.cli.common import SEED, check_out_apart, crop_size, int_in
from armscope.core.errors import ArmscopeError

def _cmd_train(args) -> int:
    from armscope.export.train import train

    members = train(Path(args.data_dir), Path(args.out), backbone=args.backbone, folds=args.folds,
                    epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    for path in members:
        print(path)
    return 0


def _cmd_export(args) -> int:
    from armscope.core.preprocess import Preprocessing
    from armscope.export.onnx_export import TaskSpec, export_bundle

    task = None
    if args.weights or args.architecture:
        if args.members:
            raise ArmscopeError("give members either as model files or as --weights, not both")
        if not (args.weights and args.architecture and args.input_scaling):
            raise ArmscopeError("--weights needs --architecture and --input-scaling (and the other way round)")
    elif not args.members:
        raise ArmscopeError("no members given: expected .keras/.h5 files or SavedModel directories, or --weights")
    resolved = [Path(m).resolve() for m in args.members or args.weights]
    if len(set(resolved)) < len(resolved):
        raise ArmscopeError("members: the same file is given twice; each ensemble member is a different model")
    if args.explain:
        if args.weights:
            raise ArmscopeError("--explain describes model files; a --weights member has no graph to explain")
        if _differing_members(args):
            from armscope.export.multi_export import explain as explain_multi

            print(explain_multi(_member_sources(args), trust_code=args.trust_code))
            return 0
        from armscope.export.onnx_export import explain

        print(explain([Path(p) for p in args.members], trust_code=args.trust_code))
        return 0
    if not args.out:
        raise ArmscopeError("--out is required (the bundle directory to create), unless --explain")
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
        if not all(classes):
            raise ArmscopeError(f"--classes {args.classes!r}: expected comma-separated non-empty class names")
        kind = args.task or ("binary" if len(classes) == 2 else "multiclass")
        positive = args.positive_class or (classes[-1] if kind == "binary" else None)
        threshold = args.threshold if args.threshold is not None else (0.5 if kind == "binary" else None)
        task = TaskSpec(kind, classes, positive, threshold)
        if args.threshold is not None:  # before minutes of conversion, not at the manifest check after them
            from armscope.core.decision import check_threshold

            check_threshold(args.threshold, task.to_manifest(), "--threshold")
    elif args.task or args.positive_class or args.threshold is not None:
        raise ArmscopeError("--task/--positive-class/--threshold need --classes")
    check_out_apart(args.out, args.members or args.weights)
    spec = Preprocessing(center_crop=0 if args.no_crop else args.crop, resize=640, interpolation=args.interpolation,
                         input=_input_spec(args))
    gate = _tissue_gate(args.tissue_gate) if args.tissue_gate else None
    if _differing_members(args):
        from armscope.export.multi_export import export_multi

        if args.weights or args.saliency or args.jobs != 1:
            raise ArmscopeError("--svm-head/--scaling/--input-size export members that differ; they do not combine "
                                "with --weights, --saliency or --jobs")
        out = export_multi(_member_sources(args), Path(args.out), task=task, name=args.name, preprocessing=spec,
                           input_size=args.input_size, opset=args.opset, force=args.force,
                           description=args.description, trust_code=args.trust_code, tissue_gate=gate)
        print(f"wrote bundle {out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="armscope-weights-") as scratch:
        members = [Path(p) for p in args.members]
        if args.weights:
            from armscope.export.weights_map import save_weights_members

            members = save_weights_members([Path(w) for w in args.weights], args.architecture, args.input_scaling,
                                           Path(scratch))
        out = export_bundle(members, Path(args.out), task=task, name=args.name,
                            preprocessing=spec, opset=args.opset, force=args.force, description=args.description,
                            jobs=args.jobs, trust_code=args.trust_code, saliency=args.saliency,
                            input_scaling=None if args.weights else args.input_scaling, tissue_gate=gate)
    print(f"wrote bundle {out}")
    return 0


def _differing_members(args) -> bool:
    """Members that differ in head, scaling or input size go through armscope.export.multi_export."""
    return bool(args.svm_head or args.scaling or args.input_size)


def _member_sources(args):
    """--svm-head MEMBER=HEAD and --scaling MEMBER=NAME, matched to the positional members by path."""
    from armscope.export.multi_export import MemberSource

    members = [Path(m) for m in args.members]
    by_path = {m.resolve(): i for i, m in enumerate(members)}
    heads, scalings = {}, {}
    for option, values, into in (("--svm-head", args.svm_head, heads), ("--scaling", args.scaling, scalings)):
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
    default = args.input_scaling or "none"  # armscope.export.member_input takes --input-scaling's names too
    return [MemberSource(m, Path(heads[i]) if i in heads else None, scalings.get(i, default))
            for i, m in enumerate(members)]


def _input_spec(args):
    """--grey / --bit-depth / --window -> the manifest's preprocessing.input (None: camera frames as always)."""
    from armscope.core.preprocess import InputSpec, parse_window

    if not (args.grey or args.bit_depth or args.window):
        return None
    return InputSpec(kind="grey" if args.grey else "rgb", bit_depth_handling=args.bit_depth or "window",
                     window=parse_window(args.window) if args.window else None)


def _tissue_gate(text: str) -> dict:
    """--tissue-gate mri | KEY=VALUE,... -> the manifest's tissue_gate block."""
    from armscope.core.tissue import GATE_PRESETS, TissueGate

    if text in GATE_PRESETS:
        return dict(GATE_PRESETS[text])
    fields = TissueGate.__dataclass_fields__
    block = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ArmscopeError(f"--tissue-gate {text!r}: expected {' or '.join(GATE_PRESETS)} or KEY=VALUE pairs "
                                f"with KEY one of {', '.join(fields)}")
        try:
            number_value = float(value)
        except ValueError:
            raise ArmscopeError(f"--tissue-gate {item!r}: {value!r} is not a number") from None
        block[key] = int(number_value) if fields[key].type in (int, "int") else number_value
    return block




def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a member or a K-fold ensemble on a folder of class subfolders (needs [tf])")
    p.add_argument("data_dir")
    p.add_argument("--out", required=True, help="directory for member_N.keras and their .json sidecars")
    p.add_argument("--backbone", default="densenet-mini", choices=["densenet121", "densenet-mini"])
    p.add_argument("--folds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="Keras members -> ONNX bundle with in-graph tiling and Grad-CAM (needs [tf])")
    p.add_argument("members", nargs="*", help=".keras, .h5 or SavedModel directories, one per ensemble member")
    p.add_argument("--weights", action="append", default=[], metavar="FILE.h5|SAVEDMODEL",
                   help="weights-only member (repeat per member): a Keras 2 .h5 whose graph cannot be rebuilt, or a "
                        "SavedModel without Keras layers (Keras 3 model.export(), tf.saved_model.save); its tensors "
                        "are mapped by name (else by layer order) and shape onto --architecture, every match is "
                        "printed, and a partial or ambiguous match is refused. No code from the file runs")
    p.add_argument("--architecture", help="with --weights: the architecture the weights belong to: tiled-densenet121, "
                                          "tiled-densenet-mini (the 4x4 tiled 640x640 model), or whole-image "
                                          "densenet121, inceptionv3, densenet-mini (GAP + one Dense, softmax or one "
                                          "sigmoid unit; input size from the file)")
    p.add_argument("--input-scaling", choices=["symmetric", "unit", "imagenet"],
                   help="how the model expects RGB 0..255 scaled (symmetric: -1..1, unit: 0..1, imagenet: /255 then "
                        "ImageNet mean/std); required with --weights (weights cannot tell); for model files trained "
                        "on pre-scaled pixels it is prepended in the graph (the manifest says so)")
    p.add_argument("--out", help="bundle directory to create (required unless --explain)")
    p.add_argument("--explain", action="store_true",
                   help="print what each member is (input size, tiling, backbone, feature map, head, per-patch "
                        "heads, final output) and which Grad-CAM form applies, without exporting")
    p.add_argument("--trust-code", action="store_true",
                   help="allow running Python code stored in the model file (Keras Lambda layers and objects "
                        "from outside Keras run their code while the model loads and runs); refused by default")
    p.add_argument("--svm-head", action="append", default=[], metavar="MEMBER=HEAD.joblib",
                   help="MEMBER is a feature extractor (its output: global average pools of feature maps, "
                        "concatenated) and HEAD.joblib its scikit-learn SVC(kernel='rbf', probability=True), alone "
                        "or after a StandardScaler; put in the graph with Platt scaling and libsvm's pairwise "
                        "coupling. A joblib file is a pickle: needs --trust-code. Repeat per member")
    p.add_argument("--scaling", action="append", default=[], metavar="MEMBER=NAME",
                   help="how MEMBER was trained to see RGB 0..255, put in its graph: x/255, x/127.5-1, caffe "
                        "(keras.applications ResNet50's preprocess_input), torch, none (default: the model scales "
                        "itself); recorded in members[i].preprocessing. Repeat per member")
    p.add_argument("--input-size", type=int_in(16, 8192), metavar="S",
                   help="the bundle's one input S x S (default: the largest member's); a member of another size "
                        "is resized in its own graph (bilinear)")
    p.add_argument("--name")
    p.add_argument("--description", default="")
    p.add_argument("--classes", help="comma-separated class names (default: from the training sidecars)")
    p.add_argument("--task", choices=["binary", "multiclass"])
    p.add_argument("--positive-class")
    p.add_argument("--threshold", type=float, help="decision threshold on the positive class (binary tasks)")
    p.add_argument("--crop", type=crop_size, default=1024,
                   help="centre crop of the camera frame, pixels; 0: none, the whole image padded to a square")
    p.add_argument("--no-crop", action="store_true", help="whole images (an MRI slice): same as --crop 0")
    p.add_argument("--saliency", action="store_true",
                   help="add a vanilla saliency output (max over channels of |d score / d image| at the input size, "
                        "computed in the graph; whole-image models): about one more backward pass per image")
    p.add_argument("--grey", action="store_true",
                   help="the model was trained on greyscale images replicated to 3 channels (MRI slices): colour "
                        "inputs are turned grey")
    p.add_argument("--bit-depth", choices=["window", "minmax", "scale"],
                   help="how images of more than 8 bits (16-bit PNG/TIFF, DICOM) became 8 bits in training: "
                        "window (--window, else the DICOM file's, else min/max; the default), minmax, scale (x/65535)")
    p.add_argument("--window", metavar="CENTRE,WIDTH", help="the window/level the model was trained with "
                                                            "(default: each DICOM file's own)")
    p.add_argument("--tissue-gate", metavar="mri|KEY=VALUE,...",
                   help="the gate's thresholds for this modality, written to the manifest: 'mri' (air is background, "
                        "armscope.core.tissue.MRI_GATE) or e.g. min_tissue_fraction=0.1,min_brightness=45")
    p.add_argument("--interpolation", default="area", choices=["area", "linear", "cubic", "nearest"])
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--jobs", type=int, default=1, help="members whose graphs cannot share one conversion "
                   "(armscope.export.convert falls back to tf2onnx per member) are converted in this many worker processes")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.set_defaults(func=_cmd_export)
