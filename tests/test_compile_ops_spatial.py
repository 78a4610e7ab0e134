"""The spatial rules (ops_spatial, and Pad's edge/reflect/wrap modes) against onnxruntime: each
variant a one-node model, lowered and run on CPU, then run on meta tensors (no host reads).

ONNX's own node test cases for these ops are run by the conformance test; these cover what those
cases leave out (asymmetric pads with dilations, ceil-mode overhang counted or not, Indices with
pads, opset-18 GroupNormalization, sizes with a policy, integer inputs, negative Pad pads...).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fuse_attn.compile.lower import LoweringError, lower, to_torch
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.static_check import run_on_meta, sdpa_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RNG = np.random.default_rng(0)


def randn(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def one_node(op, feeds, consts=None, opset=19, n_outputs=1, **attrs) -> onnx.ModelProto:
    """A model of one `op` node: `feeds` graph inputs, `consts` initializers (in input order after
    the feeds; a None value is an omitted optional input)."""
    consts = consts or {}
    inputs = list(feeds) + [name if value is not None else "" for name, value in consts.items()]
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op, inputs, outputs, **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [onnx.ValueInfoProto(name=o) for o in outputs],  # typed by onnxruntime's inference
        [numpy_helper.from_array(v, k) for k, v in consts.items() if v is not None])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol=1e-5, expected=None):
    """Lowered output == onnxruntime's (dtype, shape and values), and forward runs on meta tensors.
    `expected`: the outputs, where onnxruntime refuses the case or errs in it."""
    expected = run_onnxruntime(model, feeds) if expected is None else expected
    module = lower(model, [], sdpa_attention)
    inputs = tuple(to_torch(feeds[n]) for n in module.input_names)
    got = module(*inputs)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.numpy().dtype == e.dtype and g.shape == e.shape, (g.dtype, g.shape, e.dtype, e.shape)
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=atol)
    meta = run_on_meta(module, inputs)
    meta = meta if isinstance(meta, tuple) else (meta,)
    assert [tuple(m.shape) for m in meta] == [e.shape for e in expected]
    assert all(m.device.type == "meta" for m in meta)


# --- pooling ----------------------------------------------------------------------------------------

POOL_VARIANTS = {
    "asymmetric pads, strides, dilations": dict(kernel_shape=[3, 2], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2]),
    "ceil mode": dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "ceil mode, pads, last window dropped": dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
    "ceil mode with dilations": dict(kernel_shape=[2, 3], strides=[3, 2], dilations=[2, 1], pads=[0, 1, 1, 0], ceil_mode=1),
    "SAME_UPPER, stride 2": dict(kernel_shape=[3, 4], strides=[2, 2], auto_pad="SAME_UPPER"),
    "SAME_LOWER, stride 2": dict(kernel_shape=[4, 3], strides=[2, 3], auto_pad="SAME_LOWER"),
    "VALID": dict(kernel_shape=[2, 3], strides=[2, 1], auto_pad="VALID"),
}


@pytest.mark.parametrize("attrs", POOL_VARIANTS.values(), ids=POOL_VARIANTS.keys())
def test_max_pool(attrs):
    x = randn(2, 3, 9, 8)
    check(one_node("MaxPool", {"x": x}, opset=12, **attrs), {"x": x})


@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("attrs", [POOL_VARIANTS["asymmetric pads, strides, dilations"], POOL_VARIANTS["ceil mode"]],
                         ids=["pads", "ceil"])
def test_max_pool_indices(attrs, storage_order):
    x = randn(2, 3, 9, 8)
    check(one_node("MaxPool", {"x": x}, opset=12, n_outputs=2, storage_order=storage_order, **attrs), {"x": x})


@pytest.mark.parametrize("rank", [3, 5])
def test_max_pool_1d_3d_with_indices(rank):
    x = randn(*(2, 3, 7, 6, 5)[:rank])
    n = rank - 2
    check(one_node("MaxPool", {"x": x}, opset=12, n_outputs=2, kernel_shape=[2] * n, strides=[2] * n,
                   pads=[1] * n + [0] * n), {"x": x})


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_max_pool_integers(dtype):
    x = RNG.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (1, 2, 7, 7)).astype(dtype)
    check(one_node("MaxPool", {"x": x}, opset=12, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]), {"x": x})


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("attrs", POOL_VARIANTS.values(), ids=POOL_VARIANTS.keys())
def test_average_pool(attrs, count_include_pad):
    x = randn(2, 3, 9, 8)
    check(one_node("AveragePool", {"x": x}, opset=19, count_include_pad=count_include_pad, **attrs), {"x": x})


def test_average_pool_3d():
    x = randn(1, 2, 6, 7, 5)
    check(one_node("AveragePool", {"x": x}, opset=19, kernel_shape=[2, 3, 2], pads=[1, 1, 0, 0, 1, 1],
                   strides=[2, 2, 1], count_include_pad=1), {"x": x})


@pytest.mark.parametrize("p", [1, 2, 3])
def test_lp_pool(p):
    x = randn(2, 3, 9, 8)
    check(one_node("LpPool", {"x": x}, opset=18, p=p, **POOL_VARIANTS["asymmetric pads, strides, dilations"]), {"x": x})


def test_lp_pool_same_upper():
    x = randn(1, 2, 7, 6)
    check(one_node("LpPool", {"x": x}, opset=18, kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"), {"x": x})


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 5, 4), (1, 2, 3, 4, 5)])
def test_global_pools(op, shape):
    x = randn(*shape)
    check(one_node(op, {"x": x}, opset=13), {"x": x})


# --- normalisations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 5)])
def test_batch_norm(shape):
    x = randn(*shape)
    c = shape[1]
    consts = {"scale": randn(c), "bias": randn(c), "mean": randn(c), "var": np.abs(randn(c)) + 0.1}
    check(one_node("BatchNormalization", {"x": x}, consts, opset=15, epsilon=1e-3), {"x": x})


def test_batch_norm_training_mode():
    """Batch statistics, and the running-statistics outputs (onnxruntime requires all three)."""
    x = randn(4, 3, 5) * 2 + 1
    consts = {"scale": randn(3), "bias": randn(3), "mean": randn(3), "var": np.abs(randn(3))}
    check(one_node("BatchNormalization", {"x": x}, consts, opset=15, n_outputs=3, training_mode=1,
                   momentum=0.8), {"x": x})


def test_batch_norm_saved_statistics_of_old_opsets_are_refused():
    x = randn(2, 3, 4)
    consts = {"scale": randn(3), "bias": randn(3), "mean": randn(3), "var": np.abs(randn(3))}
    model = one_node("BatchNormalization", {"x": x}, consts, opset=9, n_outputs=5)
    with pytest.raises(LoweringError, match="saved-statistics outputs of opsets before 14"):
        lower(model, [], sdpa_attention)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 4, 5)])
def test_instance_norm(shape):
    x = randn(*shape) * 3 + 1
    consts = {"scale": randn(3), "bias": randn(3)}
    check(one_node("InstanceNormalization", {"x": x}, consts, opset=6, epsilon=1e-3), {"x": x})


@pytest.mark.parametrize("opset, scale_len", [(18, 2), (21, 6)], ids=["per group (18)", "per channel (21)"])
def test_group_norm(opset, scale_len):
    x = randn(2, 6, 4, 3) * 2 + 1
    consts = {"scale": randn(scale_len), "bias": randn(scale_len)}
    check(one_node("GroupNormalization", {"x": x}, consts, opset=opset, num_groups=2, epsilon=1e-4), {"x": x})


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("axis", [0, -1])
def test_lp_norm(p, axis):
    x = randn(3, 4, 5)
    x[1, 2, :] = 0  # a zero vector along the last axis stays zero
    x[:, 1, 3] = 0  # and along the first
    check(one_node("LpNormalization", {"x": x}, opset=1, p=p, axis=axis), {"x": x})


@pytest.mark.parametrize("axes", [None, [1], [0, 2, 3]])
def test_mean_variance_norm(axes):
    x = randn(2, 3, 4, 5) * 2 + 3
    attrs = {} if axes is None else {"axes": axes}
    check(one_node("MeanVarianceNormalization", {"x": x}, opset=13, **attrs), {"x": x})


# --- Resize and Upsample ----------------------------------------------------------------------------

F32 = lambda *v: np.array(v, np.float32)  # noqa: E731
I64 = lambda *v: np.array(v, np.int64)  # noqa: E731

RESIZE_VARIANTS = {
    "nearest up, half_pixel, round_prefer_floor": (dict(mode="nearest"), F32(1, 1, 1.7, 2.5), None),
    "nearest down, asymmetric, floor": (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), F32(1, 1, 0.6, 0.8), None),
    "nearest, align_corners, round_prefer_ceil": (dict(mode="nearest", coordinate_transformation_mode="align_corners", nearest_mode="round_prefer_ceil"), F32(1, 1, 1.5, 0.7), None),
    "nearest, tf_half_pixel ceil": (dict(mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="ceil"), F32(1, 1, 2.0, 3.0), None),
    "linear up, half_pixel": (dict(mode="linear"), F32(1, 1, 1.7, 2.5), None),
    "linear down, align_corners": (dict(mode="linear", coordinate_transformation_mode="align_corners"), F32(1, 1, 0.6, 0.8), None),
    "linear, pytorch_half_pixel to one row": (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), None, I64(2, 3, 1, 11)),
    "linear, half_pixel_symmetric": (dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"), F32(1, 1, 1.7, 0.55), None),
    "linear, asymmetric sizes": (dict(mode="linear", coordinate_transformation_mode="asymmetric"), None, I64(2, 3, 13, 4)),
    "cubic, half_pixel": (dict(mode="cubic"), F32(1, 1, 1.7, 0.8), None),
    "cubic, A=-0.5, exclude_outside": (dict(mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1), F32(1, 1, 2.3, 0.6), None),
    "cubic, align_corners": (dict(mode="cubic", coordinate_transformation_mode="align_corners"), F32(1, 1, 1.5, 0.6), None),
    "linear antialias down": (dict(mode="linear", antialias=1), F32(1, 1, 0.35, 0.6), None),
    "cubic antialias down": (dict(mode="cubic", antialias=1), F32(1, 1, 0.3, 0.75), None),
    "sizes, not_larger, axes": (dict(mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger"), None, I64(15, 20)),
    "sizes, not_smaller, axes (reversed)": (dict(mode="nearest", axes=[3, 2], keep_aspect_ratio_policy="not_smaller"), None, I64(5, 12)),
    "scales on given axes": (dict(mode="cubic", axes=[3]), F32(1.4), None),
}


@pytest.mark.parametrize("attrs, scales, sizes", RESIZE_VARIANTS.values(), ids=RESIZE_VARIANTS.keys())
def test_resize(attrs, scales, sizes):
    x = randn(2, 3, 7, 9)
    consts = {"roi": None, "scales": scales, "sizes": sizes}
    check(one_node("Resize", {"x": x}, consts, opset=19, **attrs), {"x": x})


@pytest.mark.parametrize("mode", ["linear", "cubic", "nearest"])
def test_resize_tf_crop_and_resize(mode):
    x = randn(1, 2, 6, 8)
    consts = {"roi": F32(0, 0, 0.2, -0.1, 1, 1, 0.9, 1.3), "scales": None, "sizes": I64(1, 2, 5, 7)}
    check(one_node("Resize", {"x": x}, consts, opset=19, mode=mode, coordinate_transformation_mode="tf_crop_and_resize",
                   extrapolation_value=-3.0), {"x": x})


@pytest.mark.parametrize("mode", ["nearest", "linear"])  # onnxruntime has no uint8 cubic but antialiased
def test_resize_integers(mode):
    x = RNG.integers(0, 255, (1, 2, 5, 6)).astype(np.uint8)
    consts = {"roi": None, "scales": F32(1, 1, 1.6, 0.7)}
    check(one_node("Resize", {"x": x}, consts, opset=19, mode=mode), {"x": x})


@pytest.mark.parametrize("scales", [F32(1, 1, 1.6, 0.7), F32(1, 1, 0.5, 0.4)], ids=["up and down", "down"])
def test_resize_integers_antialias(scales):
    """uint8 antialiased cubic (image preprocessing): onnxruntime rounds after each axis' pass."""
    x = RNG.integers(0, 255, (1, 2, 5, 6)).astype(np.uint8)
    check(one_node("Resize", {"x": x}, {"roi": None, "scales": scales}, opset=19, mode="cubic", antialias=1), {"x": x})


