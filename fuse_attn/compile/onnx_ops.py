"""ONNX ops as torch functions whose shape-like arguments are Python constants.

Each rule sees one node at lowering time, with its inputs as `Arg`s: the shape and dtype of
every input (compile fixes all input shapes) and the contents of those known then (initializers,
Constant nodes, anything folded from them and from shapes). It returns `(fn, runtime_args)`:
`fn` takes the runtime args' tensors and returns the node's output (a tuple for several). Every
shape, axis, index list or repeat count an op needs is read here, once, into a Python constant,
so `fn` only ever calls tensor ops: no `.item()`, `.tolist()`, `bool(tensor)` or numpy at run
time, which torch-xla (torch_neuronx.trace) would turn into host reads in the middle of a trace.
A rule whose shape argument is only known at run time raises `NotStatic`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

TORCH_DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}


class LoweringError(ValueError):
    """A node the lowering cannot turn into tensor ops; the message names it and why."""


class NotStatic(LoweringError):
    """A shape-like input whose contents are only known at run time."""


# A table a rule builds at lowering (indices, weights, masks) from sizes the model declares is
# refused past this: a model file does not get to make compile allocate without bound.
MAX_TABLE_ELEMENTS = 1 << 26


def bounded(what: str, elements: int) -> int:
    if elements > MAX_TABLE_ELEMENTS:
        raise LoweringError(f"{what} would hold {elements} elements at lowering (at most {MAX_TABLE_ELEMENTS})")
    return elements


def torch_dtype(elem_type: int) -> torch.dtype:
    if elem_type not in TORCH_DTYPES:
        raise LoweringError(f"tensors of type {TensorProto.DataType.Name(elem_type).lower()} are not supported")
    return TORCH_DTYPES[elem_type]


def array_to_torch(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor holding `array`. bfloat16 (ml_dtypes, what onnx gives) goes through its bits:
    torch.from_numpy and torch.tensor reject ml_dtypes.bfloat16."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def tensor_proto_to_torch(tensor: onnx.TensorProto) -> torch.Tensor:
    dtype = torch_dtype(tensor.data_type)  # a type torch lacks (float8, int4) is refused before it is read
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == TensorProto.BFLOAT16 and array.dtype == np.uint16:  # older onnx: raw bits
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return array_to_torch(array).to(dtype)


@dataclasses.dataclass
class Arg:
    """A node input at lowering time: its shape and dtype (a meta tensor), and its contents when
    they are known before run time (`value`, a CPU tensor)."""

    name: str | None  # None: a constant a rule made (a buffer of the module)
    meta: torch.Tensor
    value: torch.Tensor | None = None

    @staticmethod
    def constant(value: torch.Tensor, name: str | None = None) -> "Arg":
        return Arg(name, torch.empty(value.shape, dtype=value.dtype, device="meta"), value)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.dtype

    def ints(self, what: str) -> list[int]:
        """The contents as Python ints, for a shape-like input."""
        if self.value is None:
            raise NotStatic(f"its {what} ({self.name}) depends on the contents of an input; compile fixes "
                            f"shapes, not values")
        return [int(v) for v in self.value.reshape(-1).tolist()]

    def floats(self, what: str) -> list[float]:
        if self.value is None:
            raise NotStatic(f"its {what} ({self.name}) depends on the contents of an input")
        return [float(v) for v in self.value.reshape(-1).float().tolist()]


@dataclasses.dataclass
class Node:
    op_type: str
    name: str
    attrs: dict[str, Any]
    opset: int  # of the default domain
    n_outputs: int  # outputs the node names


Fn = Callable[..., Any]
Rule = Callable[[Node, list], "tuple[Fn, list[Arg]]"]
RULES: dict[str, Rule] = {}


def rule(*op_types: str):
    def register(fn: Rule) -> Rule:
        for op in op_types:
            RULES[op] = fn
        return fn

    return register


def attribute_values(node: onnx.NodeProto) -> dict[str, Any]:
    """Any node's attributes by name, strings decoded."""
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _present(args: list, i: int) -> Arg | None:
    return args[i] if i < len(args) else None


