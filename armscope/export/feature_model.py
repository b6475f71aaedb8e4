"""A feature extractor whose classifier lives outside Keras (an SVM head): what
it is, found from its graph, and its deploy computation with Grad-CAM.

The model's one output is a feature vector: the global average pools of one or
more feature maps (a ResNet's "skip features": conv3, conv4 and conv5 outputs
pooled and concatenated), possibly behind identity layers. Found by walking
back from the output by layer kind, never by name, as ``armscope.export.heads`` does for
classifiers; anything else is refused naming the layer.

Grad-CAM needs one map: the deepest of them (downstream of all the others), as
for a plain CNN. Its pooled vector is a known slice of the features, and a
global average pool gives every cell of A the same share, so
alpha_c = (d s_c / d v[slice]) / (H W) with the SVM's score gradient
(``armscope.export.svm_head``); cam_c = ReLU(sum_d alpha_c,d A_d). The shallower maps'
pools feed the score too but lie upstream of A, so they do not enter dA.
"""
from __future__ import annotations

from dataclasses import dataclass

from armscope.core.errors import ArmscopeError
from armscope.export.graph import ModelGraph, shape_of, sub_model
from armscope.export.heads import PASS_THROUGH, activation_name
from armscope.export.structure import MODEL_CLASSES, input_size_of

FEATURE_CAM = "Grad-CAM of the SVM head (its gradient computed in graph)"


@dataclass(eq=False)
class FeatureStructure:
    source: str
    input_size: int
    maps: list  # the pooled maps' symbolic tensors, in feature order
    offsets: list[tuple[int, int]]  # each map's slice of the feature vector
    deepest: int
    map_size: tuple[int, int]
    channels: int  # of the deepest map
    n_features: int
    feature_layer: str
    backbone: str
    pooled_layers: list[str]

    @property
    def channel_slice(self) -> slice:
        start, stop = self.offsets[self.deepest]
        return slice(start, stop)

    def explain(self, head=None) -> str:
        s, (h, w) = self.input_size, self.map_size
        pools = ", ".join(f"{n} [{a}:{b}]" for n, (a, b) in zip(self.pooled_layers, self.offsets))
        lines = [f"model       {self.source}",
                 f"input       {s}x{s}x3 (float32 RGB 0..255 in; the member's scaling is inside its graph)",
                 f"backbone    {self.backbone}",
                 f"features    {self.n_features}: global average pools of {len(self.maps)} maps concatenated "
                 f"({pools})",
                 f"feature map {self.feature_layer}: {h}x{w}x{self.channels} (the deepest pooled map)"]
        if head is not None:
            lines.append(f"head        {head.source}: {head.describe()}")
        lines.append(f"grad-cam    {FEATURE_CAM}; score differentiated: " + _score_text())
        return "\n".join(lines)


def _score_text() -> str:
    from armscope.export.svm_head import SCORE

    return SCORE


def _skip_back(graph: ModelGraph, tensor):
    call = graph.producer_of(tensor)
    while call is not None and (call.kind in PASS_THROUGH or
                                (call.kind == "Activation" and activation_name(call.layer) == "linear") or
                                (call.kind == "Flatten" and len(shape_of(call.inputs[0])) == 2)):
        tensor = call.inputs[0]
        call = graph.producer_of(tensor)
    return tensor, call


def _ancestors(graph: ModelGraph, tensor) -> set[int]:
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        call = graph.producer_of(t)
        if call is not None:
            stack.extend(call.inputs)
    return seen


def find_feature_structure(model, source) -> FeatureStructure:
    """Analyse a feature extractor; raise ArmscopeError naming the layer when it is not one."""
    graph = ModelGraph.of(model, source)
    size = input_size_of(graph, source)
    if len(graph.outputs) != 1 or len(shape_of(graph.outputs[0])) != 2:
        raise ArmscopeError(f"{source}: outputs {[shape_of(o) for o in graph.outputs]}; a feature extractor for "
                            "an SVM head has one output, the (None, D) feature vector")
    _, call = _skip_back(graph, graph.outputs[0])
    parts = call.inputs if call is not None and call.kind == "Concatenate" else [graph.outputs[0]]
    if call is not None and call.kind == "Concatenate" and call.layer.get_config().get("axis") not in (-1, 1):
        raise ArmscopeError(f"{source}: {call.name!r} concatenates along axis {call.layer.get_config()['axis']}; "
                            "expected the feature axis")
    maps, widths, names = [], [], []
    for part in parts:
        _, pool = _skip_back(graph, part)
        if pool is None or pool.kind != "GlobalAveragePooling2D" or len(shape_of(pool.inputs[0])) != 4 \
                or len(shape_of(pool.outputs[0])) != 2:
            found = f"{pool.kind} {pool.name!r}" if pool is not None else "the input"
            raise ArmscopeError(
                f"{source}: the feature vector comes from {found}; expected the global average pools of "
                "feature maps (GlobalAveragePooling2D), concatenated (a feature extractor for an SVM head)")
        maps.append(pool.inputs[0])
        widths.append(int(shape_of(pool.outputs[0])[1]))
        names.append(pool.name)
    offsets, start = [], 0
    for width in widths:
        offsets.append((start, start + width))
        start += width
    if start != int(shape_of(graph.outputs[0])[1]):
        raise ArmscopeError(f"{source}: the pools give {start} features but the output has "
                            f"{shape_of(graph.outputs[0])[1]}")
    deepest = _deepest(graph, maps, source)
    h, w, k = (int(d) for d in shape_of(maps[deepest])[1:4])
    producer = graph.producer_of(maps[deepest])
    return FeatureStructure(source=str(source), input_size=size, maps=maps, offsets=offsets,
                            deepest=deepest, map_size=(h, w), channels=k, n_features=start,
                            feature_layer=producer.name if producer else "input",
                            backbone=_backbone(graph, maps[deepest], model), pooled_layers=names)


def _deepest(graph: ModelGraph, maps: list, source) -> int:
    """The map every other pooled map lies upstream of."""
    for i, candidate in enumerate(maps):
        upstream = _ancestors(graph, candidate)
        if all(id(m) in upstream for j, m in enumerate(maps) if j != i):
            return i
    raise ArmscopeError(f"{source}: none of the {len(maps)} pooled feature maps lies downstream of all the others "
                        "(parallel branches); Grad-CAM needs one deepest map")


def _backbone(graph: ModelGraph, tensor, model) -> str:
    for t in [tensor]:
        call = graph.producer_of(t)
        if call is not None and type(call.layer).__name__ in MODEL_CLASSES:
            return str(call.layer.name)
    return f"{model.name} (layers of the model itself)"


class SvmMemberGraph:
    """One feature-extractor + SVM member's deploy computation: image -> {probs, cam}."""

    def __init__(self, model, structure: FeatureStructure, head):
        self.st, self.head = structure, head
        self.parts = sub_model(model, [structure.maps[structure.deepest], model.outputs[0]],
                               f"{model.name}_svm_deploy_parts")

    def __call__(self, image) -> dict:
        import tensorflow as tf

        fmap, features = self.parts(image, training=False)
        x, kernel = self.head.kernel(features)
        dec = self.head.decision_values(kernel)
        h, w = self.st.map_size
        alpha = self.head.score_gradient(x, kernel, self.st.channel_slice) / float(h * w)  # (B, C, K)
        cam = tf.nn.relu(tf.einsum("bijd,bcd->bcij", fmap, alpha))
        return {"probs": self.head.probabilities(dec), "cam": cam}

    def features(self, image):
        """The Keras model's own feature vector (for parity checks against scikit-learn)."""
        return self.parts(image, training=False)[1]
