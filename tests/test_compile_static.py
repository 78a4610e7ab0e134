"""The lowered module is a static graph (no host reads in forward), shape arithmetic is folded at
lowering, and bfloat16 models go through fuse -> lower -> `compile --simulate`.

The zoo models are checked the same way in test_compile_zoo.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import attention_graphs as ag
from fuse_attn.compile import constraints, shapes
from fuse_attn.commands.compile import compile_main
from fuse_attn.compile.run import attention_fn, compare_with_onnxruntime
from fuse_attn.compile.lower import lower, to_torch
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.static_check import HostRead, run_on_meta, sdpa_attention, with_attention
from fuse_attn.compile.simulator import simulate_flash_fwd
from fuse_attn.ir.contract import FlashFwdAttrs
from test_compile_lower import fused_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the check itself -------------------------------------------------------------------------------


class Reads(torch.nn.Module):
    """A forward that reads tensor contents on the host in one of the ways torch-xla syncs on."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("shape", torch.tensor([2, -1]))

    def forward(self, x):
        if self.how == "item":
            return x * x.max().item()
        if self.how == "tolist":
            return x.reshape(self.shape.tolist())  # what onnx2pytorch's Reshape did
        if self.how == "bool":
            return x if bool((x > 0).all()) else -x
        if self.how == "int":
            return x[: int(x.sum())]
        if self.how == "numpy":
            return torch.from_numpy(x.numpy() * 2)
        if self.how == "nonzero":  # an output shape that depends on values
            return x[x > 0]
        return x.reshape(2, -1) * 2  # "none": shapes only


@pytest.mark.parametrize("how", ["item", "tolist", "bool", "int", "numpy", "nonzero"])
def test_meta_run_catches_every_kind_of_host_read(how):
    x = torch.randn(2, 4)
    Reads(how)(x)  # runs on CPU tensors
    with pytest.raises(HostRead):
        run_on_meta(Reads(how), (x,))


def test_meta_run_passes_shape_only_forward():
    out = run_on_meta(Reads("none"), (torch.randn(2, 4),))
    assert out.device.type == "meta" and tuple(out.shape) == (2, 4)