@pytest.mark.parametrize("scales", [F32(1, 1, 2, 3), F32(1, 1, 0.5, 0.7), F32(1, 1, 1.5, 2.5)],
                         ids=["up", "down", "fractional up"])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_opset10(mode, scales):
    x = randn(1, 2, 5, 6)
    check(one_node("Resize", {"x": x}, {"scales": scales}, opset=10, mode=mode), {"x": x})


@pytest.mark.parametrize("transform, gathered", [("half_pixel", 0), ("asymmetric", 1)])
def test_integer_nearest_upsampling_is_a_broadcast(transform, gathered):
    """x2 and x3 nearest with half_pixel repeat each row: no index table, no gather. asymmetric
    with round_prefer_floor x3 rounds 2/3 up, not a repeat: that axis stays a gather."""
    x = randn(1, 2, 4, 5)
    model = one_node("Resize", {"x": x}, {"roi": None, "scales": F32(1, 1, 2, 3)}, opset=19, mode="nearest",
                     coordinate_transformation_mode=transform)
    check(model, {"x": x})
    assert len(lower(model, [], sdpa_attention).constant_keys) == gathered


@pytest.mark.parametrize("transform", ["tf_half_pixel_for_nn", "half_pixel"])
def test_resize_opset11_sizes_after_empty_scales(transform):
    """Opset 11's required roi and scales given empty, the size in `sizes`."""
    x = randn(1, 2, 5, 6)
    consts = {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32), "sizes": I64(1, 2, 8, 4)}
    check(one_node("Resize", {"x": x}, consts, opset=11, mode="nearest", coordinate_transformation_mode=transform), {"x": x})


