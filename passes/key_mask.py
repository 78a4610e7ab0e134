"""A key mask read from a graph input (a padding mask), proven and carried in the key-bias column.

The kernel applies no mask but its causal one. A mask that is, for every value of its input, a
term per (batch entry, key) — 0 for a kept key, "masked" for a padded one — on top of no mask or
the causal triangle rides in one extra head-dim column (`contract.FlashFwdAttrs.key_bias_column`):
q' = [q; 1], k' = [k; bias/scale], v' = [v; 0], so the kernel's scale·q'ᵀk' adds the bias.

The proof has two parts; nothing is sampled.
1. Structure. Each score-step operand that reads the contents of a graph input is followed back
   to it: data movement (Unsqueeze, Reshape, Expand, Slice, Gather, GatherND, ScatterND, ...) is
   run on index arrays, so every element of the operand is known to read one element of the input
   (or none); position-wise ops (Cast, Not, Sub, Mul, Where, ...) must read one element at each
   position; anything else (CumSum, reductions, MatMul, indices read from the input) is refused.
   The element read must follow only the scores' batch and key axes, and all operands together
   must read one element per (batch entry, key).
2. Values. For an input that holds two values (bool, or a 0/1 token mask: the assumption is
   named in the report), the score reading at each (batch entry, key) is then a function of one
   element of the input, so reading the steps with the input all ones and all zeros covers every
   case: one must read as no mask or top-left causal, the other must mask every score. A float
   input that enters only as an additive term per key, on a block without a mask, is carried as
   it is, provided the term's operand is one function of (batch entry, key) at every query row
   and head, for every value of the input (`_ElementFunctions`): a constant that is not per key
   in the same operand (a causal triangle, ALiBi's bias) would be dropped with it.

The column is computed in the fused graph from the input the model reads: from the input itself
when each (batch entry, key) reads element [b, j] of a (batch, seq) input, else by replaying the
score steps on zero scores at the last query row, which sees every key under a top-left causal
mask with seq_q == seq_k, with the model's own operands sliced there.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto

from fuse_attn.ir import contract
from fuse_attn.ir.builder import NodeBuilder
from fuse_attn.ir.diagonal import Strip
from fuse_attn.ir.evaluator import MAX_CONE_NODES, DependsOnInput, Evaluator, Unprovable
from fuse_attn.ir.graph import DEFAULT_DOMAINS, Node, Value
from fuse_attn.passes._graph import NotFused, describe, is_op, reads_type_only
from fuse_attn.passes.find_attention import ScoreStep
from fuse_attn.passes.masks import MASKED_AT_MOST, ScoreReading, all_masked, read_scores

# Ops whose output element reads each input at the broadcast index: they move no position.
_POSITIONWISE = {"Cast", "CastLike", "Not", "Neg", "Identity", "Abs", "Sign", "Exp", "Log", "Sqrt", "Reciprocal",
                 "Floor", "Ceil", "Round", "Relu", "Sigmoid", "Tanh", "Erf", "IsNaN", "IsInf", "Clip",
                 "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "LessOrEqual", "Greater",
                 "GreaterOrEqual", "And", "Or", "Xor", "Where", "Max", "Min", "BitwiseAnd", "BitwiseOr",
                 "BitwiseXor", "BitwiseNot"}
# Data movement: followed by running the op on the index arrays (its data inputs by position).
_MOVES = {"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose", "Slice", "Gather",
          "GatherND", "GatherElements", "ScatterND", "ScatterElements", "Tile", "Concat"}
_DATA_INPUTS = {"Unsqueeze": (0,), "Squeeze": (0,), "Reshape": (0,), "Flatten": (0,),
                "Expand": (0,), "Transpose": (0,), "Slice": (0,), "Gather": (0,), "GatherND": (0,),
                "GatherElements": (0,), "ScatterND": (0, 2), "ScatterElements": (0, 2), "Tile": (0,)}  # Concat: all
MAX_INDEX_ELEMENTS = 1 << 24
_TO_THE_END = np.iinfo(np.int64).max
_INTEGER_TYPES = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                  TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_SUFFIX = "; if it is always all ones, --assume-no-padding fuses it without the column (unsafe with padded batches)"

# For each graph input a value reads: the flat index of the input element each of its elements
# reads (-1: none, a constant there).
Reads = dict[str, np.ndarray]


def _ones(shape, dtype):
    return np.ones(shape, dtype=dtype)


def _zeros(shape, dtype):
    return np.zeros(shape, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class KeyMask:
    """A proven key mask: what the column is computed from and how."""

    inputs: tuple[str, ...]
    assumption: str | None  # what the proof assumes of the inputs' contents (None: nothing)
    steps: tuple[ScoreStep, ...]  # replayed at the last query row to compute the column
    scores_rank: int
    ranks: tuple[tuple[str, int], ...]  # the rank of each operand the replay reads, by value name
    masked: float = contract.KEY_BIAS_MASKED  # the bias a masked key gets (after scaling)
    dtype: int = TensorProto.FLOAT  # the block's data dtype, the column's
    # A general per-key additive term (carried as it is) instead of a kept/masked key mask.
    general: bool = False
    # A two-valued mask whose (batch entry, key) reads the (batch, seq) input in place: the input
    # value that keeps a key (the column is computed from the input itself); None: replay the steps.
    kept_value: float | None = None


class _Tracer:
    """Which element of each graph input every element of a value reads (`Reads`), or NotFused
    saying which op mixes the input's positions. Data movement (Reshape, Gather, ScatterND, ...) is
    run on the index arrays themselves, so whatever indices the graph computes from shapes are
    followed exactly; position-wise ops must read one element of an input at each position."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.memo: dict[Value, Reads] = evaluator.memo.setdefault(("key mask reads",), {})

    def reads(self, value: Value) -> Reads:
        pending, visited = [value], 0
        while pending:  # inputs first, with an explicit stack (cones may be deep)
            current = pending[-1]
            if current in self.memo:
                pending.pop()
                continue
            missing = [i for i in self._contents(current) if i not in self.memo]
            if missing:
                visited += 1
                if visited > MAX_CONE_NODES:
                    raise NotFused(f"the mask operand '{value.name}' is computed by more than {MAX_CONE_NODES} nodes")
                pending.extend(missing)
                continue
            self.memo[current] = self._reads(current)
            pending.pop()
        return self.memo[value]

    @staticmethod
    def _contents(v: Value) -> list[Value]:
        """The values whose contents `v`'s producer reads (none for a leaf)."""
        node = v.producer()
        if v.is_constant() or v.is_graph_input() or node is None or is_op(node, "Shape", "Size"):
            return []
        return [i for i in node.inputs if i is not None and not reads_type_only(node, i)]

    def _shape(self, v: Value) -> tuple[int, ...]:
        try:
            shape = self.evaluator.shape_of(v)
        except Unprovable as exc:
            raise NotFused(f"cannot prove the shape of the mask operand '{v.name}': {exc}") from None
        if int(np.prod(shape)) > MAX_INDEX_ELEMENTS:
            raise NotFused(f"the mask operand '{v.name}' has {int(np.prod(shape))} elements at the proof's sample "
                           "sizes, too many to follow which input element each reads")
        return shape

    def _reads(self, v: Value) -> Reads:
        if v.is_constant():
            return {}
        if v.is_graph_input():
            if v.is_overridable():
                raise DependsOnInput(v.name, overridable=True)
            shape = self._shape(v)
            return {v.name: np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)}
        node = v.producer()
        if node is None or is_op(node, "Shape", "Size"):
            return {}
        contents = self._contents(v)
        names = sorted({name for i in contents for name in self.memo[i]})
        if not names:
            return {}
        if node.domain not in DEFAULT_DOMAINS:
            raise NotFused(_mixes(names[0], node))
        if node.op_type in _POSITIONWISE:
            return self._positionwise(node, v, contents, names)
        if node.op_type in _MOVES:
            return self._moved(node, v, names)
        raise NotFused(_mixes(names[0], node))

    def _positionwise(self, node: Node, out: Value, contents: list[Value], names: list[str]) -> Reads:
        shape = self._shape(out)
        merged: Reads = {}
        for name in names:
            result = None
            for value in contents:
                index = self.memo[value].get(name)
                if index is None:
                    continue
                index = np.broadcast_to(index, shape)
                if result is None:
                    result = index
                    continue
                if ((index != result) & (index >= 0) & (result >= 0)).any():
                    raise NotFused(f"the mask reads graph input '{name}' at two different positions for one score "
                                   f"(in {describe(node)}: a block-diagonal mask, packed sequences?); the key-bias "
                                   "column carries one term per key" + _SUFFIX)
                result = np.maximum(result, index)
            merged[name] = np.ascontiguousarray(result)
        return merged

    def _moved(self, node: Node, out: Value, names: list[str]) -> Reads:
        result: Reads = {}
        for name in names:
            moved = self.move(node, out, name, lambda value, n=name: self.memo[value].get(n))
            if (moved >= 0).any():
                result[name] = moved
        return result

    def move(self, node: Node, out: Value, name: str, carried) -> np.ndarray:
        """`node`'s data movement run on one int64 array per data input: `carried(value)`, or -1
        (a constant there) for a data input that does not read `name`."""
        data = _DATA_INPUTS.get(node.op_type, range(len(node.inputs)))
        feeds = {}
        for position, value in enumerate(node.inputs):
            if value is None or position in data:
                continue
            if self.memo.get(value):  # indices or a shape read from the input's contents
                raise NotFused(_mixes(name, node))
            try:
                feeds[position] = np.asarray(self.evaluator.value_of(value))
            except Unprovable as exc:
                raise NotFused(f"cannot follow the mask through {describe(node)}: {exc}") from None
        self._shape(out)
        for position in data:
            value = node.inputs[position] if position < len(node.inputs) else None
            if value is None:
                continue
            array = carried(value) if name in self.memo[value] else None
            feeds[position] = array if array is not None else np.full(self._shape(value), -1, np.int64)
        return _run_node(node, feeds, self.evaluator.graph.opset)


