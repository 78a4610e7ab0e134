"""Spatial ops as onnx_ops rules: pooling and MaxUnpool, the batch/instance/group/Lp/MVN/LRN
norms, Resize and Upsample, ConvTranspose, GridSample/AffineGrid/Col2Im, CenterCropPad,
DepthToSpace and SpaceToDepth.

The contract is onnx_ops': every kernel size, pad, output size, index table and interpolation
weight is computed here at lowering, from attributes and the fixed input shapes, into Python
constants or constant tensors. A constant tensor goes to `fn` as a runtime arg (`Arg.constant`),
so it becomes a buffer of the lowered module and moves with it to the device; `fn` only calls
tensor ops, all of which exist in torch 2.1.

Geometry follows the ONNX operator specs; where onnxruntime and the spec's reference
implementation disagree (Resize's coordinates: float32, and align_corners with the integer
output length; ConvTranspose SAME with a stride over the kernel; MaxUnpool's indices with an
output_shape) the rule computes what onnxruntime does, which is what a model's exporter checked
it against. A table built from sizes the model declares is `bounded`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from fuse_attn.compile.onnx_ops import Arg, LoweringError, _axis, _present, bounded, rule

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _spatial_rank(node, shape: tuple[int, ...]) -> int:
    n = len(shape) - 2
    if n not in (1, 2, 3):
        raise LoweringError(f"{node.op_type} over {n} spatial dims (torch pools and convolves 1 to 3)")
    return n


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """F.pad's list (last dim first) for pads before/after each of the trailing dims."""
    return [p for pair in zip(reversed(begin), reversed(end)) for p in pair]


