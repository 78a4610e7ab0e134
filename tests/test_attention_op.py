"""The ONNX `Attention` op lowered as plain attention (compile/attention_op.py), for the blocks the
pass leaves alone. Its full semantics are checked by ONNX's own Attention node cases in
test_onnx_conformance.py (masks, GQA, scale, softcap, past/present, qk_matmul_output_mode,
is_causal, windows, nonpad_kv_seqlen, 3D); here: a model with one fused and one refused block
compiles --simulate and matches onnxruntime, and the lowered op against onnxruntime on peaked
scores, where a wrong scale or mask would show."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fuse_attn import fuse
from fuse_attn.compile import constraints, shapes
from fuse_attn.commands.compile import compile_main
from fuse_attn.compile.run import attention_fn, compare_with_onnxruntime
from fuse_attn.compile.lower import lower, to_torch
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.static_check import run_on_meta, sdpa_attention, with_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS, KV_HEADS, SEQ, D = 4, 2, 512, 16


def two_block_model() -> onnx.ModelProto:
    """Y1 = causal attention (the kernel runs it); Y2 = attention with a softcap and an additive
    mask, sharing K and V (the pass refuses soft-capping)."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Attention", ["Q", "K", "V"], ["Y1"], is_causal=1),
        helper.make_node("Attention", ["Q2", "K", "V", "bias"], ["Y2"], softcap=8.0),
    ]
    inputs = [helper.make_tensor_value_info("Q", f, [1, HEADS, SEQ, D]),
              helper.make_tensor_value_info("Q2", f, [1, HEADS, SEQ, D]),
              helper.make_tensor_value_info("K", f, [1, KV_HEADS, SEQ, D]),
              helper.make_tensor_value_info("V", f, [1, KV_HEADS, SEQ, D]),
              helper.make_tensor_value_info("bias", f, [1, 1, SEQ, SEQ])]
    outputs = [helper.make_tensor_value_info(n, f, [1, HEADS, SEQ, D]) for n in ("Y1", "Y2")]
    model = helper.make_model(helper.make_graph(nodes, "two_blocks", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model, full_check=True)
    return model


def peaked_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    """Q and K scaled so scores at 1/sqrt(D) have a std of about 4; an additive mask of -inf on
    a random third of the keys, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    qk = 2.0  # q.k / sqrt(D) has std qk**2
    feeds = {"Q": rng.normal(size=(1, HEADS, SEQ, D)) * qk, "Q2": rng.normal(size=(1, HEADS, SEQ, D)) * qk,
             "K": rng.normal(size=(1, KV_HEADS, SEQ, D)) * qk, "V": rng.normal(size=(1, KV_HEADS, SEQ, D))}
    feeds["bias"] = np.where(rng.random((1, 1, SEQ, SEQ)) < 1 / 3, -np.inf, 0.0)
    return {k: v.astype(np.float32) for k, v in feeds.items()}


def test_scores_are_peaked():
    feeds = peaked_feeds()
    scores = np.einsum("hsd,htd->hst", feeds["Q"][0, :2], feeds["K"][0, :1].repeat(2, 0)) / np.sqrt(D)
    assert 3 < scores.std() < 6


def test_model_with_a_refused_block_compiles_simulate(tmp_path, capsys):
    model = two_block_model()
    fused, report = fuse(model)
    assert [b.fused for b in report.blocks] == [True, False]
    assert "soft" in report.blocks[1].reason
    assert [n.op_type for n in fused.graph.node].count("Attention") == 1  # the refused block stays
    path = tmp_path / "fused.onnx"
    onnx.save(fused, path)
    assert compile_main([str(path), "--simulate"]) == 0
    out = capsys.readouterr().out
    assert ": ok." in out and "MISMATCH" not in out, out


@pytest.mark.parametrize("wrong", [None, "scale", "mask"])
def test_lowered_refused_block_matches_onnxruntime(wrong):
    fused, _ = fuse(two_block_model())
    model = shapes.fix_input_shapes(fused, {})
    feeds = peaked_feeds()
    reference = run_onnxruntime(model, feeds)
    plans, problems = constraints.plan_model(model, False, feeds)
    assert problems == [] and len(plans) == 1
    lowered_model = model
    if wrong is not None:  # the comparison can fail: the refused block mis-lowered
        lowered_model = shapes.copy_model(model)
        node = next(n for n in lowered_model.graph.node if n.op_type == "Attention")
        if wrong == "scale":
            node.attribute.append(helper.make_attribute("scale", 1.1 / np.sqrt(D)))
        else:
            del node.input[3:]
    module = lower(lowered_model, plans, attention_fn(simulate=True)[0])
    errors = {name: abs_err for name, abs_err, _ in compare_with_onnxruntime(model, module, feeds, reference)}
    if wrong is None:
        assert max(errors.values()) <= 1e-5, errors
        inputs = tuple(to_torch(feeds[n]) for n in module.input_names)
        outs = run_on_meta(with_attention(module, sdpa_attention), inputs)  # no host reads in forward
        assert [tuple(o.shape) for o in outs] == [r.shape for r in reference]
    else:
        assert max(errors.values()) > 1e-2, errors


def test_nonpad_kv_seqlen_is_a_runtime_input_without_host_reads():
    """nonpad_kv_seqlen (opset 24) is data: it feeds tensor comparisons, so the lowered op runs on
    meta tensors and gives onnxruntime's result for each value."""
    f = TensorProto.FLOAT
    node = helper.make_node("Attention", ["Q", "K", "V", "", "", "", "n"], ["Y"], is_causal=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("Q", f, [2, 2, 3, 8]),
                                            helper.make_tensor_value_info("K", f, [2, 2, 7, 8]),
                                            helper.make_tensor_value_info("V", f, [2, 2, 7, 8]),
                                            helper.make_tensor_value_info("n", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("Y", f, [2, 2, 3, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    rng = np.random.default_rng(1)
    feeds = {k: (rng.normal(size=s) * 1.7).astype(np.float32) for k, s in
             (("Q", (2, 2, 3, 8)), ("K", (2, 2, 7, 8)), ("V", (2, 2, 7, 8)))}
    module = lower(model, [], None)
    assert run_on_meta(module, tuple(to_torch(feeds[k]) for k in "QKV") + (torch.tensor([5, 7]),)).shape == (2, 2, 3, 8)
    results = []
    for n in ([5, 7], [3, 6]):
        feeds["n"] = np.array(n, np.int64)
        got = module(*[to_torch(feeds[k]) for k in module.input_names]).numpy()
        np.testing.assert_allclose(got, run_onnxruntime(model, feeds)[0], atol=1e-5)
        results.append(got)
    assert np.abs(results[0] - results[1]).max() > 1e-2  # the value changed the result


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_qk_matmul_output_modes_match_onnxruntime(mode):
    """Mode 0 is the raw QK product even with a softcap (the spec and onnxruntime; onnx's Python
    reference soft-caps it, and no node case has that combination)."""
    f = TensorProto.FLOAT
    node = helper.make_node("Attention", ["Q", "K", "V", "mask"], ["Y", "", "", "qk"], softcap=2.0,
                            qk_matmul_output_mode=mode)
    graph = helper.make_graph([node], "g", [*(helper.make_tensor_value_info(n, f, [1, 2, 5, 4]) for n in "QKV"),
                                            helper.make_tensor_value_info("mask", TensorProto.BOOL, [5, 5])],
                              [helper.make_tensor_value_info(n, f, None) for n in ("Y", "qk")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    rng = np.random.default_rng(mode)
    feeds = {n: (rng.normal(size=(1, 2, 5, 4)) * 2.5).astype(np.float32) for n in "QKV"}
    feeds["mask"] = rng.random((5, 5)) < 0.7
    module = lower(model, [], None)
    got = module(*[to_torch(feeds[n]) for n in module.input_names])
    for g, want in zip(got, run_onnxruntime(model, feeds)):
        # onnxruntime writes a masked-out score as float32's lowest; the spec and onnx's cases, -inf
        want = np.where(want <= np.finfo(np.float32).min, -np.inf, want)
        np.testing.assert_allclose(g.numpy(), want, atol=1e-5)