@pytest.mark.parametrize("mode, scales", [("nearest", F32(1, 1, 2, 3)), ("linear", F32(1, 1, 2, 1.5))])
def test_upsample(mode, scales):
    x = randn(1, 2, 4, 5)
    check(one_node("Upsample", {"x": x}, {"scales": scales}, opset=9, mode=mode), {"x": x})


def test_upsample_opset7_scales_attribute():
    x = randn(1, 2, 4, 5)
    check(one_node("Upsample", {"x": x}, opset=7, mode="nearest", scales=[1.0, 1.0, 2.0, 3.0]), {"x": x})


# --- ConvTranspose ----------------------------------------------------------------------------------

CONV_TRANSPOSE_VARIANTS = {
    "plain": dict(),
    "groups, strides, dilations": dict(group=2, strides=[2, 3], dilations=[2, 1]),
    "symmetric pads, output_padding (torch's own padding)": dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0]),
    "asymmetric pads": dict(strides=[2, 1], pads=[0, 2, 1, 0]),
    "output_padding past the pads": dict(strides=[3, 2], output_padding=[2, 1]),
    "output_shape, longer than unpadded": dict(strides=[2, 2], output_shape=[10, 12]),
    "output_shape, odd and even cut": dict(strides=[2, 2], output_shape=[8, 9]),
    "SAME_UPPER, odd total": dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    "SAME_LOWER, odd total": dict(strides=[2, 2], auto_pad="SAME_LOWER"),
    "SAME_UPPER, stride over kernel": dict(strides=[4, 4], auto_pad="SAME_UPPER"),
}


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("attrs", CONV_TRANSPOSE_VARIANTS.values(), ids=CONV_TRANSPOSE_VARIANTS.keys())
def test_conv_transpose(attrs, bias):
    x = randn(2, 4, 4, 5)
    w = randn(4, 3, 3, 3)
    consts = {"w": w, "b": randn(3 * attrs.get("group", 1))} if bias else {"w": w}
    check(one_node("ConvTranspose", {"x": x}, consts, opset=11, **attrs), {"x": x})


