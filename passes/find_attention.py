"""Find decomposed attention: MatMul(Q, Kᵀ) → score ops → Softmax → prob ops → MatMul(P, V).

The two products may also be Einsums (`fuse_attn.passes.products`).

Anchored on Softmax. Walking back to the QK MatMul collects the score steps (scale, mask,
casts) as data for `fuse_attn.passes.masks` to interpret; walking forward to the PV MatMul accepts only
what is the identity at inference: casts, the SDPA NaN guard Where(IsNaN(p), 0, p), Identity
and Dropout (whose training-mode ratio becomes dropout_p). Every intermediate must have this
block as its only reader, or removing it would change what the graph computes elsewhere.
"""

from __future__ import annotations

import dataclasses

from fuse_attn.ir.graph import Node, Value
from fuse_attn.passes._graph import (FLOAT_TYPES, NotFused, cast_target, describe, dtype_name, is_op, scalar_constant,
                           sole_consumer)
from fuse_attn.passes.products import Product, product_of

# Ops that may stand between the QK MatMul and the Softmax.
_SCORE_OPS = ("Cast", "Mul", "Div", "Add", "Sub", "Where")


@dataclasses.dataclass(frozen=True)
class ScoreStep:
    """One op between MatMul(Q, Kᵀ) and Softmax, in the order they apply."""

    kind: str  # "cast" | "scale" | "add" | "sub" | "where"
    node: Node
    operand: Value | None = None  # the mask, bias or fill the op brings in
    factor: float = 1.0  # for "scale": the multiplier (a Div's divisor is inverted)
    condition: Value | None = None  # for "where"
    scores_when_true: bool = True  # for "where": which branch carries the scores


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    qk: Product
    softmax: Node
    pv: Product
    score_steps: tuple[ScoreStep, ...]
    dropout_p: float
    dropout_seed: int

    @property
    def query(self) -> Value:
        return self.qk.node.inputs[0]

    @property
    def key_t(self) -> Value:
        return self.qk.node.inputs[1]

    @property
    def value(self) -> Value:
        return self.pv.node.inputs[1]

    @property
    def output(self) -> Value:
        return self.pv.node.outputs[0]


def check_softmax_axis(softmax: Node, opset: int, rank: int | None) -> None:
    default = -1 if opset >= 13 else 1
    axis = softmax.attr("axis", default)
    if axis == -1 or (rank is not None and axis == rank - 1):
        return
    where = f"axis {axis}" + (f" of a rank-{rank} tensor" if rank is not None else "")
    raise NotFused(f"softmax over {where}, not the last (key) axis", softmax)


def _reaches_matmul(value: Value, budget: int = 12) -> bool:
    """Whether `value` is computed from a MatMul through score ops only (cheap, structural)."""
    node = value.producer()
    if budget == 0 or node is None:
        return False
    if product_of(node) is not None:
        return True
    if not is_op(node, *_SCORE_OPS):
        return False
    inputs = node.inputs[1:] if node.op_type == "Where" else node.inputs
    return any(v is not None and _reaches_matmul(v, budget - 1) for v in inputs)


def _blocking_op(value: Value, budget: int = 16) -> Node | None:
    """The first op that is not a score op on a path from a product to `value`, if a product is
    within a few steps (say Tanh, for logit soft-capping): it is why the block does not match."""
    blocker = None
    node = value.producer()
    while budget and node is not None:
        if product_of(node) is not None:
            return blocker
        if blocker is None and not is_op(node, *_SCORE_OPS):
            blocker = node
        node = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None), None)
        budget -= 1
    return None


def _pick_scores(node: Node, candidates: list[int]) -> int:
    for index in candidates:
        value = node.inputs[index]
        if value is not None and _reaches_matmul(value):
            return index
    for index in candidates:
        blocker = None if node.inputs[index] is None else _blocking_op(node.inputs[index])
        if blocker is not None:
            raise NotFused(f"{describe(blocker)} between the QK MatMul and the softmax is not a scale or mask"
                           + (" (logit soft-capping)" if blocker.op_type == "Tanh" else ""), blocker)
    raise NotFused(f"{describe(node)} before the softmax does not carry the QK scores", node)


