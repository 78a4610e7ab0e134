"""Masks as functions of i − j: a (…, rows, cols) value kept as one strip of rows + cols − 1.

A causal mask, a sliding window or an off-by-one diagonal all have the same value along every
diagonal: M[…, i, j] = strip[…, i − j + cols − 1]. Elementwise ops (compare, And, Where, Add,
Cast, ...) map diagonals to diagonals, so the mask's computation can run on strips, and the
proof reads a strip of 2·seq numbers instead of a seq × seq array, at any length.

`strip_of` follows the computation node by node. Values whose last two axes are not both
longer than 1 (position vectors, scalars, shapes) are evaluated as they are (`Evaluator`); a
value that is seq × seq is built from them by rules that are exact:
  - row index vs column index: an integer affine row vector a + k·i against a column vector
    a' + k·j (Range, Unsqueeze, ...) compares as (a − a') + k·(i − j) against 0;
  - elementwise ops on strips; Expand, Unsqueeze, Reshape, Transpose of the leading axes;
    Transpose of the last two (the strip reversed); Slice (rows r0.. and cols c0.. shift it);
    Trilu (a threshold on i − j); ConstantOfShape; a stored seq² buffer, read row block by row
    block and checked to be constant along its diagonals.
Anything else raises `NotDiagonal`, and the caller proves the mask another way.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from onnx import helper, numpy_helper

from fuse_attn.ir.evaluator import Evaluator, Unprovable
from fuse_attn.ir.graph import DEFAULT_DOMAINS, Node, Value

# Rows of a stored seq² constant read at once when checking it is constant along diagonals.
_STORED_ROWS_AT_ONCE = 256

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not",
    "Where", "Cast", "CastLike", "Neg", "Abs", "IsNaN", "IsInf", "Sqrt", "Exp", "Log", "Reciprocal",
    "Floor", "Ceil", "Sign", "Relu", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "Identity",
}
_COMPARE = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
# Largest integer every value of these float dtypes represents exactly (affine index arithmetic).
_EXACT_INT = {np.dtype(np.float16): 2**11, np.dtype(np.float32): 2**24, np.dtype(np.float64): 2**53}


class NotDiagonal(Exception):
    """The value is not shown to be constant along its diagonals; the message says where."""


@dataclasses.dataclass(frozen=True)
class Strip:
    """value[…, i, j] = table[…, i − j + cols − 1] for a value of shape lead + (rows, cols)."""

    table: np.ndarray  # lead (broadcastable) + (rows + cols − 1,)
    rows: int
    cols: int

    def offsets(self) -> np.ndarray:
        """i − j at each table position."""
        return np.arange(-(self.cols - 1), self.rows)

    def dense(self) -> np.ndarray:
        """The full value (tests; small sizes only)."""
        i = np.arange(self.rows)[:, None]
        j = np.arange(self.cols)[None, :]
        return self.table[..., i - j + self.cols - 1]


def is_square(shape: tuple[int, ...]) -> bool:
    """A value whose last two axes both vary: what a seq × seq mask is."""
    return len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1


def _lead_of(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A strip's table broadcast to the lead axes of `shape` (lead + (rows, cols)); the table may
    carry more leading size-1 axes than the value has (they broadcast away)."""
    extra = table.ndim - (len(shape) - 1)
    if extra > 0 and all(d == 1 for d in table.shape[:extra]):
        table = table.reshape(table.shape[extra:])
    return np.broadcast_to(table, tuple(shape[:-2]) + table.shape[-1:])


def strip_of(evaluator: Evaluator, value: Value) -> Strip:
    """`value` (shape lead + (rows, cols)) as a strip, or NotDiagonal / Unprovable."""
    try:
        return _StripWalk(evaluator).strip(value)
    except (ValueError, IndexError, TypeError) as exc:  # shapes the rules did not foresee
        raise NotDiagonal(f"'{value.name}': {type(exc).__name__}: {exc}") from None


