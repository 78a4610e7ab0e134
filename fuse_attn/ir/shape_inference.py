"""Concrete shapes and dtypes under one binding of the symbolic dims: declared, or inferred node
by node by ONNX's own per-op inference on concrete input shapes and evaluated shape operands,
never invented. A mixin of `Evaluator` (it reads `value_of` for shape operands)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fuse_attn.ir import contract, dim_expr
from fuse_attn.ir.graph import DEFAULT_DOMAINS, Node, Value
from fuse_attn.ir.unprovable import Unprovable

MAX_SHAPE_WALK = 200_000

# Ops whose first output has exactly the type and shape of their first input.
_SAME_TYPE_AS_INPUT = {"Dropout", "Identity", "Softmax", "LogSoftmax", "Relu", "Erf", "Tanh", "Sigmoid",
                       "Neg", "Sqrt", "Exp", "Abs", "LayerNormalization"}


# Element-wise ops whose output shape is the multidirectional broadcast of their inputs.
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "LessOrEqual", "Greater",
                 "GreaterOrEqual", "And", "Or", "Xor", "Where", "Max", "Min", "Sum", "Mean"}


class ShapeConflict(Unprovable):
    """A node's inputs have sizes its op cannot combine; `pairs` are the sizes that disagree."""

    def __init__(self, message: str, node: Node, pairs: list[tuple[int, int]]):
        super().__init__(message)
        self.node, self.pairs = node, pairs


