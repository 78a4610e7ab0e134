"""Find decomposed attention: MatMul(Q, Kᵀ) → score ops → Softmax → prob ops → MatMul(P, V).

The two products may also be Einsums (`fuse_attn.passes.products`).

Anchored on Softmax. Walking back to the QK MatMul collects the score steps (scale, mask,
casts) as data for `fuse_attn.passes.masks` to interpret; walking forward to the PV MatMul accepts only
what is the identity at inference: casts, the SDPA NaN guard Where(IsNaN(p), 0, p), Identity
and Dropout (whose training-mode ratio becomes dropout_p), and a renormalisation by a mask
(p·m / rowsum(p·m), a "renorm" step `masks` reads as a mask). Data movement next to the products
(tf2onnx's Reshape/Squeeze around a 3-D product) is collected for the plan to prove it moves
nothing. Every intermediate must have this block as its only reader (type-only readers such as
Shape or CastLike's second input aside), or removing it would change what the graph computes elsewhere.
"""

from __future__ import annotations

import dataclasses

from fuse_attn.ir.graph import Node, Value
from fuse_attn.passes._graph import (FLOAT_TYPES, NotFused, cast_target, describe, dtype_name, is_op, scalar_constant,
                           sole_consumer)
from fuse_attn.passes.products import Product, product_of

# Ops that may stand between the QK MatMul and the Softmax.
_SCORE_OPS = ("Cast", "Mul", "Div", "Add", "Sub", "Where")
# Data movement that may stand next to a product (tf2onnx: MatMul -> Reshape -> Squeeze); the plan
# proves it moves nothing (`layout.check_moves_nothing`).
MOVE_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Identity")


@dataclasses.dataclass(frozen=True)
class ScoreStep:
    """One op between MatMul(Q, Kᵀ) and Softmax, in the order they apply."""

    kind: str  # "cast" | "scale" | "add" | "sub" | "where" | "renorm" (softmax, Mul by operand, divide by the row sum)
    node: Node
    operand: Value | None = None  # the mask, bias or fill the op brings in
    factor: float | None = 1.0  # for "scale": the multiplier (a Div's divisor is inverted); None: evaluate operand
    divides: bool = False  # for "scale": the operand is a divisor
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
    score_moves: tuple[Node, ...] = ()  # data movement from the QK product to the first score step
    prob_moves: tuple[Node, ...] = ()  # data movement from the probabilities to the PV product
    # Conditions of Where(cond, 0, p) on the probabilities: the identity only if all false.
    prob_guards: tuple[Value, ...] = ()

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
    if opset < 13:  # Softmax-1/11 coerces its input to 2D: one row is every axis from `axis` on
        raise NotFused(f"softmax over {where} at opset {opset}, which normalises axes {axis}.. together "
                       "(Softmax coerces to 2D before opset 13): only the last axis is a row softmax", softmax)
    raise NotFused(f"softmax over {where}, not the last (key) axis", softmax)


def _reaches_matmul(value: Value, budget: int = 12) -> bool:
    """Whether `value` is computed from a MatMul through score ops only (cheap, structural)."""
    node = value.producer()
    if budget == 0 or node is None:
        return False
    if product_of(node) is not None:
        return True
    if is_op(node, *MOVE_OPS):
        return node.inputs[0] is not None and _reaches_matmul(node.inputs[0], budget - 1)
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
        if blocker is None and not is_op(node, *_SCORE_OPS, *MOVE_OPS):
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
        factor = scalar_constant(other)  # else a value `masks` evaluates: a scale or a multiplicative mask
        if factor is not None and op == "Div":
            factor = 1.0 / factor if factor else float("inf")
        return ScoreStep("scale", node, other, factor=factor, divides=op == "Div"), node.inputs[index]
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


def _walk_scores(softmax: Node) -> tuple[Product, tuple[ScoreStep, ...], tuple[Node, ...]]:
    steps: list[ScoreStep] = []
    moves: list[Node] = []
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
            return product, tuple(reversed(steps)), tuple(reversed(moves))
        if is_op(node, *MOVE_OPS):
            moves.append(node)
            value, reader = node.inputs[0], node
            continue
        if moves:  # masks are read in the softmax's layout: movement only next to the product
            raise NotFused(f"{describe(moves[-1])} moves the scores between two score steps", moves[-1])
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


def _row_guard(value: Value, consumers: list[Node]) -> tuple[Value, Value] | None:
    """(output, condition) of Where(cond, 0, p) when `consumers` are exactly that guard, and
    maybe the CastLike(zero, p) that gives the zero p's type (it reads only the type): the
    expanded ONNX Attention sets fully masked rows to 0 so. It is the identity when `cond` is
    all false, which the plan proves."""
    where = next((n for n in consumers if is_op(n, "Where")), None)
    if where is None or len(where.inputs) != 3 or where.inputs[2] is not value or where.inputs[0] is value:
        return None
    fill = where.inputs[1]
    others = [n for n in consumers if n is not where]
    if others:
        (cast_like,) = others if len(others) == 1 else (None,)
        if (not is_op(cast_like, "CastLike") or cast_like.inputs[1] is not value or cast_like.inputs[0] is value
                or fill is not cast_like.outputs[0] or fill.is_graph_output() or len(fill.consumers()) != 1):
            return None
    elif fill is value:
        return None
    return where.outputs[0], where.inputs[0]


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


def _row_sum(node: Node | None, rank: int | None) -> bool:
    """Whether `node` is ReduceSum over the last axis, keeping it."""
    if not is_op(node, "ReduceSum") or not node.attr("keepdims", 1):
        return False
    if len(node.inputs) > 1 and node.inputs[1] is not None:  # opset 13+: axes as an input
        axis = scalar_constant(node.inputs[1])
        axes = None if axis is None else [int(axis)]
    else:
        axes = node.attr("axes")
    return axes == [-1] or (rank is not None and axes == [rank - 1])


