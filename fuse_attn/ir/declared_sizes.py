"""Sizes in a model that onnx's own whole-model shape inference would materialize.

With `data_prop=True` onnx computes the values of shape-like tensors, and a Range whose bounds
are constants among them: a Range to 10¹⁰ makes it allocate 10¹⁰ values (std::bad_alloc, or
the machine's memory). Such a model is inferred without data propagation instead.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

# More values than any shape-like tensor (positions up to a seq of a million) holds.
MAX_PROPAGATED_VALUES = 1 << 20


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(body)


def _scalars(graph: onnx.GraphProto) -> dict[str, float]:
    """Constant one-element tensors by name: initializers and Constant nodes."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if value is not None:
                tensors[node.output[0]] = value
    out = {}
    for name, tensor in tensors.items():
        if math.prod(tensor.dims) == 1 and tensor.data_location != onnx.TensorProto.EXTERNAL:
            try:
                out[name] = float(np.asarray(numpy_helper.to_array(tensor)).reshape(-1)[0])
            except (ValueError, TypeError, IndexError):
                continue
    return out


def oversized_range(model: onnx.ModelProto) -> str | None:
    """A Range with constant bounds that makes more than MAX_PROPAGATED_VALUES values, described;
    None when there is none."""
    for graph in _graphs(model.graph):
        scalars = None
        for node in graph.node:
            if node.op_type != "Range" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
                continue
            scalars = _scalars(graph) if scalars is None else scalars
            try:
                start, limit, delta = (scalars[name] for name in node.input[:3])
            except KeyError:
                continue
            if delta == 0 or not all(map(math.isfinite, (start, limit, delta))):
                continue
            count = math.ceil((limit - start) / delta)
            if count > MAX_PROPAGATED_VALUES:
                return f"Range node '{node.name}' makes {count} values"
    return None