def _score_step(node: Node) -> tuple[ScoreStep, Value]:
    """Interpret one op before the softmax; returns the step and the scores it reads."""
    op = node.op_type
    if op == "Cast":
        if cast_target(node) not in FLOAT_TYPES:
            raise NotFused(f"scores are cast to {dtype_name(cast_target(node))} before the softmax", node)
        return ScoreStep("cast", node), node.inputs[0]
    if op in ("Mul", "Div"):
        index = 0 if op == "Div" else _pick_scores(node, [0, 1])
        if op == "Div" and not _reaches_matmul(node.inputs[0]):
            raise NotFused("scores are the divisor of a Div", node)
        other = node.inputs[1 - index]
        factor = scalar_constant(other)
        if factor is None:
            raise NotFused(f"the scale '{other.name}' is not a scalar constant", node)
        if op == "Div":
            factor = 1.0 / factor if factor else float("inf")
        return ScoreStep("scale", node, other, factor=factor), node.inputs[index]
    if op in ("Add", "Sub"):
        index = 0 if op == "Sub" else _pick_scores(node, [0, 1])
        if op == "Sub" and not _reaches_matmul(node.inputs[0]):
            raise NotFused("scores are subtracted from something before the softmax", node)
        return ScoreStep(op.lower(), node, node.inputs[1 - index]), node.inputs[index]
    if op == "Where":
        index = _pick_scores(node, [1, 2])
        step = ScoreStep("where", node, node.inputs[3 - index], condition=node.inputs[0],
                         scores_when_true=index == 1)
        return step, node.inputs[index]
    raise NotFused(f"{describe(node)} between the QK MatMul and the softmax is not a scale or mask", node)


def _walk_scores(softmax: Node) -> tuple[Product, tuple[ScoreStep, ...]]:
    steps: list[ScoreStep] = []
    value = softmax.inputs[0]
    reader = softmax
    while True:
        if sole_consumer(value, "attention scores") is not reader:
            raise NotFused("attention scores feed something else", reader)
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            raise NotFused("the softmax input is not computed from a QK MatMul", softmax)
        product = product_of(node)
        if product is not None:
            return product, tuple(reversed(steps))
        step, value = _score_step(node)
        steps.append(step)
        reader = node


def _nan_guard_output(value: Value, consumers: list[Node]) -> Value | None:
    """The output of Where(IsNaN(p), 0, p) when `consumers` are exactly that guard, else None."""
    isnan = next((n for n in consumers if is_op(n, "IsNaN")), None)
    where = next((n for n in consumers if is_op(n, "Where")), None)
    if isnan is None or where is None or len(consumers) != 2:
        return None
    cond, zero, passthrough = where.inputs
    if cond is not isnan.outputs[0] or passthrough is not value or scalar_constant(zero) != 0.0:
        return None
    if len(isnan.outputs[0].consumers()) != 1 or isnan.outputs[0].is_graph_output():
        return None
    return where.outputs[0]


def _dropout_ratio(node: Node) -> tuple[float, int]:
    """dropout_p of a Dropout node: 0 unless its training mode is a constant true."""
    if len(node.outputs) > 1 and node.outputs[1] is not None and (
        node.outputs[1].consumers() or node.outputs[1].is_graph_output()
    ):
        raise NotFused("the dropout mask output is used", node)
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is None:
        return 0.0, 0
    mode = scalar_constant(training)
    if mode is None:
        raise NotFused("dropout's training mode is not a constant", node)
    if not mode:
        return 0.0, 0
    ratio_input = node.inputs[1] if len(node.inputs) > 1 else None
    ratio = 0.5 if ratio_input is None else scalar_constant(ratio_input)
    if ratio is None:
        raise NotFused("dropout's ratio is not a constant", node)
    return ratio, node.attr("seed", 0)


def _walk_probs(softmax: Node) -> tuple[Product, float, int]:
    value = softmax.outputs[0]
    dropout_p, seed = 0.0, 0
    while True:
        consumers = value.consumers()
        guarded = None if value.is_graph_output() else _nan_guard_output(value, consumers)
        if guarded is not None:
            value = guarded
            continue
        node = sole_consumer(value, "attention probabilities")
        if is_op(node, "Cast") and cast_target(node) in FLOAT_TYPES or is_op(node, "Identity"):
            value = node.outputs[0]
        elif is_op(node, "Dropout"):
            dropout_p, seed = _dropout_ratio(node)
            value = node.outputs[0]
        elif product_of(node) is not None and node.inputs[0] is value:
            return product_of(node), dropout_p, seed
        else:
            raise NotFused(f"the probabilities feed {describe(node)}, not MatMul(P, V)", node)


def match_attention(softmax: Node, opset: int, rank: int | None) -> AttentionMatch:
    """The attention block around `softmax` (whose input has `rank` dims, if known), or
    NotFused saying why there is none."""
    check_softmax_axis(softmax, opset, rank)
    qk, steps = _walk_scores(softmax)
    pv, dropout_p, seed = _walk_probs(softmax)
    return AttentionMatch(qk, softmax, pv, steps, dropout_p, seed)
