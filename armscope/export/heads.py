"""Classifier heads found by walking a model's graph back from an output:
the activation (softmax, or one sigmoid unit), the classifier layer, the layers
between it and the global pool, and the feature map(s) the pool reads.

The walk goes by layer *kind* and tensor rank, never by layer name, so a lab's
own names (and Keras's defaults) are fine. ``armscope.export.structure`` decides from the
heads found which output is final and which are per-patch heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from armscope.export.graph import Call, ModelGraph, shape_of

# identity at inference: skipped between the pool and the classifier
PASS_THROUGH = {"Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianDropout", "GaussianNoise",
                "AlphaDropout", "Identity", "ActivityRegularization"}
PROBABILITY = ("softmax", "sigmoid")
CLASSIFIERS = ("Dense", "EinsumDense")


@dataclass(eq=False)
class Head:
    """One probability output and how it is computed from pooled feature maps."""

    output: object  # the probability tensor
    output_name: str  # the layer that produces it
    activation: str  # "softmax" | "sigmoid"
    classifier: Call  # Dense, EinsumDense or TimeDistributed(Dense)
    logits: object | None  # pre-activation tensor when a separate Activation/Softmax layer applies it
    pool: str  # "GlobalAveragePooling2D", "GlobalAveragePooling3D", "mean of per-patch GAP", ...
    maps: list  # the tensors the pool reads: one (B,H,W,K) map, one (B,P,h,w,K) stack, or P (B,h,w,K) maps
    layout: str  # "map" | "stacked" | "list"
    pooled: object = None  # the pool's output vector (B, K)
    between: list[Call] = field(default_factory=list)  # non-identity layers between the pool and the classifier
    units: int = 0

    @property
    def linear(self) -> bool:
        """Linear after an average pool: Grad-CAM has a closed form."""
        return not self.between and self.pool != "GlobalMaxPooling2D"

    @property
    def n_classes(self) -> int:
        return 2 if self.activation == "sigmoid" else self.units

    @property
    def per_patch_stack(self) -> bool:
        """A (B, P, C) output: one head per patch, all in one tensor."""
        return len(shape_of(self.output)) == 3

    @property
    def cells(self) -> int:
        """Feature-map cells the pool averages over (all patches together)."""
        total = 0
        for m in self.maps:
            s = shape_of(m)
            total += (s[1] * s[2] * s[3]) if len(s) == 5 else (s[1] * s[2])
        return total

    def kernel_and_bias(self):
        """The classifier's (K, C) or (P, K, C) kernel and its bias (or None), as variables."""
        layer = self.classifier.inner or self.classifier.layer
        return layer.kernel, getattr(layer, "bias", None)


def activation_name(layer) -> str | None:
    """The activation of a Dense/Activation layer as a name ("softmax", "linear", ...)."""
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    name = getattr(act, "__name__", None) or str(act)
    return name.rsplit(".", 1)[-1]


def find_head(graph: ModelGraph, output) -> tuple[Head | None, str]:
    """The head that produces ``output``, or (None, why it is not one)."""
    call = graph.producer_of(output)
    if call is None:
        return None, "it is a model input"
    logits = None
    if call.kind == "Softmax" or (call.kind == "Activation" and activation_name(call.layer) in PROBABILITY):
        activation = "softmax" if call.kind == "Softmax" else activation_name(call.layer)
        logits = call.inputs[0]
        classifier = _skip_identity_back(graph, logits)
        if classifier is None or _dense_of(classifier) is None:
            found = classifier.kind if classifier else "the input"
            return None, f"its {activation} follows {found}, not a Dense classifier"
        if activation_name(_dense_of(classifier)) not in (None, "linear"):
            return None, f"{classifier.name} has its own activation before {call.name}'s {activation}"
    else:
        dense = _dense_of(call)
        if dense is None:
            return None, f"it comes from {call.kind} {call.name!r}, not from a softmax or sigmoid classifier"
        activation = activation_name(dense)
        if activation not in PROBABILITY:
            return None, (f"{call.name!r} has activation {activation!r}; expected softmax or sigmoid "
                          "(an output of logits has no probabilities to deploy)")
        classifier = call
    units = int(shape_of(output)[-1])
    if activation == "sigmoid" and units != 1:
        return None, (f"{classifier.name!r} has {units} sigmoid units (a multi-label model); supported: "
                      "softmax, or a single sigmoid unit for a binary task")
    head = Head(output, (graph.producer_of(output) or call).name, activation, classifier, logits,
                pool="", maps=[], layout="", units=units)
    reason = _find_pool(graph, head)
    return (head, "") if not reason else (None, reason)


