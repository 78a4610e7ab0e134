"""Concrete evaluation of the cone that computes a value from constants, shapes and declared
inputs, run in ONNX's reference evaluator after its size is checked. A mixin of `Evaluator` (it
reads `shape_of` and `dtype_of`)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from onnx import helper

from fuse_attn.ir.graph import DEFAULT_DOMAINS, Node, Value
from fuse_attn.ir.unprovable import DependsOnInput, Unprovable

# A cone this large is real computation, not mask or shape plumbing; refusing keeps proofs cheap.
MAX_CONE_NODES = 400
# Masks and biases read small tables (a causal buffer, a position-bias embedding); a cone that
# needs more than this is computing with weights, and reading them is what the pass avoids.
MAX_CONE_CONSTANT_ELEMENTS = 16 << 20
# Sizes a model declares or computes are data, not allocations to make: a cone whose values would
# exceed these (a ConstantOfShape of [10⁶, 10⁶], a Range to 10¹⁰, an input declared that large) is
# refused before it runs. Above any mask or shape a proof evaluates (masks are evaluated whole up
# to 4096², strips beyond).
MAX_VALUE_ELEMENTS = 1 << 28
MAX_CONE_ELEMENTS = 1 << 29
_CACHE_AT_MOST = 1 << 16  # elements: intermediate values larger than this are not kept

# A Slice start or end this far out is clamped to the dim for every tensor a proof can handle: "to the
# end" (TorchScript writes INT64_MAX, tf2onnx 1e9).
TO_THE_END = 10**9


def _is_shape_op(node: Node) -> bool:
    return node.domain in DEFAULT_DOMAINS and node.op_type in ("Shape", "Size")


def _contents_read(node: Node) -> list[Value]:
    """The inputs whose contents `node` reads: CastLike takes only the type of its second."""
    if node.op_type == "CastLike" and node.domain in DEFAULT_DOMAINS:
        return node.inputs[:1]
    return [v for v in node.inputs if v is not None]


class ConeEvaluation:
    """Values of a graph: `value_of`, and the integer constants a value is computed from
    (state set up by `Evaluator`)."""

    def cone_index_constants(self, value: Value) -> list[int]:
        """The single-number integer constants `value` is computed from: the numbers position
        arithmetic uses (a window size would be one; mask fill values are floats).

        A Slice bound at or past the dim it slices means "to the end" and is no such number:
        past a dim the graph fixes (a stored causal buffer's 1024), or past any length a dim can
        have (TorchScript's INT64_MAX for `x[:, :n]`, tf2onnx's 1e9). A real window constant is
        one wherever it is."""
        found, seen, stack = [], set(), [(value, None)]
        while stack and len(seen) < MAX_CONE_NODES:
            v, end = stack.pop()  # end: a bound at least this far out is "to the end" (None: not a bound)
            if (v, end) in seen:
                continue
            seen.add((v, end))
            if v.is_constant():
                if v.constant_size() == 1:
                    array = np.asarray(v.constant())
                    if array.dtype.kind in "iu" and not (end is not None and abs(int(array.reshape(()))) >= end):
                        found.append(int(array.reshape(())))
                continue
            node = v.producer()
            if node is not None and not _is_shape_op(node):
                # The fixed dim applies to a constant that is the bound itself; arithmetic on a bound
                # may cross a threshold below it (1500 − seq), so deeper only the far sentinel does.
                bound = _slice_end(node) if node.op_type == "Slice" and node.domain in DEFAULT_DOMAINS else None
                deeper = None if end is None else TO_THE_END
                stack.extend((i, deeper if end is not None else bound if index in (1, 2) else None)
                             for index, i in enumerate(node.inputs) if i is not None and i in _contents_read(node))
        return found

    def _check_cone_sizes(self, order: list[Node]) -> None:
        """Refuse, before running it, a cone whose values would be too large to hold: each
        value's size where its shape can be inferred at this binding."""
        total = 0
        for node in order:
            for out in node.outputs:
                if out is None:
                    continue
                try:
                    shape = self.shape_of(out)
                except Unprovable:  # the run itself will say, or compute it
                    continue
                total += _check_size(out, shape)
        if total > MAX_CONE_ELEMENTS:
            raise Unprovable(f"evaluating it would hold {total} elements, more than the {MAX_CONE_ELEMENTS} a proof "
                             "evaluates")

    def value_of(self, value: Value) -> np.ndarray:
        if value not in self._cache:
            self._evaluate_cone(value)
        return self._cache[value]

    def _leaf(self, value: Value) -> np.ndarray | Value | None:
        """A cone leaf — an array, or a constant Value not loaded yet — or None if the value
        must be computed by its producer."""
        if value in self._cache:
            return self._cache[value]
        if value.is_constant():
            return value
        if value.is_graph_input():
            maker = self.declared_inputs.get(value.name)
            if maker is None:
                raise DependsOnInput(value.name, value.is_overridable())
            shape = self.shape_of(value)
            _check_size(value, shape)
            self.declared_used.add(value.name)
            return maker(shape, helper.tensor_dtype_to_np_dtype(self.dtype_of(value)))
        producer = value.producer()
        if producer is None:
            raise Unprovable(f"'{value.name}' has no producer")
        if _is_shape_op(producer):
            shape = self.shape_of(producer.inputs[0])
            if producer.op_type == "Size":
                return np.array(math.prod(shape), dtype=np.int64)
            start, end = producer.attr("start", 0), producer.attr("end", None)
            return np.array(shape[slice(start, end)], dtype=np.int64)
        return None

    def _evaluate_cone(self, target: Value) -> None:
        # Collect the nodes to run, stopping at leaves (constants, shapes, declared inputs).
        leaves: dict[Value, np.ndarray | Value] = {}
        seen: set[Node] = set()
        stack = [target]
        while stack:
            value = stack.pop()
            if value in leaves:
                continue
            leaf = self._leaf(value)
            if leaf is not None:
                leaves[value] = leaf
                continue
            node = value.producer()
            if node in seen:
                continue
            seen.add(node)
            if len(seen) > MAX_CONE_NODES:
                raise Unprovable(f"'{target.name}' is computed by more than {MAX_CONE_NODES} nodes")
            if node.domain not in DEFAULT_DOMAINS:
                raise Unprovable(f"'{target.name}' is computed by custom op {node.domain}::{node.op_type}")
            stack.extend(_contents_read(node))
        constants = [v for v, leaf in leaves.items() if isinstance(leaf, Value)]
        if sum(v.constant_size() or 0 for v in constants) > MAX_CONE_CONSTANT_ELEMENTS:
            raise Unprovable(f"'{target.name}' is computed from large weights, not from shapes")
        for v in constants:
            array = v.constant()
            if array is None:
                raise Unprovable(f"the constant '{v.name}' cannot be read")
            leaves[v] = array
        if not seen:
            self._cache[target] = leaves[target]
            return
        order = _topological(target, seen)
        self._check_cone_sizes(order)
        names: dict[Value, str] = {}

        def name(v: Value | None) -> str:
            return "" if v is None else names.setdefault(v, f"v{len(names)}")

        protos = []
        for node in order:
            if node.op_type == "CastLike":  # the type is all it takes from its second input
                proto = helper.make_node("Cast", [name(node.inputs[0])], [name(v) for v in node.outputs],
                                         to=self.dtype_of(node.inputs[1]))
            else:
                proto = helper.make_node(node.op_type, [name(v) for v in node.inputs],
                                         [name(v) for v in node.outputs])
                proto.attribute.extend(node.proto.attribute)
            protos.append(proto)
        feeds = {name(v): a for v, a in leaves.items()}
        wanted = [v for n in order for v in n.outputs if v in names]
        graph = helper.make_graph(
            protos, "cone",
            [helper.make_tensor_value_info(name(v), helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for v, a in leaves.items()],
            [helper.make_empty_tensor_value_info(name(v)) for v in wanted],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self._opset)])
        from onnx.reference import ReferenceEvaluator  # heavy import, only when a cone is run

        try:  # masks compute log(0), cast -inf...: the values are the point, not the warnings
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results = ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:  # the reference runtime's own message is the best we have
            raise Unprovable(f"evaluating '{target.name}' failed: {type(exc).__name__}: {exc}") from None
        # Keep what later proofs reuse (the target, shape-sized values), not seq² intermediates.
        computed = {v: np.asarray(r) for v, r in zip(wanted, results)}
        for v, array in (*leaves.items(), *computed.items()):
            if v is target or array.size <= _CACHE_AT_MOST:
                self._cache[v] = array