# --- elementwise ------------------------------------------------------------------------------------

UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Sign": torch.sign, "Not": torch.logical_not, "IsNaN": torch.isnan, "Softplus": F.softplus,
}
BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
    "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor,
}


@rule(*UNARY)
def unary(node, args):
    return UNARY[node.op_type], [args[0]]


@rule("Identity", "Dropout")
def identity(node, args):  # Dropout at inference; its mask output is all True
    if node.op_type == "Dropout" and _present(args, 2) is not None and (args[2].value is None or bool(args[2].value)):
        raise LoweringError("Dropout in training mode")
    if node.n_outputs == 1:
        return (lambda x: x), [args[0]]
    return (lambda x: (x, torch.ones_like(x, dtype=torch.bool))), [args[0]]


@rule(*BINARY)
def binary(node, args):
    return BINARY[node.op_type], args[:2]


@rule("Div")
def div(node, args):
    if args[0].dtype.is_floating_point:
        return torch.div, args[:2]
    return (lambda a, b: torch.div(a, b, rounding_mode="trunc")), args[:2]  # C integer division


@rule("Mod")
def mod(node, args):
    return (torch.fmod if node.attrs.get("fmod", 0) else torch.remainder), args[:2]


@rule("Pow")
def pow_(node, args):
    dtype = args[0].dtype  # ONNX: the base's type, whatever the exponent's
    return (lambda x, y: torch.pow(x, y).to(dtype)), args[:2]