def as_strip(x, rows: int, cols: int) -> Strip:
    """A strip, or a concrete array of rank ≥ 2 that is constant along its diagonals, as a strip
    of (rows, cols); a size-1 axis broadcasts."""
    if isinstance(x, Strip):
        if (x.rows, x.cols) != (rows, cols):
            raise NotDiagonal(f"a ({x.rows}, {x.cols}) mask does not broadcast to ({rows}, {cols})")
        return x
    x = np.asarray(x)
    x = x.reshape((1,) * (2 - x.ndim) + x.shape) if x.ndim < 2 else x
    r, c = x.shape[-2:]
    if r not in (1, rows) or c not in (1, cols):
        raise NotDiagonal(f"shape {x.shape} does not broadcast to ({rows}, {cols})")
    # Constant along a varying axis: that axis broadcasts.
    if r > 1 and c == 1 and (x == x[..., :1, :]).all():
        x, r = x[..., :1, :], 1
    if c > 1 and r == 1 and (x == x[..., :, :1]).all():
        x, c = x[..., :, :1], 1
    if (r, c) == (1, 1):
        return Strip(x[..., 0], rows, cols)
    if (r, c) != (rows, cols) or not (x[..., 1:, 1:] == x[..., :-1, :-1]).all():
        raise NotDiagonal("a value varies along its diagonals (depends on the row or column alone)")
    return Strip(np.concatenate([x[..., 0, :0:-1], x[..., :, 0]], axis=-1), rows, cols)


def _affine(x: np.ndarray, rows: int, cols: int):
    """x (rank ≥ 2, last axes each 1 or full) as (base, k_row, k_col): x = base + k_row·i + k_col·j
    exactly, with base constant over the last two axes and integer slopes; else None."""
    if x.dtype.kind not in "iuf" or x.ndim < 2:
        return None
    if x.dtype.kind == "f":
        limit = _EXACT_INT.get(x.dtype)
        if limit is None or not np.isfinite(x).all() or (x != np.round(x)).any():
            return None
        if np.abs(x).max(initial=0) * 2 + 2 * (rows + cols) >= limit:
            return None
    elif np.abs(x.astype(np.int64)).max(initial=0) >= 2**40:  # no overflow in the differences
        return None
    r, c = x.shape[-2:]
    base = x[..., :1, :1].astype(np.int64)
    k_row = int(x[(0,) * (x.ndim - 2) + (1, 0)]) - int(base.reshape(-1)[0]) if r > 1 else 0
    k_col = int(x[(0,) * (x.ndim - 2) + (0, 1)]) - int(base.reshape(-1)[0]) if c > 1 else 0
    i = np.arange(r, dtype=np.int64)[:, None]
    j = np.arange(c, dtype=np.int64)[None, :]
    if not (x.astype(np.int64) == base + k_row * i + k_col * j).all():
        return None
    return base[..., 0], k_row, k_col


# Ops whose numpy form is exactly ONNX's: run directly (the reference runtime's import alone
# costs a quarter of a second). Integer Div, Mod, Pow... go to the reference runtime.
_NUMPY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Neg": np.negative, "Abs": np.abs,
    "Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal, "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
    "Not": np.logical_not, "Where": np.where, "IsNaN": np.isnan, "Identity": lambda x: x,
}


def _numpy_cast(node: Node, x: np.ndarray) -> np.ndarray | None:
    to = helper.tensor_dtype_to_np_dtype(node.attr("to"))
    if to.kind not in "biuf" or x.dtype.kind not in "biuf" or node.attr("saturate") is not None:
        return None
    return x.astype(to)


