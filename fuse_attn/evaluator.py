"""Concrete evaluation of the parts of a graph that depend only on constants and shapes.

The passes prove what a subgraph computes by evaluating it: a mask computed from shapes is
evaluated at a concrete binding of the symbolic dims and compared with the causal pattern;
a Reshape target computed from `Shape(x)` is evaluated the same way. A value that depends on
the *contents* of a graph input (a padding mask, say) is never guessed: it raises
`DependsOnInput`, unless the caller declared that input's contents (e.g. all ones).
"""

from __future__ import annotations

import ast
import math
import operator

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
from onnx import helper

# A cone this large is real computation, not mask or shape plumbing; refusing keeps proofs cheap.
MAX_CONE_NODES = 400
# Masks and biases read small tables (a causal buffer, a position-bias embedding); a cone that
# needs more than this is computing with weights, and reading them is what the pass avoids.
MAX_CONE_CONSTANT_BYTES = 64 << 20


class Unprovable(Exception):
    """The value cannot be evaluated from constants and shapes; the message says why."""


class DependsOnInput(Unprovable):
    def __init__(self, input_name: str):
        super().__init__(f"depends on the contents of graph input '{input_name}'")
        self.input_name = input_name


def _is_shape_op(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ("Shape", "Size")


class Evaluator:
    """Evaluates values of one graph under one binding of symbolic dims to integers.

    `declared_inputs` maps graph-input names to contents the user vouched for; they are
    built at the input's concrete shape with `declared_inputs[name](shape, dtype)`.
    """

    def __init__(self, graph: ir.Graph, binding: dict[str, int], declared_inputs=None):
        self.graph = graph
        self.binding = binding
        self.declared_inputs = declared_inputs or {}
        self._cache: dict[ir.Value, np.ndarray] = {}
        self._shapes: dict[ir.Value, tuple[int, ...]] = {}
        self._opset = graph.opset_imports.get("", 18)
        self.declared_used: set[str] = set()
        # Proofs keyed by what they depend on: layers that repeat a structure are proven once.
        self.memo: dict[object, object] = {}

    # --- shapes ---------------------------------------------------------------------------
    def dim(self, d) -> int:
        if isinstance(d, int):
            return d
        name = getattr(d, "value", None)
        if name is not None and name in self.binding:
            return self.binding[name]
        if name is not None:
            value = _arithmetic(name, self.binding)
            if value is not None:
                return value
        raise Unprovable(f"a dimension is unknown ({d if name else '?'})")

    def shape_of(self, value: ir.Value) -> tuple[int, ...]:
        """The concrete shape of `value` under the binding.

        Dims that are not free symbols of the graph inputs (shape inference's `unk__N`, or no
        shape at all) are never guessed: the producer's shape is inferred again, node by node,
        from its inputs' concrete shapes and its evaluated shape operands.
        """
        if value in self._shapes:
            return self._shapes[value]
        pending = [value]
        while pending:
            current = pending[-1]
            if current in self._shapes:
                pending.pop()
                continue
            known = self._declared_shape(current)
            if known is not None:
                self._shapes[current] = known
                pending.pop()
                continue
            node = current.producer()
            if node is None:
                raise Unprovable(f"the shape of '{current.name}' is unknown")
            missing = [v for v in node.inputs if v is not None and v not in self._shapes]
            if missing:
                if len(pending) > 100_000:
                    raise Unprovable(f"the shape of '{value.name}' is unknown")
                pending.extend(missing)
                continue
            self._infer_outputs(node)
            if current not in self._shapes:
                raise Unprovable(f"the shape of '{current.name}' cannot be inferred")
            pending.pop()
        return self._shapes[value]

    def _declared_shape(self, value: ir.Value) -> tuple[int, ...] | None:
        const = ir.convenience.get_const_tensor(value)
        if const is not None:
            return tuple(const.shape)
        if value.shape is None:
            return None
        try:
            return tuple(self.dim(d) for d in value.shape)
        except Unprovable:
            return None

    def _infer_outputs(self, node: ir.Node) -> None:
        """Shapes of `node`'s outputs by ONNX's own per-op inference, on concrete inputs."""
        from onnx import defs, shape_inference

        names = {v: f"i{i}" for i, v in enumerate(node.inputs) if v is not None}
        proto = helper.make_node(node.op_type, [names.get(v, "") for v in node.inputs],
                                 [f"o{i}" for i in range(len(node.outputs))], domain=node.domain)
        proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
        types, data = {}, {}
        for v, name in names.items():
            elem = v.dtype if v.dtype is not None else ir.DataType.FLOAT
            types[name] = helper.make_tensor_type_proto(int(elem), self._shapes[v])
            if elem == ir.DataType.INT64 and len(self._shapes[v]) <= 1 and math.prod(self._shapes[v]) <= 64:
                try:
                    data[name] = onnx.numpy_helper.from_array(np.asarray(self.value_of(v), dtype=np.int64), name)
                except Unprovable:
                    pass
        try:
            schema = defs.get_schema(node.op_type, self._opset, node.domain)
            inferred = shape_inference.infer_node_outputs(
                schema, proto, types, data, opset_imports=[helper.make_opsetid(node.domain, self._opset)])
        except Exception as exc:
            raise Unprovable(f"cannot infer the shapes of {node.op_type} '{node.name}': {exc}") from None
        for i, out in enumerate(node.outputs):
            type_proto = inferred.get(f"o{i}")
            if out is None or type_proto is None or not type_proto.tensor_type.HasField("shape"):
                continue
            dims = type_proto.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                self._shapes[out] = tuple(d.dim_value for d in dims)

    # --- values ---------------------------------------------------------------------------
    def value_of(self, value: ir.Value) -> np.ndarray:
        if value not in self._cache:
            self._evaluate_cone(value)
        return self._cache[value]

    def _leaf(self, value: ir.Value) -> np.ndarray | ir.TensorProtocol | None:
        """A cone leaf (a constant tensor, not loaded yet, or an array), or None if the value
        must be computed by its producer."""
        if value in self._cache:
            return self._cache[value]
        const = ir.convenience.get_const_tensor(value)
        if const is not None:
            return const
        if value.is_graph_input():
            maker = self.declared_inputs.get(value.name)
            if maker is None:
                raise DependsOnInput(value.name)
            self.declared_used.add(value.name)
            return maker(self.shape_of(value), value.dtype.numpy())
        producer = value.producer()
        if producer is None:
            raise Unprovable(f"'{value.name}' has no producer")
        if _is_shape_op(producer):
            shape = self.shape_of(producer.inputs[0])
            if producer.op_type == "Size":
                return np.array(math.prod(shape), dtype=np.int64)
            start = producer.attributes.get_int("start", 0)
            end = producer.attributes.get_int("end", len(shape))
            return np.array(shape[slice(start, end if end is not None else None)], dtype=np.int64)
        return None

    def _evaluate_cone(self, target: ir.Value) -> None:
        # Collect the nodes to run, stopping at leaves (constants, shapes, declared inputs).
        leaves: dict[ir.Value, np.ndarray] = {}
        order: list[ir.Node] = []
        seen: set[ir.Node] = set()
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
            if node.domain not in ("", "ai.onnx"):
                raise Unprovable(f"'{target.name}' is computed by custom op {node.domain}::{node.op_type}")
            order.append(node)
            stack.extend(v for v in node.inputs if v is not None)
        constants = [v for v, leaf in leaves.items() if not isinstance(leaf, np.ndarray)]
        if sum(leaves[v].nbytes for v in constants) > MAX_CONE_CONSTANT_BYTES:
            raise Unprovable(f"'{target.name}' is computed from large weights, not from shapes")
        leaves.update({v: np.asarray(leaves[v].numpy()) for v in constants})
        if not order:
            self._cache[target] = leaves[target]
            return
        order = _topological(target, seen)
        names: dict[ir.Value, str] = {}

        def name(v: ir.Value | None) -> str:
            if v is None:
                return ""
            return names.setdefault(v, f"v{len(names)}")

        protos = []
        for node in order:
            proto = helper.make_node(
                node.op_type, [name(v) for v in node.inputs], [name(v) for v in node.outputs]
            )
            proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
            protos.append(proto)
        feeds = {name(v): arr for v, arr in leaves.items()}
        wanted = [v for n in order for v in n.outputs if v in names]
        graph = helper.make_graph(
            protos,
            "cone",
            [helper.make_tensor_value_info(name(v), helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for v, a in leaves.items()],
            [helper.make_empty_tensor_value_info(name(v)) for v in wanted],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self._opset)])
        from onnx.reference import ReferenceEvaluator  # heavy import, only when a cone is run

        try:
            results = ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:  # the reference runtime's own message is the best we have
            raise Unprovable(f"evaluating '{target.name}' failed: {type(exc).__name__}: {exc}") from None
        self._cache.update(leaves)
        self._cache.update({v: np.asarray(r) for v, r in zip(wanted, results)})


def _topological(target: ir.Value, nodes: set[ir.Node]) -> list[ir.Node]:
    """`nodes` (the cone of `target`) in an order where producers come first."""
    order: list[ir.Node] = []
    done: set[ir.Node] = set()
    stack: list[tuple[ir.Node, bool]] = [(target.producer(), False)]
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


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _arithmetic(expression: str, binding: dict[str, int]) -> int | None:
    """A dim written as arithmetic over symbols (dynamo writes 's0 + 1', '2*s1'), or None."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in binding:
            return binding[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            return None if left is None or right is None else _OPERATORS[type(node.op)](left, right)
        return None

    return walk(tree)
