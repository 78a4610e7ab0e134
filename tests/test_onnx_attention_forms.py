"""More forms of the ONNX `Attention` op: 3D inputs with q_num_heads/kv_num_heads, a past of
static length 0, and the op's expanded function body (what a model holds once functions are
inlined), where the probabilities also feed CastLike(zero, p) and Where(RowAllMasked, 0, p).
Checked on ONNX's own conformance models for Attention, re-declared at lengths the kernel runs
(the cases themselves attend 4 queries over 6 keys)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attention_graphs import mutate_flashfwd
from exporter_graphs import at_seq, conformance_attention_cases, max_diff, peaked_qkv, run
from fuse_attn import fuse

TOL = 1e-4
CASES = conformance_attention_cases()
# The kernel's cases among the conformance models (inputs exactly Q, K, V; one head size;
# no softcap, window or extra outputs), as the op and as its expanded body.
RUNNABLE = ["test_attention_3d", "test_attention_3d_causal", "test_attention_3d_gqa", "test_attention_3d_gqa_causal",
            "test_attention_3d_scaled", "test_attention_3d_gqa_scaled", "test_attention_3d_transpose_verification",
            "test_attention_4d", "test_attention_4d_causal", "test_attention_4d_gqa", "test_attention_4d_gqa_causal",
            "test_attention_4d_scaled", "test_attention_4d_gqa_scaled", "test_attention_4d_fp16",
            "test_attention_4d_causal_fp16", "test_attention_local_window_default"]


def _fp16(model: onnx.ModelProto) -> bool:
    return model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


@pytest.mark.parametrize("name", [n + suffix for n in RUNNABLE for suffix in ("", "_expanded")])
def test_conformance_case_fuses_at_a_kernel_length(name):
    causal = "causal" in name
    seq = 16 if causal else 512
    model = at_seq(CASES[name], seq)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused, block.reason
    assert block.causal == causal and block.seq == seq
    onnx.checker.check_model(fused, full_check=True)
    assert not any(n.op_type in ("Attention", "Softmax") for n in fused.graph.node)
    feeds = peaked_qkv(model, seq, gain=4.0 if "scaled" in name else 1.0)  # their scale is 0.1, not 1/sqrt(8)
    tol = 4e-3 if _fp16(model) else TOL
    assert max_diff(run(model, feeds), run(fused, feeds)) <= tol
    # The comparison notices a wrong scale or mask.
    assert max_diff(run(model, feeds), run(mutate_flashfwd(fused, scale_factor=1.05), feeds)) > 10 * tol
    assert max_diff(run(model, feeds), run(mutate_flashfwd(fused, flip_causal=True), feeds)) > 10 * tol


@pytest.mark.parametrize("name", ["test_attention_3d_causal", "test_attention_4d_gqa_causal_expanded"])
def test_conformance_case_symbolic_seq(name):
    model = at_seq(CASES[name], 0, symbolic=True)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.causal and block.seq == "seq", block
    for seq in (16, 40):
        feeds = peaked_qkv(model, seq)
        assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL


@pytest.mark.parametrize("name", ["test_attention_3d", "test_attention_3d_expanded"])
def test_conformance_noncausal_at_any_seq_is_left_to_compile_to_pad(name):
    """Seq 16 non-causal: no tile divides it; compile pads it and masks the padded keys in the
    key-bias column, so the pass fuses it and says so."""
    model = at_seq(CASES[name], 16)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and not block.causal and block.seq_tile_size == 512, block
    assert any("compile pads seq 16 to 512" in n and "key-bias column" in n for n in block.notes), block.notes
    feeds = peaked_qkv(model, 16)
    assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL


@pytest.mark.parametrize("name, reason", [
    ("test_attention_3d_diff_heads_sizes", "shapes do not agree"),  # v head dim 10, q/k 8
    ("test_attention_4d_softcap_expanded", "soft-capping"),
    ("test_attention_3d_softcap", "softcap"),
    ("test_attention_local_window_expanded", "sliding window"),
    ("test_attention_4d_with_qk_matmul_expanded", "another consumer"),
])
def test_conformance_near_misses_are_left_alone(name, reason):
    model = at_seq(CASES[name], 16)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and reason in block.reason, block.reason


def _with_past(three_d: bool, past: int | str, use_present: bool = True, causal: bool = True) -> onnx.ModelProto:
    """Attention with past_key/past_value inputs of length `past` and present outputs."""
    b, h, kv, d = 2, 4, 2, 8
    if three_d:
        q = helper.make_tensor_value_info("Q", TensorProto.FLOAT, [b, "seq", h * d])
        k = helper.make_tensor_value_info("K", TensorProto.FLOAT, [b, "seq", kv * d])
        v = helper.make_tensor_value_info("V", TensorProto.FLOAT, [b, "seq", kv * d])
        attrs = {"q_num_heads": h, "kv_num_heads": kv}
    else:
        q = helper.make_tensor_value_info("Q", TensorProto.FLOAT, [b, h, "seq", d])
        k = helper.make_tensor_value_info("K", TensorProto.FLOAT, [b, kv, "seq", d])
        v = helper.make_tensor_value_info("V", TensorProto.FLOAT, [b, kv, "seq", d])
        attrs = {}
    pk = helper.make_tensor_value_info("past_key", TensorProto.FLOAT, [b, kv, past, d])
    pv = helper.make_tensor_value_info("past_value", TensorProto.FLOAT, [b, kv, past, d])
    outputs = ["Y", "present_key", "present_value"] if use_present else ["Y"]
    node = helper.make_node("Attention", ["Q", "K", "V", "", "past_key", "past_value"], outputs,
                            is_causal=int(causal), **attrs)
    total = "seq" if past == 0 else (f"{past} + seq" if isinstance(past, str) else None)
    shapes = {"Y": [b, "seq", h * d] if three_d else [b, h, "seq", d], "present_key": [b, kv, total, d],
              "present_value": [b, kv, total, d]}
    graph = helper.make_graph([node], "attention_with_past", [q, k, v, pk, pv],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _past_feeds(model: onnx.ModelProto, seq: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else (seq if d.dim_param == "seq" else past)
                for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = (rng.normal(size=dims) * (1.0 if value.name == "V" else 1.5)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("three_d", [False, True])
def test_empty_past_of_static_length_fuses_and_keeps_present(three_d):
    model = _with_past(three_d, 0)
    onnx.checker.check_model(model, full_check=True)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.causal, block.reason
    onnx.checker.check_model(fused, full_check=True)
    assert [o.name for o in fused.graph.output] == ["Y", "present_key", "present_value"]
    assert not any(n.op_type == "Attention" for n in fused.graph.node)
    for seq in (16, 24):
        feeds = _past_feeds(model, seq, 0)
        assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL
        assert max_diff(run(model, feeds), run(mutate_flashfwd(fused, flip_causal=True), feeds)) > 100 * TOL


def test_past_fixed_empty_by_dim():
    model = _with_past(False, "past_sequence_length")
    _, report = fuse(model)
    assert not report.blocks[0].fused and "past_key" in report.blocks[0].reason
    fused, report = fuse(model, dims={"past_sequence_length": 0})
    assert report.blocks[0].fused, report.blocks[0].reason
    feeds = _past_feeds(fused, 16, 0)
    assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL


def test_past_of_nonzero_length_is_left_alone():
    _, report = fuse(_with_past(True, 3))
    (block,) = report.blocks
    assert not block.fused and "past_key" in block.reason


def test_3d_without_head_counts_is_left_alone():
    model = _with_past(True, 0)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name not in ("q_num_heads", "kv_num_heads")]
    del node.attribute[:]
    node.attribute.extend(kept)
    _, report = fuse(model)
    assert not report.blocks[0].fused and "q_num_heads" in report.blocks[0].reason