@pytest.mark.parametrize("rank", [3, 5])
def test_conv_transpose_1d_3d(rank):
    n = rank - 2
    x = randn(*(1, 2, 5, 4, 3)[:rank])
    w = randn(*(2, 3, 3, 2, 2)[: rank])
    check(one_node("ConvTranspose", {"x": x}, {"w": w}, opset=11, strides=[2] * n, pads=[1] * n + [0] * n), {"x": x})


# --- unpooling, LRN, sampling grids, Col2Im --------------------------------------------------------


def test_global_lp_pool():
    x = randn(2, 3, 4, 5)
    check(one_node("GlobalLpPool", {"x": x}, opset=2, p=3), {"x": x})


@pytest.mark.parametrize("shape, output_shape", [((1, 2, 6, 8), None), ((1, 2, 7, 9), I64(1, 2, 7, 9))],
                         ids=["inferred", "output_shape"])
def test_max_unpool_inverts_max_pool(shape, output_shape):
    """MaxPool's values and Indices fed to MaxUnpool; with output_shape (the pooled input's own
    size) the indices index that output, as onnxruntime reads them."""
    x = randn(*shape)
    pool_attrs = dict(kernel_shape=[2, 2], strides=[2, 2])
    pooled = lower(one_node("MaxPool", {"x": x}, opset=12, n_outputs=2, **pool_attrs), [], sdpa_attention)(to_torch(x))
    values, indices = (t.numpy() for t in pooled)
    consts = {"shape": output_shape} if output_shape is not None else {}
    model = one_node("MaxUnpool", {"v": values, "i": indices}, consts, opset=11, **pool_attrs)
    check(model, {"v": values, "i": indices})


