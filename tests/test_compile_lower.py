"""Shapes, kernel checks, and the lowering of fused models (fuse_attn.compile.lower + simulated FlashFwd)
against onnxruntime running the same fused model through FlashFwd's reference ONNX function."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fuse_attn.ir import contract
from fuse_attn.compile import constraints, shapes
from fuse_attn.compile.run import attention_fn
from fuse_attn.compile.lower import FlashFwdModule, lower

BF16_ATOL = 3e-2  # relative to outputs of magnitude ~5 here; see the simulator tests for the kernel alone


# The simulator's tensor ops run on one thread: on a shared 2-core machine two are slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fused_model(hidden=64, heads=4, kv_heads=2, causal=True, layers=1, opset=18, scale=None, dropout_p=0.0,
                seq_tile_size=None, seed=0, dtype=np.float32) -> onnx.ModelProto:
    """x (batch, seq, hidden) -> layers of [q/k/v MatMul + Reshape + Transpose to kernel layouts,
    FlashFwd, Transpose + Reshape + MatMul + residual Add], with contract.make_function(opset)."""
    d = hidden // heads
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(name, shape):
        return init(name, (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype))

    init("shape_q", np.array([0, 0, heads, d], np.int64))
    init("shape_kv", np.array([0, 0, kv_heads, d], np.int64))
    init("shape_o", np.array([0, 0, heads * d], np.int64))
    x = "x"
    for layer in range(layers):
        p = f"l{layer}_"
        for t, n, shape in (("q", heads, "shape_q"), ("k", kv_heads, "shape_kv"), ("v", kv_heads, "shape_kv")):
            nodes.append(helper.make_node("MatMul", [x, weight(f"{p}W{t}", (hidden, n * d))], [f"{p}{t}_lin"]))
            nodes.append(helper.make_node("Reshape", [f"{p}{t}_lin", shape], [f"{p}{t}_bshd"]))
            perm = [0, 2, 1, 3] if t == "v" else [0, 2, 3, 1]  # v (b, kv, s, d); q, k (b, h, d, s)
            nodes.append(helper.make_node("Transpose", [f"{p}{t}_bshd"], [p + t], perm=perm))
        attrs = contract.FlashFwdAttrs(softmax_scale=1 / np.sqrt(d) if scale is None else scale, use_causal_mask=causal,
                                       num_heads=heads, num_kv_heads=kv_heads, dropout_p=dropout_p,
                                       seq_tile_size=seq_tile_size)
        nodes.append(helper.make_node(contract.OP_TYPE, [p + "q", p + "k", p + "v"], [p + "o"], domain=contract.DOMAIN,
                                      name=p + "flash", **attrs.as_onnx_attributes()))
        nodes.append(helper.make_node("Transpose", [p + "o"], [p + "o_bshd"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [p + "o_bshd", "shape_o"], [p + "o_flat"]))
        nodes.append(helper.make_node("MatMul", [p + "o_flat", weight(p + "Wo", (heads * d, hidden))], [p + "proj"]))
        nodes.append(helper.make_node("Add", [p + "proj", x], [p + "y"]))
        x = p + "y"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", elem, ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info("y", elem, ["batch", "seq", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(contract.DOMAIN, contract.VERSION)])
    model.functions.append(contract.make_function(opset))
    onnx.checker.check_model(model)
    return model


def run_both(model, batch, seq, mixed_precision):
    fixed = shapes.fix_input_shapes(model, {"x": (batch, seq, 64)})
    plans, problems = constraints.plan_model(fixed, mixed_precision=mixed_precision)
    assert problems == []
    module = lower(fixed, plans, attention_fn(simulate=True)[0])
    x = np.random.default_rng(1).standard_normal((batch, seq, 64)).astype(np.float32)
    expected = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    return plans, got, expected


@pytest.mark.parametrize(
    "kwargs,batch,seq",
    [
        (dict(heads=4, kv_heads=2, causal=True, layers=2), 2, 512),  # GQA, two blocks in a row
        (dict(heads=4, kv_heads=4, causal=False, scale=0.2), 1, 1024),  # MHA, non-causal, explicit scale
        (dict(heads=8, kv_heads=1, causal=True), 1, 300),  # MQA, causal, padded 300 -> 512
    ],
)
def test_lowered_model_matches_onnxruntime(kwargs, batch, seq):
    model = fused_model(**kwargs)
    plans, got, expected = run_both(model, batch, seq, mixed_precision=False)
    assert len(plans) == kwargs.get("layers", 1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    plans, got, expected = run_both(model, batch, seq, mixed_precision=True)
    err = np.abs(got - expected).max()
    assert 1e-4 < err < BF16_ATOL


# --- shapes ----------------------------------------------------------------------------------------


def test_shape_args_and_symbol_binding():
    assert shapes.parse_shape_args(["input_ids=1x2048", "x=2X3"]) == {"input_ids": (1, 2048), "x": (2, 3)}
    for bad in ["input_ids", "input_ids=", "a=1xb", "a=0x2"]:
        with pytest.raises(shapes.ShapeError, match="expected NAME="):
            shapes.parse_shape_args([bad])
    g = helper.make_graph(
        [helper.make_node("Add", ["ids", "mask"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    fixed = shapes.fix_input_shapes(model, {"ids": (1, 2048)})  # mask shares batch, seq
    types = shapes.value_types(fixed)
    assert (types["ids"].shape, types["mask"].shape, types["y"].shape) == ((1, 2048),) * 3
    with pytest.raises(shapes.ShapeError, match="input 'ids' has unknown dims"):
        shapes.fix_input_shapes(model, {})
    with pytest.raises(shapes.ShapeError, match="not inputs of the model"):
        shapes.fix_input_shapes(model, {"nope": (1,)})
    with pytest.raises(shapes.ShapeError, match="rank 2"):
        shapes.fix_input_shapes(model, {"ids": (1, 2, 3)})


# --- kernel checks ---------------------------------------------------------------------------------


def problems_of(seq=512, batch=1, **kwargs):
    fixed = shapes.fix_input_shapes(fused_model(**kwargs), {"x": (batch, seq, kwargs.get("hidden", 64))})
    plans, problems = constraints.plan_model(fixed)
    assert all(p.startswith("l0_flash: ") and "; fix: " in p for p in problems)
    return plans, problems


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        # Non-causal at a seq no tile divides: padded with a key-bias column, unless d + 1 > 128.
        (dict(seq=300, causal=False, hidden=128, heads=1, kv_heads=1),
         "seq 300 needs padding to 512, and a non-causal block without a key-bias column needs one appended to "
         "mask the padded keys: head dim 128 + 1 > 128; fix: pass a --shape whose seq is a multiple of 512, or "
         "--kernel-min-seq"),
        (dict(dropout_p=0.5), "dropout_p 0.5 != 0"),
        (dict(scale=0.0), "softmax_scale 0.0"),
    ],
)
def test_each_violation_names_the_node_and_a_fix(kwargs, expected):
    plans, problems = problems_of(**kwargs)
    assert plans == []
    assert any(expected in p for p in problems), problems


def test_head_dim_over_128_and_unrunnable_dtype():
    model = fused_model(hidden=64, heads=1, kv_heads=1, dtype=np.float64)  # d = 64, float64
    fixed = shapes.fix_input_shapes(model, {"x": (1, 512, 64)})
    _, problems = constraints.plan_model(fixed)
    assert any("dtype double" in p for p in problems), problems
    types = shapes.value_types(fixed)
    big = {n: shapes.ValueType(t.shape[:2] + (256,) + t.shape[3:] if n in ("l0_q", "l0_k") else
                               (t.shape[:3] + (256,) if n == "l0_v" else t.shape), TensorProto.FLOAT)
           for n, t in types.items()}
    _, problems = constraints.plan_node(constraints.flash_nodes(fixed)[0], big)
    assert any("head dim 256 > 128" in p and "no path for head_dim > 128" in p for p in problems), problems


def test_plans_choose_tile_and_padding():
    (plan,), _ = problems_of(seq=1536)
    assert (plan.seq_tile_size, plan.padded_seq, plan.pad) == (512, 1536, 0)
    (plan,), _ = problems_of(seq=2048, seq_tile_size=1024)  # the node's own tile, since it divides
    assert plan.seq_tile_size == 1024
    (plan,), _ = problems_of(seq=1000)  # causal: padded
    assert (plan.seq_tile_size, plan.padded_seq) == (1024, 1024)
    assert "seq padded 1000 -> 1024" in plan.describe()
    (plan,), _ = problems_of(seq=512, heads=4, kv_heads=2)
    assert (plan.batch, plan.heads, plan.kv_heads, plan.head_dim) == (1, 4, 2, 16)


# (the compile command itself: tests/test_compile_cli.py)


def test_flash_module_slices_padding():
    calls = []

    def attention(q, k, v, attrs, tile):
        calls.append((q.shape, k.shape, v.shape, tile))
        return torch.zeros(q.shape[0], q.shape[1], q.shape[3], q.shape[2])

    (plan,), _ = problems_of(seq=300)
    o = FlashFwdModule(plan, attention)(torch.ones(1, 4, 16, 300), torch.ones(1, 2, 16, 300), torch.ones(1, 2, 300, 16))
    assert calls == [((1, 4, 16, 512), (1, 2, 16, 512), (1, 2, 512, 16), 512)]
    assert o.shape == (1, 4, 300, 16)


def test_gemm_whose_weights_are_activations():
    """TorchScript exports feed deduplicated weights to Gemm through Identity nodes: Gemm's B and
    C may be activations as well as initializers."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias")
    nodes = [helper.make_node("Identity", ["w"], ["w_shared"]), helper.make_node("Identity", ["bias"], ["b_shared"]),
             helper.make_node("Gemm", ["x", "w_shared", "b_shared"], ["y"], alpha=0.5, beta=2.0, transB=1),
             helper.make_node("Gemm", ["x", "w", "bias"], ["z"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 8])], [w, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((3, 6)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        got = lower(model, [], attention_fn(simulate=True)[0])(torch.from_numpy(x))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, atol=1e-5)