@rule("Max", "Min", "Sum", "Mean")
def variadic(node, args):
    pair = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]
    n = len(args)

    def fn(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = pair(out, x)
        return out / n if node.op_type == "Mean" else out

    return fn, list(args)


@rule("Where")
def where(node, args):
    return torch.where, args[:3]


@rule("Clip")
def clip(node, args):
    if node.opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        return (lambda x: torch.clamp(x, lo, hi)), [args[0]]
    bounds = [_present(args, 1), _present(args, 2)]
    runtime = [args[0]] + [b for b in bounds if b is not None]

    def fn(x, *given):
        it = iter(given)
        lo, hi = (next(it) if b is not None else None for b in bounds)
        if lo is not None:
            x = torch.maximum(x, lo)
        return torch.minimum(x, hi) if hi is not None else x

    return fn, runtime


@rule("Cast")
def cast(node, args):
    dtype = torch_dtype(node.attrs["to"])
    return (lambda x: x.to(dtype)), [args[0]]


@rule("CastLike")
def cast_like(node, args):
    dtype = args[1].dtype
    return (lambda x: x.to(dtype)), [args[0]]


@rule("Gelu")
def gelu(node, args):
    approximate = node.attrs.get("approximate", "none")
    return (lambda x: F.gelu(x, approximate=approximate)), [args[0]]


# --- shapes and constants: folded at lowering -------------------------------------------------------


@rule("Constant")
def constant(node, args):
    attrs = node.attrs
    if "value" in attrs:
        value = tensor_proto_to_torch(attrs["value"])
    elif "value_float" in attrs:
        value = torch.tensor(attrs["value_float"], dtype=torch.float32)
    elif "value_floats" in attrs:
        value = torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    elif "value_int" in attrs:
        value = torch.tensor(attrs["value_int"], dtype=torch.int64)
    elif "value_ints" in attrs:
        value = torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    else:
        raise LoweringError(f"Constant with attribute(s) {sorted(attrs)}")
    return (lambda: value), []


@rule("Shape")
def shape(node, args):
    dims = list(args[0].shape)
    rank = len(dims)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start, end = (min(max(_axis(i, rank), 0), rank) for i in (start, end))
    value = torch.tensor(dims[start:end], dtype=torch.int64)
    return (lambda: value), []


@rule("Size")
def size(node, args):
    value = torch.tensor(math.prod(args[0].shape), dtype=torch.int64)
    return (lambda: value), []


# A constant made from sizes the model gives (ConstantOfShape's shape, Range's bounds) is made only
# up to this many elements (1 GiB of float32): a size is data, not an allocation to trust.
MAX_MADE_ELEMENTS = 1 << 28


def _made(count: int, what: str) -> None:
    if count > MAX_MADE_ELEMENTS:
        raise LoweringError(f"{what} would make {count} elements, more than the {MAX_MADE_ELEMENTS} compile makes")


@rule("ConstantOfShape")
def constant_of_shape(node, args):
    dims = args[0].ints("shape")
    _made(math.prod(dims), f"shape {dims}")
    fill = tensor_proto_to_torch(node.attrs["value"]).reshape(()) if "value" in node.attrs else torch.tensor(0.0)
    return (lambda: fill.expand(dims).clone()), []


@rule("Range")
def range_(node, args):
    dtype = args[0].dtype
    start, limit, delta = (a.floats("bound")[0] if dtype.is_floating_point else a.ints("bound")[0] for a in args[:3])
    n = max(int(math.ceil((limit - start) / delta)), 0)
    _made(n, f"Range({start}, {limit}, {delta})")
    value = (torch.arange(n, dtype=torch.float64) * delta + start).to(dtype)
    return (lambda: value), []


# --- layout -----------------------------------------------------------------------------------------


def _reshape_to(out_shape: tuple[int, ...]):
    return lambda x: x.reshape(out_shape)


@rule("Reshape")
def reshape(node, args):
    data_shape = args[0].shape
    target = args[1].ints("target shape")
    allowzero = node.attrs.get("allowzero", 0)
    out = [data_shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(data_shape) // known if known else 0
    return _reshape_to(tuple(out)), [args[0]]


@rule("Flatten")
def flatten(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", 1), len(s))
    return _reshape_to((math.prod(s[:axis]), math.prod(s[axis:]))), [args[0]]


def _axes(node, args, index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from input `index` (newer); None when absent."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    arg = _present(args, index)
    return arg.ints("axes") if arg is not None else None


@rule("Squeeze")
def squeeze(node, args):
    s = args[0].shape
    axes = _axes(node, args, 1)
    drop = {_axis(a, len(s)) for a in axes} if axes is not None else {i for i, d in enumerate(s) if d == 1}
    return _reshape_to(tuple(d for i, d in enumerate(s) if i not in drop)), [args[0]]


@rule("Unsqueeze")
def unsqueeze(node, args):
    s = list(args[0].shape)
    rank = len(s) + len(_axes(node, args, 1))
    for a in sorted(_axis(a, rank) for a in _axes(node, args, 1)):
        s.insert(a, 1)
    return _reshape_to(tuple(s)), [args[0]]


@rule("Transpose")
def transpose(node, args):
    perm = list(node.attrs.get("perm", range(len(args[0].shape) - 1, -1, -1)))
    return (lambda x: x.permute(perm)), [args[0]]


@rule("Expand")
def expand(node, args):
    out = tuple(np.broadcast_shapes(args[0].shape, tuple(args[1].ints("target shape"))))
    return (lambda x: x.expand(out)), [args[0]]


@rule("Tile")
def tile(node, args):
    repeats = args[1].ints("repeats")
    return (lambda x: x.repeat(repeats)), [args[0]]


@rule("Concat")
def concat(node, args):
    axis = _axis(node.attrs["axis"], len(args[0].shape))
    return (lambda *xs: torch.cat(xs, axis)), list(args)


@rule("Split")
def split(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", 0), len(s))
    if "split" in node.attrs:
        sizes = list(node.attrs["split"])
    elif _present(args, 1) is not None:
        sizes = args[1].ints("split sizes")
    else:
        n = node.attrs.get("num_outputs", node.n_outputs)
        chunk = -(-s[axis] // n)
        sizes = [chunk] * (s[axis] // chunk) + ([s[axis] % chunk] if s[axis] % chunk else [])
    return (lambda x: tuple(torch.split(x, sizes, axis))), [args[0]]


@rule("Slice")
def slice_(node, args):
    s = args[0].shape
    if node.opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = args[1].ints("starts"), args[2].ints("ends")
        axes = _present(args, 3).ints("axes") if _present(args, 3) is not None else list(range(len(starts)))
        steps = _present(args, 4).ints("steps") if _present(args, 4) is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * len(s)
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, len(s))
        dim = s[axis]
        start, stop, _ = slice(start, end, step).indices(dim)  # ONNX clamps exactly as Python does
        if step > 0:
            index[axis] = slice(start, stop, step)
        else:  # torch has no negative steps: flip, then slice forwards
            count = len(range(start, stop, step))
            first = dim - 1 - start
            index[axis] = slice(first, first + (count - 1) * -step + 1 if count else first, -step)
            flips.append(axis)
    index_t = tuple(index)

    def fn(x):
        if flips:
            x = torch.flip(x, flips)
        return x[index_t]

    return fn, [args[0]]


@rule("Trilu")
def trilu(node, args):
    k = args[1].ints("k")[0] if _present(args, 1) is not None else 0
    upper = node.attrs.get("upper", 1)
    return (lambda x: torch.triu(x, k) if upper else torch.tril(x, k)), [args[0]]


def _pad_source(mode: str, size: int, begin: int, end: int) -> list[int]:
    """For each position of a dim padded by (begin, end) in edge/reflect/wrap mode, the input
    position it copies (numpy.pad's meaning). A negative pad crops first, as onnxruntime does,
    so wrap repeats what is kept."""
    first, last = max(-begin, 0), size - max(-end, 0)  # the kept input [first, last)
    kept = last - first
    if kept <= 0:
        raise LoweringError(f"Pad mode {mode!r} of a dim cropped to nothing")
    bounded(f"Pad mode {mode!r}'s index table", kept + max(begin, 0) + max(end, 0))
    out = []
    for p in range(-max(begin, 0), kept + max(end, 0)):
        if mode == "edge":
            q = min(max(p, 0), kept - 1)
        elif mode == "wrap":
            q = p % kept
        else:  # reflect about the first and last element, repeatedly
            period = 2 * (kept - 1)
            q = p % period if period else 0
            q = q if q < kept else period - q
        out.append(first + q)
    return out


@rule("Pad")
def pad(node, args):
    s = args[0].shape
    pads = list(node.attrs["pads"]) if "pads" in node.attrs else args[1].ints("pads")
    mode = node.attrs.get("mode", "constant")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise LoweringError(f"Pad mode {mode!r}")
    value = float(node.attrs.get("value", 0.0))
    if node.opset >= 11 and _present(args, 2) is not None:
        value = args[2].floats("pad value")[0]
    axes = list(range(len(s)))
    if node.opset >= 18 and _present(args, 3) is not None:
        axes = [_axis(a, len(s)) for a in args[3].ints("axes")]
    n = len(axes)
    begin, end = dict(zip(axes, pads[:n])), dict(zip(axes, pads[n:]))
    if mode != "constant":  # each padded dim a gather of constant source positions: any dim, any dtype
        padded = [a for a in range(len(s)) if begin.get(a, 0) or end.get(a, 0)]
        sources = [Arg.constant(torch.tensor(_pad_source(mode, s[a], begin.get(a, 0), end.get(a, 0)),
                                             dtype=torch.int64)) for a in padded]

        def gather_pad(x, *sources):
            for axis, index in zip(padded, sources):
                x = torch.index_select(x, axis, index)
            return x

        return gather_pad, [args[0]] + sources
    torch_pads = []
    for axis in reversed(range(len(s))):  # F.pad lists the last dim first
        torch_pads += [begin.get(axis, 0), end.get(axis, 0)]
    return (lambda x: F.pad(x, torch_pads, value=value)), [args[0]]


# --- indexing ---------------------------------------------------------------------------------------


def _index_arg(indices: Arg, dim: int) -> tuple[Arg, bool]:
    """Indices with negatives resolved: at lowering when they are constants, else (False) at run time."""
    if indices.value is not None:
        v = indices.value.to(torch.int64)
        return Arg.constant(torch.where(v < 0, v + dim, v)), True
    return indices, False


def _resolve(idx: torch.Tensor, dim: int, resolved: bool) -> torch.Tensor:
    idx = idx.to(torch.int64)
    return idx if resolved else torch.where(idx < 0, idx + dim, idx)


@rule("Gather")
def gather(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", 0), len(s))
    indices, resolved = _index_arg(args[1], s[axis])
    out_shape = s[:axis] + indices.shape + s[axis + 1:]
    if indices.value is not None and indices.value.dim() == 0:
        i = int(indices.value)
        return (lambda x: x.select(axis, i)), [args[0]]

    def fn(x, idx):
        idx = _resolve(idx, s[axis], resolved)
        return torch.index_select(x, axis, idx.reshape(-1)).reshape(out_shape)

    return fn, [args[0], indices]


@rule("GatherElements")
def gather_elements(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", 0), len(s))
    indices, resolved = _index_arg(args[1], s[axis])
    return (lambda x, idx: torch.gather(x, axis, _resolve(idx, s[axis], resolved))), [args[0], indices]


@rule("GatherND")
def gather_nd(node, args):
    s, i_shape = args[0].shape, args[1].shape
    b = node.attrs.get("batch_dims", 0)
    k = i_shape[-1]
    batch = math.prod(s[:b])
    indexed, tail = s[b:b + k], s[b + k:]
    strides = [math.prod(indexed[j + 1:]) for j in range(k)]
    out_shape = i_shape[:-1] + tail
    per_batch = math.prod(i_shape[b:-1])
    offsets = Arg.constant(torch.arange(batch, dtype=torch.int64).reshape(batch, 1) * math.prod(indexed))
    dims = Arg.constant(torch.tensor(indexed, dtype=torch.int64))
    stride_t = Arg.constant(torch.tensor(strides, dtype=torch.int64))

    def fn(x, idx, offsets, dims, stride_t):
        idx = idx.to(torch.int64).reshape(batch, per_batch, k)
        idx = torch.where(idx < 0, idx + dims, idx)
        flat = (idx * stride_t).sum(-1) + offsets  # (batch, per_batch) rows of x viewed (batch*prod(indexed), *tail)
        rows = x.reshape((batch * math.prod(indexed),) + tail)
        return torch.index_select(rows, 0, flat.reshape(-1)).reshape(out_shape)

    return fn, [args[0], args[1], offsets, dims, stride_t]


# --- reductions and normalisations ------------------------------------------------------------------


def _over_dims(op):
    """op(x, dims, keepdim=) as a reduction over `dims`, the identity over none (what ONNX's
    noop_with_empty_axes reduces; torch would read an empty dim list as every dim)."""
    return lambda x, dims, keep: op(x, dims, keepdim=keep) if dims else x


def _prod(x, dims, keepdim):
    for d in reversed(dims):  # torch.prod takes one dim
        x = torch.prod(x, d, keepdim=keepdim)
    return x


reduce_sum = _over_dims(torch.sum)

# ReduceX -> fn(x, dims, keep) over the sorted dims (none: only its elementwise part). ops_math adds more.
REDUCTIONS: dict[str, Callable] = {
    "ReduceMean": _over_dims(torch.mean), "ReduceSum": reduce_sum, "ReduceProd": _over_dims(_prod),
    "ReduceMax": _over_dims(torch.amax), "ReduceMin": _over_dims(torch.amin),
}


def _lowest(dtype: torch.dtype):
    return False if dtype == torch.bool else -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


def _highest(dtype: torch.dtype):
    return True if dtype == torch.bool else math.inf if dtype.is_floating_point else torch.iinfo(dtype).max


# torch refuses max and min over a zero extent; ONNX gives the type's lowest (highest) value.
EMPTY_REDUCTION = {"ReduceMax": _lowest, "ReduceMin": _highest}


@rule(*REDUCTIONS)
def reduce(node, args):
    s, dtype = args[0].shape, args[0].dtype
    in_input = node.opset >= 18 or (node.op_type == "ReduceSum" and node.opset >= 13)
    axes = (_present(args, 1).ints("axes") if _present(args, 1) is not None else None) if in_input \
        else (list(node.attrs["axes"]) if "axes" in node.attrs else None)
    keep = bool(node.attrs.get("keepdims", 1))
    if not axes:
        axes = [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(len(s)))
    dims = sorted(_axis(a, len(s)) for a in axes)
    op = REDUCTIONS[node.op_type]
    if node.op_type in EMPTY_REDUCTION and any(s[d] == 0 for d in dims):
        out_shape = tuple(1 if i in dims else d for i, d in enumerate(s) if keep or i not in dims)
        fill = EMPTY_REDUCTION[node.op_type](dtype)
        return (lambda: torch.full(out_shape, fill, dtype=dtype)), []
    return (lambda x: op(x, dims, keep).to(dtype)), [args[0]]  # torch sums small ints to int64


@rule("ArgMax", "ArgMin")
def arg_max(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", 0), len(s))
    keep = bool(node.attrs.get("keepdims", 1))
    op = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    if not node.attrs.get("select_last_index", 0):
        return (lambda x: op(x, axis, keepdim=keep)), [args[0]]
    last = s[axis] - 1  # torch gives the first of equal extremes: search the flipped axis

    return (lambda x: last - op(torch.flip(x, [axis]), axis, keepdim=keep)), [args[0]]


# CumX -> (the running op, its identity): an exclusive scan starts at the identity.
CUMULATIVE: dict[str, tuple[Callable, int]] = {"CumSum": (torch.cumsum, 0)}


@rule(*CUMULATIVE)
def cumulative(node, args):
    s = args[0].shape
    axis = _axis(args[1].ints("axis")[0], len(s))
    exclusive, reverse = node.attrs.get("exclusive", 0), node.attrs.get("reverse", 0)
    op, identity = CUMULATIVE[node.op_type]
    n = s[axis]

    def fn(x):
        y = torch.flip(x, [axis]) if reverse else x
        out = op(y, axis, dtype=x.dtype)  # torch would sum int32 into int64
        if exclusive and n:  # shifted by one (not out - y: exact, and CumProd cannot divide by zeros)
            first = torch.full_like(out.narrow(axis, 0, 1), identity)
            out = torch.cat([first, out.narrow(axis, 0, n - 1)], axis)
        return torch.flip(out, [axis]) if reverse else out

    return fn, [args[0]]


@rule("Softmax", "LogSoftmax")
def softmax(node, args):
    s = args[0].shape
    op = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if node.opset >= 13:
        axis = node.attrs.get("axis", -1)
        return (lambda x: op(x, axis)), [args[0]]
    axis = _axis(node.attrs.get("axis", 1), len(s))  # before 13: over all dims from axis on
    flat = (math.prod(s[:axis]), math.prod(s[axis:]))
    return (lambda x: op(x.reshape(flat), -1).reshape(s)), [args[0]]


@rule("LayerNormalization")
def layer_norm(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", -1), len(s))
    eps = float(node.attrs.get("epsilon", 1e-5))
    dims = list(range(axis, len(s)))
    normalized = s[axis:]
    scale, bias = args[1], _present(args, 2)
    fits = scale.shape == normalized and (bias is None or bias.shape == normalized)
    runtime = [args[0], scale] + ([bias] if bias is not None else [])
    stash = torch.float32 if node.attrs.get("stash_type", 1) == 1 else None

    def fn(x, w, b=None):
        if fits:
            y = F.layer_norm(x, normalized, w, b, eps)
        else:
            xs = x.to(stash) if stash is not None else x
            mean = xs.mean(dims, keepdim=True)
            y = ((xs - mean) * torch.rsqrt((xs - mean).pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype) * w
            y = y + b if b is not None else y
        if node.n_outputs == 1:
            return y
        xs = x.to(stash) if stash is not None else x
        mean = xs.mean(dims, keepdim=True)
        return y, mean, torch.rsqrt((xs - mean).pow(2).mean(dims, keepdim=True) + eps)

    return fn, runtime


@rule("RMSNormalization")
def rms_norm(node, args):
    s = args[0].shape
    dims = list(range(_axis(node.attrs.get("axis", -1), len(s)), len(s)))
    eps = float(node.attrs.get("epsilon", 1e-5))
    stash = torch.float32 if node.attrs.get("stash_type", 1) == 1 else None

    def fn(x, w):
        xs = x.to(stash) if stash is not None else x
        y = xs * torch.rsqrt(xs.pow(2).mean(dims, keepdim=True) + eps)
        return (y.to(x.dtype) * w).to(x.dtype)

    return fn, args[:2]


@rule("RotaryEmbedding")
def rotary_embedding(node, args):
    x_shape = args[0].shape
    interleaved = node.attrs.get("interleaved", 0)
    num_heads = node.attrs.get("num_heads", 0)
    position_ids = _present(args, 3)
    if len(x_shape) == 4:  # (b, h, s, d): rotated in (b, s, h, d)
        b, h, n, d = x_shape
    else:
        b, n, hidden = x_shape
        h, d = num_heads, hidden // num_heads
    rot = node.attrs.get("rotary_embedding_dim", 0) or d
    half = rot // 2
    runtime = args[:3] + ([position_ids] if position_ids is not None else [])

    def fn(x, cos, sin, pos=None):
        y = x.transpose(1, 2) if len(x_shape) == 4 else x.reshape(b, n, h, d)
        if pos is not None:
            cos = torch.index_select(cos, 0, pos.reshape(-1)).reshape(pos.shape + (half,))
            sin = torch.index_select(sin, 0, pos.reshape(-1)).reshape(pos.shape + (half,))
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        rotate, keep = y[..., :rot], y[..., rot:]
        if interleaved:
            x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
        else:
            x1, x2 = rotate[..., :half], rotate[..., half:]
        real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
        if interleaved:
            rotated = torch.stack((real, imag), -1).reshape(real.shape[:-1] + (rot,))
        else:
            rotated = torch.cat((real, imag), -1)
        out = torch.cat((rotated, keep), -1)
        return out.transpose(1, 2) if len(x_shape) == 4 else out.reshape(x_shape)

    return fn, runtime


# --- products ---------------------------------------------------------------------------------------


@rule("MatMul")
def matmul(node, args):
    return torch.matmul, args[:2]


@rule("Gemm")
def gemm(node, args):
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    c = _present(args, 2)

    def fn(a, b, c=None):
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        y = y * alpha if alpha != 1.0 else y
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return fn, args[:2] + ([c] if c is not None else [])


@rule("Einsum")
def einsum(node, args):
    equation = node.attrs["equation"]
    return (lambda *xs: torch.einsum(equation, *xs)), list(args)


@rule("Conv")
def conv(node, args):
    w_shape = args[1].shape
    spatial = len(w_shape) - 2
    x_spatial = args[0].shape[2:]
    kernel = list(node.attrs.get("kernel_shape", w_shape[2:]))
    strides = list(node.attrs.get("strides", [1] * spatial))
    dilations = list(node.attrs.get("dilations", [1] * spatial))
    groups = node.attrs.get("group", 1)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, st, dl in zip(x_spatial, kernel, strides, dilations):
            total = max((-(-size // st) - 1) * st + (k - 1) * dl + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else big)
            pads_end.append(big if auto_pad == "SAME_UPPER" else small)
    else:
        pads = list(node.attrs.get("pads", [0] * 2 * spatial)) if auto_pad == "NOTSET" else [0] * 2 * spatial
        pads_begin, pads_end = pads[:spatial], pads[spatial:]
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    symmetric = pads_begin == pads_end
    extra = [p for pair in zip(reversed(pads_begin), reversed(pads_end)) for p in pair]
    bias = _present(args, 2)

    def fn(x, w, b=None):
        if not symmetric:
            x = F.pad(x, extra)
        return conv_fn(x, w, b, strides, pads_begin if symmetric else 0, dilations, groups)

    return fn, args[:2] + ([bias] if bias is not None else [])


# Rules kept in modules of their own register themselves into RULES when imported.
from fuse_attn.compile import attention_op  # noqa: E402,F401