# --- pooling ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolWindow:
    """Where a pooling op's windows sit, per spatial dim: the input is padded by `begin` before and
    `tail` after (a negative tail crops what no window reaches); windows of `kernel` taps
    `dilations` apart start every `strides` from 0, `out` of them. `pad_end` is the pad after the
    input that ONNX counts as padding (for count_include_pad); `tail` may exceed it in ceil mode."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begin: list[int]
    pad_end: list[int]
    tail: list[int]
    out: list[int]

    @property
    def torch_pads(self) -> list[int]:
        return _torch_pads(self.begin, self.tail)


def pool_window(node, spatial: tuple[int, ...]) -> PoolWindow:
    """The windows of a MaxPool/AveragePool/LpPool node over input dims `spatial` (the spec's
    output-shape formulas for each auto_pad, ceil_mode included)."""
    n = len(spatial)
    if "kernel_shape" not in node.attrs:
        raise LoweringError(f"{node.op_type} without kernel_shape")
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    ceil_mode = node.attrs.get("ceil_mode", 0)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-size // s) for size, s in zip(spatial, strides)]
        total = [max((o - 1) * s + w - size, 0) for o, s, w, size in zip(out, strides, span, spatial)]
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        pad_end = [t - b for t, b in zip(total, begin)]
    else:
        pads = list(node.attrs.get("pads", [0] * 2 * n)) if auto_pad == "NOTSET" else [0] * 2 * n
        begin, pad_end = pads[:n], pads[n:]
        out = []
        for size, b, e, w, s in zip(spatial, begin, pad_end, span, strides):
            reach = size + b + e - w
            o = (-(-reach // s) if ceil_mode else reach // s) + 1
            if ceil_mode and (o - 1) * s >= size + b:  # the last window would start in the end padding
                o -= 1
            out.append(o)
    if min(out) < 1:
        raise LoweringError(f"{node.op_type}: a window of {kernel} does not fit input {list(spatial)}")
    tail = [(o - 1) * s + w - size - b for o, s, w, size, b in zip(out, strides, span, spatial, begin)]
    return PoolWindow(kernel, strides, dilations, begin, pad_end, tail, out)


def _window_sum(x: torch.Tensor, window: PoolWindow) -> torch.Tensor:
    """The sum over each window of an already padded (n, c, *spatial) x: a convolution of every
    channel with a kernel of ones (which, unlike avg_pool, takes dilations)."""
    n, c = x.shape[:2]
    ones = x.new_ones((1, 1, *window.kernel))
    flat = x.reshape((n * c, 1) + tuple(x.shape[2:]))
    summed = _CONV[len(window.kernel)](flat, ones, None, window.strides, 0, window.dilations)
    return summed.reshape((n, c) + tuple(window.out))


def _counted_positions(spatial: tuple[int, ...], window: PoolWindow, include_pad: bool) -> torch.Tensor:
    """How many positions of each window AveragePool divides by: those on the input, plus with
    count_include_pad those on the explicit (or auto) pads; never the ceil-mode overhang."""
    padded = [b + size + t for b, size, t in zip(window.begin, spatial, window.tail)]
    bounded("AveragePool's divisor table", math.prod(padded))
    mask = torch.zeros([1, 1] + padded, dtype=torch.float64)
    region = tuple(slice(0, b + size + e) if include_pad else slice(b, b + size)
                   for b, size, e in zip(window.begin, spatial, window.pad_end))
    mask[(slice(None), slice(None)) + region] = 1.0
    return _window_sum(mask, window)


def _pool_dtype(dtype: torch.dtype) -> torch.dtype:
    """A floating dtype holding every value of `dtype` exactly (torch 2.1 pools floats only)."""
    if dtype.is_floating_point:
        return dtype
    return torch.float32 if torch.iinfo(dtype).bits <= 16 else torch.float64


def _max_pool_indices(x_shape: tuple[int, ...], window: PoolWindow, column_major: bool) -> torch.Tensor:
    """For each position of the padded plane max_pool's indices refer to, ONNX's index of it in
    the unpadded input, its (n, c) plane excluded: row-major, or column-major for storage_order 1."""
    spatial = x_shape[2:]
    bounded("MaxPool's Indices table", math.prod(b + size + t for b, size, t in zip(window.begin, spatial, window.tail)))
    coords = np.meshgrid(*[np.arange(b + size + t) - b for b, size, t in zip(window.begin, spatial, window.tail)],
                         indexing="ij")
    order = range(len(spatial)) if column_major else reversed(range(len(spatial)))
    index, stride = np.zeros_like(coords[0]), 1
    for d in order:
        index = index + coords[d] * stride
        stride *= spatial[d]
    return torch.from_numpy(index.reshape(-1).astype(np.int64))


@rule("MaxPool")
def max_pool(node, args):
    x = args[0]
    n = _spatial_rank(node, x.shape)
    window = pool_window(node, x.shape[2:])
    work = _pool_dtype(x.dtype)
    pool = _MAX_POOL[n]

    def pooled(x, with_indices):
        xp = F.pad(x.to(work), window.torch_pads, value=float("-inf"))
        return pool(xp, window.kernel, window.strides, 0, window.dilations, return_indices=with_indices)

    if node.n_outputs == 1:
        return (lambda x: pooled(x, False).to(x.dtype)), [x]
    plane = Arg.constant(_max_pool_indices(x.shape, window, bool(node.attrs.get("storage_order", 0))))
    batch, channels = x.shape[:2]
    offsets = torch.arange(batch * channels, dtype=torch.int64) * math.prod(x.shape[2:])
    offsets = Arg.constant(offsets.reshape((batch, channels) + (1,) * n))

    def with_indices(x, plane, offsets):
        y, padded_index = pooled(x, True)
        return y.to(x.dtype), torch.take(plane, padded_index) + offsets

    return with_indices, [x, plane, offsets]


@rule("AveragePool")
def average_pool(node, args):
    x = args[0]
    n = _spatial_rank(node, x.shape)
    window = pool_window(node, x.shape[2:])
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    count = Arg.constant(_counted_positions(x.shape[2:], window, include_pad).to(x.dtype))

    def fn(x, count):
        return _window_sum(F.pad(x, window.torch_pads), window) / count

    return fn, [x, count]


@rule("LpPool")
def lp_pool(node, args):
    x = args[0]
    _spatial_rank(node, x.shape)
    window = pool_window(node, x.shape[2:])
    p = float(node.attrs.get("p", 2))

    def fn(x):
        return _window_sum(F.pad(x.abs().pow(p), window.torch_pads), window).pow(1.0 / p)

    return fn, [x]


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def global_pool(node, args):
    dims = list(range(2, len(args[0].shape)))
    if node.op_type == "GlobalAveragePool":
        return (lambda x: x.mean(dims, keepdim=True)), [args[0]]
    if node.op_type == "GlobalLpPool":
        p = float(node.attrs.get("p", 2))
        return (lambda x: x.abs().pow(p).sum(dims, keepdim=True).pow(1.0 / p)), [args[0]]
    return (lambda x: torch.amax(x, dims, keepdim=True)), [args[0]]


@rule("MaxUnpool")
def max_unpool(node, args):
    """Each value written at its MaxPool index (flat over the whole output) into zeros."""
    x, indices = args[0], args[1]
    n = _spatial_rank(node, x.shape)
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * n))
    pads = list(node.attrs.get("pads", [0] * 2 * n))
    given = _present(args, 2)
    if given is not None:
        out_shape = tuple(given.ints("output_shape"))
    else:
        out_shape = tuple(x.shape[:2]) + tuple((size - 1) * s + k - b - e for size, s, k, b, e in
                                               zip(x.shape[2:], strides, kernel, pads[:n], pads[n:]))
    total = math.prod(out_shape)

    def fn(x, indices):
        flat = x.new_zeros(total).scatter(0, indices.reshape(-1).to(torch.int64), x.reshape(-1))
        return flat.reshape(out_shape)

    return fn, [x, indices]


# --- normalisations ---------------------------------------------------------------------------------


def _channel_shape(rank: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (rank - 2)


@rule("BatchNormalization")
def batch_norm(node, args):
    eps = float(node.attrs.get("epsilon", 1e-5))
    training = bool(node.attrs.get("training_mode", 0))
    if node.n_outputs > 1 and (not training or node.opset < 14):
        raise LoweringError("BatchNormalization with the saved-statistics outputs of opsets before 14")
    if not training:
        def inference(x, scale, bias, mean, var):
            mean, var, scale, bias = (t.to(x.dtype) for t in (mean, var, scale, bias))  # opset 15: may differ
            return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

        return inference, args[:5]
    # training_mode: normalised by the batch's own statistics (population variance); the running
    # statistics outputs blend them into the given ones by momentum.
    momentum = float(node.attrs.get("momentum", 0.9))
    dims = [d for d in range(len(args[0].shape)) if d != 1]
    n_outputs = node.n_outputs

    def training_fn(x, scale, bias, mean, var):
        batch_mean = x.mean(dims)
        batch_var = (x - batch_mean.reshape(_channel_shape(x.dim()))).pow(2).mean(dims)
        y = F.batch_norm(x, batch_mean, batch_var, scale.to(x.dtype), bias.to(x.dtype), False, 0.0, eps)
        if n_outputs == 1:
            return y
        return (y, mean * momentum + batch_mean.to(mean.dtype) * (1 - momentum),
                var * momentum + batch_var.to(var.dtype) * (1 - momentum))

    return training_fn, args[:5]


@rule("InstanceNormalization")
def instance_norm(node, args):
    channels = args[0].shape[1]
    eps = float(node.attrs.get("epsilon", 1e-5))
    # Each channel its own group: group_norm normalises over the spatial dims of each (n, c).
    return (lambda x, scale, bias: F.group_norm(x, channels, scale, bias, eps)), args[:3]


@rule("GroupNormalization")
def group_norm(node, args):
    channels = args[0].shape[1]
    groups = node.attrs["num_groups"]
    eps = float(node.attrs.get("epsilon", 1e-5))
    per_group = node.opset < 21  # opset 18: scale and bias per group; 21: per channel
    stash = torch.float32 if node.opset >= 21 and node.attrs.get("stash_type", 1) == 1 else None

    def fn(x, scale, bias):
        if per_group:
            scale = scale.reshape(groups, 1).expand(groups, channels // groups).reshape(channels)
            bias = bias.reshape(groups, 1).expand(groups, channels // groups).reshape(channels)
        xs = x.to(stash) if stash is not None else x
        y = F.group_norm(xs, groups, None, None, eps).to(x.dtype)
        return y * scale.reshape(_channel_shape(x.dim())) + bias.reshape(_channel_shape(x.dim()))

    return fn, args[:3]


@rule("LpNormalization")
def lp_norm(node, args):
    axis = _axis(node.attrs.get("axis", -1), len(args[0].shape))
    p = node.attrs.get("p", 2)
    if p not in (1, 2):
        raise LoweringError(f"LpNormalization with p={p} (the spec allows 1 and 2)")

    def fn(x):
        norm = x.abs().sum(axis, keepdim=True) if p == 1 else x.pow(2).sum(axis, keepdim=True).sqrt()
        return torch.where(norm == 0, torch.zeros_like(x), x / norm)  # a zero vector stays zero

    return fn, [args[0]]


@rule("MeanVarianceNormalization")
def mean_variance_norm(node, args):
    rank = len(args[0].shape)
    dims = sorted(_axis(a, rank) for a in node.attrs.get("axes", [0, 2, 3]))

    def fn(x):  # the op's function body, (x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9), with the
        centered = x - x.mean(dims, keepdim=True)  # variance as E[(x - E[x])^2]: no cancellation
        return centered / (centered.pow(2).mean(dims, keepdim=True).sqrt() + 1e-9)

    return fn, [args[0]]


@rule("LRN")
def local_response_norm(node, args):
    """x / (bias + alpha / size * sum of x^2 over the channels [c - floor((size-1)/2), c + ceil((size-1)/2)])^beta."""
    channels = args[0].shape[1]
    size = node.attrs["size"]
    alpha, beta = float(node.attrs.get("alpha", 1e-4)), float(node.attrs.get("beta", 0.75))
    bias = float(node.attrs.get("bias", 1.0))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    rank = len(args[0].shape)

    def fn(x):
        squares = (x * x).unsqueeze(1)  # (n, 1, c, ...): pad the channel dim as a spatial one
        squares = F.pad(squares, [0, 0] * (rank - 2) + [before, after])
        window = sum(squares[:, :, j:j + channels] for j in range(size)).squeeze(1)
        return x / (bias + alpha / size * window).pow(beta)

    return fn, [args[0]]


# --- Resize and Upsample ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResizeAttrs:
    mode: str  # nearest | linear | cubic
    transform: str  # coordinate_transformation_mode
    nearest_mode: str  # round_prefer_floor | round_prefer_ceil | floor | ceil | simple (before opset 11)
    cubic_a: float = -0.75
    exclude_outside: bool = False
    antialias: bool = False
    extrapolation_value: float = 0.0


def _source_coords(attrs: ResizeAttrs, size: int, out: int, scale: float, roi: tuple[float, float]) -> np.ndarray:
    """For each output position along one axis, the input coordinate it samples: the spec's
    coordinate_transformation_mode formulas, computed as onnxruntime does (in float32, the output
    length an integer), so that a coordinate on a rounding tie picks the same neighbour."""
    f = np.float32
    y = np.arange(out, dtype=f)
    scale, length, resized = f(scale), f(size), f(out)
    t = attrs.transform
    if t == "align_corners":
        x = np.zeros(out, f) if out == 1 else y * (length - 1) / (resized - 1)
    elif t == "asymmetric":
        x = y / scale
    elif t == "tf_crop_and_resize":
        start, end = f(roi[0]), f(roi[1])
        if out == 1:
            x = np.full(out, f(0.5) * (start + end) * (length - 1), f)
        else:
            x = start * (length - 1) + y * (end - start) * (length - 1) / (resized - 1)
    elif t == "pytorch_half_pixel":
        x = np.zeros(out, f) if out == 1 else (y + f(0.5)) / scale - f(0.5)
    elif t == "half_pixel":
        x = (y + f(0.5)) / scale - f(0.5)
    elif t == "tf_half_pixel_for_nn":
        x = (y + f(0.5)) / scale
    elif t == "half_pixel_symmetric":
        offset = length / 2 * (1 - resized / (scale * length))
        x = offset + ((y + f(0.5)) / scale - f(0.5))
    else:
        raise LoweringError(f"Resize with coordinate_transformation_mode {t!r}")
    return x.astype(np.float64)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _tap_weights(attrs: ResizeAttrs, ratio: np.ndarray, scale: float) -> np.ndarray:
    """(out, taps) weights of the taps around each coordinate, `ratio` in (0, 1] its distance past
    the tap left of it (the reference's convention: an integral coordinate has ratio 1)."""
    if attrs.mode == "nearest":
        if attrs.nearest_mode == "round_prefer_floor":
            right = ratio > 0.5
        elif attrs.nearest_mode == "round_prefer_ceil":
            right = ratio >= 0.5
        elif attrs.nearest_mode == "floor":
            right = np.zeros_like(ratio, dtype=bool)
        elif attrs.nearest_mode == "ceil":
            right = np.ones_like(ratio, dtype=bool)
        elif attrs.nearest_mode == "simple":  # opset < 11: truncate upsampling, ceil downsampling
            right = np.full(ratio.shape, scale < 1, dtype=bool)
        else:
            raise LoweringError(f"Resize with nearest_mode {attrs.nearest_mode!r}")
        right = right | (ratio == 1)
        return np.stack([~right, right], 1).astype(np.float64)
    if attrs.antialias and scale < 1:  # a kernel stretched by 1/scale, normalised
        reach = 1 if attrs.mode == "linear" else 2
        start = int(np.floor(-reach / scale) + 1)
        offsets = np.arange(start, 2 - start)
        args = (offsets[None, :] - ratio[:, None]) * scale
        w = np.clip(1 - np.abs(args), 0, 1) if attrs.mode == "linear" else _cubic(args, attrs.cubic_a)
        return w / w.sum(1, keepdims=True)
    if attrs.mode == "linear":
        return np.stack([1 - ratio, ratio], 1)
    if attrs.mode == "cubic":
        return _cubic(np.stack([ratio + 1, ratio, 1 - ratio, 2 - ratio], 1), attrs.cubic_a)
    raise LoweringError(f"Resize mode {attrs.mode!r}")


@dataclasses.dataclass(frozen=True)
class AxisResample:
    """One axis' resize: output position i = sum_j weights[j, i] * input[index[j, i]]; positions
    in `outside` (tf_crop_and_resize past the input) take the extrapolation value instead."""

    axis: int
    index: np.ndarray  # (taps, out) int64, within [0, size)
    weights: np.ndarray | None  # (taps, out); None: one tap of weight 1 (nearest)
    outside: np.ndarray | None  # (out,) bool
    repeat: int = 0  # > 0: index is each input position `repeat` times in order, a broadcast, not a gather


def axis_resample(attrs: ResizeAttrs, axis: int, size: int, out: int, scale: float,
                  roi: tuple[float, float]) -> AxisResample:
    """The taps and weights of one axis, as the spec's reference computes them: coefficients
    over the input edge-padded (indices clamped), or with exclude_outside renormalised."""
    reach = {"nearest": 1, "linear": 1, "cubic": 2}.get(attrs.mode, 2)
    taps = 2 * math.ceil(reach / scale) + 2 if attrs.antialias and 0 < scale < 1 else 4
    bounded("Resize's sampling table", out * taps)
    x = _source_coords(attrs, size, out, scale, roi)
    left = np.floor(x)
    ratio = np.where(x == left, 1.0, x - left)
    weights = _tap_weights(attrs, ratio, scale)
    taps = weights.shape[1]
    # The `taps` input positions nearest x, ties to the smaller (ratio 1 keeps x's own tap rightmost of a pair).
    half = int(np.ceil(taps / 2))
    padded = x + half
    base = np.floor(padded)
    frac = padded - base
    if taps % 2 == 0:
        offset = np.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((taps - 1) // 2), -((taps - 1) // 2) + 1)
    index = (base + offset).astype(np.int64)[:, None] + np.arange(taps)[None, :] - half
    if attrs.exclude_outside:
        weights = np.where((index < 0) | (index >= size), 0.0, weights)
        total = weights.sum(1, keepdims=True)
        weights = weights / np.where(total == 0, 1.0, total)
    index = np.clip(index, 0, size - 1)
    outside = None
    if attrs.transform == "tf_crop_and_resize":
        outside = (x < 0) | (x > size - 1)
        outside = outside if outside.any() else None
    if attrs.mode == "nearest":  # exactly one tap of weight 1 per position: a gather
        picked = index[np.arange(out), weights.argmax(1)]
        k = out // size
        repeat = k if outside is None and k * size == out and (picked == np.arange(out) // k).all() else 0
        return AxisResample(axis, picked[None, :], None, outside, repeat)
    return AxisResample(axis, index.T.copy(), weights.T.copy(), outside)


def _resample(x: torch.Tensor, plan: AxisResample, index: torch.Tensor, weights: torch.Tensor | None,
              outside: torch.Tensor | None, extrapolation_value: float) -> torch.Tensor:
    bcast = [1] * x.dim()
    bcast[plan.axis] = -1
    if plan.repeat:  # integer-factor nearest upsampling: each row repeated, as a layout change
        shape = list(x.shape)
        wide = shape[: plan.axis + 1] + [plan.repeat] + shape[plan.axis + 1:]
        shape[plan.axis] *= plan.repeat
        return x.unsqueeze(plan.axis + 1).expand(wide).reshape(shape)
    if weights is None:
        y = torch.index_select(x, plan.axis, index[0])
    else:
        y = None
        for j in range(index.shape[0]):
            term = torch.index_select(x, plan.axis, index[j]) * weights[j].reshape(bcast)
            y = term if y is None else y + term
    if outside is not None:
        y = y.masked_fill(outside.reshape(bcast), extrapolation_value)
    return y


def _lower_resize(x: Arg, attrs: ResizeAttrs, out_shape: list[int], scales: list[float],
                  rois: list[tuple[float, float]]):
    """fn and runtime args resizing x to out_shape, one axis after another."""
    shape = x.shape
    plans = []
    for axis, (size, out, scale, roi) in enumerate(zip(shape, out_shape, scales, rois)):
        if out == size and math.isclose(scale, 1.0) and roi == (0.0, 1.0):
            continue  # identity along this axis (the reference skips it too)
        if size == 0 or out <= 0:
            raise LoweringError(f"Resize of a dim of {size} to {out}")
        plans.append(axis_resample(attrs, axis, size, out, scale, roi))
    floating = x.dtype.is_floating_point
    work = x.dtype if floating else torch.float32
    runtime = [x]
    for plan in plans:
        runtime.append(Arg.constant(torch.from_numpy(plan.index)) if not plan.repeat else None)
        runtime.append(Arg.constant(torch.from_numpy(plan.weights).to(work)) if plan.weights is not None else None)
        runtime.append(Arg.constant(torch.from_numpy(plan.outside)) if plan.outside is not None else None)
    present = [a is not None for a in runtime]
    interpolates = any(p.weights is not None for p in plans)
    limits = None if floating else (torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max)

    def fn(x, *given):
        it = iter(given)
        tables = [next(it) if p else None for p in present[1:]]
        y = x.to(work) if interpolates else x
        # Last axis first, as onnxruntime's antialias passes go (width, then height): for integers,
        # rounded after each pass as there, it decides the last bit.
        for i, plan in reversed(list(enumerate(plans))):
            y = _resample(y, plan, *tables[3 * i: 3 * i + 3], attrs.extrapolation_value)
            if limits is not None and attrs.antialias and plan.weights is not None:
                y = torch.round(y).clamp(*limits)
        if interpolates and limits is not None:  # integers saturated, and else truncated, as onnxruntime casts
            y = y.clamp(*limits).to(x.dtype)
        return y

    return fn, [a for a in runtime if a is not None]


def _optional_values(arg: Arg | None, what: str, floats: bool) -> list | None:
    if arg is None or arg.meta.numel() == 0:
        return None
    return arg.floats(what) if floats else arg.ints(what)


@rule("Resize")
def resize(node, args):
    x = args[0]
    rank = len(x.shape)
    a = node.attrs
    if node.opset < 11:
        scales_arg, sizes_arg, roi_arg = _present(args, 1), None, None
        attrs = ResizeAttrs(a.get("mode", "nearest"), "asymmetric", "simple")
    else:
        roi_arg, scales_arg, sizes_arg = _present(args, 1), _present(args, 2), _present(args, 3)
        attrs = ResizeAttrs(a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel"),
                            a.get("nearest_mode", "round_prefer_floor"), float(a.get("cubic_coeff_a", -0.75)),
                            bool(a.get("exclude_outside", 0)), bool(a.get("antialias", 0)),
                            float(a.get("extrapolation_value", 0.0)))
    axes = [_axis(i, rank) for i in a["axes"]] if "axes" in a else list(range(rank))
    given_scales = _optional_values(scales_arg, "scales", True)
    given_sizes = _optional_values(sizes_arg, "sizes", False)
    given_roi = _optional_values(roi_arg, "roi", True)
    scales, out_shape = [1.0] * rank, list(x.shape)
    if given_sizes is not None:
        ratios = [given_sizes[i] / x.shape[axis] for i, axis in enumerate(axes)]
        policy = a.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":  # one scale for every axis, the output rounded half up
            ratio = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [ratio] * len(axes)
        for axis, ratio, size in zip(axes, ratios, given_sizes):
            scales[axis] = ratio
            out_shape[axis] = size if policy == "stretch" else int(ratio * x.shape[axis] + 0.5)
    elif given_scales is not None:
        for axis, scale in zip(axes, given_scales):
            scales[axis] = scale
            out_shape[axis] = int(np.float32(scale) * np.float32(x.shape[axis]))  # in float32, as onnxruntime
    else:
        raise LoweringError("Resize with neither scales nor sizes")
    rois = [(0.0, 1.0)] * rank
    if given_roi is not None and attrs.transform == "tf_crop_and_resize":
        k = len(given_roi) // 2
        roi_axes = axes if k == len(axes) else list(range(rank))
        for i, axis in enumerate(roi_axes):
            rois[axis] = (given_roi[i], given_roi[k + i])
    return _lower_resize(x, attrs, out_shape, scales, rois)


@rule("Upsample")
def upsample(node, args):
    x = args[0]
    scales = list(node.attrs["scales"]) if "scales" in node.attrs else args[1].floats("scales")
    mode = node.attrs.get("mode", "nearest")
    attrs = ResizeAttrs("linear" if mode in ("linear", "bilinear") else mode, "asymmetric", "simple")
    out_shape = [int(np.float32(s) * np.float32(d)) for s, d in zip(scales, x.shape)]
    return _lower_resize(x, attrs, out_shape, scales, [(0.0, 1.0)] * len(x.shape))


# --- ConvTranspose ----------------------------------------------------------------------------------


@rule("ConvTranspose")
def conv_transpose(node, args):
    x_shape, w_shape = args[0].shape, args[1].shape
    n = _spatial_rank(node, x_shape)
    a = node.attrs
    kernel = list(w_shape[2:])
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    output_padding = list(a.get("output_padding", [0] * n))
    groups = a.get("group", 1)
    auto_pad = a.get("auto_pad", "NOTSET")
    # The output with no pads: what conv_transpose gives at padding 0. ONNX's output is a window of
    # it, starting at `begin` (pads before), `out` long; past its end the output is zero.
    full = [(size - 1) * s + (k - 1) * d + 1 for size, s, k, d in zip(x_shape[2:], strides, kernel, dilations)]
    if "output_shape" in a or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        grown = [f + p for f, p in zip(full, output_padding)]
        if "output_shape" in a:  # pads ignored; a longer output is zeros after
            out = list(a["output_shape"])[-n:]
            total = [max(g - o, 0) for g, o in zip(grown, out)]
        else:  # out = size * stride; as onnxruntime, no longer than unpadded when the stride exceeds the kernel
            total = [max(g - size * s, 0) for g, size, s in zip(grown, x_shape[2:], strides)]
            out = [g - t for g, t in zip(grown, total)]
        # The larger half of an odd total after for SAME_UPPER, before otherwise (the spec's rule).
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
    else:
        pads = list(a.get("pads", [0] * 2 * n)) if auto_pad == "NOTSET" else [0] * 2 * n
        begin = pads[:n]
        out = [f + p - b - e for f, p, b, e in zip(full, output_padding, begin, pads[n:])]
    if min(out) < 1:
        raise LoweringError(f"ConvTranspose output of {out}")
    end_crop = [f - b - o for f, b, o in zip(full, begin, out)]  # negative: zeros appended
    extra = [b - e for b, e in zip(begin, end_crop)]
    # torch's own padding crops `begin` on both sides and adds output_padding (< stride or dilation) after.
    native = all(b >= 0 and 0 <= p < max(s, d) for b, p, s, d in zip(begin, extra, strides, dilations))
    op = _CONV_TRANSPOSE[n]
    bias = _present(args, 2)
    crop = _torch_pads([-b for b in begin], [-e for e in end_crop])

    def fn(x, w, b=None):
        if native:
            return op(x, w, b, strides, begin, extra, groups, dilations)
        y = F.pad(op(x, w, None, strides, 0, 0, groups, dilations), crop)
        return y + b.reshape(_channel_shape(y.dim())) if b is not None else y

    return fn, args[:2] + ([bias] if bias is not None else [])


# --- sampling grids --------------------------------------------------------------------------------


_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
               "cubic": "bicubic"}


@rule("GridSample")
def grid_sample(node, args):
    mode = _GRID_MODES.get(node.attrs.get("mode", "linear" if node.opset >= 20 else "bilinear"))
    padding = node.attrs.get("padding_mode", "zeros")
    align = bool(node.attrs.get("align_corners", 0))
    rank = len(args[0].shape)
    if mode is None or rank not in (4, 5) or (rank == 5 and mode == "bicubic"):
        raise LoweringError(f"GridSample mode {node.attrs.get('mode')!r} over {rank - 2} spatial dims "
                            f"(torch samples 2 dims in every mode, 3 in linear and nearest)")
    return (lambda x, grid: F.grid_sample(x, grid.to(x.dtype), mode, padding, align)), args[:2]


@rule("AffineGrid")
def affine_grid(node, args):
    size = args[1].ints("size")
    align = bool(node.attrs.get("align_corners", 0))
    if len(size) not in (4, 5):
        raise LoweringError(f"AffineGrid of a {len(size)}-d size (torch makes 2-d and 3-d grids)")
    return (lambda theta: F.affine_grid(theta, size, align)), [args[0]]


@rule("Col2Im")
def col2im(node, args):
    """Each column's block added back into the image: a transposed convolution of the columns,
    laid out on the grid of block positions, with a one-hot kernel per (channel, kernel offset);
    torch's fold does 2 spatial dims only, this does 1 to 3."""
    image = args[1].ints("image_shape")
    block = args[2].ints("block_shape")
    n = len(image)
    if n not in (1, 2, 3):
        raise LoweringError(f"Col2Im over {n} spatial dims (torch convolves 1 to 3)")
    dilations = list(node.attrs.get("dilations", [1] * n))
    strides = list(node.attrs.get("strides", [1] * n))
    pads = list(node.attrs.get("pads", [0] * 2 * n))
    batch, rows, _ = args[0].shape
    taps = math.prod(block)
    channels = rows // taps
    bounded("Col2Im's one-hot kernel", rows * taps)
    grid = [(size + b + e - d * (k - 1) - 1) // s + 1
            for size, b, e, d, k, s in zip(image, pads[:n], pads[n:], dilations, block, strides)]
    one_hot = torch.eye(taps, dtype=args[0].dtype).reshape([taps, 1] + block).repeat([channels, 1] + [1] * n)
    kernel = Arg.constant(one_hot)
    full = [(g - 1) * s + d * (k - 1) + 1 for g, s, d, k in zip(grid, strides, dilations, block)]
    crop = _torch_pads([-b for b in pads[:n]], [size - (f - b) for size, f, b in zip(image, full, pads[:n])])
    op = _CONV_TRANSPOSE[n]

    def fn(x, kernel):
        y = op(x.reshape([batch, rows] + grid), kernel, None, strides, 0, 0, channels, dilations)
        return F.pad(y, crop)  # the padded image's pads cut off (and any rows no block reached, zeros)

    return fn, [args[0], kernel]


# --- depth and space --------------------------------------------------------------------------------


def _block_mode(node) -> str:
    mode = node.attrs.get("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise LoweringError(f"{node.op_type} mode {mode!r}")
    return mode


@rule("CenterCropPad")
def center_crop_pad(node, args):
    """Each listed axis cut or zero-padded to its target, centred: an odd remainder is cropped
    from, or padded onto, the end. One constant F.pad (negative pads crop)."""
    shape = args[0].shape
    rank = len(shape)
    targets = args[1].ints("shape")
    axes = [_axis(a, rank) for a in node.attrs.get("axes", range(rank))]
    begin, end = [0] * rank, [0] * rank
    for axis, target in zip(axes, targets):
        grow = target - shape[axis]
        begin[axis] = grow // 2 if grow >= 0 else -((-grow) // 2)
        end[axis] = grow - begin[axis]
    pads = _torch_pads(begin, end)
    return (lambda x: F.pad(x, pads)), [args[0]]


@rule("DepthToSpace")
def depth_to_space(node, args):
    b, c, h, w = args[0].shape
    bs = node.attrs["blocksize"]
    if _block_mode(node) == "DCR":  # channels ordered (block row, block column, channel)
        split, perm = (b, bs, bs, c // (bs * bs), h, w), (0, 3, 4, 1, 5, 2)
    else:  # (channel, block row, block column)
        split, perm = (b, c // (bs * bs), bs, bs, h, w), (0, 1, 4, 2, 5, 3)
    out = (b, c // (bs * bs), h * bs, w * bs)
    return (lambda x: x.reshape(split).permute(perm).reshape(out)), [args[0]]


@rule("SpaceToDepth")
def space_to_depth(node, args):
    b, c, h, w = args[0].shape
    bs = node.attrs["blocksize"]
    split = (b, c, h // bs, bs, w // bs, bs)
    perm = (0, 3, 5, 1, 2, 4) if _block_mode(node) == "DCR" else (0, 1, 3, 5, 2, 4)
    out = (b, c * bs * bs, h // bs, w // bs)
    return (lambda x: x.reshape(split).permute(perm).reshape(out)), [args[0]]
