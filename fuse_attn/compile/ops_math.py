"""Lowering rules for ONNX's elementwise math (activations, trigonometry, bitwise ops), the
reductions beyond onnx_ops' own, selection (TopK, Hardmax, OneHot), writes by index (ScatterND,
ScatterElements, TensorScatter, ReverseSequence), n-gram counts (TfIdfVectorizer) and linear
(de)quantization.

The contract is onnx_ops': every shape, axis, count and attribute is read at lowering into a
Python constant, and forward calls tensor ops only (indices and scales may be runtime tensors;
their shapes are not). Ops that share a mechanism with onnx_ops' rules (unary, binary,
reductions, cumulative scans) are entries in its tables, lowered by its rules. Only ops that
exist in torch 2.1 are used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fuse_attn.compile import onnx_ops
from fuse_attn.compile.onnx_ops import Arg, LoweringError, _axis, _index_arg, _present, _resolve, rule, torch_dtype

# --- elementwise ------------------------------------------------------------------------------------

_NEW_UNARY = {
    "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh,
    "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh, "BitwiseNot": torch.bitwise_not,
    "Softsign": F.softsign, "Mish": F.mish,
}
_NEW_BINARY = {"BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor}
onnx_ops.UNARY.update(_NEW_UNARY)
onnx_ops.BINARY.update(_NEW_BINARY)
rule(*_NEW_UNARY)(onnx_ops.unary)
rule(*_NEW_BINARY)(onnx_ops.binary)


def _float_attr(node, name: str, default: float) -> float:
    return float(node.attrs.get(name, default))


def _hard_sigmoid(alpha: float, beta: float):
    return lambda x: torch.clamp(x * alpha + beta, 0, 1)


@rule("HardSigmoid")
def hard_sigmoid(node, args):
    return _hard_sigmoid(_float_attr(node, "alpha", 0.2), _float_attr(node, "beta", 0.5)), [args[0]]


@rule("HardSwish")
def hard_swish(node, args):  # ONNX: x * HardSigmoid(x) with alpha 1/6, beta 1/2
    gate = _hard_sigmoid(1 / 6, 0.5)
    return (lambda x: x * gate(x)), [args[0]]


@rule("LeakyRelu")
def leaky_relu(node, args):
    alpha = _float_attr(node, "alpha", 0.01)
    return (lambda x: F.leaky_relu(x, alpha)), [args[0]]


@rule("PRelu")
def prelu(node, args):  # the slope broadcasts to x (F.prelu wants one slope per channel)
    return (lambda x, slope: torch.where(x < 0, x * slope, x)), args[:2]


@rule("Elu")
def elu(node, args):
    alpha = _float_attr(node, "alpha", 1.0)
    return (lambda x: F.elu(x, alpha)), [args[0]]


@rule("Selu")
def selu(node, args):  # gamma * Elu(x, alpha)
    alpha = _float_attr(node, "alpha", 1.67326319217681884765625)
    gamma = _float_attr(node, "gamma", 1.05070102214813232421875)
    return (lambda x: F.elu(x, alpha) * gamma), [args[0]]


@rule("Celu")
def celu(node, args):
    alpha = _float_attr(node, "alpha", 1.0)
    return (lambda x: F.celu(x, alpha)), [args[0]]


@rule("ThresholdedRelu")
def thresholded_relu(node, args):  # x where x > alpha, else 0
    alpha = _float_attr(node, "alpha", 1.0)
    return (lambda x: F.threshold(x, alpha, 0.0)), [args[0]]


@rule("Shrink")
def shrink(node, args):
    lambd, bias = _float_attr(node, "lambd", 0.5), _float_attr(node, "bias", 0.0)
    dtype = args[0].dtype  # integer inputs too: the float bias must not widen the result

    def fn(x):
        shifted = torch.where(x < -lambd, x + bias, x - bias).to(dtype)
        return torch.where((x < -lambd) | (x > lambd), shifted, torch.zeros_like(x))

    return fn, [args[0]]


@rule("Swish")
def swish(node, args):
    alpha = _float_attr(node, "alpha", 1.0)
    return (lambda x: x * torch.sigmoid(x * alpha)), [args[0]]


@rule("SwiGLU")
def swiglu(node, args):  # Swish(a) * b
    alpha = _float_attr(node, "alpha", 1.0)
    return (lambda a, b: a * torch.sigmoid(a * alpha) * b), args[:2]


@rule("IsInf")
def is_inf(node, args):
    positive, negative = node.attrs.get("detect_positive", 1), node.attrs.get("detect_negative", 1)

    def fn(x):
        if positive and negative:
            return torch.isinf(x)
        if positive:
            return torch.isposinf(x)
        if negative:
            return torch.isneginf(x)
        return torch.zeros_like(x, dtype=torch.bool)

    return fn, [args[0]]


@rule("BitShift")
def bit_shift(node, args):
    dtype = args[0].dtype
    if dtype.is_floating_point or dtype == torch.bool:
        raise LoweringError(f"BitShift of {dtype}")
    bits = torch.iinfo(dtype).bits
    left = node.attrs["direction"] == "LEFT"

    def fn(x, y):
        # A shift past the width (or negative) leaves only the sign fill: -1 for a right shift
        # of a negative x, else 0. torch, like C, would take the count modulo the width.
        in_range = (y >= 0) & (y < bits)
        count = torch.clamp(y, 0, bits - 1).to(dtype)
        if left:
            return torch.where(in_range, torch.bitwise_left_shift(x, count), torch.zeros_like(x))
        fill = torch.where(x < 0, -torch.ones_like(x), torch.zeros_like(x)) if dtype.is_signed else torch.zeros_like(x)
        return torch.where(in_range, torch.bitwise_right_shift(x, count), fill)

    return fn, args[:2]


def _element_bits(dtype: torch.dtype) -> int:
    return 8 * torch.empty((), dtype=dtype).element_size()


@rule("BitCast")
def bit_cast(node, args):
    to = torch_dtype(node.attrs["to"])
    if _element_bits(to) != _element_bits(args[0].dtype):
        raise LoweringError(f"BitCast from {args[0].dtype} to {to}: not the same width")
    return (lambda x: x.view(to)), [args[0]]


@rule("Det")
def det(node, args):
    return torch.linalg.det, [args[0]]


# --- reductions: entries of onnx_ops' tables --------------------------------------------------------

_NEW_REDUCTIONS = {
    "ReduceL1": lambda x, dims, keep: onnx_ops.reduce_sum(torch.abs(x), dims, keep),
    "ReduceL2": lambda x, dims, keep: torch.sqrt(onnx_ops.reduce_sum(x * x, dims, keep)),
    "ReduceSumSquare": lambda x, dims, keep: onnx_ops.reduce_sum(x * x, dims, keep),
    "ReduceLogSum": lambda x, dims, keep: torch.log(onnx_ops.reduce_sum(x, dims, keep)),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dims, keepdim=keep) if dims else x,
}
onnx_ops.REDUCTIONS.update(_NEW_REDUCTIONS)
rule(*_NEW_REDUCTIONS)(onnx_ops.reduce)

onnx_ops.CUMULATIVE["CumProd"] = (torch.cumprod, 1)
rule("CumProd")(onnx_ops.cumulative)


# --- selection and indexing -------------------------------------------------------------------------


@rule("TopK")
def top_k(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", -1), len(s))
    k = args[1].ints("k")[0] if node.opset >= 10 else int(node.attrs["k"])
    if not 0 <= k <= s[axis]:
        raise LoweringError(f"k={k} for an axis of {s[axis]}")
    largest = bool(node.attrs.get("largest", 1))

    def fn(x):
        # ONNX puts the lower index first among equal values; a stable sort keeps that order,
        # torch.topk promises none. Sorted output also satisfies sorted=0.
        values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
        return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)

    return fn, [args[0]]


@rule("OneHot")
def one_hot(node, args):
    s = args[0].shape
    depth = int(args[1].floats("depth")[0])
    if depth < 0:
        raise LoweringError(f"depth {depth}")
    axis = _axis(node.attrs.get("axis", -1), len(s) + 1)
    # Positions 0..depth-1 along the output's axis; indices out of [-depth, depth) match none.
    # Float indices are truncated to integers, as onnxruntime does. The positions are made in
    # forward: depth is a value in the model file, and lowering allocates nothing by it.
    positions_shape = (depth,) + (1,) * (len(s) - axis)

    def fn(indices, values):
        positions = torch.arange(depth, device=indices.device).reshape(positions_shape)
        indices = indices.to(torch.int64)
        indices = torch.where(indices < 0, indices + depth, indices).unsqueeze(axis)
        return torch.where(indices == positions, values[1], values[0])

    return fn, [args[0], args[2]]


@rule("Hardmax")
def hardmax(node, args):  # 1 at the first maximum along the axis, else 0
    s = args[0].shape
    if node.opset >= 13:
        axis = _axis(node.attrs.get("axis", -1), len(s))
        view = s
    else:  # before 13: over every dim from axis on, as one
        first = _axis(node.attrs.get("axis", 1), len(s))
        view, axis = (math.prod(s[:first]), math.prod(s[first:])), 1
    positions = Arg.constant(torch.arange(view[axis]).reshape((view[axis],) + (1,) * (len(view) - axis - 1)))

    def fn(x, positions):
        first_max = torch.argmax(x.reshape(view), axis, keepdim=True)
        return (positions == first_max).to(x.dtype).reshape(s)

    return fn, [args[0], positions]


@rule("EyeLike")
def eye_like(node, args):  # a constant: only the input's shape matters
    rows, cols = args[0].shape
    dtype = torch_dtype(node.attrs["dtype"]) if "dtype" in node.attrs else args[0].dtype
    value = torch.zeros(rows, cols, dtype=dtype)
    value.diagonal(int(node.attrs.get("k", 0))).fill_(1)
    return (lambda: value), []


@rule("ReverseSequence")
def reverse_sequence(node, args):
    s = args[0].shape
    batch_axis, time_axis = node.attrs.get("batch_axis", 1), node.attrs.get("time_axis", 0)
    along = lambda axis, n: tuple(n if i == axis else 1 for i in range(len(s)))  # noqa: E731
    times = Arg.constant(torch.arange(s[time_axis]).reshape(along(time_axis, s[time_axis])))
    lens_shape = along(batch_axis, s[batch_axis])

    def fn(x, lens, times):
        lens = lens.to(torch.int64).reshape(lens_shape)
        source = torch.where(times < lens, lens - 1 - times, times)  # the first lens[b] steps reversed
        return torch.gather(x, time_axis, source.expand(s))

    return fn, [args[0], args[1], times]


@rule("TensorScatter")
def tensor_scatter(node, args):
    s, u_shape = args[0].shape, args[1].shape
    axis = _axis(node.attrs.get("axis", -2), len(s))
    mode = node.attrs.get("mode", "linear")
    if mode not in ("linear", "circular"):
        raise LoweringError(f"mode {mode!r}")
    if axis == 0 or len(u_shape) != len(s) or u_shape[axis] > s[axis] or any(
            u_shape[i] != s[i] for i in range(len(s)) if i != axis):
        raise LoweringError(f"an update of shape {u_shape} for a cache of shape {s} on axis {axis}")
    steps = Arg.constant(torch.arange(u_shape[axis]).reshape((u_shape[axis],) + (1,) * (len(s) - axis - 1)))
    write_indices = _present(args, 2)
    per_batch = (s[0],) + (1,) * (len(s) - 1)

    def fn(cache, update, steps, start=None):
        # cache[b, ..., start[b] + t, ...] = update[b, ..., t, ...]
        position = steps if start is None else start.reshape(per_batch) + steps
        if mode == "circular":
            position = torch.remainder(position, s[axis])
        return torch.scatter(cache, axis, position.expand(u_shape), update)

    return fn, [args[0], args[1], steps] + ([write_indices] if write_indices is not None else [])


# ONNX reduction -> torch.scatter_reduce's
_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter(reduction: str):
    if reduction == "none":
        return torch.scatter
    if reduction not in _SCATTER_REDUCE:
        raise LoweringError(f"reduction {reduction!r}")
    how = _SCATTER_REDUCE[reduction]
    return lambda x, dim, index, src: torch.scatter_reduce(x, dim, index, src, how, include_self=True)


@rule("ScatterElements", "Scatter")
def scatter_elements(node, args):
    s = args[0].shape
    axis = _axis(node.attrs.get("axis", 0), len(s))
    scatter = _scatter(node.attrs.get("reduction", "none"))
    indices, resolved = _index_arg(args[1], s[axis])

    def fn(x, idx, updates):
        return scatter(x, axis, _resolve(idx, s[axis], resolved), updates)

    return fn, [args[0], indices, args[2]]


@rule("ScatterND")
def scatter_nd(node, args):
    s, i_shape = args[0].shape, args[1].shape
    scatter = _scatter(node.attrs.get("reduction", "none"))
    k = i_shape[-1]
    indexed, tail = s[:k], s[k:]
    n = math.prod(i_shape[:-1])
    # x as rows (prod(indexed), *tail); an index tuple is one row: sum(index * stride)
    rows_shape = (math.prod(indexed),) + tail
    dims = Arg.constant(torch.tensor(indexed, dtype=torch.int64))
    strides = Arg.constant(torch.tensor([math.prod(indexed[j + 1:]) for j in range(k)], dtype=torch.int64))
    per_row = (n,) + (1,) * len(tail)

    def fn(x, idx, updates, dims, strides):
        idx = idx.to(torch.int64).reshape(n, k)
        idx = torch.where(idx < 0, idx + dims, idx)
        rows = (idx * strides).sum(-1).reshape(per_row).expand((n,) + tail)
        out = scatter(x.reshape(rows_shape), 0, rows, updates.reshape((n,) + tail))
        return out.reshape(s)

    return fn, [args[0], args[1], args[2], dims, strides]


# --- linear quantization ----------------------------------------------------------------------------

_QUANT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}
_DEQUANT_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32)


def _spread(node, x_shape: tuple[int, ...], param: Arg):
    """A function laying a scale or zero point over x: per tensor (one value), per axis (a 1-D
    tensor along `axis`) or blocked (x's rank, `block_size` consecutive elements per value along
    `axis`), checked here against x's shape."""
    p_shape = param.shape
    if math.prod(p_shape) == 1:
        return lambda p: p.reshape(())
    rank = len(x_shape)
    axis = node.attrs.get("axis", 1)
    if not -rank <= axis < rank:
        raise LoweringError(f"axis {axis} for an input of rank {rank}")
    axis = _axis(axis, rank)
    block = node.attrs.get("block_size", 0)
    if not block:
        if p_shape != (x_shape[axis],):
            raise LoweringError(f"a scale of shape {p_shape} for an input of shape {x_shape} on axis {axis}")
        target = tuple(x_shape[axis] if i == axis else 1 for i in range(rank))
        return lambda p: p.reshape(target)
    blocks = -(-x_shape[axis] // block)
    if len(p_shape) != rank or p_shape[axis] != blocks or any(
            p_shape[i] != x_shape[i] for i in range(rank) if i != axis):
        raise LoweringError(f"a scale of shape {p_shape} for an input of shape {x_shape} in blocks of {block} "
                            f"on axis {axis}")
    length = x_shape[axis]

    def fn(p):  # element i along axis reads value i // block (a table of x's length, not block's)
        source = torch.div(torch.arange(length, device=p.device), block, rounding_mode="floor")
        return torch.index_select(p, axis, source)

    return fn


@rule("DequantizeLinear")
def dequantize_linear(node, args):
    x, scale, zero_point = args[0], args[1], _present(args, 2)
    if x.dtype not in _DEQUANT_TYPES:
        raise LoweringError(f"DequantizeLinear of {x.dtype} (supported: int8, uint8, int16, int32)")
    out_dtype = torch_dtype(node.attrs["output_dtype"]) if node.attrs.get("output_dtype") else scale.dtype
    spread = _spread(node, x.shape, scale)
    # ONNX's reference: (x - zero_point) in float32, times the scale, cast to the output type
    compute = torch.promote_types(torch.float32, scale.dtype)

    def fn(x, scale, zero_point=None):
        shifted = x.to(compute)
        if zero_point is not None:
            shifted = shifted - spread(zero_point).to(compute)
        return (shifted * spread(scale).to(compute)).to(out_dtype)

    return fn, [x, scale] + ([zero_point] if zero_point is not None else [])


@rule("QuantizeLinear")
def quantize_linear(node, args):
    x, scale, zero_point = args[0], args[1], _present(args, 2)
    if zero_point is not None:
        out_dtype = zero_point.dtype
    else:
        out_dtype = torch_dtype(node.attrs["output_dtype"]) if node.attrs.get("output_dtype") else torch.uint8
    if out_dtype not in _QUANT_RANGES:
        raise LoweringError(f"QuantizeLinear to {out_dtype} (supported: int8, uint8, int16)")
    low, high = _QUANT_RANGES[out_dtype]
    spread = _spread(node, x.shape, scale)
    precision = torch_dtype(node.attrs["precision"]) if node.attrs.get("precision") else \
        torch.promote_types(x.dtype, scale.dtype)

    def fn(x, scale, zero_point=None):
        # torch.round rounds half to even, as ONNX does; the sum is exact in float32 for these ranges
        q = torch.round(x.to(precision) / spread(scale).to(precision)).float()
        if zero_point is not None:
            q = q + spread(zero_point).float()
        return torch.clamp(q, low, high).to(out_dtype)

    return fn, [x, scale] + ([zero_point] if zero_point is not None else [])


@rule("DynamicQuantizeLinear")
def dynamic_quantize_linear(node, args):
    """x -> (uint8 y, scale, zero point) over x's range widened to include 0; a range of zero
    width (x all zeros) has scale 1, as in onnxruntime (onnx's reference evaluator gives 1/255)."""

    def fn(x):
        low, high = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
        scale = torch.where(high == low, torch.ones_like(high), (high - low) / 255)
        zero_point = torch.round(torch.clamp(-low / scale, 0, 255))
        y = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
        return y.to(torch.uint8), scale.to(x.dtype), zero_point.to(torch.uint8)

    return fn, [args[0]]


@rule("TfIdfVectorizer")
def tfidf_vectorizer(node, args):
    """Counts of the pool's n-grams in each row, weighted. ONNX counts an n-gram at every start
    and every skip distance 1..max_skip_count+1 (unigrams at distance 1 only), for sizes between
    min_gram_length and max_gram_length: every window is a constant list of positions here, and
    forward compares the gathered windows with the pool and sums the matches."""
    attrs = node.attrs
    if "pool_int64s" not in attrs:
        raise LoweringError("a string pool (pool_strings): compile lowers tensors of numbers only")
    s = args[0].shape
    if len(s) > 2:
        raise LoweringError(f"input of shape {s}, not (C) or (B, C)")
    rows, length = (s[0], s[1]) if len(s) == 2 else (1, math.prod(s))
    pool, starts, indexes = list(attrs["pool_int64s"]), list(attrs["ngram_counts"]), list(attrs["ngram_indexes"])
    low, high, skips = attrs["min_gram_length"], attrs["max_gram_length"], attrs["max_skip_count"]
    width = max(indexes) + 1
    # The pool's n-grams by size: size -> [(n-gram, output index)], ids in pool order
    grams: dict[int, list] = {}
    k = 0
    for size, start in enumerate(starts, 1):
        end = starts[size] if size < len(starts) else len(pool)
        for j in range((end - start) // size):
            if low <= size <= high:
                grams.setdefault(size, []).append((pool[start + j * size:start + (j + 1) * size], indexes[k]))
            k += 1
    shapes, consts = [], []  # per size: (windows, n); its window positions, n-grams (P, n), one-hot columns (P, width)
    for size, entries in sorted(grams.items()):
        # no window of this size fits past distance (length - 1) // (size - 1): the range stops there
        distances = [1] if size == 1 else range(1, min(skips + 1, (length - 1) // (size - 1)) + 1)
        windows = [first + d * i for d in distances for first in range(length - d * (size - 1)) for i in range(size)]
        if not windows:
            continue
        columns = torch.zeros(len(entries), width)
        columns[torch.arange(len(entries)), torch.tensor([c for _, c in entries])] = 1
        shapes.append((len(windows) // size, size))
        consts += [Arg.constant(torch.tensor(windows)), Arg.constant(torch.tensor([g for g, _ in entries])),
                   Arg.constant(columns)]
    mode = attrs.get("mode", "TF")
    if mode not in ("TF", "IDF", "TFIDF"):
        raise LoweringError(f"mode {mode!r}")
    weights = list(attrs.get("weights", []))
    if weights and mode != "TF":  # weights[i] scales output column i
        consts.append(Arg.constant(torch.tensor(weights, dtype=torch.float32)))
    out_shape = (rows, width) if len(s) == 2 else (width,)

    def fn(x, *consts):
        x = x.reshape(rows, length).to(torch.int64)
        counts = x.new_zeros((rows, width), dtype=torch.float32)
        for i, (count, size) in enumerate(shapes):
            windows, ngrams, columns = consts[3 * i:3 * i + 3]
            seen = torch.index_select(x, 1, windows).reshape(rows, count, 1, size)
            hits = (seen == ngrams).all(-1).sum(1)  # (rows, n-grams of this size)
            counts = counts + hits.float() @ columns
        if mode == "IDF":
            counts = (counts > 0).float()
        if len(consts) > 3 * len(shapes):
            counts = counts * consts[-1]
        return counts.reshape(out_shape)

    return fn, [args[0]] + consts
