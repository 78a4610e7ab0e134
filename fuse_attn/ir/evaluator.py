"""Concrete evaluation of the parts of a graph that depend only on constants and shapes.

The passes prove what a subgraph computes by evaluating it: a mask computed from shapes is
evaluated at a concrete binding of the symbolic dims and compared with the causal pattern;
a Reshape target computed from `Shape(x)` is evaluated the same way. A value that depends on
the *contents* of a graph input (a padding mask, say) is never guessed: it raises
`DependsOnInput`, unless the caller declared that input's contents (e.g. all ones).
Shapes the model does not declare are inferred node by node (ONNX's own per-op inference on
concrete input shapes and evaluated shape operands), never invented.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fuse_attn.ir import contract, dim_expr
from fuse_attn.ir.graph import DEFAULT_DOMAINS, Graph, Node, Value

# A cone this large is real computation, not mask or shape plumbing; refusing keeps proofs cheap.
MAX_CONE_NODES = 400
# Masks and biases read small tables (a causal buffer, a position-bias embedding); a cone that
# needs more than this is computing with weights, and reading them is what the pass avoids.
MAX_CONE_CONSTANT_ELEMENTS = 16 << 20
MAX_SHAPE_WALK = 200_000
# Sizes a model declares or computes are data, not allocations to make: a cone whose values would
# exceed these (a ConstantOfShape of [10⁶, 10⁶], a Range to 10¹⁰, an input declared that large) is
# refused before it runs. Above any mask or shape a proof evaluates (masks are evaluated whole up
# to 4096², strips beyond).
MAX_VALUE_ELEMENTS = 1 << 28
MAX_CONE_ELEMENTS = 1 << 29
_CACHE_AT_MOST = 1 << 16  # elements: intermediate values larger than this are not kept


# Ops whose first output has exactly the type and shape of their first input.
_SAME_TYPE_AS_INPUT = {"Dropout", "Identity", "Softmax", "LogSoftmax", "Relu", "Erf", "Tanh", "Sigmoid",
                       "Neg", "Sqrt", "Exp", "Abs", "LayerNormalization"}


# Element-wise ops whose output shape is the multidirectional broadcast of their inputs.
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "LessOrEqual", "Greater",
                 "GreaterOrEqual", "And", "Or", "Xor", "Where", "Max", "Min", "Sum", "Mean"}


class Unprovable(Exception):
    """The value cannot be evaluated from constants and shapes; the message says why."""


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


class DependsOnInput(Unprovable):
    def __init__(self, input_name: str, overridable: bool = False):
        super().__init__(overridable_reason(input_name) if overridable
                         else f"depends on the contents of graph input '{input_name}'")
        self.input_name = input_name
        self.overridable = overridable


def overridable_reason(name: str) -> str:
    return (f"depends on initializer '{name}', which is also a graph input: a caller may replace it "
            "(pass --freeze-initializer-inputs to read it as the constant it holds)")


def _is_shape_op(node: Node) -> bool:
    return node.domain in DEFAULT_DOMAINS and node.op_type in ("Shape", "Size")


def _contents_read(node: Node) -> list[Value]:
    """The inputs whose contents `node` reads: CastLike takes only the type of its second."""
    if node.op_type == "CastLike" and node.domain in DEFAULT_DOMAINS:
        return node.inputs[:1]
    return [v for v in node.inputs if v is not None]


# A Slice start or end this far out is clamped to the dim for every tensor a proof can handle: "to the
# end" (TorchScript writes INT64_MAX, tf2onnx 1e9).
TO_THE_END = 10**9

BATCH_SAMPLE = 2
# Symbolic seq lengths are proven at this size (one distinct size per symbol, so that two
# symbols never look equal by accident), and masks again past their constants (see plan).
FIRST_SEQ_SAMPLE, SEQ_SAMPLE_STEP = 96, 8


def sample_binding(graph: Graph, seq: int = FIRST_SEQ_SAMPLE, caps: dict[str, int] | None = None,
                   *, below_caps: bool = False) -> dict[str, int]:
    """A concrete size for every free symbolic dim: those of the graph inputs (axis 0 is batch).

    Symbols that only intermediate values carry (shape inference's `unk__N`) are not free:
    the evaluator infers them from the inputs instead of inventing a size. `caps`: the largest
    size the graph admits for a symbol (`_cap_of`); a size is taken at most there, and with
    `below_caps` below it, leaving room for a second, larger sample (`Evaluator.varied`).
    """
    binding: dict[str, int] = {}
    others = 0
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if not isinstance(dim, str):
                continue
            # A dim written as arithmetic ('past_sequence_length + sequence_length') is not free
            # itself: its symbols are, and it follows from them.
            for symbol in dim_expr.parse(dim).symbols:
                if symbol in binding:
                    continue
                if axis == 0:
                    size, room = BATCH_SAMPLE, 1
                else:
                    size, room = seq + SEQ_SAMPLE_STEP * others, 1 + SEQ_SAMPLE_STEP * others
                    others += 1
                cap = (caps or {}).get(symbol)
                if cap is not None:
                    size = max(1, min(size, cap - room if below_caps else cap))
                binding[symbol] = size
    return binding


def dims_text(dims: tuple[str, ...]) -> str:
    """A shape as `Evaluator.model_dims` words it: ('batch_size', 12, 'sequence_length', 64)."""
    return f"({', '.join(dims)})"


MAX_TIES = 16


def _tie(binding: dict[str, int], ties: dict[str, str | int]) -> dict[str, int]:
    """`binding` with each tied symbol bound like its partner (a symbol) or to its size (an int)."""
    out = dict(binding)
    for symbol, partner in ties.items():
        out[symbol] = partner if isinstance(partner, int) else out[partner]
    return out


def _free_symbols_by_size(binding: dict[str, int], ties: dict) -> dict[int, list[str]]:
    """The symbols no tie fixes, by their sample size."""
    owners: dict[int, list[str]] = {}
    for symbol, size in binding.items():
        if symbol not in ties:
            owners.setdefault(size, []).append(symbol)
    return owners


def _cap_of(pairs, binding: dict[str, int], ties: dict, caps: dict[str, int]) -> tuple[str, int] | None:
    """A size limit that explains a conflict: a free symbol's sample against a smaller size no
    symbol has (a fixed extent), as where a seq slices a fixed table that stops short of it
    (CLIP's `position_ids = buffer[:, :seq]` of 128 rows, added to seq token embeddings). The
    caller checks the limit: below it the conflict must be gone (else the graph ties the symbol
    to that size, which `_explain` finds)."""
    owners = _free_symbols_by_size(binding, ties)
    for a, b in pairs:
        fixed, sample = sorted((a, b))
        symbols = owners.get(sample, [])
        if len(symbols) == 1 and fixed >= 1 and fixed not in owners and fixed < caps.get(symbols[0], sample + 1):
            return symbols[0], fixed
    return None


def _slices_a_fixed_table(graph: Graph) -> bool:
    """Whether a Slice cuts a constant table at bounds computed in the graph (CLIP's
    `position_ids = buffer[:, :seq]`): what makes a graph run only up to a fixed size."""
    return any(node.op_type == "Slice" and node.domain in DEFAULT_DOMAINS and node.inputs[0] is not None
               and node.inputs[0].is_constant()
               and any(v is not None and not v.is_constant() for v in node.inputs[1:3])
               for node in graph.all_nodes())


def _first_conflict(evaluator: "Evaluator", probes: list[Value]) -> tuple[ShapeConflict, Value] | None:
    for value in probes:
        try:
            evaluator.shape_of(value)
        except ShapeConflict as exc:
            return exc, value
        except Unprovable:
            continue
    return None


def _runs_past(evaluator: "Evaluator", probe: Value, conflict: ShapeConflict) -> bool:
    """Whether `probe`'s shape infers under `evaluator` without the same conflict again."""
    try:
        evaluator.shape_of(probe)
    except ShapeConflict as exc:
        return exc.node is not conflict.node
    except Unprovable:
        return True
    return True


def _explain(pairs, moved_pairs, binding: dict[str, int], moved: dict[str, int], ties: dict) -> tuple[str, str | int] | None:
    """A tie that resolves one of the conflicting size pairs, seen the same way with every
    symbol moved: a free symbol made equal to the other free symbol, or to the fixed size the
    graph puts against it. Sizes shared by several symbols (batch) are never tied."""
    owners = _free_symbols_by_size(binding, ties)
    moved_pairs = {frozenset(p) for p in moved_pairs}
    for a, b in pairs:
        sa, sb = owners.get(a, []), owners.get(b, [])
        if len(sa) > 1 or len(sb) > 1:
            continue
        if sa and sb and frozenset((moved[sa[0]], moved[sb[0]])) in moved_pairs:
            return sb[0], sa[0]
        if sa and not sb and frozenset((moved[sa[0]], b)) in moved_pairs:
            return sa[0], b
        if sb and not sa and frozenset((moved[sb[0]], a)) in moved_pairs:
            return sb[0], a
    return None


class Evaluator:
    """Evaluates values of one graph under one binding of symbolic dims to integers.

    `declared_inputs` maps graph-input names to contents the user vouched for; they are
    built at the input's concrete shape with `declared_inputs[name](shape, numpy_dtype)`.
    """

    @classmethod
    def for_graph(cls, graph: Graph, declared_inputs=None, seq: int = FIRST_SEQ_SAMPLE,
                  ties: dict[str, str | int] | None = None, *, mask_inputs=None,
                  caps: dict[str, int] | None = None, below_caps: bool = False) -> "Evaluator":
        """An evaluator with every free seq symbol at `seq` (and up), at most where `caps` limit
        it (`below_caps`: below the limit, leaving room for `varied`)."""
        caps = {} if caps is None else caps
        binding = sample_binding(graph, seq, caps, below_caps=below_caps)
        evaluator = cls(graph, _tie(binding, ties or {}), declared_inputs, ties, caps)
        evaluator.mask_inputs = mask_inputs or {}
        return evaluator

    @classmethod
    def tied_for_graph(cls, graph: Graph, declared_inputs, probes: list[Value], *, mask_inputs=None) -> "Evaluator":
        """An evaluator whose free symbols are tied where the graph ties them: distinct sample
        sizes that the graph cannot run with (a MatMul or broadcast between two free dims, or a
        free dim against a fixed one, say an unnamed hidden dim) are made equal, and the shapes
        of `probes` inferred again, until they infer or no tie explains the conflict. A symbol
        the graph admits only up to a fixed size (a seq slicing a fixed position table) is
        sampled at or below it (`caps`), here and at `varied` and `at_seq`."""
        ties: dict[str, str | int] = {}
        caps: dict[str, int] = {}

        def new(with_caps):
            evaluator = cls.for_graph(graph, declared_inputs, ties=ties, mask_inputs=mask_inputs, caps=with_caps,
                                      below_caps=True)
            evaluator.probes = probes
            return evaluator

        # Whether a limit may lie between the two samples: the second is then checked to run (a
        # walk of the whole graph, which graphs without such a table do not pay).
        limited = _slices_a_fixed_table(graph)
        while True:
            evaluator = new(caps)
            evaluator.limited = limited
            found = _first_conflict(evaluator, probes)
            varied = evaluator.varied()
            if found is None and not limited:
                return evaluator
            if found is None:  # the second sample must run too: a limit between the two shows there
                found = _first_conflict(varied, probes)
                if found is None:
                    return evaluator
                cap = _cap_of(found[0].pairs, varied.binding, ties, caps)
                if cap is None or len(ties) + len(caps) >= MAX_TIES:
                    return evaluator
                trial = new({**caps, cap[0]: cap[1]})
                if not (_runs_past(trial, found[1], found[0]) and _runs_past(trial.varied(), found[1], found[0])):
                    return evaluator
                caps[cap[0]] = cap[1]
                continue
            conflict, probe = found
            if len(ties) + len(caps) >= MAX_TIES:
                return evaluator
            cap = _cap_of(conflict.pairs, evaluator.binding, ties, caps)
            if cap is not None and _runs_past(new({**caps, cap[0]: cap[1]}), probe, conflict):
                caps[cap[0]] = cap[1]
                continue
            # The same conflict with every symbol moved tells which sizes follow which symbol
            # (a size computed from the samples moves; a size the graph fixes does not).
            try:
                varied.shape_of(probe)
                return evaluator
            except ShapeConflict as exc:
                if exc.node is not conflict.node:
                    return evaluator
                moved_pairs = exc.pairs
            except Unprovable:
                return evaluator
            tie = _explain(conflict.pairs, moved_pairs, evaluator.binding, varied.binding, ties)
            if tie is None:
                return evaluator
            ties[tie[0]] = tie[1]

    def at_seq(self, seq: int) -> "Evaluator":
        """The same graph with its symbolic seq lengths bound to `seq` (and up); one per seq. A
        symbol the graph admits only up to a known limit (`caps`) is bound at most there."""
        if seq not in self._rebound:
            self._rebound[seq] = self._bound_at(seq, self.caps)
        return self._rebound[seq]

    def admitted_at_seq(self, seq: int) -> "Evaluator | None":
        """After a proof failed at `at_seq(seq)`: if that binding is past a limit the graph puts
        on a symbol (found as in `tied_for_graph`, from every probe's shape), the evaluator at
        the limit — it replaces `at_seq(seq)`, and the limit holds for every later binding —
        else None. Only on failure, and only in a graph that may have a limit (`limited`): probing
        walks the whole graph at that binding."""
        if not self.limited:
            return None
        other, found_any = self.at_seq(seq), False
        for _ in range(MAX_TIES):
            found = _first_conflict(other, self.probes)
            cap = None if found is None else _cap_of(found[0].pairs, other.binding, self.ties, self.caps)
            if cap is None:
                break
            trial = self._bound_at(seq, {**self.caps, cap[0]: cap[1]})
            if not _runs_past(trial, found[1], found[0]):
                break
            self.caps[cap[0]] = cap[1]
            other, found_any = trial, True
        if not found_any:
            return None
        self._rebound[seq] = other
        return other

    def _bound_at(self, seq: int, caps: dict[str, int]) -> "Evaluator":
        other = Evaluator.for_graph(self.graph, self.declared_inputs, seq, self.ties, mask_inputs=self.mask_inputs,
                                    caps=caps)
        other.declared_used = self.declared_used
        return other

    def for_masks(self) -> "Evaluator":
        """The evaluator of mask and bias operands: this binding, plus the inputs whose contents the
        user vouched for (`mask_inputs`, --assume-no-padding). Nothing else a proof reads may use
        them: a token-id input read for a Reshape is not all ones."""
        if not self.mask_inputs:
            return self
        if self._for_masks is None:
            self._for_masks = Evaluator(self.graph, self.binding, {**self.declared_inputs, **self.mask_inputs},
                                        self.ties, self.caps)
            self._for_masks.declared_used = self.declared_used
        return self._for_masks

    def with_mask_contents(self, contents: dict) -> "Evaluator":
        """This binding with the mask inputs `contents` ({name: maker}) in place of `mask_inputs`:
        a proof's own exhaustive cases (a 0/1 mask all ones, all zeros), not an assumption, so
        what it reads is not counted in `declared_used`. Shapes already inferred are kept (they
        never depend on an input's contents: such a shape raised DependsOnInput instead)."""
        key = tuple(sorted((name, id(maker)) for name, maker in contents.items()))
        if key not in self._with_contents:
            other = Evaluator(self.graph, self.binding, self.declared_inputs, self.ties)
            other._types = dict(self._types)
            other.mask_inputs = dict(contents)
            self._with_contents[key] = other
        return self._with_contents[key]

    def varied(self) -> "Evaluator":
        """The same graph with every free symbol, batch included, bound to another size: a dim
        that comes out equal under both evaluators is fixed by the graph."""
        if self._varied is None:
            moved = {k: v * 2 if v == BATCH_SAMPLE else v + 64 for k, v in self.binding.items()}
            moved = {k: min(v, self.caps.get(k, v)) for k, v in moved.items()}
            self._varied = Evaluator(self.graph, _tie(moved, self.ties), self.declared_inputs, self.ties, self.caps)
            self._varied.declared_used = self.declared_used
            self._varied.mask_inputs = self.mask_inputs
        return self._varied

    def __init__(self, graph: Graph, binding: dict[str, int], declared_inputs=None,
                 ties: dict[str, str | int] | None = None, caps: dict[str, int] | None = None):
        self.graph = graph
        self.ties = ties or {}
        # The largest size the graph admits for a free symbol, where it has one (shared by the
        # evaluators of one graph: found at one binding, it holds at all of them).
        self.caps = {} if caps is None else caps
        self.probes: list[Value] = []  # values whose shapes show a binding the graph cannot run
        self.limited = False  # whether the graph slices a fixed table by a computed bound (a seq limit)
        self.binding = binding
        self._dim_expressions: dict[str, int | None] = {}
        self.declared_inputs = declared_inputs or {}
        self._cache: dict[Value, np.ndarray] = {}
        self._types: dict[Value, tuple[int, tuple[int, ...]]] = {}
        self._opset = graph.opset or 18
        self.declared_used: set[str] = set()
        # Proofs keyed by what they depend on: layers that repeat a structure are proven once.
        self.memo: dict[object, object] = {}
        self._rebound: dict[int, Evaluator] = {}
        self._varied: Evaluator | None = None
        self.mask_inputs: dict = {}  # see `for_masks`
        self._with_contents: dict[tuple, Evaluator] = {}
        self._for_masks: Evaluator | None = None

    # --- the model's words for sample sizes ------------------------------------------------
    def model_dims(self, sizes: tuple[int, ...], moved: tuple[int, ...] | None = None) -> tuple[str, ...]:
        """Sizes a proof found at this binding, as a reason should quote them: a size the graph
        fixes as its number, one that follows the free dims by their name or expression
        ('past_sequence_length + sequence_length'), else "symbolic". `moved` are the same sizes
        at `varied()` (None when they could not be found there): a size that stays is fixed."""
        if not self.binding:
            return tuple(map(str, sizes))
        return tuple(self._model_dim(size, again) for size, again in zip(sizes, moved or (None,) * len(sizes)))

    def _model_dim(self, size: int, again: int | None) -> str:
        if again == size:
            return str(size)
        varied = self.varied()
        free = [s for s in self.binding if s not in self.ties]
        # The graph's own spellings first: free symbols, then the expressions its inputs and outputs declare.
        declared = dict.fromkeys(d for v in (*self.graph.inputs, *self.graph.outputs) for d in (v.shape or ())
                                 if isinstance(d, str) and not dim_expr.parse(d).is_symbol)
        tiers = [free, list(declared),
                 # Then what exporters compute from them: a sum of two (past + new tokens), a multiple (batch · heads).
                 [f"{a} + {b}" for i, a in enumerate(free) for b in free[i + 1:]],
                 [f"{size // self.binding[s]}*{s}" for s in free if size % self.binding[s] == 0 and size > self.binding[s]]]
        for tier in tiers if again is not None else tiers[:2]:  # unchecked: only the graph's own spellings
            matches = [c for c in tier if dim_expr.parse(c).evaluate(self.binding) == size
                       and (again is None or dim_expr.parse(c).evaluate(varied.binding) == again)]
            if matches:
                # Two symbols alike at both bindings (a batch dim under two names) cannot be told apart.
                return f"'{matches[0]}'" if len(matches) == 1 or again is None else "symbolic"
        return str(size) if again is None else "symbolic"

    # --- shapes and dtypes ----------------------------------------------------------------
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

    # --- values ---------------------------------------------------------------------------
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
