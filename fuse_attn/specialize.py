"""`--shape NAME=DIMS` and `--dim SYMBOL=N`: fix a model's input shapes or named dims.

Shared by `fuse-attn` and `fuse-attn check` (fix dims before proving: a KV-cache decoder
specialized to `past_sequence_length=0` is its prefill) and `fuse-attn compile` (fix every dim
before tracing).
A symbol bound here is replaced by its value wherever the model declares it — inputs, outputs,
intermediate shapes, inside subgraphs, and inside dims written as expressions
(`past_sequence_length + sequence_length`) — so that the specialized model says what it accepts.
"""

from __future__ import annotations

import dataclasses

import onnx

from fuse_attn.ir import dim_expr


class ShapeError(ValueError):
    """A shape or dim that cannot be fixed; the message names the input and what to pass."""


def parse_shape_args(args: list[str], *, allow_zero: bool = False) -> dict[str, tuple[int, ...]]:
    """`["input_ids=1x2048", ...]` -> {"input_ids": (1, 2048)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    least = 0 if allow_zero else 1
    for arg in args:
        name, sep, dims = arg.partition("=")
        try:
            if not (sep and name and dims):
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if any(d < least for d in shape):
                raise ValueError
        except ValueError:
            kind = "non-negative" if allow_zero else "positive"
            raise ShapeError(f"--shape {arg!r}: expected NAME=DxDx... with {kind} dims, e.g. input_ids=1x2048") from None
        shapes[name] = shape
    return shapes


def parse_dim_args(args: list[str]) -> dict[str, int]:
    """`["past_sequence_length=0", ...]` -> {"past_sequence_length": 0}."""
    dims: dict[str, int] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        try:
            if not (sep and name):
                raise ValueError
            number = int(value)
            if number < 0:
                raise ValueError
        except ValueError:
            raise ShapeError(f"--dim {arg!r}: expected SYMBOL=N with N >= 0, e.g. past_sequence_length=0") from None
        dims[name] = number
    return dims


def _names(expression: str) -> set[str]:
    """The symbols a dim_param uses: itself, or the names of an arithmetic expression."""
    return set(dim_expr.parse(expression).symbols)


def _substitute(expression: str, values: dict[str, int]) -> int | str:
    """`expression` with bound symbols replaced: an int when nothing free is left."""
    try:
        return dim_expr.parse(expression).substitute(values)
    except ValueError:
        raise ShapeError(f"dim {expression!r} has no size with {values}") from None


@dataclasses.dataclass
class Specialization:
    """What was fixed, for the report."""

    symbols: dict[str, int]
    shapes: dict[str, tuple[int, ...]]

    def lines(self) -> list[str]:
        out = [f"input '{name}' has shape {'x'.join(map(str, shape))} (--shape)" for name, shape in self.shapes.items()]
        out += [f"{name} = {value}" for name, value in self.symbols.items()]
        return out


def _value_infos(graph: onnx.GraphProto):
    yield from graph.input
    yield from graph.output
    yield from graph.value_info
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.HasField("g") else attr.graphs):
                yield from _value_infos(body)


def _inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (not the initializers also listed as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in initializers}


def _input_symbols(inputs: dict[str, onnx.ValueInfoProto]) -> set[str]:
    return {s for i in inputs.values() for d in i.type.tensor_type.shape.dim if d.dim_param for s in _names(d.dim_param)}


def applicable(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
               dims: dict[str, int]) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """The `shapes` naming an input of `model` and the `dims` naming a symbol of its inputs: what
    `fuse-attn check` applies to each model of a folder where not every model has them."""
    inputs = _inputs(model)
    symbols = _input_symbols(inputs)
    return ({n: s for n, s in shapes.items() if n in inputs}, {n: v for n, v in dims.items() if n in symbols})


def specialize(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], dims: dict[str, int]) -> Specialization:
    """Fix `shapes` (by input name) and `dims` (by symbol) in `model`, in place."""
    inputs = _inputs(model)
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ShapeError(f"--shape names {', '.join(unknown)}, not inputs of the model (inputs: {', '.join(inputs)})")
    declared = _input_symbols(inputs)
    missing = sorted(set(dims) - declared)
    if missing:
        raise ShapeError(f"--dim names {', '.join(missing)}, not a symbolic dim of the model's inputs "
                         f"(symbols: {', '.join(sorted(declared)) or 'none'})")
    symbols = dict(dims)
    fixed_unnamed: dict[tuple[str, int], int] = {}
    expressions: list[tuple[str, int, str, int]] = []  # (input, axis, dim expression, size given)
    for name, shape in shapes.items():
        input_dims = inputs[name].type.tensor_type.shape.dim
        if len(input_dims) != len(shape):
            raise ShapeError(f"--shape {name}: the input has rank {len(input_dims)}, got {len(shape)} dims {shape}")
        for i, (dim, value) in enumerate(zip(input_dims, shape)):
            if dim.HasField("dim_value"):
                if dim.dim_value != value:
                    raise ShapeError(f"--shape {name}: dim {i} is fixed at {dim.dim_value} in the model, got {value}")
            elif dim.dim_param and dim_expr.parse(dim.dim_param).is_symbol:
                if symbols.setdefault(dim.dim_param, value) != value:
                    raise ShapeError(f"--shape {name}: dim {dim.dim_param!r} is already bound to "
                                     f"{symbols[dim.dim_param]}, got {value}")
            elif dim.dim_param:
                expressions.append((name, i, dim.dim_param, value))
            else:
                fixed_unnamed[(name, i)] = value
    for name, i, expression, value in expressions:  # once every --shape has bound its plain symbols
        if _substitute(expression, symbols) != value:
            raise ShapeError(f"--shape {name}: dim {i} is {expression!r}; fix its symbols with --dim")
    for (name, i), value in fixed_unnamed.items():
        inputs[name].type.tensor_type.shape.dim[i].dim_value = value
    for info in _value_infos(model.graph):
        if not info.type.HasField("tensor_type"):
            continue
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param:
                bound = _substitute(dim.dim_param, symbols)
                if isinstance(bound, int):
                    if bound < 0:
                        raise ShapeError(f"dim {dim.dim_param!r} would be {bound} with {symbols}")
                    dim.Clear()
                    dim.dim_value = bound
                elif bound != dim.dim_param:
                    dim.dim_param = bound
    return Specialization(symbols, dict(shapes))
