"""The weights-only path: a Keras 2 ``.h5`` whose graph cannot be rebuilt (a
``Lambda`` written by Python 3.6, a custom layer, Keras 2.2.4's serialisation),
or a SavedModel that holds no Keras layers (Keras 3 ``model.export()``,
``tf.saved_model.save``), still holds every trained tensor
(``armscope.export.weight_files`` reads them). This maps those tensors onto an architecture
armscope builds itself (``armscope.export.architecture``), so the lab's training survives
even when its code does not.

Why by name *and* shape, and why it refuses rather than guesses: a weight put
in the wrong place does not fail, it gives a confident wrong diagnosis. So
every tensor of the target must be matched exactly once, every match is
printed, and a partial or ambiguous match is an error that names what is
missing. No code from the file runs: only HDF5 datasets or SavedModel variables
are read.

Matching, in order:
1. **By layer name**: a file weight ``conv1/conv/kernel:0`` (Keras 2 writes
   nested names with ``/``) is the target weight ``conv1_conv/kernel`` when
   the layer parts agree with ``/`` read as ``_`` and the shapes agree. A
   leading component naming the nested model (``densenet121/conv1/conv/...``)
   is ignored.
   **By order**, when names do not decide (Keras 3 names a variable after its
   layer only, so names repeat across nested models; InceptionV3's layers are
   auto-numbered): the backbone's layers, in order, must occur exactly once in
   the file as consecutive layers with the same variables and shapes; twice
   is ambiguous and refused.
2. **Heads by shape**, for what names cannot say (labs name their heads
   freely): the final head is the one Dense kernel (K, C) + bias (C,) left;
   per-patch heads are one (16, K, C) kernel or 16 Dense (K, C) kernels that
   share a name with a number in it, stacked in that number's order.

The input scaling cannot be read from weights, so the caller states it
(``--input-scaling``); nothing in the file can check it, which the report says.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.export import architecture as arch
from armscope.export.scalings import parse_scaling
from armscope.export.weight_files import FileTensor, input_size_of, is_saved_model, read_h5_tensors, read_tensors  # noqa: F401

# name -> backbone of armscope.export.architecture; TILED: the muscle-biopsy tiling (640 in, 16 patches),
# the others whole-image (GAP + one Dense: softmax, or one sigmoid unit), at the file's input size
ARCHITECTURES = {
    "tiled-densenet121": "densenet121",
    "tiled-densenet-mini": "densenet-mini",
    "densenet121": "densenet121",
    "inceptionv3": "inceptionv3",
    "densenet-mini": "densenet-mini",
}
TILED = ("tiled-densenet121", "tiled-densenet-mini")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class WeightMap:
    """What was matched: (target weight path, file tensor name, how) in target order."""

    matched: list[tuple[str, str, str]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    has_patch_heads: bool = True


def build_target(architecture: str, n_classes: int, input_scaling: str, size: int | None = None):
    """The armscope model the weights go into, with the lab's input scaling
    (``size``: the input of a whole-image architecture)."""
    import keras

    if architecture not in ARCHITECTURES:
        raise ArmscopeError(f"--architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    # how the lab scaled RGB 0..255 before the network, as the target's Rescaling layer (multiply-add only)
    scale, offset = parse_scaling(input_scaling, "--input-scaling").affine("--input-scaling")
    if architecture in TILED:
        if n_classes < 2:
            raise ArmscopeError(f"--architecture {architecture}: its final head is a softmax over C >= 2 classes; "
                                f"the file's head has {n_classes} unit(s)")
        model = arch.build_tiled_model(arch.ArchitectureSpec(ARCHITECTURES[architecture], n_classes))
    else:
        model = arch.build_whole_image_model(ARCHITECTURES[architecture], n_classes, size)

    def clone(layer):
        if layer.name == "scale":
            return keras.layers.Rescaling(scale=scale, offset=offset, name="scale")
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def _classes_in(tensors: list[FileTensor], channels: int) -> int:
    """C from the final head: the Dense kernels (K, C) whose bias (C,) follows them."""
    sizes = {t.value.shape[1] for t in tensors if t.var == "kernel" and t.value.ndim == 2
             and t.value.shape[0] == channels}
    if len(sizes) != 1:
        raise ArmscopeError(f"cannot tell the number of classes: Dense kernels ({channels}, C) in the file have "
                            f"C in {sorted(sizes) or 'none'}; expected one value")
    return sizes.pop()


def map_weights(model, tensors: list[FileTensor], source: Path) -> WeightMap:
    """Assign ``tensors`` to ``model``'s weights (see the module docstring) or raise
    naming every target weight left without a match and every ambiguity."""
    result = WeightMap()
    targets = list(model.weights)
    assigned: dict[str, np.ndarray] = {}
    heads = [w for w in targets if _layer_of(w) in (arch.FINAL_HEAD, arch.PATCH_HEADS)]
    backbone = [w for w in targets if _layer_of(w) not in (arch.FINAL_HEAD, arch.PATCH_HEADS)]
    pairs, problems = _backbone_by_name(backbone, tensors)
    if problems:
        by_name = len(pairs)
        pairs, order_problem = _backbone_by_order(backbone, tensors)
        if pairs is None:
            if not by_name:   # names say nothing: listing every weight as missing would hide the reason
                problems = [(f"by name: no backbone weight's layer name is in the file "
                             f"({len(backbone)} tensors, e.g. {backbone[0].path})")]
            problems.append(order_problem)
        else:
            problems = []
    if not problems:
        for w, t, how in pairs:
            t.used = True
            assigned[w.path] = t.value
            result.matched.append((w.path, t.name, how))
        problems += _map_heads(heads, tensors, assigned, result)
    result.unused = [t.name for t in tensors if not t.used]
    if result.unused and not problems:
        problems.append(f"{len(result.unused)} tensors of the file were not used (the architecture differs): "
                        + ", ".join(result.unused[:12]) + (" ..." if len(result.unused) > 12 else ""))
    if problems:
        raise ArmscopeError(f"{source}: its weights do not map onto the architecture "
                            f"({len(problems)} problem(s)); nothing was written:\n  " + "\n  ".join(problems[:40]))
    for w in targets:
        if w.path in assigned:
            w.assign(assigned[w.path].astype(np.float32))
    return result


def _layer_of(weight) -> str:
    return weight.path.rpartition("/")[0].rpartition("/")[2]


def _backbone_by_name(targets, tensors):
    """(target, tensor, how) for every backbone weight matched by layer name and shape, and the problems."""
    by_key: dict[tuple[str, str], list[FileTensor]] = {}
    for t in tensors:
        by_key.setdefault((t.layer_key, t.var), []).append(t)
    pairs, problems = [], []
    for w in targets:
        layer, var = _layer_of(w), w.path.rpartition("/")[2]
        found = [t for t in by_key.get((layer, var), []) if t.value.shape == tuple(w.shape)]
        if len(found) == 1:
            pairs.append((w, found[0], "name+shape"))
        elif not found:
            shapes = [t.value.shape for t in by_key.get((layer, var), [])]
            problems.append(f"{w.path} {tuple(w.shape)}: no tensor in the file" +
                            (f" (same name, shapes {shapes})" if shapes else ""))
        else:
            problems.append(f"{w.path}: ambiguous, {len(found)} tensors match: {', '.join(t.name for t in found)}")
    return pairs, problems


def _runs(items, key, var):
    """Consecutive items of one layer as [(key, {var: item})], a repeated variable starting a new layer."""
    runs: list[tuple[str, dict]] = []
    for item in items:
        k, v = key(item), var(item)
        if not runs or runs[-1][0] != k or v in runs[-1][1]:
            runs.append((k, {}))
        runs[-1][1][v] = item
    return runs


def _backbone_by_order(targets, tensors):
    """When names do not decide (layers auto-named ``conv2d_57``, names repeated across
    nested models): the backbone's layers, in the model's order, must appear exactly
    once as consecutive layers of the file with the same variables and shapes.
    Returns (pairs, None) or (None, the reason)."""
    want = _runs(targets, _layer_of, lambda w: w.path.rpartition("/")[2])
    have = _runs(tensors, lambda t: t.layer_key, lambda t: t.var)
    shape_w = [{v: tuple(w.shape) for v, w in layer.items()} for _, layer in want]
    shape_h = [{v: t.value.shape for v, t in layer.items()} for _, layer in have]
    starts = [i for i in range(len(have) - len(want) + 1)
              if all(shape_h[i + j] == shape_w[j] for j in range(len(want)))]
    if len(starts) != 1:
        return None, (f"by order: the backbone's {len(want)} layers ({sum(map(len, shape_w))} tensors) "
                      + ("appear nowhere in the file as consecutive layers with the same variables and shapes"
                         if not starts else f"appear {len(starts)} times in the file: ambiguous"))
    pairs = []
    for (_, layer), (_, found) in zip(want, have[starts[0]:]):
        pairs += [(w, found[v], "order+shape") for v, w in layer.items()]
    return pairs, None


def _map_heads(heads, tensors, assigned, result) -> list[str]:
    free = [t for t in tensors if not t.used]
    final_k = next(w for w in heads if w.path.endswith(f"{arch.FINAL_HEAD}/kernel"))
    channels, n_classes = tuple(final_k.shape)
    kernels = [t for t in free if t.var == "kernel" and t.value.shape == (channels, n_classes)]
    stacked = [t for t in free if t.var == "kernel" and t.value.shape == (arch.N_PATCHES, channels, n_classes)]
    bias_of = {t.layer_key: t for t in free if t.var == "bias"}
    problems: list[str] = []

    def take(target_path: str, t: FileTensor, value: np.ndarray, how: str):
        t.used = True
        assigned[target_path] = value
        result.matched.append((target_path, t.name, how))

    # per-patch heads: 16 numbered (K, C) Dense layers sharing a stem, or one (16, K, C) kernel
    groups: dict[str, list[FileTensor]] = {}
    for t in kernels:
        stem = _NUMBER.sub("#", t.layer_key)
        groups.setdefault(stem, []).append(t)
    patch = [g for g in groups.values() if len(g) == arch.N_PATCHES and "#" in _NUMBER.sub("#", g[0].layer_key)]
    if len(patch) + len(stacked) > 1:
        return [f"per-patch heads: ambiguous, several candidates ({len(patch)} groups of 16 Dense layers, "
                f"{len(stacked)} (16, {channels}, {n_classes}) kernels)"]
    pk = f"{arch.PATCH_HEADS}/kernel"
    pb = f"{arch.PATCH_HEADS}/bias"
    tiled = any(w.path == pk for w in heads)
    if not tiled:   # a whole-image architecture: per-patch heads in the file are left over, and refused
        result.has_patch_heads = False
    elif patch:
        group = sorted(patch[0], key=lambda t: int(_NUMBER.search(t.layer_key).group(1)))
        biases = [bias_of.get(t.layer_key) for t in group]
        if any(b is None or b.value.shape != (n_classes,) for b in biases):
            return [f"per-patch heads {group[0].layer_key}..{group[-1].layer_key}: a bias ({n_classes},) is missing"]
        for t, b in zip(group, biases):
            t.used = b.used = True
        assigned[pk] = np.stack([t.value for t in group])
        assigned[pb] = np.stack([b.value for b in biases])
        result.matched.append((pk, f"{group[0].name} .. {group[-1].name}", "16 Dense kernels stacked by their number"))
        result.matched.append((pb, f"{biases[0].name} .. {biases[-1].name}", "16 biases stacked by their number"))
        kernels = [t for t in kernels if not t.used]
    elif stacked:
        bias = bias_of.get(stacked[0].layer_key)
        if bias is None or bias.value.shape not in ((arch.N_PATCHES, n_classes),):
            return [f"per-patch heads {stacked[0].name}: no ({arch.N_PATCHES}, {n_classes}) bias beside it"]
        take(pk, stacked[0], stacked[0].value, "shape (16, K, C)")
        take(pb, bias, bias.value, "shape (16, C)")
    else:
        result.has_patch_heads = False
    # the final head: the one (K, C) Dense kernel left, with its (C,) bias
    if len(kernels) != 1:
        return [f"{arch.FINAL_HEAD}: expected exactly one Dense kernel {(channels, n_classes)} for the final head "
                f"besides the per-patch heads, found {len(kernels)}: " + ", ".join(t.name for t in kernels)]
    bias = bias_of.get(kernels[0].layer_key)
    if bias is None or bias.used or bias.value.shape != (n_classes,):
        return [f"{arch.FINAL_HEAD}: Dense kernel {kernels[0].name} has no ({n_classes},) bias"]
    take(f"{arch.FINAL_HEAD}/kernel", kernels[0], kernels[0].value, "the one Dense (K, C) left")
    take(f"{arch.FINAL_HEAD}/bias", bias, bias.value, "its bias")
    if tiled and not result.has_patch_heads:
        for path in (pk, pb):   # zero heads: the model is cut to its final output below
            assigned[path] = np.zeros(tuple(next(w for w in heads if w.path == path).shape), np.float32)
    return problems


def load_weights_member(weights: Path, architecture: str, input_scaling: str, report=print):
    """A Keras 3 model of ``architecture`` carrying the weights of ``weights`` (a
    Keras 2 ``.h5`` or a SavedModel directory). Without per-patch heads in the
    file a tiled model has the final output only (Grad-CAM then uses the final head)."""
    import keras

    weights = Path(weights)
    if architecture not in ARCHITECTURES:
        raise ArmscopeError(f"--architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    input_scaling = parse_scaling(input_scaling, "--input-scaling").recorded_name  # before reading the file
    tensors = read_tensors(weights)
    size = input_size_of(weights)
    if architecture in TILED:
        if size not in (None, arch.IMAGE_SIZE):
            raise ArmscopeError(f"--weights {weights}: the model takes {size}x{size} images, but {architecture} "
                                f"takes {arch.IMAGE_SIZE}x{arch.IMAGE_SIZE} (4x4 patches of {arch.PATCH_SIZE}); "
                                f"a whole-image model needs a whole-image --architecture "
                                f"({', '.join(a for a in ARCHITECTURES if a not in TILED)})")
        backbone = arch.make_backbone(ARCHITECTURES[architecture])
        size = None
    else:
        if size is None:
            raise ArmscopeError(f"--weights {weights}: the file does not say its input size (no fixed square "
                                f"input in its {'serving signature' if weights.is_dir() else 'model configuration'}), "
                                f"which the whole-image architecture {architecture} needs")
        backbone = arch.make_whole_backbone(ARCHITECTURES[architecture], size)
    n_classes = _classes_in(tensors, int(backbone.output.shape[-1]))
    model = build_target(architecture, n_classes, input_scaling, size)
    result = map_weights(model, tensors, weights)
    report(f"{weights}: {len(result.matched)} weights of {architecture} matched "
           f"({sum(int(np.prod(w.shape)) for w in model.weights):,} values)"
           + (f", input {size}x{size} from the file" if size else "")
           + f"; input scaling {input_scaling!r} as given (weights cannot confirm it)")
    for target, source, how in result.matched:
        report(f"  {target:<48} <- {source}  [{how}]")
    if architecture in TILED and not result.has_patch_heads:
        report("  no per-patch heads in the file: the model keeps its final output only")
        model = keras.Model(model.input, {"probs": model.output["probs"]}, name=model.name)
    return model


def save_weights_members(paths: list[Path], architecture: str, input_scaling: str, directory: Path,
                         report=print) -> list[Path]:
    """Each weights file as a ``.keras`` member in ``directory`` (for ``export_bundle``),
    with a sidecar that records where its weights came from. All are mapped before
    any is written, so one bad file stops the export before any work."""
    import json

    input_scaling = parse_scaling(input_scaling, "--input-scaling").recorded_name  # the sidecar's name for it
    models = [load_weights_member(p, architecture, input_scaling, report) for p in paths]
    out = []
    for i, (path, model) in enumerate(zip(paths, models)):
        target = Path(directory) / f"{Path(path).stem}.keras"
        if target in out:
            target = target.with_name(f"{Path(path).stem}_{i}.keras")
        model.save(target)
        target.with_suffix(".json").write_text(json.dumps({
            "fold": i, "weights_source": str(path), "architecture": architecture, "input_scaling": input_scaling,
        }, indent=2) + "\n")
        out.append(target)
    return out