def _check_size(value: Value, shape: tuple[int, ...]) -> int:
    count = math.prod(shape)
    if count > MAX_VALUE_ELEMENTS:
        raise Unprovable(f"'{value.name}' would hold {count} elements, more than the {MAX_VALUE_ELEMENTS} "
                         "a proof evaluates")
    return count


def _slice_end(node: Node) -> int:
    """How far out a bound of this Slice is "to the end": the sliced dim where the graph fixes it
    (one axis, declared as a number), else any length a dim can have."""
    data, axes = node.inputs[0], node.inputs[3] if len(node.inputs) > 3 else None
    axis = 0 if axes is None else (int(np.asarray(axes.constant()).reshape(-1)[0])
                                   if axes.is_constant() and axes.constant_size() == 1 else None)
    shape = data.shape if data is not None else None
    if axis is not None and shape and -len(shape) <= axis < len(shape) and isinstance(shape[axis], int):
        return min(shape[axis], TO_THE_END)
    return TO_THE_END


def _topological(target: Value, nodes: set[Node]) -> list[Node]:
    """`nodes` (the cone of `target`) in an order where producers come first."""
    order: list[Node] = []
    done: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(target.producer(), False)]
    while stack:
        node, expanded = stack.pop()
        if node in done:
            continue
        if expanded:
            done.add(node)
            order.append(node)
            continue
        stack.append((node, True))
        for v in node.inputs:
            producer = v.producer() if v is not None else None
            if producer in nodes and producer not in done:
                stack.append((producer, False))
    return order
