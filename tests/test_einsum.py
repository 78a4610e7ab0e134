"""Attention written with Einsum (torch.einsum in hand-written modules): any letter order of the
two products fuses exactly; products that are not Q·Kᵀ over the key axis then P·V are left alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fuse_attn import fuse

B, S, H, D = 1, 512, 4, 16
LAYOUT_SHAPES = {"bhsd": (B, H, S, D), "bshd": (B, S, H, D), "Bsd": (B * H, S, D)}


def _block(layout: str, qk: str, pv: str, causal: bool = True) -> onnx.ModelProto:
    """q, k, v inputs in `layout` -> Einsum(qk) * 1/4 (+ causal mask) -> Softmax -> Einsum(pv)."""
    shape = LAYOUT_SHAPES[layout]
    inits = [numpy_helper.from_array(np.float32(0.25), "scale")]
    nodes = [helper.make_node("Einsum", ["q", "k"], ["scores"], equation=qk),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"])]
    last = "scaled"
    if causal:
        inits.append(numpy_helper.from_array(np.triu(np.full((S, S), -np.inf, np.float32), 1), "mask"))
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"]))
        last = "masked"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1),
              helper.make_node("Einsum", ["p", "v"], ["o"], equation=pv)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")]
    graph = helper.make_graph(nodes, "einsum", io, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, layout: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    feeds = {n: (2 * rng.standard_normal(LAYOUT_SHAPES[layout])).astype(np.float32) for n in ("q", "k", "v")}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("layout, qk, pv, heads", [
    ("bhsd", "bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", H),
    ("bshd", "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", H),   # straight from the (b, s, h, d) reshape
    ("bshd", "bqhd,bkhd->bhqk", "bhqk,bkhd->bhqd", H),   # output in (b, h, s, d)
    ("bshd", "xqyd,xkyd->xyqk", "xyqk,xkyd->xqyd", H),   # other letters
    ("Bsd", "bqd,bkd->bqk", "bqk,bkd->bqd", 1),          # heads batched
])
def test_einsum_attention_fuses_exactly(layout, qk, pv, heads):
    model = _block(layout, qk, pv)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.causal and block.heads == heads and block.scale == 0.25, block
    assert not [n for n in fused.graph.node if n.op_type in ("Einsum", "Softmax")]
    np.testing.assert_allclose(_run(fused, layout), _run(model, layout), atol=1e-5)


@pytest.mark.parametrize("qk, pv, cause", [
    ("bhqd,bhkd->bhkq", "bhkq,bhkd->bhqd", "query, key"),       # scores as (.., key, query)
    ("bhqd,bhkd->bhqk", "bhqk,bhqd->bhkd", "over the key axis"),  # contracts the query axis
])
def test_einsum_that_is_not_attention_is_left_alone(qk, pv, cause):
    model = _block("bhsd", qk, pv, causal=False)
    _run(model, "bhsd")  # a valid graph
    _, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and cause in block.reason, block.reason


def test_einsum_with_symbolic_batch_reads_seq_from_the_operands_seq_axis():
    """(b, s, h, d) operands with a free batch (jax2onnx's einsum attention): seq is axis 1, not -2."""
    model = _block("bshd", "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[0].dim_param = "B"
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.causal and block.seq == S and block.heads == H, block
    np.testing.assert_allclose(_run(fused, "bshd"), _run(model, "bshd"), atol=1e-5)