class _ElementFunctions:
    """For each element of a value that reads graph input `name`, an id of the function of that
    input element it computes: two elements that read the same input element and carry the same id
    compute the same function of it — the same ops, with equal constants at every step.

    Data movement carries the ids with the elements (run on the id arrays, as on the index
    arrays); a position-wise op gives one new id to each distinct combination, at a position, of
    its operands' ids and the constants they hold there. The ids are exact (interned, never hashed),
    and unique across ops, so elements of two different computations never share one."""

    def __init__(self, tracer: _Tracer, name: str):
        self.tracer, self.name = tracer, name
        # The constants beside the input: with the input all zeros, any contents would do (the
        # elements that read no input element do not depend on them).
        self.constants = tracer.evaluator.with_mask_contents({name: _zeros}).for_masks()
        self.memo: dict[Value, np.ndarray] = {}
        self.next_id = 0

    def _reads(self, value: Value) -> np.ndarray | None:
        return self.tracer.memo[value].get(self.name)

    def of(self, value: Value) -> np.ndarray:
        self.tracer.reads(value)
        pending = [value]
        while pending:  # inputs first, as the tracer goes
            current = pending[-1]
            if current in self.memo:
                pending.pop()
                continue
            missing = [i for i in _Tracer._contents(current) if self._reads(i) is not None and i not in self.memo]
            if missing:
                pending.extend(missing)
                continue
            self.memo[current] = self._ids(current)
            pending.pop()
        return self.memo[value]

    def _fresh(self, count: int) -> int:
        first, self.next_id = self.next_id, self.next_id + count
        return first

    def constant_keys(self, value: Value, shape: tuple[int, ...], at: np.ndarray) -> np.ndarray:
        """`value`'s elements at the positions `at` of `shape`, as exact int64 keys."""
        try:
            array = np.asarray(self.constants.value_of(value))
        except (Unprovable, DependsOnInput) as exc:
            raise NotFused(f"cannot prove what the mask operand '{value.name}' holds beside graph input "
                           f"'{self.name}': {exc}") from None
        array = np.broadcast_to(array, shape)[at]
        if array.dtype.kind == "f" or array.dtype.kind not in "biu":
            return array.astype(np.float64).view(np.int64)  # bits: -0.0 and each NaN are their own
        return array.astype(np.int64)

    def _ids(self, v: Value) -> np.ndarray:
        reads = self._reads(v)
        if v.is_graph_input():
            return np.full(reads.shape, self._fresh(1), np.int64)
        node = v.producer()
        if node.op_type in _MOVES:
            return self.tracer.move(node, v, self.name, lambda value: self.memo[value])
        # position-wise: a new id per distinct (operand ids, constants) at the positions that read
        shape, at = reads.shape, reads >= 0
        keys = []
        for value in _Tracer._contents(v):
            index = self._reads(value)
            if index is None:
                keys.append(self.constant_keys(value, shape, at))
                continue
            index = np.broadcast_to(index, shape)[at]
            ids = np.broadcast_to(self.memo[value], shape)[at]
            reading = index >= 0
            constant = 0 if reading.all() else self.constant_keys(value, shape, at)
            keys += [np.where(reading, ids, -1), np.where(reading, 0, constant)]
        ids = np.full(shape, -1, np.int64)
        if at.any():
            _, inverse = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            ids[at] = inverse + self._fresh(int(inverse.max()) + 1)
        return ids


