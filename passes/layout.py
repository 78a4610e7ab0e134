"""Prove which tensor, with which transpose, is the kernel's q, k or v — by index labels.

Q, Kᵀ and V reach the attention MatMuls through data-movement ops (Reshape, Transpose,
Unsqueeze, Expand, ...) and scalar Muls. Walking back through those to the first op that
computes something (the chain's root), we label every element of the root with its own
index and move the labels through the chain exactly as the ops move data. The labels of the
MatMul operand then say, for each element, which root element it is: from them we read
  - the kernel layout the operand must be brought to (the `target`),
  - which q heads share a kv head (GQA), and whether that is repeat_kv's order,
  - the cheapest tensor along the chain that is the target up to one Transpose
    (reusing the graph's own Kᵀ; folding q's transpose into the existing one).
Equal labels mean equal values for any root contents, so the choice is exact, not guessed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from fuse_attn.ir.evaluator import Evaluator, Unprovable, dims_text
from fuse_attn.ir.graph import Node, Value
from fuse_attn.passes._graph import NotFused, describe, in_model_dims, is_op, scalar_constant, shape_words
from fuse_attn.passes.scales import positive_scale

_MOVEMENT_OPS = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Tile", "Flatten", "Identity")
_MAX_CHAIN = 24


@dataclasses.dataclass(frozen=True)
class Chain:
    """values[0] is the root; nodes[i] moves values[i] into values[i + 1]; the last value is the operand.
    factors[i] is the scalar nodes[i] multiplies by (1.0 for data movement)."""

    values: tuple[Value, ...]
    nodes: tuple[Node, ...]
    factors: tuple[float, ...] = ()

    def factor_after(self, index: int) -> float:
        """The product of the scalar multipliers between values[index] and the operand."""
        return math.prod(self.factors[index:])


@dataclasses.dataclass(frozen=True)
class Pick:
    """Where along a chain the kernel input is taken: values[index], transposed, maybe unsqueezed."""

    index: int
    perm: tuple[int, ...]
    unsqueeze: bool


@dataclasses.dataclass(frozen=True)
class Source:
    """The kernel input is Transpose(value, perm), then Unsqueeze(axis 1) if `unsqueeze`."""

    value: Value
    perm: tuple[int, ...]
    unsqueeze: bool
    factor: float  # scalar multipliers the graph applied after `value` (part of softmax_scale)

    @property
    def nodes_needed(self) -> int:
        return int(self.perm != tuple(range(len(self.perm)))) + int(self.unsqueeze)


def _scale_step(node: Node, evaluator: Evaluator | None) -> tuple[int, float] | None:
    """(index of the data input, factor) of a Mul or Div by one positive number, else None.

    The number is a constant or, given an evaluator, computed from constants and shapes (torch's
    SDPA decomposition multiplies Q and Kᵀ by Sqrt(1 / Sqrt(Cast(Shape(q)[-1]))))."""
    if not is_op(node, "Mul", "Div") or len(node.inputs) != 2 or None in node.inputs:
        return None
    candidates = [(0, 1)] if node.op_type == "Div" else [(0, 1), (1, 0)]
    for data, other in candidates:  # constants first: cheap, and what most exporters write
        factor = scalar_constant(node.inputs[other])
        if factor is not None and scalar_constant(node.inputs[data]) is None:
            break
    else:
        if evaluator is None:
            return None
        try:  # the scale is the operand smaller than the result (the data has the result's shape)
            out = evaluator.shape_of(node.outputs[0])
            smaller = [(d, o) for d, o in candidates if evaluator.shape_of(node.inputs[d]) == out
                       and math.prod(evaluator.shape_of(node.inputs[o])) < math.prod(out)]
        except Unprovable:
            return None
        if not smaller:
            return None
        data, other = smaller[0]
        factor = positive_scale(node.inputs[other], evaluator)
        if factor is None:
            return None
    if not (np.isfinite(factor) and factor > 0):
        return None
    return data, (1.0 / factor if node.op_type == "Div" else factor)


def walk_chain(operand: Value, allow_scale: bool, evaluator: Evaluator | None = None) -> Chain:
    values, nodes, factors = [operand], [], []
    while len(nodes) < _MAX_CHAIN:
        node = values[0].producer()
        if node is None:
            break
        factor = 1.0
        if is_op(node, *_MOVEMENT_OPS):
            data = node.inputs[0]
        elif allow_scale and (step := _scale_step(node, evaluator)) is not None:
            data, factor = node.inputs[step[0]], step[1]
        else:
            break
        values.insert(0, data)
        nodes.insert(0, node)
        factors.insert(0, factor)
    return Chain(tuple(values), tuple(nodes), tuple(factors))


# --- moving labels ---------------------------------------------------------------------------

def _ints(evaluator: Evaluator, node: Node, index: int, attr: str) -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        return [int(x) for x in np.asarray(evaluator.value_of(node.inputs[index])).reshape(-1)]
    return node.attr(attr)


def _move(node: Node, labels: np.ndarray, evaluator: Evaluator, params: list[int] | None = None) -> np.ndarray:
    """`labels` moved as `node` moves data; `params` overrides its shape operand (a shrunk seq)."""
    op = node.op_type
    if params is not None:
        evaluator = _Fixed(params)
    if op in ("Identity", "Mul", "Div"):
        return labels
    if op == "Transpose":
        perm = node.attr("perm")
        return labels.transpose(perm if perm is not None else tuple(reversed(range(labels.ndim))))
    if op == "Reshape":
        shape = _ints(evaluator, node, 1, "shape")
        if not node.attr("allowzero", 0):
            shape = [labels.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return labels.reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = _ints(evaluator, node, 1, "axes")
        if op == "Squeeze":
            return np.squeeze(labels, axis=None if axes is None else tuple(axes))
        rank = labels.ndim + len(axes)
        return np.expand_dims(labels, tuple(sorted(a % rank for a in axes)))
    if op == "Expand":
        shape = _ints(evaluator, node, 1, "shape")
        return np.broadcast_to(labels, np.broadcast_shapes(labels.shape, tuple(shape)))
    if op == "Tile":
        return np.tile(labels, _ints(evaluator, node, 1, "repeats"))
    if op == "Flatten":
        axis = node.attr("axis", 1) % max(labels.ndim, 1)
        return labels.reshape(math.prod(labels.shape[:axis]), -1)
    raise AssertionError(op)


class _Fixed:
    """Stands in for the evaluator where a node's shape operand is given."""

    def __init__(self, params: list[int]):
        self.params = params

    def value_of(self, value):
        return np.asarray(self.params, dtype=np.int64)