def lrn_by_the_spec(x, size, alpha, beta, bias):
    squares = np.zeros_like(x)
    for c in range(x.shape[1]):
        lo, hi = max(0, c - (size - 1) // 2), min(x.shape[1], c + -(-(size - 1) // 2) + 1)
        squares[:, c] = (x[:, lo:hi] ** 2).sum(1)
    return x / (bias + alpha / size * squares) ** beta


@pytest.mark.parametrize("size", [3, 5, 4])
def test_lrn(size):
    """An even size's window reaches one more channel after than before: onnxruntime refuses it
    (and ONNX's Python reference sums the wrong channels past the batch size), so the spec's
    formula, written out, is the reference there."""
    x = randn(2, 7, 3, 4)
    model = one_node("LRN", {"x": x}, opset=13, size=size, alpha=0.3, beta=0.6, bias=1.5)
    check(model, {"x": x}, expected=[lrn_by_the_spec(x, size, 0.3, 0.6, 1.5)] if size % 2 == 0 else None)


GRID_VARIANTS = {
    "bilinear, zeros": dict(mode="linear", padding_mode="zeros", align_corners=0),
    "nearest, border, aligned": dict(mode="nearest", padding_mode="border", align_corners=1),
    "bicubic, reflection": dict(mode="cubic", padding_mode="reflection", align_corners=0),
    "bicubic, zeros, aligned": dict(mode="cubic", padding_mode="zeros", align_corners=1),
}


@pytest.mark.parametrize("attrs", GRID_VARIANTS.values(), ids=GRID_VARIANTS.keys())
def test_grid_sample(attrs):
    x = randn(2, 3, 5, 6)
    grid = (RNG.uniform(-1.3, 1.3, (2, 4, 7, 2))).astype(np.float32)  # past the edges too
    check(one_node("GridSample", {"x": x, "grid": grid}, opset=20, **attrs), {"x": x, "grid": grid})


def test_grid_sample_volumetric():
    x = randn(1, 2, 4, 5, 3)
    grid = (RNG.uniform(-1.2, 1.2, (1, 3, 2, 4, 3))).astype(np.float32)
    check(one_node("GridSample", {"x": x, "grid": grid}, opset=20, mode="linear"), {"x": x, "grid": grid})


@pytest.mark.parametrize("align_corners", [0, 1])
@pytest.mark.parametrize("size", [I64(2, 3, 5, 6), I64(2, 3, 4, 5, 3)], ids=["2d", "3d"])
def test_affine_grid(size, align_corners):
    theta = randn(2, len(size) - 2, len(size) - 1)
    check(one_node("AffineGrid", {"theta": theta}, {"size": size}, opset=20, align_corners=align_corners),
          {"theta": theta})


COL2IM_VARIANTS = {
    "2d, asymmetric pads, strides, dilations": (I64(7, 8), I64(2, 3), dict(pads=[1, 0, 0, 2], strides=[2, 1], dilations=[1, 2])),
    "2d, a stride past the last block": (I64(6, 7), I64(2, 2), dict(strides=[3, 2])),
    "3d": (I64(4, 5, 3), I64(2, 2, 2), dict(pads=[1, 0, 0, 0, 1, 1])),
    "1d": (I64(9,), I64(3,), dict(strides=[2])),
    "1d, dilations (onnxruntime's differs from the reference)": (I64(9,), I64(3,), dict(strides=[2], dilations=[2])),
}


@pytest.mark.parametrize("image, block, attrs", COL2IM_VARIANTS.values(), ids=COL2IM_VARIANTS.keys())
def test_col2im(image, block, attrs):
    n = len(image)
    pads = attrs.get("pads", [0] * 2 * n)
    strides, dilations = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    blocks = np.prod([(i + pads[d] + pads[n + d] - dilations[d] * (block[d] - 1) - 1) // strides[d] + 1
                      for d, i in enumerate(image)])
    x = randn(2, 3 * int(np.prod(block)), int(blocks))
    model = one_node("Col2Im", {"x": x}, {"image": image, "block": block}, opset=18, **attrs)
    by_reference = n == 1 and "dilations" in attrs  # onnxruntime's 1-d dilated Col2Im differs from the spec's reference
    check(model, {"x": x}, expected=ReferenceEvaluator(model).run(None, {"x": x}) if by_reference else None)


# --- depth and space --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(mode):
    x = randn(2, 8, 3, 4)
    check(one_node("DepthToSpace", {"x": x}, opset=13, blocksize=2, mode=mode), {"x": x})


def test_space_to_depth():
    x = randn(2, 3, 6, 4)
    check(one_node("SpaceToDepth", {"x": x}, opset=13, blocksize=2), {"x": x})


@pytest.mark.parametrize("target, axes", [(I64(3, 6, 2, 9), None), (I64(7, 2), [-1, 1]), (I64(5,), [2])],
                         ids=["every axis, odd crop and pad", "negative axes", "one axis"])
def test_center_crop_pad(target, axes):
    x = randn(3, 4, 5, 6)
    attrs = {} if axes is None else {"axes": axes}
    check(one_node("CenterCropPad", {"x": x}, {"shape": target}, opset=18, **attrs), {"x": x})


# --- Pad's gathered modes ---------------------------------------------------------------------------

PAD_VARIANTS = {
    "last two dims": (I64(0, 0, 2, 3, 0, 0, 1, 2), None),
    "every dim, batch too": (I64(1, 2, 1, 1, 2, 0, 2, 1), None),
    "negative (crop) and positive": (I64(0, 0, -1, 2, 0, 0, 2, -2), None),
    "axes input": (I64(2, 1, 1, 3), I64(-1, 1)),
}


@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap"])
@pytest.mark.parametrize("pads, axes", PAD_VARIANTS.values(), ids=PAD_VARIANTS.keys())
def test_pad_modes(mode, pads, axes):
    x = randn(3, 4, 5, 6)
    consts = {"pads": pads, "value": None, "axes": axes}
    check(one_node("Pad", {"x": x}, consts, opset=19, mode=mode), {"x": x})


def test_pad_edge_of_integers():
    x = RNG.integers(-100, 100, (3, 4)).astype(np.int64)
    check(one_node("Pad", {"x": x}, {"pads": I64(1, 2, 3, 1)}, opset=19, mode="edge"), {"x": x})


# --- float16 (diffusion UNets and detectors ship in it) ---------------------------------------------

H = np.float16
HALF_VARIANTS = {
    "MaxPool": ("MaxPool", {}, dict(opset=12, kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "AveragePool": ("AveragePool", {}, dict(opset=19, kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "InstanceNormalization": ("InstanceNormalization", {"s": randn(4).astype(H), "b": randn(4).astype(H)}, dict(opset=6)),
    "GroupNormalization": ("GroupNormalization", {"s": randn(4).astype(H), "b": randn(4).astype(H)},
                           dict(opset=21, num_groups=2)),
    "Resize linear": ("Resize", {"roi": None, "scales": F32(1, 1, 2, 1.5)}, dict(opset=19, mode="linear")),
    "ConvTranspose": ("ConvTranspose", {"w": randn(4, 2, 3, 3).astype(H)},
                      dict(opset=11, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
}


@pytest.mark.parametrize("op, consts, attrs", HALF_VARIANTS.values(), ids=HALF_VARIANTS.keys())
def test_half_precision(op, consts, attrs):
    """float16 in, float16 out, within a few float16 ulps of onnxruntime's."""
    x = randn(1, 4, 6, 6).astype(H)
    check(one_node(op, {"x": x}, consts, **attrs), {"x": x}, atol=1e-2)


# --- refusals: one line naming why ------------------------------------------------------------------


def test_refusals_say_why():
    x = randn(1, 2, 4, 4)
    runtime_scales = one_node("Resize", {"x": x, "scales": F32(1, 1, 2, 2)}, {}, opset=19)
    runtime_scales.graph.node[0].input[:] = ["x", "", "scales"]
    cases = [
        (runtime_scales, "depends on the contents of an input"),
        (one_node("Resize", {"x": x}, {"roi": None, "scales": None, "sizes": None}, opset=19), "neither scales nor sizes"),
        (one_node("LpNormalization", {"x": x}, opset=1, p=3), "p=3"),
        (one_node("Pad", {"x": x}, {"pads": I64(0, 0, -2, 0, 0, 0, -2, 0)}, opset=19, mode="reflect"), "cropped to nothing"),
        # sizes a model declares do not make compile build tables without bound
        (one_node("Resize", {"x": x}, {"roi": None, "scales": None, "sizes": I64(1, 2, 4, 1 << 40)}, opset=19),
         "Resize's sampling table would hold"),
        (one_node("Pad", {"x": x}, {"pads": I64(0, 0, 0, 0, 0, 0, 0, 1 << 40)}, opset=19, mode="edge"),
         "index table would hold"),
        (one_node("Col2Im", {"x": randn(1, 1 << 20, 1)}, {"image": I64(1024, 1024), "block": I64(1024, 1024)}, opset=18),
         "one-hot kernel would hold"),
    ]
    for model, reason in cases:
        with pytest.raises(LoweringError, match=reason):
            lower(model, [], sdpa_attention)