def _mixes(name: str, node: Node) -> str:
    return (f"the mask reads graph input '{name}' through {describe(node)}, which combines its positions "
            "(cumulative lengths, packed sequences?); the key-bias column carries one term per key" + _SUFFIX)


def _run_node(node: Node, feeds: dict[int, np.ndarray], opset: int) -> np.ndarray:
    """`node`'s first output on `feeds` (by input position), by the ONNX reference runtime."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    names = [f"i{p}" if p in feeds else "" for p in range(len(node.inputs))]
    proto = helper.make_node(node.op_type, names, ["o"])
    proto.attribute.extend(node.proto.attribute)
    graph = helper.make_graph(
        [proto], "move",
        [helper.make_tensor_value_info(f"i{p}", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for p, a in feeds.items()],
        [helper.make_empty_tensor_value_info("o")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset or 18)])
    try:
        (out,) = ReferenceEvaluator(model).run(None, {f"i{p}": a for p, a in feeds.items()})[:1]
    except Exception as exc:  # the reference runtime's own message is the best we have
        raise NotFused(f"cannot follow the mask through {describe(node)}: {type(exc).__name__}: {exc}") from None
    return np.asarray(out, dtype=np.int64)


def _operands(step: ScoreStep) -> list[Value]:
    return [v for v in (step.operand, step.condition) if isinstance(v, Value)]


def input_dependence(steps: tuple[ScoreStep, ...], evaluator: Evaluator) -> list[tuple[ScoreStep, Value, Reads]]:
    """The operands that read graph inputs' contents, with which element each of their elements reads
    (NotFused when an op mixes an input's positions)."""
    tracer = _Tracer(evaluator)
    found = []
    for step in steps:
        for value in _operands(step):
            try:
                reads = tracer.reads(value)
            except DependsOnInput as exc:  # an initializer a caller may replace
                raise NotFused(f"the mask operand '{value.name}' {exc}", step.node) from None
            if reads:
                found.append((step, value, reads))
    return found


def _check_landing(step: ScoreStep, reads: Reads, batch_axis: int | None) -> None:
    """Each operand element must read the input at an index that follows only the scores' batch
    and key axes: the same along the query axis and every head axis."""
    for name, index in reads.items():
        for axis in range(-index.ndim, 0):
            if axis == -1 or axis == batch_axis or (index == index.take([0], axis=axis)).all():
                continue
            if axis == -2:
                raise NotFused(f"the mask from graph input '{name}' varies along the query axis (a query-side mask, "
                               "packed sequences or a block-diagonal mask); the key-bias column carries one term per "
                               "key, the same for every query" + _SUFFIX, step.node)
            if batch_axis is None:
                raise NotFused(f"the mask from graph input '{name}' varies along a score axis that is not the key "
                               "axis, and the block's layout does not say which score axis is the batch" + _SUFFIX,
                               step.node)
            raise NotFused(f"the mask from graph input '{name}' differs between q heads; the key-bias column carries "
                           "one term per batch entry and key, shared by every head" + _SUFFIX, step.node)


def _assumption(name: str, dtype: int) -> str | None:
    if dtype == TensorProto.BOOL:
        return None
    if dtype in _INTEGER_TYPES | _FLOAT_TYPES:
        return f"assumes '{name}' holds only 0 and 1"
    raise NotFused(f"the mask reads graph input '{name}' of type {TensorProto.DataType.Name(dtype).lower()}, "
                   "not a bool or 0/1 token mask" + _SUFFIX)


def _check_replayable(steps: tuple[ScoreStep, ...], seq_q: int, seq_k: int) -> None:
    """Implied operands (the Attention op's causal strip, a -inf fill) must be replayable at the last row."""
    for step in steps:
        for value in (step.operand, step.condition):
            if isinstance(value, Strip):
                if value is step.condition and (value.rows, value.cols) == (seq_q, seq_k):
                    last = np.asarray(value.dense()).reshape(-1, seq_q, seq_k)[:, -1]
                    if (last.astype(bool) == step.scores_when_true).all():
                        continue  # the last row keeps every score: the Where is the identity there
                raise NotFused("the mask's implied causal operand cannot be replayed for the key-bias column",
                               step.node)
            if isinstance(value, np.ndarray) and value.size != 1:
                raise NotFused("the mask's implied operand cannot be replayed for the key-bias column", step.node)


def read_with_key_mask(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int,
                       batch_axis: int | None, scores_rank: int) -> tuple[ScoreReading, KeyMask | None]:
    """The scale and mask of the steps, and the key mask they read from a graph input (None: none).

    `batch_axis` is the scores' batch axis (negative; None when the layout does not tell)."""
    dependent = input_dependence(steps, evaluator)
    if not dependent:
        return read_scores(steps, evaluator, seq_q, seq_k), None
    names = sorted({name for _, _, reads in dependent for name in reads})
    if len(names) > 1:
        raise NotFused(f"the mask reads graph inputs {', '.join(repr(n) for n in names)}; the key-bias column is "
                       "proven for a mask read from one input" + _SUFFIX)
    (name,) = names
    if batch_axis is not None and batch_axis < -scores_rank:
        batch_axis = None
    per_key = None  # the input element each (batch entry, key) reads, over every operand
    for step, _, reads in dependent:
        _check_landing(step, reads, batch_axis)
        index = reads[name]
        for axis in range(-index.ndim, 0):
            if axis not in (-1, batch_axis):
                index = index.take([0], axis=axis)
        index = index.reshape((1,) * (scores_rank - index.ndim) + index.shape)
        if per_key is not None:
            index, per_key = np.broadcast_arrays(index, per_key)
            if ((index != per_key) & (index >= 0) & (per_key >= 0)).any():
                raise NotFused(f"two mask operands read graph input '{name}' at different positions for one score; "
                               "the key-bias column carries one term per key" + _SUFFIX, step.node)
        per_key = index if per_key is None else np.maximum(index, per_key)
    if seq_q != seq_k:
        raise NotFused("a key mask read from an input needs seq_q == seq_k")
    _check_replayable(steps, seq_q, seq_k)
    source = evaluator.graph.value(name)
    assumption = _assumption(name, evaluator.dtype_of(source))
    # Every (batch entry, key) reads one element of the input: its two values are every case.
    readings = {}
    for contents, maker in (("ones", _ones), ("zeros", _zeros)):
        at = evaluator.with_mask_contents({name: maker})
        try:
            readings[contents] = read_scores(steps, at, seq_q, seq_k)
        except NotFused as exc:
            readings[contents] = exc
        if isinstance(readings[contents], NotFused):
            try:
                readings[contents] = "masked" if all_masked(steps, at, seq_q, seq_k) else readings[contents]
            except NotFused:
                pass
    kept = next((c for c in ("ones", "zeros") if isinstance(readings[c], ScoreReading)
                 and readings["zeros" if c == "ones" else "ones"] == "masked"), None)
    ranks = tuple((value.name, len(evaluator.shape_of(value))) for step in steps for value in _operands(step))
    if kept is not None:
        direct = _reads_in_place(per_key, evaluator.shape_of(source))
        return readings[kept], KeyMask((name,), assumption, steps, scores_rank, ranks,
                                       kept_value=(1.0 if kept == "ones" else 0.0) if direct else None)
    general = _general_term(steps, dependent, evaluator, name, batch_axis, seq_q, seq_k)
    if isinstance(general, ScoreReading):
        return general, KeyMask((name,), None, steps, scores_rank, ranks, general=True)
    ones = readings["ones"]
    said = (ones.reason if isinstance(ones, NotFused) else "every score masked" if ones == "masked"
            else "causal" if ones.causal else "no mask")
    raise NotFused(f"the mask from graph input '{name}' is not a key mask: with '{name}' all ones it reads as "
                   f"{said}, and all zeros should then mask every score; nor is it an additive term per key on a "
                   f"block without a mask: {general}" + _SUFFIX)


def _reads_in_place(per_key: np.ndarray, input_shape: tuple[int, ...]) -> bool:
    """Whether (batch entry b, key j) reads element [b, j] of a (batch, seq) input: then a two-valued
    mask's column is computed from the input directly, without the model's mask ops (exact: each
    key is kept where the input holds the kept value)."""
    index = np.squeeze(per_key)
    return (len(input_shape) == 2 and min(input_shape) > 1 and index.shape == tuple(input_shape)
            and np.array_equal(index, np.arange(index.size).reshape(index.shape)))


def _general_term(steps: tuple[ScoreStep, ...], dependent, evaluator: Evaluator, name: str, batch_axis: int | None,
                  seq_q: int, seq_k: int) -> ScoreReading | str:
    """The reading of a block whose input enters only as additive terms, one per (batch entry, key),
    on scores the other steps leave unmasked: softmax(scale·s + P·t(b, j)) with P the factors after
    the term, which the replay at the last row gives as it is. Else why not.

    Every additive term is accounted for: each term operand must be, for every value of the input,
    one function of (batch entry, key) — the same at every query row and head, constants added to it
    included (a causal triangle or ALiBi's bias in the same operand is not) — and the other steps,
    read without the terms, must leave every score unmasked with no bias of their own. Only without
    a mask: a term added to scores a mask removes could bring them back."""
    if any(step.kind not in ("add", "sub") or value is not step.operand for step, value, _ in dependent):
        return f"'{name}' enters the scores other than as an added term"
    functions = _ElementFunctions(_Tracer(evaluator), name)
    for step, value, reads in dependent:
        index, ids = reads[name], functions.of(value)
        reading = index >= 0
        constants = functions.constant_keys(value, index.shape, ~reading) if not reading.all() else None
        keys = np.where(reading, ids, -1)
        if constants is not None:
            keys[~reading] = constants  # a key reading no input element: its constant
        for axis in range(-keys.ndim, 0):
            if axis not in (-1, batch_axis) and not (keys == keys.take([0], axis=axis)).all():
                return (f"the term '{value.name}' added in {describe(step.node)} differs between query rows or heads "
                        f"of one key: it combines '{name}' with constants that do (a causal triangle or a position "
                        "bias in the same operand?)")
    terms = {id(step) for step, _, _ in dependent}
    rest = tuple(dataclasses.replace(s, kind="cast") if id(s) in terms else s for s in steps)
    try:
        reading = read_scores(rest, evaluator, seq_q, seq_k)
    except NotFused as exc:
        return f"without the term from '{name}', {exc.reason}"
    if reading.causal:
        return "the block is causal, and a term added to scores a mask removes could bring them back"
    return reading


# --- the column in the fused graph -------------------------------------------------------------
def _row(nodes: NodeBuilder, value: Value, rank: int, scores_rank: int, batch_axis: int, as_float: bool) -> str:
    """`value` at the last query row and the first of any other axis but batch and key."""
    starts, ends, axes = [], [], []
    for axis in range(-min(rank, scores_rank), 0):
        if axis in (-1, batch_axis):
            continue
        start = -1 if axis == -2 else 0
        starts.append(start)
        ends.append(_TO_THE_END if start == -1 else 1)
        axes.append(axis)
    out = nodes.slice(value.name, starts, ends, axes, "mask_row") if axes else value.name
    return nodes.op("Cast", [out], "mask_row_f", to=TensorProto.FLOAT) if as_float else out


def key_bias_column(nodes: NodeBuilder, key_mask: KeyMask, k: str, scale: float) -> str:
    """The column (b, kv, 1, s) the kernel's k gains: masked/scale where the key is masked, else 0."""
    if key_mask.kept_value is not None:
        return _column_from_input(nodes, key_mask, k, scale)
    rank_of = dict(key_mask.ranks)
    batch_axis = -key_mask.scores_rank

    def row(value: Value, as_float: bool = True) -> str:
        return _row(nodes, value, rank_of[value.name], key_mask.scores_rank, batch_axis, as_float)

    def const(x: float) -> str:
        return nodes.constant(np.array(x, dtype=np.float32), "mask_const")

    z = const(0.0)  # the scores replayed as 0: what remains is the mask
    for step in key_mask.steps:
        if step.kind == "cast":
            continue
        if step.kind == "scale":
            if step.factor is not None:
                z = nodes.op("Mul", [z, const(step.factor)], "mask_z")
            else:
                z = nodes.op("Div" if step.divides else "Mul", [z, row(step.operand)], "mask_z")
        elif step.kind in ("add", "sub"):
            term = row(step.operand) if isinstance(step.operand, Value) else const(float(step.operand))
            z = nodes.op("Add" if step.kind == "add" else "Sub", [z, term], "mask_z")
        elif step.kind == "renorm":
            dropped = nodes.op("Equal", [row(step.operand), const(0.0)], "mask_dropped")
            z = nodes.op("Where", [dropped, const(-1e9), z], "mask_z")
        else:  # where
            if isinstance(step.condition, Strip):
                continue  # keeps every score of the last row (_check_replayable)
            cond = row(step.condition, as_float=False)
            fill = row(step.operand) if isinstance(step.operand, Value) else const(float(np.asarray(step.operand)))
            z = nodes.op("Where", [cond, z, fill] if step.scores_when_true else [cond, fill, z], "mask_z")
    rank = max((r for _, r in key_mask.ranks), default=0)
    if rank < key_mask.scores_rank:
        z = nodes.unsqueeze(z, list(range(key_mask.scores_rank - rank)), "mask_z_rank")
    if key_mask.scores_rank == 3:  # (b, 1, s) -> (b, 1, 1, s)
        z = nodes.unsqueeze(z, [1], "mask_z_4d")
    if key_mask.general:  # the term as it is, a masked one (-inf, say) at the finite masked value
        column = nodes.op("Div", [nodes.op("Max", [z, const(key_mask.masked)], "mask_floor"), const(scale)],
                          "key_bias")
    else:
        kept = nodes.op("Greater", [z, const(MASKED_AT_MOST)], "mask_kept")
        column = nodes.op("Where", [kept, const(0.0), const(key_mask.masked / scale)], "key_bias")
    return _expanded(nodes, nodes.op("Cast", [column], "key_bias_cast", to=key_mask.dtype), k)


def _column_from_input(nodes: NodeBuilder, key_mask: KeyMask, k: str, scale: float) -> str:
    """The column of a two-valued (batch, seq) mask input read in place: 0 where it holds the kept
    value, masked/scale elsewhere."""
    def const(x: float) -> str:
        return nodes.constant(np.array(x, dtype=np.float32), "mask_const")

    (name,) = key_mask.inputs
    mask = nodes.op("Cast", [nodes.unsqueeze(name, [1, 2], "mask_4d")], "mask_f", to=TensorProto.FLOAT)
    kept = nodes.op("Equal", [mask, const(key_mask.kept_value)], "mask_kept")
    column = nodes.op("Where", [kept, const(0.0), const(key_mask.masked / scale)], "key_bias")
    return _expanded(nodes, nodes.op("Cast", [column], "key_bias_cast", to=key_mask.dtype), k)


def _expanded(nodes: NodeBuilder, column: str, k: str) -> str:
    """`column` (b | 1, 1, 1, s | 1) as k's extra row: (b, kv, 1, s)."""
    shape = nodes.concat([nodes.shape(k, 0, 2, "k_bk"), nodes.ints([1], "one"), nodes.shape(k, 3, 4, "k_s")], 0,
                         "key_bias_shape")
    return nodes.op("Expand", [column, shape], "key_bias_column")


def widen(nodes: NodeBuilder, x: str, fill: float, axis: int, dtype: int) -> str:
    """`x` with one more index on `axis` (its last) holding `fill`: q's 1 or v's 0."""
    rank = 4
    parts = [nodes.shape(x, 0, axis, "lead"), nodes.ints([1], "one")]
    if axis < rank - 1:
        parts.append(nodes.shape(x, axis + 1, rank, "tail"))
    shape = nodes.concat(parts, 0, "column_shape")
    value = nodes.op("Cast", [nodes.constant(np.array(fill, dtype=np.float32), "column_fill")], "column_fill_cast",
                     to=dtype)
    return nodes.concat([x, nodes.op("Expand", [value, shape], "column")], axis, "widened")