# The seq axis is moved at this length: index labels keep the same structure at any length.
SHRUNK_SEQ = 3


def _seq_positions(chain: Chain, shapes: list[tuple[int, ...]], axis: int) -> list[int] | None:
    """Where the operand's axis `axis` sits in every value along the chain, walking back, if it
    is carried whole (never split, merged or broadcast) from the root; else None."""
    positions = [axis % len(shapes[-1])]
    for node, before, after in zip(reversed(chain.nodes), reversed(shapes[:-1]), reversed(shapes[1:])):
        p = positions[0]
        op = node.op_type
        if op in ("Identity", "Mul", "Div") and before == after:
            q = p
        elif op == "Transpose":
            perm = node.attr("perm") or list(reversed(range(len(before))))
            q = perm[p]
        elif op in ("Reshape", "Unsqueeze", "Squeeze", "Flatten"):
            # A reshape keeps an axis whole when the elements before it and the axis itself match.
            ahead = math.prod(after[:p])
            found = [k for k in range(len(before)) if before[k] == after[p] and math.prod(before[:k]) == ahead]
            if len(found) != 1:
                return None
            q = found[0]
        elif op == "Expand":
            q = p - (len(after) - len(before))
            if q < 0:
                return None
        else:
            return None
        if before[q] != after[p]:
            return None
        positions.insert(0, q)
    return positions


def chain_signature(chain: Chain, evaluator: Evaluator) -> tuple:
    """Everything the chain's labels depend on: root shape, ops, attributes, shape operands."""
    try:
        parts: list[object] = [evaluator.shape_of(chain.values[0])]
        for node in chain.nodes:
            attrs = tuple(sorted(a.SerializeToString() for a in node.proto.attribute))
            params = ()
            if node.op_type not in ("Mul", "Div"):
                params = tuple(tuple(np.asarray(evaluator.value_of(v)).reshape(-1).tolist())
                               for v in node.inputs[1:] if v is not None)
            parts.append((node.op_type, attrs, params))
    except Unprovable as exc:
        raise NotFused(f"cannot prove the attention layout: {exc}") from None
    return tuple(parts)