def test_sdpa_stand_in_matches_the_simulator():
    """The stand-in FlashFwd of the meta run and of benchmarks/xla_trace.py computes what the kernel does."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 8, 16, 512, generator=g) * 3, torch.randn(1, 2, 16, 512, generator=g), torch.randn(1, 2, 512, 16, generator=g)
    for causal in (True, False):
        attrs = FlashFwdAttrs(softmax_scale=0.3, use_causal_mask=causal, num_heads=8, num_kv_heads=2, mixed_precision=False)
        expected = simulate_flash_fwd(q, k, v, softmax_scale=0.3, use_causal_mask=causal, mixed_precision=False, seq_tile_size=512)
        torch.testing.assert_close(sdpa_attention(q, k, v, attrs, 512), expected, rtol=0, atol=1e-5)


# --- lowering folds every shape computation --------------------------------------------------------


def shape_heavy_model() -> onnx.ModelProto:
    """y = Reshape(x, Concat(Shape(x)[0:2], [-1])) + Range(0, Shape(x)[2]) masked by Less(Range, n),
    Expand-ed to a computed shape: every shape, length and Range bound comes from Shape(x)."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero1", "two1"], ["lead"]),
        helper.make_node("Concat", ["lead", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Gather", ["shape", "two"], ["n"], axis=0),
        helper.make_node("Mul", ["n", "three"], ["n3"]),
        helper.make_node("Range", ["zero", "n3", "one"], ["pos"]),
        helper.make_node("Less", ["pos", "n"], ["early"]),
        helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Where", ["early", "posf", "zerof"], ["bias"]),
        helper.make_node("Add", ["flat", "bias"], ["y0"]),
        helper.make_node("Unsqueeze", ["n3", "zero1"], ["n3_1d"]),
        helper.make_node("Concat", ["lead", "n3_1d"], ["target_full"], axis=0),
        helper.make_node("ConstantOfShape", ["target_full"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["y0", "ones"], ["y"]),
    ]
    inits = [i64("zero1", [0]), i64("two1", [2]), i64("minus1", [-1]), i64("two", 2), i64("three", 3),
             i64("zero", 0), i64("one", 1), numpy_helper.from_array(np.array(0.0, np.float32), "zerof")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def test_shape_arithmetic_is_folded_and_forward_is_tensor_ops_only():
    model = shapes.fix_input_shapes(shape_heavy_model(), {"x": (2, 5, 4, 3)})
    module = lower(model, [], sdpa_attention)
    # What is left to run: Reshape, Add (of a folded bias), Mul (of folded ones): nothing of Shape/Range.
    assert [s.node.split()[0] for s in module.steps] == ["Reshape", "Add", "Mul"]
    x = np.random.default_rng(0).standard_normal((2, 5, 4, 3)).astype(np.float32)
    expected = run_onnxruntime(model, {"x": x})[0]
    got = module(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    assert tuple(run_on_meta(module, (torch.from_numpy(x),)).shape) == expected.shape


@pytest.mark.parametrize("seq", [512, 300])  # 300: FlashFwd pads to 512 and slices
def test_lowered_fused_model_has_no_host_reads(seq):
    model = shapes.fix_input_shapes(fused_model(layers=2), {"x": (1, seq, 64)})
    plans, problems = constraints.plan_model(model, mixed_precision=False)
    assert problems == [] and len(plans) == 2
    module = lower(model, plans, attention_fn(simulate=True)[0])
    x = torch.randn(1, seq, 64)
    out = run_on_meta(with_attention(module, sdpa_attention), (x,))
    assert tuple(out.shape) == (1, seq, 64)
    # The stand-in gives the model's own result, so the check runs the real computation.
    with torch.no_grad():
        torch.testing.assert_close(with_attention(module, sdpa_attention)(x), module(x), rtol=0, atol=1e-4)


def test_unlowerable_model_is_one_line(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("NonZero", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    assert compile_main([str(path), "--simulate"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fuse-attn: error: cannot lower the model: NonZero node 'y': the lowering has no rule for ai.onnx.NonZero"


def test_data_dependent_shape_is_refused_with_the_node():
    """A Reshape whose target is an input's contents cannot be fixed at compile time."""
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                           helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    from fuse_attn.compile.lower import LoweringError

    with pytest.raises(LoweringError, match=r"Reshape node 'y': its target shape \(shape\) depends on the contents"):
        lower(model, [], sdpa_attention)


# --- bfloat16 ---------------------------------------------------------------------------------------

# bf16 outputs against the float32 reference, relative to max |output|. The model's own bf16
# rounding between ops is most of it: the unfused model lowered to torch in bf16 (no FlashFwd)
# is 1.8e-2 off the float32 reference on these inputs, the fused one simulated with mixed
# precision 1.9e-2 (2.20 arithmetic) or 1.5e-2 (2.21).
BF16_RTOL = 3e-2


def bf16_model():
    spec = ag.AttnSpec(dtype="bfloat16", seq=256, heads=4, kv_heads=2, head_dim=16, blocks=2)  # peaked scores
    built = ag.build(spec)
    fused, report = ag.fuse_model(built.model)
    assert sum(b.fused for b in report.blocks) == 2
    return built.model, fused


def test_bfloat16_values_cross_into_torch_exactly():
    import ml_dtypes

    a = np.array([1.5, -2.0, 3.140625, 1e-3], dtype=ml_dtypes.bfloat16)
    t = to_torch(a)
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), a.astype(np.float32))
    init = numpy_helper.from_array(a, "w")
    assert init.data_type == TensorProto.BFLOAT16


def test_bfloat16_model_fuses_lowers_and_compares_in_float32(tmp_path):
    original, fused = bf16_model()
    model = shapes.fix_input_shapes(fused, {})
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    feeds = shapes.example_feeds(model, seed=0)
    reference = run_onnxruntime(model, feeds)  # runs as the float32 copy: ORT's CPU provider lacks bf16 MatMul
    original_reference = run_onnxruntime(shapes.fix_input_shapes(original, {}), feeds)
    np.testing.assert_allclose(reference[0], original_reference[0], atol=1e-4)  # fused == original in float32
    plans, problems = constraints.plan_model(model, True, feeds)
    assert problems == [] and [p.pad for p in plans] == [256, 256]
    module = lower(model, plans, attention_fn(simulate=True)[0])
    (_, _, rel), = compare_with_onnxruntime(model, module, feeds, reference)
    # The unfused model in bf16 torch: what the graph alone costs.
    (_, _, graph_rel), = compare_with_onnxruntime(model, lower(shapes.fix_input_shapes(original, {}), [], None), feeds, reference)
    assert rel <= BF16_RTOL and rel <= 1.25 * graph_rel, (rel, graph_rel)
    # A wrong softmax scale is far outside the tolerance: the comparison can fail.
    wrong = ag.mutate_flashfwd(model, scale_factor=0.5)
    plans_wrong, _ = constraints.plan_model(wrong, True, feeds)
    (_, _, wrong_rel), = compare_with_onnxruntime(model, lower(wrong, plans_wrong, attention_fn(simulate=True)[0]), feeds, reference)
    assert wrong_rel > 3 * BF16_RTOL, wrong_rel
    x = to_torch(feeds["x"])
    assert run_on_meta(with_attention(module, sdpa_attention), (x,)).dtype == torch.bfloat16


def test_bfloat16_compile_simulate_runs(tmp_path, capsys):
    _, fused = bf16_model()
    path = tmp_path / "bf16.onnx"
    onnx.save(fused, path)
    assert compile_main([str(path), "--simulate"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and ": ok." in out
    rel = float(out.split("max rel ")[1].split()[0])
    assert rel <= BF16_RTOL, out
