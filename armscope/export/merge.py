"""Merging member ONNX graphs into one ensemble graph.

Each member is prefixed (``onnx.compose.add_prefix``) so names cannot clash,
all members read the one ``image`` input, and ``Mean`` nodes average their
``probs``, ``patch_probs`` (only tiled models with per-patch heads have it),
``cam`` and ``saliency`` (when exported with it). Done on the ONNX graphs rather than by
tracing all members through tf2onnx again, which would convert every member
twice (minutes for DenseNet-121).
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose, helper

OUTPUTS = ("probs", "patch_probs", "cam", "saliency")  # in this order, those the members have


def merge_members(member_paths: list[Path]) -> onnx.ModelProto:
    members = [onnx.load(str(p)) for p in member_paths]
    first = members[0]
    first_names = sorted(o.name for o in first.graph.output)
    for path, model in zip(member_paths[1:], members[1:]):
        if sorted(o.name for o in model.graph.output) != first_names:
            raise ValueError(f"{path}: outputs {[o.name for o in model.graph.output]} differ from the first "
                             f"member's {first_names}; members of one ensemble must have the same outputs")
    nodes, initializers, value_info = [], [], []
    for i, model in enumerate(members):
        prefixed = compose.add_prefix(model, prefix=f"m{i}_")
        graph = prefixed.graph
        input_name = graph.input[0].name
        for node in graph.node:
            node.input[:] = ["image" if name == input_name else name for name in node.input]
            nodes.append(node)
        initializers.extend(graph.initializer)
        value_info.extend(graph.value_info)
    outputs = {o.name: o for o in first.graph.output}
    names = [n for n in OUTPUTS if n in outputs]  # patch_probs only where the members have per-patch heads
    for name in names:
        nodes.append(helper.make_node("Mean", [f"m{i}_{name}" for i in range(len(members))], [name],
                                      name=f"ensemble_mean_{name}"))
    graph = helper.make_graph(
        nodes,
        "armscope_ensemble",
        inputs=[first.graph.input[0]],
        outputs=[outputs[name] for name in names],
        initializer=initializers,
        value_info=value_info,
    )
    merged = helper.make_model(graph, opset_imports=first.opset_import, producer_name="armscope")
    merged.ir_version = first.ir_version
    onnx.checker.check_model(merged)
    return merged