def _run(node: Node, inputs: list, opset: int) -> np.ndarray:
    """One node on concrete arrays, by numpy where it is exact, else ONNX's reference runtime."""
    if node.op_type in _NUMPY and all(x is not None for x in inputs) and len({np.asarray(x).dtype for x in inputs[-2:]}) == 1:
        with np.errstate(all="ignore"):
            return np.asarray(_NUMPY[node.op_type](*inputs))
    if node.op_type == "Cast" and inputs[0] is not None:
        cast = _numpy_cast(node, np.asarray(inputs[0]))
        if cast is not None:
            return cast
    from onnx.reference import ReferenceEvaluator

    names = [f"i{n}" if x is not None else "" for n, x in enumerate(inputs)]
    proto = helper.make_node(node.op_type, names, ["o"])
    proto.attribute.extend(node.proto.attribute)
    feeds = {name: np.asarray(x) for name, x in zip(names, inputs) if name}
    graph = helper.make_graph(
        [proto], "strip",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in feeds.items()],
        [helper.make_empty_tensor_value_info("o")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception as exc:
        raise Unprovable(f"evaluating {node.op_type} '{node.name}' failed: {type(exc).__name__}: {exc}") from None


class _StripWalk:
    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.opset = evaluator.graph.opset or 18

    def operand(self, value: Value | None):
        """A strip when `value` is seq × seq, else the concrete (small) value."""
        if value is None:
            return None
        if is_square(self.evaluator.shape_of(value)):
            return self.strip(value)
        return np.asarray(self.evaluator.value_of(value))

    def strip(self, value: Value) -> Strip:
        key = ("strip", value)
        memo = self.evaluator.memo
        if key not in memo:
            try:
                memo[key] = self._strip(value)
            except NotDiagonal as exc:
                memo[key] = exc
        result = memo[key]
        if isinstance(result, NotDiagonal):
            raise NotDiagonal(str(result))
        return result

    def _strip(self, value: Value) -> Strip:
        shape = self.evaluator.shape_of(value)
        rows, cols = shape[-2:]
        if value.is_constant():
            return _stored_strip(value, shape)
        if value.is_graph_input():
            maker = self.evaluator.declared_inputs.get(value.name)
            if maker is None:
                self.evaluator.value_of(value)  # raises DependsOnInput
            # Declared contents are the same at every position (all ones).
            self.evaluator.declared_used.add(value.name)
            dtype = helper.tensor_dtype_to_np_dtype(self.evaluator.dtype_of(value))
            return Strip(np.asarray(maker(shape[:-2] + (1, 1), dtype))[..., 0], rows, cols)
        node = value.producer()
        if node is None or node.domain not in DEFAULT_DOMAINS:
            raise NotDiagonal(f"'{value.name}' is not computed by standard ops")
        op = node.op_type
        if value is not node.outputs[0]:
            raise NotDiagonal(f"{op} '{node.name}' has several outputs")
        if op in _ELEMENTWISE:
            return self._elementwise(node, shape)
        if op in ("Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten"):
            return self._lead_reshape(node, shape)
        if op == "Transpose":
            return self._transpose(node, shape)
        if op == "Slice":
            return self._slice(node, shape)
        if op == "Trilu":
            return self._trilu(node, shape)
        if op == "ConstantOfShape":
            fill = node.attr("value")
            array = np.zeros(1, np.float32) if fill is None else numpy_helper.to_array(fill)
            return Strip(array.reshape((1,) * (len(shape) - 2) + (1,)), rows, cols)
        raise NotDiagonal(f"{op} '{node.name}' computes the mask")

    # --- rules ----------------------------------------------------------------------------
    def _elementwise(self, node: Node, shape) -> Strip:
        rows, cols = shape[-2:]
        inputs = [self.operand(v) for v in node.inputs]
        if node.op_type in _COMPARE | {"Add", "Sub"} and not any(isinstance(x, Strip) for x in inputs):
            pair = self._affine_pair(node, inputs, rows, cols)
            if pair is not None:
                return pair
        tables = []
        for x in inputs:
            if x is None:
                tables.append(None)
            elif node.op_type == "CastLike" and x is inputs[1]:
                tables.append(np.zeros(0, dtype=x.table.dtype if isinstance(x, Strip) else x.dtype))
            else:
                tables.append(as_strip(x, rows, cols).table)
        return Strip(_run(node, tables, self.opset), rows, cols)

    def _affine_pair(self, node: Node, inputs: list, rows: int, cols: int) -> Strip | None:
        """Row index against column index: both affine with matching slopes, the result depends on
        i − j. None when they are not index vectors (values constant along an axis may still be)."""
        a, b = (np.asarray(x).reshape((1,) * (2 - np.ndim(x)) + np.shape(x)) for x in inputs)
        fa, fb = _affine(a, rows, cols), _affine(b, rows, cols)
        if fa is None or fb is None:
            return None
        sign = 1 if node.op_type == "Add" else -1
        base = fa[0] + sign * fb[0]
        k_row, k_col = fa[1] + sign * fb[1], fa[2] + sign * fb[2]
        if k_row != -k_col:
            raise NotDiagonal(f"{node.op_type} '{node.name}' depends on more than i − j")
        d = np.arange(-(cols - 1), rows, dtype=np.int64)
        table = base + k_row * d  # a ± b at each i − j (base: lead + (1,))
        if node.op_type in ("Add", "Sub"):
            dtype = np.result_type(a.dtype, b.dtype)
            return Strip(table.astype(dtype), rows, cols)
        # a OP b  ⇔  (a − b) OP 0, exact for integers (floats were checked to hold exact integers)
        return Strip(_run(node, [table, np.zeros((), np.int64)], self.opset), rows, cols)

    def _lead_reshape(self, node: Node, shape) -> Strip:
        source = self.operand(node.inputs[0])
        rows, cols = shape[-2:]
        if not isinstance(source, Strip):  # Expand of a row, column or scalar to seq × seq
            if node.op_type != "Expand":
                raise NotDiagonal(f"{node.op_type} '{node.name}' makes a seq × seq value")
            return as_strip(source, rows, cols)
        in_shape = self.evaluator.shape_of(node.inputs[0])
        if (source.rows, source.cols) != (rows, cols) or in_shape[-2:] != (rows, cols):
            raise NotDiagonal(f"{node.op_type} '{node.name}' moves the mask's last two axes")
        if node.op_type == "Expand":
            lead = np.broadcast_shapes(source.table.shape[:-1], shape[:-2])
            return Strip(np.broadcast_to(source.table, lead + source.table.shape[-1:]), rows, cols)
        table = _lead_of(source.table, in_shape)
        return Strip(table.reshape(tuple(shape[:-2]) + table.shape[-1:]), rows, cols)

    def _transpose(self, node: Node, shape) -> Strip:
        source = self.strip(node.inputs[0])
        in_shape = self.evaluator.shape_of(node.inputs[0])
        n = len(in_shape)
        perm = list(node.attr("perm") or reversed(range(n)))
        table = _lead_of(source.table, in_shape)
        lead = [p for p in perm[:-2]]
        if sorted(lead) != list(range(n - 2)):
            raise NotDiagonal(f"Transpose '{node.name}' mixes the mask's last two axes with others")
        table = table.transpose(lead + [n - 2])
        if perm[-2:] == [n - 2, n - 1]:
            return Strip(table, source.rows, source.cols)
        return Strip(table[..., ::-1], source.cols, source.rows)  # (j, i): i − j negated

    def _slice(self, node: Node, shape) -> Strip:
        in_shape = self.evaluator.shape_of(node.inputs[0])
        n = len(in_shape)

        def ints(index, attr, default):
            if len(node.inputs) > index and node.inputs[index] is not None:
                return [int(x) for x in np.asarray(self.evaluator.value_of(node.inputs[index])).reshape(-1)]
            return node.attr(attr, default)

        starts, ends = ints(1, "starts", None), ints(2, "ends", None)
        axes = ints(3, "axes", None) or list(range(len(starts)))
        steps = ints(4, "steps", None) or [1] * len(starts)
        ranges = [range(dim) for dim in in_shape]
        for start, end, axis, step in zip(starts, ends, axes, steps):
            ranges[axis % n] = range(in_shape[axis % n])[slice(start, end, step)]
        rows_r, cols_r = ranges[-2], ranges[-1]
        if rows_r.step != 1 or cols_r.step != 1:
            raise NotDiagonal(f"Slice '{node.name}' steps over the mask's rows or columns")
        source = self.operand(node.inputs[0])
        if not isinstance(source, Strip):
            raise NotDiagonal(f"Slice '{node.name}' makes a seq × seq value")
        table = _lead_of(source.table, in_shape)
        table = table[tuple(np.asarray(r) for r in np.ix_(*ranges[:-2]))] if n > 2 else table
        rows, cols = len(rows_r), len(cols_r)
        # new i' − j' = d'  is old  d = d' + r0 − c0; old table index d + source.cols − 1
        first = -(cols - 1) + rows_r.start - cols_r.start + source.cols - 1
        if table.shape[-1] == 1:  # the same on every diagonal (a ConstantOfShape): any slice of it is too
            return Strip(table, rows, cols)
        return Strip(table[..., first:first + rows + cols - 1], rows, cols)

    def _trilu(self, node: Node, shape) -> Strip:
        source = as_strip(self.operand(node.inputs[0]), *shape[-2:])
        k = 0
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            k = int(np.asarray(self.evaluator.value_of(node.inputs[1])).reshape(()))
        d = source.offsets()
        keep = d <= -k if node.attr("upper", 1) else d >= -k  # upper keeps j − i ≥ k, lower j − i ≤ k
        table = np.where(keep, source.table, np.zeros((), source.table.dtype))
        return Strip(table, source.rows, source.cols)


def _stored_strip(value: Value, shape) -> Strip:
    """A stored (…, rows, cols) constant — a registered tril buffer, say — as a strip, read a
    block of rows at a time (from the file when it is external data), never whole."""
    rows, cols = shape[-2:]
    lead = math.prod(shape[:-2])
    tables = []
    first_row = previous = column = None
    blocks = value.constant_row_blocks(_STORED_ROWS_AT_ONCE)
    if blocks is None:
        raise NotDiagonal(f"the constant '{value.name}' cannot be read by rows")
    for start, block in blocks:
        for row_index, row in zip(range(start, start + len(block)), block):
            r = row_index % rows
            if r == 0:
                first_row, column = row.copy(), np.empty(rows, dtype=row.dtype)
            elif not (row[1:] == previous[:-1]).all():
                raise NotDiagonal(f"the constant '{value.name}' varies along its diagonals")
            column[r] = row[0]
            previous = row
            if r == rows - 1:  # the slice's strip: its first row reversed, then its first column
                tables.append(np.concatenate([first_row[:0:-1], column]))
    return Strip(np.stack(tables).reshape(tuple(shape[:-2]) + (rows + cols - 1,)), rows, cols)
