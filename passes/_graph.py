"""Small helpers over the graph view shared by the passes, and the one exception every check raises."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from fuse_attn.ir.evaluator import Evaluator, Unprovable, dims_text
from fuse_attn.ir.graph import DEFAULT_DOMAINS, Node, Value

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


class NotFused(Exception):
    """A block is left alone; `reason` is the one line the report shows."""

    def __init__(self, reason: str, node: Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def in_model_dims(evaluator: Evaluator, sizes_under) -> tuple[str, ...]:
    """Sizes a check found, `sizes_under(evaluator)`, as its reason should quote them: found again
    with every free dim moved, so that a size the graph fixes shows its number and one that follows
    the free dims their name (`Evaluator.model_dims`), never the pass's own sample lengths."""
    sizes = tuple(sizes_under(evaluator))
    moved = None
    if evaluator.binding:
        try:
            moved = tuple(sizes_under(evaluator.varied()))
        except (Unprovable, NotFused, ValueError, TypeError):
            pass
    return evaluator.model_dims(sizes, moved)


def shape_words(evaluator: Evaluator, value: Value) -> str:
    """The shape of `value` as a reason should quote it (see `in_model_dims`)."""
    return dims_text(in_model_dims(evaluator, lambda ev: ev.shape_of(value)))


def is_op(node: Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in DEFAULT_DOMAINS and node.op_type in op_types


def describe(node: Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def dtype_name(dtype: int | None) -> str:
    return "unknown" if dtype is None else TensorProto.DataType.Name(dtype).lower()


def reads_type_only(node: Node, value: Value) -> bool:
    """Whether `node` takes only the type or shape of `value` (Shape, Size, CastLike's second input):
    such a reader does not need the block's values (older dynamo's scale is CastLike(c, scores))."""
    if is_op(node, "Shape", "Size"):
        return True
    return is_op(node, "CastLike") and node.inputs[0] is not value and value in node.inputs[1:]


def sole_consumer(value: Value, what: str) -> Node:
    """The one node reading `value`'s contents; anything else reading them means the block cannot disappear."""
    if value.is_graph_output():
        raise NotFused(f"the {what} are also a graph output ('{value.name}')")
    consumers = [n for n in value.consumers() if not reads_type_only(n, value)] or value.consumers()
    if len(consumers) != 1:
        others = ", ".join(describe(n) for n in consumers[1:4])
        raise NotFused(f"the {what} have another consumer ({others})", consumers[0] if consumers else None)
    return consumers[0]


def scalar_constant(value: Value | None) -> float | None:
    """The value as a Python float if it is a constant holding exactly one number.

    The size is read from the dims first: a weight is never loaded to find it is no scalar."""
    if value is None or value.constant_size() != 1:
        return None
    array = value.constant()
    return None if array is None else float(np.asarray(array).reshape(()))


def cast_target(node: Node) -> int:
    return node.attr("to", 0)


def memoized(memo: dict, key, prove):
    """`prove()` once per key in `memo`; a NotFused is remembered and raised again like a result,
    so a structure repeated in every layer is proven, or refused, once."""
    if key not in memo:
        try:
            memo[key] = prove()
        except NotFused as exc:
            memo[key] = exc
    result = memo[key]
    if isinstance(result, NotFused):
        raise NotFused(result.reason, result.node)
    return result