def _dense_of(call: Call):
    if call.kind in CLASSIFIERS:
        return call.layer
    if call.kind == "TimeDistributed" and type(call.inner).__name__ == "Dense":
        return call.inner
    return None


def _skip_identity_back(graph: ModelGraph, tensor) -> Call | None:
    call = graph.producer_of(tensor)
    while call is not None and (call.kind in PASS_THROUGH or
                                (call.kind == "Activation" and activation_name(call.layer) == "linear")):
        call = graph.producer_of(call.inputs[0])
    return call


def _find_pool(graph: ModelGraph, head: Head) -> str:
    """Walk back from the classifier's input to the global pool; fill head.pool/maps/layout."""
    tensor = head.classifier.inputs[0]
    while True:
        call = graph.producer_of(tensor)
        if call is None:
            return f"no global pooling between the image and {head.classifier.name!r}"
        rank_in = len(shape_of(call.inputs[0])) if call.inputs else 0
        if call.kind in PASS_THROUGH or (call.kind == "Activation" and activation_name(call.layer) == "linear"):
            tensor = call.inputs[0]
            continue
        if call.kind == "Flatten" and rank_in == 2:
            tensor = call.inputs[0]
            continue
        head.pooled = call.outputs[0]
        if call.kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D") and rank_in == 4:
            head.pool, head.maps, head.layout = call.kind, [call.inputs[0]], "map"
            return ""
        if call.kind == "GlobalAveragePooling3D" and rank_in == 5:
            head.pool, head.maps, head.layout = call.kind, [call.inputs[0]], "stacked"
            return ""
        if call.kind == "TimeDistributed" and type(call.inner).__name__ == "GlobalAveragePooling2D":
            head.pool, head.maps, head.layout = "GlobalAveragePooling2D per patch", [call.inputs[0]], "stacked"
            return ""
        if call.kind == "GlobalAveragePooling1D":
            inner = graph.producer_of(call.inputs[0])
            if inner is not None and inner.kind == "TimeDistributed" and \
                    type(inner.inner).__name__ == "GlobalAveragePooling2D":
                head.pool, head.maps, head.layout = "mean of per-patch GAP", [inner.inputs[0]], "stacked"
                return ""
        if call.kind == "Average" and len(call.inputs) > 1:
            maps = []
            for t in call.inputs:
                gap = _skip_identity_back(graph, t)
                if gap is None or gap.kind != "GlobalAveragePooling2D":
                    return (f"{call.name!r} averages {gap.kind if gap else 'an input'}, not the global average "
                            "pools of patch feature maps")
                maps.append(gap.inputs[0])
            if len({shape_of(m) for m in maps}) != 1:
                return f"{call.name!r} averages pools of feature maps of different sizes"
            head.pool, head.maps, head.layout = "mean of per-patch GAP", maps, "list"
            return ""
        if rank_in == 2 and len(call.inputs) == 1:  # a vector layer between the pool and the classifier
            head.between.insert(0, call)
            tensor = call.inputs[0]
            continue
        return (f"no global pooling before {head.classifier.name!r}: the walk back stopped at {call.kind} "
                f"{call.name!r} (supported: GlobalAveragePooling2D/3D, GlobalMaxPooling2D, an Average of "
                "per-patch GlobalAveragePooling2D; Dense, Dropout and activations between pool and classifier)")
