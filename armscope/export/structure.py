"""What a trained Keras classifier is, found from its graph rather than from
layer names: input size, tiling, the feature map the final head pools, the head,
per-patch heads, and so which Grad-CAM form the deploy graph can compute.

The graph says *which* tensors matter (``armscope.export.heads``); where each patch's
feature map lies in the image is then measured, not inferred from Reshape or
slicing arguments: the pooled maps are run on one random image and on copies
whose grid cell j alone is changed. In a tiled model exactly one patch map (or
one block of a reassembled map) changes per cell; that gives the patch order and
proves the patches do not overlap. Per-patch heads are matched to the blocks of
the final head's map by value, which proves the patch-weighted Grad-CAM's map is
the one those heads read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.export.graph import ModelGraph, shape_of, sub_model
from armscope.export.heads import Head, find_head

PATCH_WEIGHTED = "patch-weighted Grad-CAM (closed form, in graph)"
GRADCAM_CLOSED = "Grad-CAM (closed form, in graph)"
GRADCAM_GRADIENT = "Grad-CAM (gradient computed in graph)"
MODEL_CLASSES = ("Functional", "Sequential", "Model")


@dataclass(eq=False)
class ModelStructure:
    source: str
    input_size: int
    final: Head
    outputs: int  # how many outputs the model has
    final_index: int
    grid: int  # 1 for a whole-image model
    order: list[int]  # map index (list/stacked layout) for each image block, row-major; [0] when whole-image
    map_size: tuple[int, int]
    channels: int
    backbone: str
    feature_layer: str
    patch_heads: list[Head] = field(default_factory=list)  # one (B,P,C) head, or P heads
    patch_blocks: list[int] = field(default_factory=list)  # image block of each patch (head order)
    per_patch: str = "none"  # "shared" | "separate" | "none"
    cam_form: str = GRADCAM_CLOSED
    notes: list[str] = field(default_factory=list)

    @property
    def tiled(self) -> bool:
        return self.grid > 1

    @property
    def n_classes(self) -> int:
        return self.final.n_classes

    @property
    def patch_size(self) -> int:
        return self.input_size // self.grid

    @property
    def score(self) -> str:
        if self.final.activation == "sigmoid":
            return "the logit z of the single sigmoid unit: z for class 1 (p), -z for class 0 (1 - p)"
        return "the class logit z_c (before softmax)"

    def explain(self) -> str:
        s, (h, w) = self.input_size, self.map_size
        lines = [f"model       {self.source}",
                 f"input       {s}x{s}x3 (float32 RGB 0..255 in; any scaling is inside the model)"]
        if self.tiled:
            lines.append(f"tiling      in-model: {self.grid}x{self.grid} patches of {self.patch_size}x{self.patch_size} "
                         "(patch positions measured, non-overlapping)")
        else:
            lines.append("tiling      none: a whole-image model")
        lines.append(f"backbone    {self.backbone}")
        lines.append(f"feature map {self.feature_layer}: {h}x{w}x{self.channels}, pooled by {self.final.pool}")
        head = (f"{self.final.activation} over {self.final.units} classes" if self.final.activation == "softmax"
                else "one sigmoid unit (exported as probs [1 - p, p])")
        between = ", ".join(f"{c.kind} {c.name!r}" for c in self.final.between)
        lines.append(f"head        {self.final.classifier.name!r}: {head}"
                     + (f"; not linear after the pool ({between})" if between else "; linear after the pool"))
        if self.outputs > 1:
            lines.append(f"final       output {self.final_index} ({self.final.output_name!r}) of {self.outputs}")
        names = ", ".join(dict.fromkeys(h.classifier.name for h in self.patch_heads))
        lines.append("patch heads " + (f"{self.per_patch} ({names})" if self.patch_heads else "none"))
        lines.append(f"grad-cam    {self.cam_form}; score differentiated: {self.score}")
        lines.extend(f"note        {n}" for n in self.notes)
        return "\n".join(lines)


def find_structure(model, source) -> ModelStructure:
    """Analyse ``model``; raise ArmscopeError naming the layer and the reason when it is not supported."""
    graph = ModelGraph.of(model, source)
    size = input_size_of(graph, source)
    heads, refused = [], []
    for i, out in enumerate(graph.outputs):
        head, why = find_head(graph, out)
        if head is None:
            producer = graph.producer_of(out)
            refused.append(f"output {i} ({producer.name if producer else 'input'!r}): {why}")
        else:
            heads.append((i, head))
    whole = [(i, h) for i, h in heads if not h.per_patch_stack]
    if not whole:
        raise ArmscopeError(f"{source}: no supported classifier output: " + "; ".join(refused or ["no outputs"]))
    most = max(h.cells for _, h in whole)
    finals = [(i, h) for i, h in whole if h.cells == most]
    if len(finals) > 1:
        raise ArmscopeError(f"{source}: outputs {', '.join(repr(h.output_name) for _, h in finals)} all classify "
                            "the whole image from maps of the same size; cannot tell which is final")
    final_index, final = finals[0]
    source_call = graph.producer_of(final.maps[0])
    if source_call is None or source_call.kind == "InputLayer":
        raise ArmscopeError(f"{source}: {final.pool} before {final.classifier.name!r} pools the input image itself; "
                            "expected the feature map of a convolutional backbone")
    others = [h for i, h in heads if h is not final]
    if refused:
        raise ArmscopeError(f"{source}: besides the final output {final.output_name!r}, "
                            + "; ".join(refused) + " (only per-patch classifier outputs may accompany it)")
    grid = _grid_of(graph, final, size, source)
    probe = _Probe(model, final, others, size, grid, source)
    order = probe.patch_order() if grid > 1 else [0]
    h, w, k = probe.map_shape()
    structure = ModelStructure(
        source=str(source), input_size=size, final=final, outputs=len(graph.outputs), final_index=final_index,
        grid=grid, order=order, map_size=(h, w), channels=k, backbone=_backbone_name(graph, final, model),
        feature_layer=_feature_layer(graph, final))
    if others:
        _attach_patch_heads(structure, others, probe)
    _choose_cam(structure)
    return structure


def input_size_of(graph: ModelGraph, source) -> int:
    """S of the one (None, S, S, 3) image input, or an ArmscopeError naming what the model has."""
    if len(graph.inputs) != 1:
        raise ArmscopeError(f"{source}: the model has {len(graph.inputs)} inputs; expected one image input")
    shape = shape_of(graph.inputs[0])
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[1] != shape[2]:
        raise ArmscopeError(f"{source}: input shape {shape}; expected (None, S, S, 3), a square RGB image of "
                            "fixed size S")
    return int(shape[1])


def _grid_of(graph: ModelGraph, final: Head, size: int, source) -> int:
    """How many patches the model tiles the image into (1: whole image), from its backbone calls."""
    if final.layout == "stacked":
        patches = shape_of(final.maps[0])[1]
    elif final.layout == "list":
        patches = len(final.maps)
    else:
        on_parts = [c for c in graph.calls if type(c.layer).__name__ in MODEL_CLASSES
                    and len(shape_of(c.inputs[0])) == 4 and (shape_of(c.inputs[0])[1] or size) < size]
        stacked = [shape_of(c.inputs[0])[1] for c in graph.calls_of_kind("TimeDistributed")
                   if len(shape_of(c.inputs[0])) == 5 and len(shape_of(c.outputs[0])) == 5]
        patches = max([len(on_parts)] + stacked + [1])
    grid = math.isqrt(patches)
    if grid * grid != patches or size % grid:
        raise ArmscopeError(f"{source}: {patches} patch feature maps feed {final.pool} of {final.output_name!r}; "
                            f"they do not form a square grid over the {size}x{size} input")
    return grid


class _Probe:
    """Runs the pooled maps (and the per-patch heads' maps) on a random image and on
    copies with one grid cell changed, to measure where each patch map comes from."""

    def __init__(self, model, final: Head, others: list[Head], size: int, grid: int, source):
        self.final, self.grid, self.source = final, grid, source
        tensors = list(final.maps)
        self.other_slices = []
        for head in others:
            self.other_slices.append(slice(len(tensors), len(tensors) + len(head.maps)))
            tensors.extend(head.maps)
        rng = np.random.default_rng(0)
        base = rng.uniform(0, 255, (1, size, size, 3)).astype(np.float32)
        batch = [base]
        cell = size // grid
        if grid > 1:
            for j in range(grid * grid):
                r, c = divmod(j, grid)
                x = base.copy()
                x[0, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = rng.uniform(0, 255, (cell, cell, 3))
                batch.append(x)
        outs = sub_model(model, tensors, "armscope_probe")(np.concatenate(batch), training=False)
        self.values = [np.asarray(o) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
        self.n_final = len(final.maps)

    def _changed(self, a: np.ndarray, b: np.ndarray) -> bool:
        scale = float(np.max(np.abs(a))) + 1e-12
        return float(np.max(np.abs(a - b))) > 1e-5 * scale

    def patch_order(self) -> list[int]:
        g, layout, vals = self.grid, self.final.layout, self.values[:self.n_final]
        order = []
        for j in range(g * g):
            if layout == "map":
                m = vals[0]
                bh, bw = m.shape[1] // g, m.shape[2] // g
                diff = np.max(np.abs(m[j + 1] - m[0]), axis=-1) > 1e-5 * (np.max(np.abs(m[0])) + 1e-12)
                r, c = divmod(j, g)
                outside = diff.copy()
                outside[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = False
                if outside.any() or not diff.any() or m.shape[1] % g or m.shape[2] % g:
                    raise ArmscopeError(self._not_tiled(j, "the pooled map changes outside that cell's block"))
                order.append(j)
                continue
            maps = [vals[0][:, k] for k in range(vals[0].shape[1])] if layout == "stacked" else vals
            changed = [k for k, m in enumerate(maps) if self._changed(m[0], m[j + 1])]
            if len(changed) != 1:
                raise ArmscopeError(self._not_tiled(j, f"{len(changed)} patch maps change, expected exactly one"))
            order.append(changed[0])
        if sorted(order) != list(range(g * g)):
            raise ArmscopeError(self._not_tiled(0, "two grid cells map to the same patch"))
        return order

    def _not_tiled(self, j: int, why: str) -> str:
        g = self.grid
        return (f"{self.source}: the maps pooled by {self.final.pool} (head {self.final.output_name!r}) are not a "
                f"{g}x{g} tiling of the input: changing grid cell {divmod(j, g)} only, {why}")

    def map_shape(self) -> tuple[int, int, int]:
        m = self.values[0]
        if self.final.layout == "map":
            return m.shape[1], m.shape[2], m.shape[3]
        h, w, k = (m.shape[2], m.shape[3], m.shape[4]) if self.final.layout == "stacked" else m.shape[1:4]
        return h * self.grid, w * self.grid, k

    def image_blocks(self, order: list[int]) -> np.ndarray:
        """The base image's final map cut into the grid's blocks, (G*G, h, w, K) row-major."""

        a = np.asarray(assemble_map([v[:1] for v in self.values[:self.n_final]], self.final.layout, order, self.grid))
        g = self.grid
        bh, bw = a.shape[1] // g, a.shape[2] // g
        return np.stack([a[0, r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] for r in range(g) for c in range(g)])

    def head_maps(self, i: int) -> list[np.ndarray]:
        """Base-image maps read by the i-th other head, one (h, w, K) per patch."""
        vals = self.values[self.other_slices[i]]
        if len(vals) == 1 and vals[0].ndim == 5:
            return [vals[0][0, k] for k in range(vals[0].shape[1])]
        return [v[0] for v in vals]


def _attach_patch_heads(st: ModelStructure, others: list[Head], probe: _Probe) -> None:
    """Accept the non-final heads as per-patch heads when each reads one patch map that
    is a block of the final head's map; otherwise refuse, naming the head."""
    if not st.tiled:
        names = ", ".join(repr(h.output_name) for h in others)
        raise ArmscopeError(f"{st.source}: outputs {names} besides the final {st.final.output_name!r}, but the model "
                            "is not tiled; only per-patch heads may accompany the final output")
    blocks = probe.image_blocks(st.order)
    n = st.grid * st.grid
    found = []
    for i, head in enumerate(others):
        if not head.per_patch_stack and head.layout != "map":
            raise ArmscopeError(f"{st.source}: output {head.output_name!r} pools several maps; not a per-patch head")
        for m in probe.head_maps(i):
            match = [j for j in range(n) if blocks[j].shape == m.shape and
                     np.allclose(blocks[j], m, rtol=1e-5, atol=1e-6 * (np.abs(m).max() + 1e-12))]
            if len(match) != 1:
                raise ArmscopeError(f"{st.source}: output {head.output_name!r} reads a map that is not one block "
                                    f"of the final head's feature map {st.feature_layer!r}; cannot place its patch")
            found.append(match[0])
    if sorted(found) != list(range(n)):
        raise ArmscopeError(f"{st.source}: per-patch heads {', '.join(repr(h.output_name) for h in others)} cover "
                            f"{len(found)} patch maps, not each of the {n} patches once")
    if any(h.n_classes != st.n_classes or h.activation != st.final.activation for h in others):
        raise ArmscopeError(f"{st.source}: per-patch heads differ from the final head {st.final.output_name!r} in "
                            "classes or activation")
    st.patch_heads, st.patch_blocks = others, found
    layers = {id(h.classifier.inner or h.classifier.layer) for h in others}
    kernel = others[0].kernel_and_bias()[0]
    st.per_patch = "separate" if len(layers) > 1 or len(shape_of(kernel)) == 3 else "shared"


def _choose_cam(st: ModelStructure) -> None:
    if st.patch_heads:
        bad = [h for h in st.patch_heads if not h.linear or (len(shape_of(h.kernel_and_bias()[0])) == 3 and
                                                             h.classifier.layer.get_config().get("equation")
                                                             not in ("bpk,pkc->bpc",))]
        if not bad:
            st.cam_form = PATCH_WEIGHTED
            return
        st.notes.append(f"per-patch head {bad[0].classifier.name!r} is not linear after its pool: plain Grad-CAM of "
                        "the final head is used instead of the patch-weighted form")
        st.patch_heads, st.patch_blocks, st.per_patch = [], [], "none"
    st.cam_form = GRADCAM_CLOSED if st.final.linear else GRADCAM_GRADIENT


def _backbone_name(graph: ModelGraph, final: Head, model) -> str:
    from armscope.export import architecture as arch

    name = str(model.name).removeprefix("tiled_")
    if name in arch.BACKBONES:  # armscope's own models record it
        return name
    seen, stack = set(), [final.maps[0]]
    while stack:  # the nearest nested model upstream of the pooled map
        call = graph.producer_of(stack.pop())
        if call is None or id(call) in seen:
            continue
        seen.add(id(call))
        inner = call.inner if call.kind == "TimeDistributed" else call.layer
        if type(inner).__name__ in MODEL_CLASSES:
            return str(inner.name)
        stack.extend(call.inputs)
    return "inline (layers of the model itself)"


def _feature_layer(graph: ModelGraph, final: Head) -> str:
    call = graph.producer_of(final.maps[0])
    return call.name if call is not None else "input"


def assemble_map(maps, layout: str, order: list[int], grid: int):
    """Pooled maps -> one (B, H, W, K) map in image layout. ``order[j]`` is the
    patch map for image block j (row-major); a "map" layout already is one."""
    import tensorflow as tf

    if layout == "map":
        return tf.convert_to_tensor(maps[0])
    if layout == "stacked":
        patches = tf.gather(maps[0], order, axis=1)
    else:
        patches = tf.stack([maps[k] for k in order], axis=1)
    _, _, h, w, k = patches.shape
    x = tf.reshape(patches, (-1, grid, grid, h, w, k))
    x = tf.transpose(x, (0, 1, 3, 2, 4, 5))
    return tf.reshape(x, (-1, grid * h, grid * w, k))
