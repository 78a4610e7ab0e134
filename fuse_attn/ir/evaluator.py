"""Concrete evaluation of the parts of a graph that depend only on constants and shapes.

The passes prove what a subgraph computes by evaluating it: a mask computed from shapes is
evaluated at a concrete binding of the symbolic dims and compared with the causal pattern;
a Reshape target computed from `Shape(x)` is evaluated the same way. A value that depends on
the *contents* of a graph input (a padding mask, say) is never guessed: it raises
`DependsOnInput`, unless the caller declared that input's contents (e.g. all ones).
Shapes the model does not declare are inferred node by node (ONNX's own per-op inference on
concrete input shapes and evaluated shape operands), never invented.

One concern per module: the sample sizes of the free dims and their ties (`symbols`), shape
inference (`shape_inference`), cone evaluation (`cone`); the Evaluator here holds one binding
and the state they share, and words sample sizes in the model's own dims (`model_dims`).
"""

from __future__ import annotations

import numpy as np

from fuse_attn.ir import dim_expr
from fuse_attn.ir.cone import MAX_CONE_NODES, ConeEvaluation
from fuse_attn.ir.graph import Graph, Value
from fuse_attn.ir.shape_inference import ShapeConflict, ShapeInference
from fuse_attn.ir.symbols import (BATCH_SAMPLE, FIRST_SEQ_SAMPLE, MAX_TIES, cap_of, explain_conflict,
                                  first_conflict, runs_past, sample_binding, slices_a_fixed_table, tie)
from fuse_attn.ir.unprovable import DependsOnInput, Unprovable

# What the passes import with the Evaluator.
__all__ = ["Evaluator", "Unprovable", "DependsOnInput", "ShapeConflict", "MAX_CONE_NODES", "FIRST_SEQ_SAMPLE",
           "sample_binding", "dims_text"]


def dims_text(dims: tuple[str, ...]) -> str:
    """A shape as `Evaluator.model_dims` words it: ('batch_size', 12, 'sequence_length', 64)."""
    return f"({', '.join(dims)})"


class Evaluator(ShapeInference, ConeEvaluation):
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
        evaluator = cls(graph, tie(binding, ties or {}), declared_inputs, ties, caps)
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
        limited = slices_a_fixed_table(graph)
        while True:
            evaluator = new(caps)
            evaluator.limited = limited
            found = first_conflict(evaluator, probes)
            varied = evaluator.varied()
            if found is None and not limited:
                return evaluator
            if found is None:  # the second sample must run too: a limit between the two shows there
                found = first_conflict(varied, probes)
                if found is None:
                    return evaluator
                cap = cap_of(found[0].pairs, varied.binding, ties, caps)
                if cap is None or len(ties) + len(caps) >= MAX_TIES:
                    return evaluator
                trial = new({**caps, cap[0]: cap[1]})
                if not (runs_past(trial, found[1], found[0]) and runs_past(trial.varied(), found[1], found[0])):
                    return evaluator
                caps[cap[0]] = cap[1]
                continue
            conflict, probe = found
            if len(ties) + len(caps) >= MAX_TIES:
                return evaluator
            cap = cap_of(conflict.pairs, evaluator.binding, ties, caps)
            if cap is not None and runs_past(new({**caps, cap[0]: cap[1]}), probe, conflict):
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
            tie = explain_conflict(conflict.pairs, moved_pairs, evaluator.binding, varied.binding, ties)
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
            found = first_conflict(other, self.probes)
            cap = None if found is None else cap_of(found[0].pairs, other.binding, self.ties, self.caps)
            if cap is None:
                break
            trial = self._bound_at(seq, {**self.caps, cap[0]: cap[1]})
            if not runs_past(trial, found[1], found[0]):
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
            self._varied = Evaluator(self.graph, tie(moved, self.ties), self.declared_inputs, self.ties, self.caps)
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
