"""Fast ONNX conversion of ensemble members: convert the graph once, bind each
member's weights.

Why: the members of one ensemble share one graph and differ only in their
weights, yet converting each through tf2onnx costs minutes per DenseNet-121
member (most of it tf2onnx's Python graph optimiser over a graph in which
Keras 3's ``TimeDistributed`` has unrolled the backbone 16 times, once per
patch). Here:

1. Each member's deploy function is traced with ``TimeDistributed`` folding the
   patch axis into the batch (``batched_time_distributed``): one backbone in
   the graph instead of 16 copies, the same arithmetic per patch.
2. The first member's traced graph is frozen with its captured variables turned
   into graph *inputs* (``weight_0``, ``weight_1``, ... in capture order) and
   converted by tf2onnx once, without its slow transpose optimiser (a
   "template"). Members whose traced graphs have the same structure share it.
3. For each member its captured variable values are bound to those inputs as
   initializers, ONNX Runtime's basic offline optimisation folds and fuses the
   result (standard ONNX ops only) and per-channel ``x * s + b`` become
   ``BatchNormalization`` again (``armscope.export.onnx_passes``).

The deploy function is a parameter (``build``: model -> (tf.function,
input TensorSpec)), so any deploy graph that closes over Keras variables is
handled; members whose graphs differ (another architecture, other variable
shapes) get their own template.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from armscope.core.errors import ArmscopeError, require_module
from armscope.export.keras_io import quiet_libraries
from armscope.export.onnx_passes import WEIGHT_PREFIX, SharedConversionUnsupported, bind_weights, finish_member

log = logging.getLogger(__name__)

# tf2onnx's passes minus optimize_transpose (minutes of Python on DenseNet-121;
# ONNX Runtime's basic level cancels the transposes in C++ instead).
TEMPLATE_OPTIMIZERS = ("fold_constants", "merge_duplication", "reshape_optimizer", "global_pool_optimizer",
                       "remove_identity", "remove_back_to_back", "einsum_optimizer")


def _stderr_progress(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def batched_time_distributed():
    """While active, Keras 3 ``TimeDistributed`` runs its inner layer once on
    (batch * time, ...) instead of once per time step (Keras 3 unrolls a static
    time axis into a Python loop: 16 copies of the backbone in a traced graph).
    Valid in inference, where a CNN treats batch elements independently;
    masked calls keep Keras's own path. For tracing only: an eager call would
    push batch x time images through the backbone at once."""
    import keras
    from keras import ops

    cls = keras.layers.TimeDistributed
    original = cls.call

    def call(self, inputs, training=None, mask=None):
        steps = inputs.shape[1]
        if mask is not None or steps is None or any(d is None for d in inputs.shape[2:]):
            return original(self, inputs, training=training, mask=mask)
        flat = ops.reshape(inputs, (-1, *inputs.shape[2:]))
        kwargs = {"training": training} if self.layer._call_has_training_arg else {}
        out = self.layer.call(flat, **kwargs)
        return keras.tree.map_structure(lambda o: ops.reshape(o, (-1, steps, *o.shape[1:])), out)

    cls.call = call
    try:
        yield
    finally:
        cls.call = original


@dataclass
class TracedMember:
    """One member's traced deploy function, its structure and captured values."""

    concrete: object
    signature: tuple
    values: list[np.ndarray]


def _default_build(model):
    from armscope.export.deploy_graph import make_deploy_function

    return make_deploy_function([model])


def trace_member(model, build: Callable = _default_build) -> TracedMember:
    """Trace ``build(model)``'s function and read what it captured, in capture order."""
    import tensorflow as tf

    with quiet_libraries():
        function, spec = build(model)  # may run the model eagerly (structure probes): unpatched, bounded memory
        with batched_time_distributed():
            concrete = function.get_concrete_function(spec)
    variables = {id(v.handle): v for v in concrete.variables}
    values = []
    for external, _ in concrete.graph.captures:
        if external.dtype == tf.resource:
            variable = variables.get(id(external))
            if variable is None:
                raise SharedConversionUnsupported("the deploy function captured a resource that is not a "
                                                  "variable; cannot convert it with bound weights")
            values.append(variable.numpy())
        else:
            values.append(external.numpy())
    shapes = tuple((v.dtype.str, v.shape) for v in values)
    return TracedMember(concrete, (_structure(concrete.graph.as_graph_def()), shapes), values)


