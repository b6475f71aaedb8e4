"""One view of a functional Keras model's call graph, the same for Keras 3 and
tf-keras models, so ``armscope.export.structure`` can walk either.

Each call of a layer (or a Keras 3 operation such as ``x[:, a:b]``) in the
outer model is a ``Call`` with the symbolic tensors it reads and writes; a layer
called 16 times (a shared backbone) appears as 16 calls. Symbolic tensors are
compared by identity: both Keras versions hand out the same tensor objects to
the producing and the consuming call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from armscope.core.errors import ArmscopeError
from armscope.export.keras_io import is_tf_keras


@dataclass(eq=False)
class Call:
    layer: object
    inputs: list
    outputs: list

    @property
    def kind(self) -> str:
        return type(self.layer).__name__

    @property
    def name(self) -> str:
        return str(self.layer.name)

    @property
    def inner(self):
        """The wrapped layer of a TimeDistributed (or None)."""
        return getattr(self.layer, "layer", None) if self.kind in ("TimeDistributed", "Bidirectional") else None


@dataclass
class ModelGraph:
    model: object
    calls: list[Call]  # inputs first, in dependency order
    producer: dict = field(default_factory=dict)  # id(tensor) -> Call
    consumers: dict = field(default_factory=dict)  # id(tensor) -> [Call]

    @classmethod
    def of(cls, model, source) -> "ModelGraph":
        by_depth = getattr(model, "_nodes_by_depth", None)
        if by_depth is None:
            raise ArmscopeError(f"{source}: a {type(model).__name__} without a functional graph (a subclassed "
                                "model?); only functional and Sequential Keras models can be analysed")
        calls = []
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                calls.append(_call_of(node))
        graph = cls(model, calls)
        for call in calls:
            for t in call.outputs:
                graph.producer[id(t)] = call
            for t in call.inputs:
                graph.consumers.setdefault(id(t), []).append(call)
        return graph

    @property
    def inputs(self) -> list:
        return list(self.model.inputs)

    @property
    def outputs(self) -> list:
        return list(self.model.outputs)

    def producer_of(self, tensor) -> Call | None:
        return self.producer.get(id(tensor))

    def consumers_of(self, tensor) -> list[Call]:
        return self.consumers.get(id(tensor), [])

    def calls_of_kind(self, *kinds: str) -> list[Call]:
        return [c for c in self.calls if c.kind in kinds]


def _call_of(node) -> Call:
    import tensorflow as tf

    if hasattr(node, "operation"):  # Keras 3
        return Call(node.operation, list(node.input_tensors), list(node.output_tensors))
    return Call(node.layer, list(tf.nest.flatten(node.keras_inputs)), list(tf.nest.flatten(node.outputs)))


def shape_of(tensor) -> tuple:
    """Static shape as a tuple of ints/None (Keras 3 gives a tuple, tf-keras a TensorShape)."""
    shape = tensor.shape
    return tuple(shape) if isinstance(shape, tuple) else tuple(shape.as_list())


def sub_model(model, outputs: list, name: str):
    """A model from the member's input to intermediate ``outputs``, built with the
    member's own Keras package (a tf-keras model cannot hold Keras 3 tensors)."""
    if is_tf_keras(model):
        import tf_keras as K
    else:
        import keras as K
    return K.Model(model.inputs[0], list(outputs), name=name)
