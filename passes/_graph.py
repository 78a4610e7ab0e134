"""Small helpers over onnx-ir shared by the passes, and the one exception every check raises."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


class NotFused(Exception):
    """A block is left alone; `reason` is the one line the report shows."""

    def __init__(self, reason: str, node: ir.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def describe(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def sole_consumer(value: ir.Value, what: str) -> ir.Node:
    """The one node reading `value`; anything else reading it means the block cannot disappear."""
    if value.is_graph_output():
        raise NotFused(f"the {what} are also a graph output ('{value.name}')")
    consumers = list(dict.fromkeys(value.consumers()))
    if len(consumers) != 1:
        others = ", ".join(describe(n) for n in consumers[1:4])
        raise NotFused(f"the {what} have another consumer ({others})", consumers[0] if consumers else None)
    return consumers[0]


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value as a Python float if it is a constant holding exactly one number.

    The size is read from the shape first: a weight is never loaded to find it is no scalar."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def cast_target(node: ir.Node) -> ir.DataType:
    return ir.DataType(node.attributes.get_int("to", 0))
