"""``armscope train`` and ``armscope export``: Keras members in, an ONNX bundle out (both need the [tf] extra)."""
from __future__ import annotations

from pathlib import Path

from armscope.cli.common import SEED, crop_size, int_in
from armscope.export.scalings import HELP as SCALING_HELP


def _cmd_train(args) -> int:
    from armscope.export.train import train

    members = train(Path(args.data_dir), Path(args.out), backbone=args.backbone, folds=args.folds,
                    epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    for path in members:
        print(path)
    return 0


def _cmd_export(args) -> int:
    from armscope.export.options import ExportOptions, run_export

    print(run_export(ExportOptions.from_namespace(args)))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a member or a K-fold ensemble on a folder of class subfolders (needs [tf])")
    p.add_argument("data_dir", help="one subfolder per class, holding that class's camera images")
    p.add_argument("--out", required=True, help="directory for member_N.keras and their .json sidecars")
    p.add_argument("--backbone", default="densenet-mini", choices=["densenet121", "densenet-mini"],
                   help="the tiled model's backbone: densenet121 (the paper's) or densenet-mini (small, for CPU "
                        "demos and tests) (default: %(default)s)")
    p.add_argument("--folds", type=int, default=1,
                   help="1: one member on all images; K > 1: a K-fold ensemble, one member per fold, validated on "
                        "its held-out fold (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the folds, shuffling and augmentation "
                                                        "(default: %(default)s)")
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
    p.add_argument("--input-scaling", metavar="NAME",
                   help=f"{SCALING_HELP}. Every member's scaling: required with --weights (weights cannot tell); "
                        "for model files trained on pre-scaled pixels it is prepended in the graph (the manifest "
                        "says so); with --scaling, the members not named there. caffe only with --scaling (one "
                        "graph for all members, and --weights, cannot reorder channels)")
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
                   help=f"one member's scaling, NAME as for --input-scaling ({SCALING_HELP}); recorded in "
                        "members[i].preprocessing. Repeat per member")
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