def _conflicting_sizes(op_type: str, shapes: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """Pairs of sizes that disagree: MatMul's contracted dims, or right-aligned dims of an
    element-wise op (neither 1) or of a Concat."""
    pairs = []
    if op_type in ("MatMul", "Gemm") and len(shapes) >= 2 and shapes[0] and shapes[1]:
        a, b = shapes[0], shapes[1]
        contracted = (a[-1], b[-2] if len(b) > 1 else b[0])
        if contracted[0] != contracted[1]:
            pairs.append(contracted)
        shapes = [a[:-2], b[:-2]]
    rank = max((len(s) for s in shapes), default=0)
    for axis in range(1, rank + 1):
        sizes = {s[-axis] for s in shapes if len(s) >= axis} - ({1} if op_type != "Concat" else set())
        sizes = sorted(sizes)
        pairs += [(sizes[0], other) for other in sizes[1:]]
    return pairs


class ShapeInference:
    """Shapes and dtypes of values: `dim`, `shape_of`, `dtype_of` (state set up by `Evaluator`)."""

    def dim(self, d) -> int:
        if isinstance(d, int):
            if d < 0:
                raise Unprovable(f"a dimension is negative ({d})")
            return d
        if isinstance(d, str):
            if d in self.binding:
                return self.binding[d]
            if d not in self._dim_expressions:  # parsed once: every declared shape asks again
                self._dim_expressions[d] = dim_expr.parse(d).evaluate(self.binding)
            value = self._dim_expressions[d]
            if value is not None and value >= 0:  # arithmetic below zero is no size
                return value
        raise Unprovable(f"a dimension is unknown ({d or '?'})")

    def shape_of(self, value: Value) -> tuple[int, ...]:
        return self._resolve(value)[1]

    def dtype_of(self, value: Value) -> int:
        return self._resolve(value)[0]

    def _resolve(self, value: Value) -> tuple[int, tuple[int, ...]]:
        """Concrete (dtype, shape) of `value` under the binding: declared, or inferred from
        the producer once its inputs are resolved (an explicit stack: graphs are deep)."""
        if value in self._types:
            return self._types[value]
        pending = [value]
        while pending:
            current = pending[-1]
            if current in self._types:
                pending.pop()
                continue
            declared = self._declared(current)
            if declared is not None:
                self._types[current] = declared
                pending.pop()
                continue
            node = current.producer()
            if node is None:
                raise Unprovable(f"the shape of '{current.name}' is unknown")
            missing = [v for v in node.inputs if v is not None and v not in self._types]
            if missing:
                if len(pending) > MAX_SHAPE_WALK:
                    raise Unprovable(f"the shape of '{value.name}' is unknown")
                pending.extend(missing)
                continue
            self._infer_outputs(node)
            if current not in self._types:
                raise Unprovable(f"the shape of '{current.name}' cannot be inferred")
            pending.pop()
        return self._types[value]

    def _declared(self, value: Value) -> tuple[int, tuple[int, ...]] | None:
        shape, dtype = value.shape, value.dtype
        if shape is None or dtype is None:
            return None
        try:
            return dtype, tuple(self.dim(d) for d in shape)
        except Unprovable:
            return None

    def _infer_outputs(self, node: Node) -> None:
        """Types of `node`'s outputs by ONNX's own per-op inference, on concrete inputs."""
        from onnx import defs, shape_inference

        if node.domain == contract.DOMAIN and node.op_type == contract.OP_TYPE and node.outputs[0] is not None:
            dtype, (b, h, d, s) = self._types[node.inputs[0]]  # q (b, h, d, s) -> o (b, h, s, d)
            self._types[node.outputs[0]] = (dtype, (b, h, s, d))
            return

        names = {v: f"i{i}" for i, v in enumerate(node.inputs) if v is not None}
        proto = helper.make_node(node.op_type, [names.get(v, "") for v in node.inputs],
                                 [f"o{i}" for i in range(len(node.outputs))], domain=node.domain)
        proto.attribute.extend(node.proto.attribute)
        types, data = {}, {}
        for v, name in names.items():
            dtype, shape = self._types[v]
            types[name] = helper.make_tensor_type_proto(dtype, shape)
            # shape-like operands (Reshape targets, Slice bounds): int64, or int32 as tf2onnx writes them
            integer = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}.get(dtype)
            if integer is not None and len(shape) <= 1 and math.prod(shape) <= 64:
                try:
                    data[name] = numpy_helper.from_array(np.asarray(self.value_of(v), dtype=integer), name)
                except Unprovable:
                    pass
        try:
            schema = defs.get_schema(node.op_type, self._opset, node.domain)
            inferred = shape_inference.infer_node_outputs(
                schema, proto, types, data, opset_imports=[helper.make_opsetid(node.domain, self._opset)])
        except Exception as exc:
            if node.op_type in _SAME_TYPE_AS_INPUT and node.domain in DEFAULT_DOMAINS and node.inputs[0] is not None:
                # A shape- and type-preserving op whose other inputs the schema objects to.
                self._types[node.outputs[0]] = self._types[node.inputs[0]]
                return
            if node.op_type == "ConstantOfShape" and node.domain in DEFAULT_DOMAINS:
                # Its type is its `value` attribute's, its shape its input's (a dtype the opset's schema may not list).
                value = node.attr("value")
                dtype = value.data_type if value is not None else onnx.TensorProto.FLOAT
                shape = tuple(int(x) for x in np.asarray(self.value_of(node.inputs[0])).reshape(-1))
                self._types[node.outputs[0]] = (dtype, shape)
                return
            message = f"cannot infer the shapes of {node.op_type} '{node.name}': {exc}"
            shapes = [self._types[v][1] for v in node.inputs if v is not None]
            if self._broadcast_fixed_by_graph(node, shapes):
                return
            pairs = _conflicting_sizes(node.op_type, shapes)
            raise ShapeConflict(self._conflict_message(node, pairs) or message, node, pairs) from None
        for i, out in enumerate(node.outputs):
            t = inferred.get(f"o{i}")
            if (i == 0 and out is not None and t is not None and t.tensor_type.elem_type
                    and not t.tensor_type.HasField("shape") and node.op_type in _BROADCASTING
                    and node.domain in DEFAULT_DOMAINS):
                # Some older schemas (LessOrEqual-12, GreaterOrEqual-12) infer only the type;
                # the shape of a broadcasting op is the inputs' broadcast.
                shapes = [self._types[v][1] for v in node.inputs if v is not None]
                try:
                    self._types[out] = (t.tensor_type.elem_type, tuple(np.broadcast_shapes(*shapes)))
                except ValueError as exc:
                    if self._broadcast_fixed_by_graph(node, shapes):
                        continue
                    pairs = _conflicting_sizes(node.op_type, shapes)
                    raise ShapeConflict(self._conflict_message(node, pairs)
                                        or f"cannot infer the shapes of {node.op_type} '{node.name}': {exc}",
                                        node, pairs) from None
                continue
            if out is None or t is None or not t.tensor_type.HasField("shape"):
                continue
            dims = t.tensor_type.shape.dim
            if t.tensor_type.elem_type and all(d.HasField("dim_value") for d in dims):
                self._types[out] = (t.tensor_type.elem_type, tuple(d.dim_value for d in dims))

    def _conflict_message(self, node: Node, pairs: list[tuple[int, int]]) -> str | None:
        """Sizes that disagree only because free dims were given independent sample sizes: the
        graph ties them in a way no single tie explains (a mask of `past + sequence` keys in
        a branch that runs without past, say). Say so, and how to fix them."""
        if not pairs or not self.binding:
            return None
        a, b = pairs[0]
        bound = ", ".join(f"{k}={v}" for k, v in self.binding.items())
        # Sizes apart by exactly one symbol's sample: a branch that runs with that symbol at 0
        # (optimum's merged decoder without past reads a mask of past + sequence keys).
        apart = [k for k, v in self.binding.items() if v == abs(a - b) and list(self.binding.values()).count(v) == 1]
        hint = f" (e.g. --dim {apart[0]}=0)" if apart else ""
        return (f"{node.op_type} '{node.name}' combines sizes {a} and {b} at sample sizes of the free dims "
                f"({bound}): the graph ties its free dims in a way the pass cannot solve; fix them with "
                f"--dim SYMBOL=N or --shape{hint}")

    def _broadcast_fixed_by_graph(self, node: Node, shapes: list[tuple[int, ...]]) -> bool:
        """A broadcast whose sample sizes disagree where the graph fixes the size: a ViT adds
        its (1, 197, d) position table to tokens counted from symbolic height and width, so
        it runs only when they come to 197, and its output has 197 whatever they are. ONNX's
        whole-model inference gives such fixed dims; the others must agree here."""
        if node.op_type not in _BROADCASTING or node.domain not in DEFAULT_DOMAINS or node.outputs[0] is None:
            return False
        inferred = self.graph.inferred_by_onnx(node.outputs[0].name)
        if inferred is None or not inferred[0]:
            return False
        dtype, fixed = inferred
        if len(fixed) != max(map(len, shapes)):
            return False
        dims = []
        for axis in range(1, len(fixed) + 1):
            sizes = {s[-axis] for s in shapes if len(s) >= axis} - {1}
            if isinstance(fixed[-axis], int):
                if fixed[-axis] not in sizes | {1}:  # the fixed size must be one an input has
                    return False
                dims.append(fixed[-axis])
            elif len(sizes) <= 1:
                dims.append(sizes.pop() if sizes else 1)
            else:
                return False
        self._types[node.outputs[0]] = (dtype, tuple(reversed(dims)))
        return True
