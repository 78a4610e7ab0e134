"""Concat with operands of zero length: the result is the one non-empty operand.

A KV-cache decoder specialized to an empty past (`--dim past_sequence_length=0`) concatenates
a (b, h, 0, d) past with the new keys; its attention then reads exactly the new keys. Readers
of such a Concat are pointed at the non-empty operand (the same values, so exact); a graph
output (the present key/values) keeps the Concat. A zero extent counts only when it is fixed —
the same at every binding of the free dims — never a sample size.
"""

from __future__ import annotations

from fuse_attn.ir.evaluator import Evaluator, Unprovable
from fuse_attn.ir.graph import Node, Value
from fuse_attn.passes._graph import is_op


def _is_empty_along(value: Value, axis: int, evaluators: tuple[Evaluator, ...]) -> bool:
    try:
        return all(_extent(e.shape_of(value), axis) == 0 for e in evaluators)
    except Unprovable:
        return False


def _extent(shape: tuple[int, ...], axis: int) -> int | None:
    return shape[axis] if -len(shape) <= axis < len(shape) else None


def _sole_nonempty(node: Node, evaluators: tuple[Evaluator, ...]) -> Value | None:
    axis = node.attr("axis", 0)
    inputs = [v for v in node.inputs if v is not None]
    kept = [v for v in inputs if not _is_empty_along(v, axis, evaluators)]
    return kept[0] if len(kept) == 1 and len(inputs) > 1 else None


def drop_empty_concat_operands(nodes, evaluator: Evaluator) -> int:
    """Point readers of every Concat whose other operands are empty at its non-empty operand.
    Returns how many Concats were bypassed."""
    evaluators = (evaluator, evaluator.varied())  # a zero extent seen at both bindings is fixed
    bypassed = 0
    for node in nodes:
        if not is_op(node, "Concat") or not node.outputs[0].consumers():
            continue
        kept = _sole_nonempty(node, evaluators)
        if kept is None:
            continue
        try:
            if evaluator.shape_of(kept) != evaluator.shape_of(node.outputs[0]):
                continue  # not a plain concatenation (an empty operand of another rank?)
        except Unprovable:
            continue
        node.graph.redirect_readers(node.outputs[0], kept)
        bypassed += 1
    return bypassed