def _structure(graph_def) -> str:
    """A digest of a traced graph that ignores node names (members' layers may be
    named apart) but not operators, wiring or attributes (constants, strides,
    shapes): equal digests mean one conversion serves both graphs."""
    if graph_def.library.function:  # not produced by Keras models; never shared rather than compared loosely
        return f"unshared-{id(graph_def)}"
    index = {node.name: i for i, node in enumerate(graph_def.node)}

    def ref(name: str) -> str:
        control = name.startswith("^")
        node, _, port = name.lstrip("^").partition(":")
        return f"{'^' if control else ''}{index.get(node, node)}:{port}"

    digest = hashlib.sha256()
    for node in graph_def.node:
        digest.update(f"{node.op}({','.join(ref(i) for i in node.input)})".encode())
        for key in sorted(k for k in node.attr if not k.startswith("_")):
            digest.update(key.encode())
            digest.update(node.attr[key].SerializeToString(deterministic=True))
    return digest.hexdigest()


def _template(traced: TracedMember, opset: int):
    """Freeze ``traced`` with its captures as inputs ``weight_i`` and convert it with tf2onnx."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    require_module("tf2onnx", "tf", "ONNX export")
    import onnx
    from tf2onnx import convert, optimizer, tf_loader

    import armscope.export.tf2onnx_grads  # noqa: F401  (gradient ops of an in-graph Grad-CAM by GradientTape)

    concrete = traced.concrete
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    renames = convert.tensor_names_from_structed(concrete, inputs, outputs)
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    graph_def = tf_loader.fix_freezing_errors_part2(frozen.graph.as_graph_def(add_shapes=True))
    captured = {internal.op.name: i for i, (_, internal) in enumerate(concrete.graph.captures)}
    weights = []
    for node in graph_def.node:
        index = captured.get(node.name)
        if index is None or node.op != "Const":
            continue
        dtype = node.attr["dtype"].type
        node.op = "Placeholder"
        node.attr.clear()
        node.attr["dtype"].type = dtype
        node.attr["shape"].shape.CopyFrom(tf.TensorShape(traced.values[index].shape).as_proto())
        renames[f"{node.name}:0"] = f"{WEIGHT_PREFIX}{index}"
        weights.append(f"{node.name}:0")
    if len(weights) != len(traced.values):
        raise SharedConversionUnsupported(f"froze {len(weights)} of the deploy function's {len(traced.values)} "
                                          "captured values; cannot convert it with bound weights")
    with tf.Graph().as_default() as graph, tf_loader.tf_session(graph=graph):
        tf.import_graph_def(graph_def, name="")
        graph_def = tf_loader.tf_optimize(inputs + weights, outputs, graph_def)
    chosen = {k: v for k, v in optimizer._get_optimizers().items() if k in TEMPLATE_OPTIMIZERS}
    with tf.device("/cpu:0"), quiet_libraries():
        model, _ = convert._convert_common(graph_def, name=concrete.name, continue_on_error=True, opset=opset,
                                           input_names=inputs + weights, output_names=outputs,
                                           tensors_to_rename=renames, optimizers=chosen)
    unknown = sorted({n.op_type for n in model.graph.node if not n.domain and not onnx.defs.has(n.op_type)})
    if unknown:
        raise ArmscopeError(f"tf2onnx could not convert TensorFlow ops {', '.join(unknown)} of the deploy graph")
    return model


@dataclass
class ConversionReport:
    """What ``convert_members`` did: seconds per stage and which members shared a template."""

    seconds: dict[str, float] = field(default_factory=dict)
    groups: list[list[int]] = field(default_factory=list)


def convert_members(models, targets, opset: int = 17, build: Callable = _default_build,
                    progress: Callable[[str], None] = _stderr_progress) -> ConversionReport:
    """Write each of ``models`` as ONNX to the matching path of ``targets``,
    converting each distinct traced graph once. ``build(model)`` returns the
    deploy ``tf.function`` and its input ``tf.TensorSpec``."""
    if len(models) != len(targets):
        raise ValueError(f"{len(models)} models but {len(targets)} targets")
    report = ConversionReport()
    n = len(models)

    def stage(name: str, started: float) -> None:
        report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - started

    traced = []
    for i, model in enumerate(models):
        progress(f"member {i + 1}/{n}: tracing")
        started = time.perf_counter()
        traced.append(trace_member(model, build))
        stage("trace", started)
    for i, member in enumerate(traced):
        group = next((g for g in report.groups if traced[g[0]].signature == member.signature), None)
        if group is None:
            report.groups.append([i])
        else:
            group.append(i)
    for g, group in enumerate(report.groups):
        first = group[0]
        progress(f"member {first + 1}/{n}: converting the graph with tf2onnx"
                 + (f" (shared by members {', '.join(str(i + 1) for i in group)})" if len(group) > 1 else ""))
        started = time.perf_counter()
        template = _template(traced[first], opset)
        stage("tf2onnx", started)
        for i in group:
            progress(f"member {i + 1}/{n}: binding weights, folding, fusing -> {Path(targets[i]).name}")
            started = time.perf_counter()
            finish_member(bind_weights(template, traced[i].values), Path(targets[i]))
            stage("bind+fold", started)
    return report