def _only_readers(value: Value, *readers: Node) -> bool:
    return not value.is_graph_output() and set(value.consumers()) == set(readers)


def _renormalized(value: Value, consumers: list[Node], rank: int | None) -> tuple[ScoreStep, Value] | None:
    """p·m / ReduceSum(p·m, last axis) read from the Mul `consumers` hold (flax nnx's masked
    softmax, jax2onnx: softmax, Mul by the mask, divide by the row sum): a "renorm" step on m and
    the quotient, or None. `masks` proves m is a mask (0 where dropped, one number on every kept
    key). jax2onnx guards rows whose sum is 0: Div(p·m, Where(sum > 0, sum, 1)), then
    Where(sum > 0, quotient, 0). A row keeps a key wherever the mask is none or causal (a mask
    dropping a whole row is refused), so its sum is positive and the guard passes it through."""
    mul = consumers[0] if len(consumers) == 1 else None
    if not is_op(mul, "Mul") or value.is_graph_output():
        return None
    weighted = mul.outputs[0]
    readers = weighted.consumers()
    total = next((n for n in readers if _row_sum(n, rank)), None)
    div = next((n for n in readers if is_op(n, "Div")), None)
    if total is None or div is None or div.inputs[0] is not weighted or not _only_readers(weighted, total, div):
        return None
    row_sum, quotient = total.outputs[0], div.outputs[0]
    step = ScoreStep("renorm", mul, mul.inputs[1] if mul.inputs[0] is value else mul.inputs[0])
    if div.inputs[1] is row_sum:
        return (step, quotient) if _only_readers(row_sum, div) else None
    test = next((n for n in row_sum.consumers() if is_op(n, "Greater") and n.inputs[0] is row_sum
                 and scalar_constant(n.inputs[1]) == 0.0), None)
    denominator = div.inputs[1].producer()
    if test is None or not is_op(denominator, "Where") or denominator.inputs[:2] != [test.outputs[0], row_sum] \
            or scalar_constant(denominator.inputs[2]) in (None, 0.0) or not _only_readers(row_sum, test, denominator) \
            or not _only_readers(denominator.outputs[0], div):
        return None
    after = quotient.consumers()
    zeroed = after[0] if len(after) == 1 and not quotient.is_graph_output() else None
    if is_op(zeroed, "Where") and zeroed.inputs[:2] == [test.outputs[0], quotient] \
            and scalar_constant(zeroed.inputs[2]) is not None:
        quotient = zeroed.outputs[0]
        return (step, quotient) if _only_readers(test.outputs[0], denominator, zeroed) else None
    return (step, quotient) if _only_readers(test.outputs[0], denominator) else None


@dataclasses.dataclass(frozen=True)
class _ProbsWalk:
    """What stands between Softmax and MatMul(P, V), as `_walk_probs` found it."""

    pv: Product
    dropout_p: float
    dropout_seed: int
    renorm: tuple[ScoreStep, ...]  # a division by the row sum after the softmax
    moves: tuple[Node, ...]
    guards: tuple[Value, ...]


def _walk_probs(softmax: Node, rank: int | None) -> _ProbsWalk:
    value = softmax.outputs[0]
    dropout_p, seed = 0.0, 0
    renorm: list[ScoreStep] = []
    moves: list[Node] = []
    guards: list[Value] = []
    while True:
        consumers = value.consumers()
        guarded = None if value.is_graph_output() else _nan_guard_output(value, consumers)
        if guarded is not None:
            value = guarded
            continue
        row_guard = None if value.is_graph_output() else _row_guard(value, consumers)
        if row_guard is not None:
            value = row_guard[0]
            guards.append(row_guard[1])
            continue
        # (after a training-mode dropout a renormalisation would undo its scaling: not the kernel's)
        renormalized = None if renorm or moves or dropout_p else _renormalized(value, consumers, rank)
        if renormalized is not None:
            renorm.append(renormalized[0])
            value = renormalized[1]
            continue
        node = sole_consumer(value, "attention probabilities")
        if is_op(node, "Cast") and cast_target(node) in FLOAT_TYPES or is_op(node, "Identity"):
            value = node.outputs[0]
        elif is_op(node, "Dropout"):
            dropout_p, seed = _dropout_ratio(node)
            value = node.outputs[0]
        elif product_of(node) is not None and node.inputs[0] is value:
            return _ProbsWalk(product_of(node), dropout_p, seed, tuple(renorm), tuple(moves), tuple(guards))
        elif is_op(node, *MOVE_OPS) and node.inputs[0] is value:
            moves.append(node)
            value = node.outputs[0]
        elif is_op(node, "Mul"):
            raise NotFused(f"the probabilities are multiplied by {describe(node)} and not renormalised by their row "
                           "sum (a mask after the softmax that the kernel does not apply)", node)
        else:
            raise NotFused(f"the probabilities feed {describe(node)}, not MatMul(P, V)", node)


def match_attention(softmax: Node, opset: int, rank: int | None) -> AttentionMatch:
    """The attention block around `softmax` (whose input has `rank` dims, if known), or
    NotFused saying why there is none."""
    check_softmax_axis(softmax, opset, rank)
    qk, steps, score_moves = _walk_scores(softmax)
    probs = _walk_probs(softmax, rank)
    # The renormalisation divides by the row sum after the softmax: a mask applied last.
    return AttentionMatch(qk, softmax, probs.pv, steps + probs.renorm, probs.dropout_p, probs.dropout_seed,
                          score_moves, probs.moves, probs.guards)
