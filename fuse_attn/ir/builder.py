"""New nodes for one graph: names no scope uses, and the few ops whose form changed across opsets.

The rewrites (`passes.rewrite`, `passes.onnx_attention`, `passes.cleanup`) build their nodes here
and insert them together; each helper returns the name of the value it writes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fuse_attn.ir.graph import Graph, Node


class NodeBuilder:
    """Collects nodes for `graph`; every value and node gets a fresh name from `prefix` and a hint."""

    def __init__(self, graph: Graph, prefix: str):
        self.graph, self.prefix = graph, prefix
        self.protos: list[onnx.NodeProto] = []

    def fresh(self, hint: str) -> str:
        return self.graph.unique_name(f"{self.prefix}_{hint}" if hint else self.prefix)

    def op(self, op_type: str, inputs: list[str], hint: str, *, domain: str = "", name: str | None = None,
           output: str | None = None, **attrs) -> str:
        """One node of `op_type` reading `inputs`; returns its (first) output's name."""
        out = output or self.fresh(hint)
        node_name = name or (out if output is None else self.fresh(f"{hint}_node"))
        kwargs = {"domain": domain} if domain else {}
        self.protos.append(helper.make_node(op_type, inputs, [out], name=node_name, **kwargs, **attrs))
        return out

    def constant(self, array, hint: str) -> str:
        out = self.fresh(hint)
        array = np.asarray(array)
        self.protos.append(helper.make_node("Constant", [], [out], name=out, value=numpy_helper.from_array(array, out)))
        return out

    def ints(self, values, hint: str) -> str:
        """A 1-D int64 constant (axes, shapes, Slice bounds)."""
        return self.constant(np.array(list(values), dtype=np.int64), hint)

    # --- ops whose form depends on the opset ------------------------------------------------
    def unsqueeze(self, x: str, axes: list[int], hint: str) -> str:
        if self.graph.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes, f"{hint}_axes")], hint)
        return self.op("Unsqueeze", [x], hint, axes=list(axes))

    def squeeze(self, x: str, axes: list[int], hint: str) -> str:
        if self.graph.opset >= 13:
            return self.op("Squeeze", [x, self.ints(axes, f"{hint}_axes")], hint)
        return self.op("Squeeze", [x], hint, axes=list(axes))

    def shape(self, x: str, start: int, end: int, hint: str) -> str:
        """Shape(x)[start:end] (Shape's start/end came at opset 15)."""
        if self.graph.opset >= 15:
            return self.op("Shape", [x], hint, start=start, end=end)
        return self.slice(self.op("Shape", [x], f"{hint}_all"), [start], [end], [0], hint)

    def slice(self, x: str, starts: list[int], ends: list[int], axes: list[int], hint: str) -> str:
        return self.op("Slice", [x, self.ints(starts, f"{hint}_starts"), self.ints(ends, f"{hint}_ends"),
                                 self.ints(axes, f"{hint}_axes")], hint)

    # --- plain ops ---------------------------------------------------------------------------
    def transpose(self, x: str, perm, hint: str) -> str:
        return self.op("Transpose", [x], hint, perm=list(perm))

    def concat(self, xs: list[str], axis: int, hint: str) -> str:
        return self.op("Concat", list(xs), hint, axis=axis)

    def gather(self, x: str, indices, axis: int, hint: str) -> str:
        return self.op("Gather", [x, self.ints(indices, f"{hint}_indices")], hint, axis=axis)

    def reshape(self, x: str, shape, hint: str) -> str:
        return self.op("Reshape", [x, self.ints(shape, f"{hint}_shape")], hint)

    def identity(self, x: str, hint: str) -> str:
        return self.op("Identity", [x], hint)

    def insert_before(self, anchor: Node) -> list[Node]:
        """Add the collected nodes just before `anchor`; the builder starts empty again."""
        protos, self.protos = self.protos, []
        return self.graph.insert_before(anchor, protos)