def chain_labels(chain: Chain, evaluator: Evaluator, seq_axis: int | None = None) -> list[np.ndarray]:
    """Index labels of every value along the chain (root labelled 0..n-1 in order).

    With `seq_axis` (the operand's seq axis), when that axis is carried whole from the root,
    the labels are moved with it at length SHRUNK_SEQ: which labels are equal, and where each
    goes, is the same at any length, and the cost no longer grows with seq."""
    try:
        shapes = [tuple(evaluator.shape_of(v)) for v in chain.values]
        params: list[list[int] | None] = [None] * len(chain.nodes)
        positions = _seq_positions(chain, shapes, seq_axis) if seq_axis is not None else None
        shrunk = positions is not None and shapes[-1][positions[-1]] > SHRUNK_SEQ
        if shrunk:
            shapes = [s[:p] + (SHRUNK_SEQ,) + s[p + 1:] for s, p in zip(shapes, positions)]
            for i, node in enumerate(chain.nodes):
                if node.op_type in ("Reshape", "Expand"):
                    wanted = [int(x) for x in np.asarray(evaluator.value_of(node.inputs[1])).reshape(-1)]
                    at = positions[i + 1] - (len(shapes[i + 1]) - len(wanted))  # Expand's shape may be shorter
                    if 0 <= at < len(wanted) and wanted[at] > 1:
                        wanted[at] = SHRUNK_SEQ
                    params[i] = wanted
        root_shape = shapes[0]
        size = math.prod(root_shape)
        labels = [np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(root_shape)]
        for node, shape, param in zip(chain.nodes, shapes[1:], params):
            labels.append(_move(node, labels[-1], evaluator, param))
            if labels[-1].shape != shape:  # a scalar Mul that broadcasts, say
                if shrunk:
                    return chain_labels(chain, evaluator)  # not shrinkable after all: at full length
                moved = in_model_dims(evaluator, lambda ev: _moved_shape(chain, len(labels) - 1, ev))
                raise NotFused(f"{describe(node)} changes the shape to {shape_words(evaluator, chain.values[len(labels) - 1])}, "
                               f"not {dims_text(moved)} as moving the data would")
    except Unprovable as exc:
        raise NotFused(f"cannot prove the attention layout: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise NotFused(f"cannot prove the attention layout: {describe(node)} fails at sample shapes ({exc})") from None
    return labels


def _moved_shape(chain: Chain, count: int, evaluator: Evaluator) -> tuple[int, ...]:
    """The shape moving the root's data through the chain's first `count` nodes gives (for a reason)."""
    data = np.zeros(evaluator.shape_of(chain.values[0]), dtype=np.int32)
    for node in chain.nodes[:count]:
        data = _move(node, data, evaluator, None)
    return data.shape


# --- GQA -------------------------------------------------------------------------------------

def kv_heads_of(target: np.ndarray, what: str) -> tuple[np.ndarray, list[int]]:
    """Split heads (axis 1) of a kernel-layout target into the distinct kv heads.

    Returns the target reduced to one head per kv head (in order of first use) and, for each
    q head, its kv head. Every kv head must serve the same number of q heads.
    """
    heads = target.shape[1]
    first_of: dict[bytes, int] = {}
    kv_of: list[int] = []
    representatives: list[int] = []
    for i in range(heads):
        key = np.ascontiguousarray(target[:, i]).tobytes()
        if key not in first_of:
            first_of[key] = len(representatives)
            representatives.append(i)
        kv_of.append(first_of[key])
    kv = len(representatives)
    if heads % kv or any(kv_of.count(j) != heads // kv for j in range(kv)):
        raise NotFused(f"the {what} heads are shared unevenly ({heads} q heads over {kv} kv heads)")
    return target[:, representatives], kv_of


def grid_order(kv_of: list[int]) -> tuple[int, ...] | None:
    """The q-head order the kernel's grid needs (kv head j serves q heads j*G .. j*G+G-1), as a
    permutation of the graph's q heads; None when the graph already uses it (repeat_kv's order)."""
    group = len(kv_of) // (max(kv_of) + 1)
    if kv_of == [i // group for i in range(len(kv_of))]:
        return None
    return tuple(sorted(range(len(kv_of)), key=lambda i: (kv_of[i], i)))


# --- choosing the source ---------------------------------------------------------------------

def choose_source(labels: list[np.ndarray], target: np.ndarray) -> Pick:
    """The tensor along the chain that becomes `target` with the fewest new nodes.

    Ties go to the tensor nearest the root, so that transposes the graph already has can be
    folded into the new one and disappear.
    """
    best: tuple[int, int, Pick] | None = None
    for index, label in enumerate(labels):
        if label.ndim not in (target.ndim, target.ndim - 1) or label.ndim > 6:
            continue
        unsqueeze = label.ndim == target.ndim - 1
        if unsqueeze and target.shape[1] != 1:
            continue
        wanted = target.shape[:1] + target.shape[2:] if unsqueeze else target.shape
        flat_target = target.reshape(wanted)
        for perm in itertools.permutations(range(label.ndim)):
            if tuple(label.shape[p] for p in perm) != wanted:
                continue
            if not np.array_equal(label.transpose(perm), flat_target):
                continue
            nodes_needed = int(perm != tuple(range(label.ndim))) + int(unsqueeze)
            if best is None or (nodes_needed, index) < best[:2]:
                best = (nodes_needed, index, Pick(index, perm, unsqueeze))
    if best is None:
        raise NotFused("no tensor feeding the attention is the kernel layout up to a transpose")
    return best[2]


# --- data movement around the softmax -----------------------------------------------------------

def _keeps_order(node: Node, evaluator: Evaluator) -> bool:
    """Whether `node` keeps every element at its row-major position: a reshape, or a Transpose
    that only moves size-1 axes."""
    if node.op_type != "Transpose":
        return True
    shape = evaluator.shape_of(node.inputs[0])
    perm = node.attr("perm") or list(reversed(range(len(shape))))
    kept = [axis for axis in perm if shape[axis] != 1]
    return kept == sorted(kept)


def check_moves_nothing(product: Node, score_moves: tuple[Node, ...], softmax: Node,
                        prob_moves: tuple[Node, ...], evaluator: Evaluator) -> None:
    """The data movement from the QK product to the softmax and from the softmax to the PV
    product, together, moves nothing: tf2onnx's einsum lowering goes (b·h, q, k) -> Reshape
    (b, h, q, k, 1) -> Squeeze -> softmax -> Unsqueeze -> Reshape (b·h, q, k). Every element
    keeps its row-major position and the softmax sees (.., q, k) as the product wrote them, so
    it is the block without the movement; only the shapes are needed, not the data."""
    try:
        written = evaluator.shape_of(product.outputs[0])
        for node in (*score_moves, *prob_moves):
            if not _keeps_order(node, evaluator):
                raise NotFused(f"{describe(node)} reorders the attention scores or probabilities (a layout "
                               "the kernel does not compute)", node)
        if score_moves:
            scores = evaluator.shape_of(score_moves[-1].outputs[0])
            if scores[-2:] != written[-2:]:
                raise NotFused(f"{describe(score_moves[-1])} reshapes the scores' query and key axes", score_moves[-1])
            if evaluator.shape_of(softmax.inputs[0]) != scores:
                raise NotFused(f"the softmax input has shape {shape_words(evaluator, softmax.inputs[0])}, the "
                               f"scores {shape_words(evaluator, score_moves[-1].outputs[0])} (the mask or scale "
                               "broadcasts the scores)", softmax)
        if prob_moves and evaluator.shape_of(prob_moves[-1].outputs[0]) != written:
            raise NotFused(f"{describe(prob_moves[-1])} gives the PV product the probabilities in another layout "
                           "than the QK product wrote the scores", prob_moves[-1])
        if not prob_moves and evaluator.shape_of(softmax.inputs[0]) != written:
            raise NotFused("the probabilities reach the PV product in another layout than the QK product "
                           "wrote the scores", softmax)
    except Unprovable as exc:
        raise NotFused(f"cannot prove the attention layout: {exc}") from None
