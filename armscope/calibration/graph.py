"""Finding the quantization-sensitive nodes of an armscope graph by structure
(not by tf2onnx's generated names, which change between exports):

* ``first_conv``: every Conv with no Conv upstream of it. The tiled graph runs
  the backbone once per patch, so there are 16 of them per member. They see
  the raw 0..255 image after in-graph scaling, and INT8 on the stem is the
  classic accuracy loss of quantized CNNs.
* ``heads``: MatMul/Gemm/Einsum downstream of the last Conv and of a pooling
  node after it (GAP, ReduceMean ...) that multiply by a weight initializer:
  ``final_head`` and the 16 ``patch_heads``; a whole-image classifier's Dense.
  (A whole-image model's closed-form Grad-CAM multiplies the unpooled feature
  map by the same head kernel: by structure that is ``cam``, not ``heads``.)
* ``cam``: every other node downstream of the backbone: the patch GAPs, the
  softmax shares, the closed-form Grad-CAM matmul/einsum and its ReLU. Small,
  cheap, and the CAM's dynamic range differs per frame (INT8 ranges fitted on
  the calibration set clip it), so it is kept in FP32 by default.
"""
from __future__ import annotations

from collections import defaultdict

import onnx

GROUPS = ("first_conv", "heads", "cam")
CONV_OPS = {"Conv", "ConvTranspose"}
MATMUL_OPS = {"MatMul", "Gemm", "Einsum"}
POOL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "ReduceMean", "ReduceMax"}


def _graph_maps(graph: onnx.GraphProto):
    producer = {}
    consumers = defaultdict(list)
    for i, node in enumerate(graph.node):
        for out in node.output:
            producer[out] = i
        for name in node.input:
            consumers[name].append(i)
    return producer, consumers


def sensitive_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names per group (see module docstring). Unnamed nodes are named first
    by ``name_nodes`` so they can be excluded."""
    graph = model.graph
    producer, consumers = _graph_maps(graph)
    nodes = list(graph.node)
    initializers = {t.name for t in graph.initializer}

    # has_conv_upstream[i]: some Conv feeds node i (directly or not)
    upstream = [False] * len(nodes)
    order = _topological(nodes, producer)
    for i in order:
        for name in nodes[i].input:
            j = producer.get(name)
            if j is not None and (nodes[j].op_type in CONV_OPS or upstream[j]):
                upstream[i] = True
                break
    downstream = [False] * len(nodes)  # some Conv consumes node i's outputs (directly or not)
    for i in reversed(order):
        for out in nodes[i].output:
            if any(nodes[k].op_type in CONV_OPS or downstream[k] for k in consumers.get(out, [])):
                downstream[i] = True
                break

    after_last_conv = [upstream[i] and not downstream[i] and nodes[i].op_type not in CONV_OPS
                       for i in range(len(nodes))]
    pooled = [False] * len(nodes)  # a pooling node after the last Conv feeds node i (directly or not)
    for i in order:
        if not after_last_conv[i]:
            continue
        for name in nodes[i].input:
            j = producer.get(name)
            if j is not None and after_last_conv[j] and (nodes[j].op_type in POOL_OPS or pooled[j]):
                pooled[i] = True
                break

    groups = {g: [] for g in GROUPS}
    for i, node in enumerate(nodes):
        if node.op_type in CONV_OPS and not upstream[i]:
            groups["first_conv"].append(node.name)
        elif after_last_conv[i]:
            if node.op_type in MATMUL_OPS and pooled[i] and any(n in initializers for n in node.input):
                groups["heads"].append(node.name)
            else:
                groups["cam"].append(node.name)
    return groups


def _topological(nodes, producer) -> list[int]:
    """ONNX requires topological order already; verify cheaply and fall back to a sort."""
    seen = set()
    ok = True
    for i, node in enumerate(nodes):
        for name in node.input:
            j = producer.get(name)
            if j is not None and j not in seen:
                ok = False
                break
        if not ok:
            break
        seen.add(i)
    if ok:
        return list(range(len(nodes)))
    indegree = {i: 0 for i in range(len(nodes))}
    edges = defaultdict(list)
    for i, node in enumerate(nodes):
        for name in node.input:
            j = producer.get(name)
            if j is not None:
                edges[j].append(i)
                indegree[i] += 1
    ready = [i for i, d in indegree.items() if d == 0]
    out = []
    while ready:
        i = ready.pop()
        out.append(i)
        for k in edges[i]:
            indegree[k] -= 1
            if indegree[k] == 0:
                ready.append(k)
    return out


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name (nodes_to_exclude works by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model
