"""Binding the free symbolic dims to sample sizes: one distinct size per symbol, so two symbols
never look equal by accident; ties where the graph makes two symbols (or a symbol and a fixed
size) equal, and caps where it admits a symbol only up to a fixed size (`Evaluator.tied_for_graph`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuse_attn.ir import dim_expr
from fuse_attn.ir.graph import DEFAULT_DOMAINS, Graph, Value
from fuse_attn.ir.shape_inference import ShapeConflict
from fuse_attn.ir.unprovable import Unprovable

if TYPE_CHECKING:
    from fuse_attn.ir.evaluator import Evaluator

BATCH_SAMPLE = 2
# Symbolic seq lengths are proven at this size (one distinct size per symbol, so that two
# symbols never look equal by accident), and masks again past their constants (see plan).
FIRST_SEQ_SAMPLE, SEQ_SAMPLE_STEP = 96, 8


def sample_binding(graph: Graph, seq: int = FIRST_SEQ_SAMPLE, caps: dict[str, int] | None = None,
                   *, below_caps: bool = False) -> dict[str, int]:
    """A concrete size for every free symbolic dim: those of the graph inputs (axis 0 is batch).

    Symbols that only intermediate values carry (shape inference's `unk__N`) are not free:
    the evaluator infers them from the inputs instead of inventing a size. `caps`: the largest
    size the graph admits for a symbol (`cap_of`); a size is taken at most there, and with
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


MAX_TIES = 16


def tie(binding: dict[str, int], ties: dict[str, str | int]) -> dict[str, int]:
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


def cap_of(pairs, binding: dict[str, int], ties: dict, caps: dict[str, int]) -> tuple[str, int] | None:
    """A size limit that explains a conflict: a free symbol's sample against a smaller size no
    symbol has (a fixed extent), as where a seq slices a fixed table that stops short of it
    (CLIP's `position_ids = buffer[:, :seq]` of 128 rows, added to seq token embeddings). The
    caller checks the limit: below it the conflict must be gone (else the graph ties the symbol
    to that size, which `explain_conflict` finds)."""
    owners = _free_symbols_by_size(binding, ties)
    for a, b in pairs:
        fixed, sample = sorted((a, b))
        symbols = owners.get(sample, [])
        if len(symbols) == 1 and fixed >= 1 and fixed not in owners and fixed < caps.get(symbols[0], sample + 1):
            return symbols[0], fixed
    return None


def slices_a_fixed_table(graph: Graph) -> bool:
    """Whether a Slice cuts a constant table at bounds computed in the graph (CLIP's
    `position_ids = buffer[:, :seq]`): what makes a graph run only up to a fixed size."""
    return any(node.op_type == "Slice" and node.domain in DEFAULT_DOMAINS and node.inputs[0] is not None
               and node.inputs[0].is_constant()
               and any(v is not None and not v.is_constant() for v in node.inputs[1:3])
               for node in graph.all_nodes())


def first_conflict(evaluator: "Evaluator", probes: list[Value]) -> tuple[ShapeConflict, Value] | None:
    for value in probes:
        try:
            evaluator.shape_of(value)
        except ShapeConflict as exc:
            return exc, value
        except Unprovable:
            continue
    return None


def runs_past(evaluator: "Evaluator", probe: Value, conflict: ShapeConflict) -> bool:
    """Whether `probe`'s shape infers under `evaluator` without the same conflict again."""
    try:
        evaluator.shape_of(probe)
    except ShapeConflict as exc:
        return exc.node is not conflict.node
    except Unprovable:
        return True
    return True


def explain_conflict(pairs, moved_pairs, binding: dict[str, int], moved: dict[str, int], ties: dict) -> tuple[str, str | int] | None:
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
