"""Masks of graphs with a symbolic seq length, computed in the graph from shapes.

Such a mask is evaluated at sample lengths. A sliding window looks causal at every length up
to its window, so the proof is repeated at a length past every constant the mask uses.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fuse_attn import fuse

D = 16


def _block(window: int | None) -> onnx.ModelProto:
    """q, k, v (2, seq, D) -> softmax(q kᵀ / 4, masked causal [within `window`]) v; the mask
    is built from Shape(q) as exporters do."""
    c = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    inits = [c("zero", np.int64(0)), c("one", np.int64(1)), c("ax0", np.array([0])), c("ax1", np.array([1])),
             c("quarter", np.float32(0.25)), c("neg_inf", np.float32(-np.inf))]
    nodes = [
        helper.make_node("Shape", ["q"], ["seq_1d"], start=1, end=2),
        helper.make_node("Squeeze", ["seq_1d"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["rows"]),
        helper.make_node("Unsqueeze", ["pos", "ax0"], ["cols"]),
        helper.make_node("LessOrEqual", ["cols", "rows"], ["keep"]),
    ]
    if window is not None:  # also key > query - window
        inits.append(c("window", np.int64(window)))
        nodes += [helper.make_node("Sub", ["rows", "window"], ["lowest"]),
                  helper.make_node("Greater", ["cols", "lowest"], ["inside"]),
                  helper.make_node("And", ["keep", "inside"], ["keep_w"])]
    keep = "keep_w" if window is not None else "keep"
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "quarter"], ["scaled"]),
        helper.make_node("Where", [keep, "scaled", "neg_inf"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, "seq", D]) for n in ("q", "k", "v")]
    graph = helper.make_graph(nodes, "g", io, [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, "seq", D])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, seq: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    feeds = {n: (3 * rng.standard_normal((2, seq, D))).astype(np.float32) for n in ("q", "k", "v")}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("seq", [7, 96, 300])
def test_causal_mask_from_shapes_fuses_and_matches_at_any_length(seq):
    model = _block(window=None)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.causal and block.seq == "seq", block
    np.testing.assert_allclose(_run(fused, seq), _run(model, seq), atol=1e-5)


def test_sliding_window_longer_than_the_first_sample_is_left_alone():
    model = _block(window=200)  # causal at every seq <= 200, the first sample is 96
    assert not np.allclose(_run(model, 300), _run(_block(window=None), 300), atol=1e-3)
    _, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and "sliding window of 200" in block.reason, block.reason


@pytest.mark.parametrize("window", [100_000, 131_071])
def test_long_window_is_caught_past_its_length(window):
    """Proven again at window + 2 (O(seq): the mask is a function of i - j)."""
    _, report = fuse(_block(window=window))
    (block,) = report.blocks
    assert not block.fused and f"sliding window of {window} keys" in block.reason, block.reason


def test_window_beyond_the_provable_length_is_left_alone():
    _, report = fuse(_block(window=300_000))
    (block,) = report.blocks
    assert not block.fused and "300000" in block.reason and "fixed seq" in block.reason, block.reason


@pytest.mark.parametrize("mask_form", ["range", "trilu"])
def test_every_block_of_a_symbolic_seq_model_fuses(mask_form):
    """Later blocks' proofs infer shapes through the FlashFwd nodes of earlier ones."""
    from attention_graphs import AttnSpec, build, fused_vs_original

    built = build(AttnSpec(blocks=3, symbolic_seq=True, mask_form=mask_form))
    fused, report = fuse(built.model)
    assert [b.fused for b in report.blocks] == [True, True, True], [b.reason for b in report.blocks]
    assert fused_vs_original(built, fused) <= 1e-4


def _sliced_to_the_end(model: onnx.ModelProto, ends, dtype) -> onnx.ModelProto:
    """The mask condition sliced "to the end" as exporters write `keep[:, :]`: TorchScript with
    INT64_MAX (int64), tf2onnx with 1e9 (int32 bounds); a 4-element variant too."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = next(n for n in m.graph.node if n.op_type == "Where").input[0]
    bounds = [numpy_helper.from_array(np.asarray(v, dtype), name) for v, name in
              (([0], "to_end_start"), ([ends], "to_end_end"), ([1], "to_end_axis"))]
    m.graph.initializer.extend(bounds)
    m.graph.node.insert(len(m.graph.node) - 6, helper.make_node(
        "Slice", [keep, "to_end_start", "to_end_end", "to_end_axis"], ["keep_to_end"]))
    for n in m.graph.node:
        if n.op_type == "Where":
            n.input[0] = "keep_to_end"
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("ends, dtype", [(9223372036854775807, np.int64), (1_000_000_000, np.int32)])
def test_slice_to_the_end_is_no_window(ends, dtype):
    model = _sliced_to_the_end(_block(window=None), ends, dtype)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.causal, block.reason
    np.testing.assert_allclose(_run(fused, 300), _run(model, 300), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_window_next_to_a_slice_to_the_end_is_still_caught(dtype):
    model = _sliced_to_the_end(_block(window=200), 9223372036854775807 if dtype == np.int64 else 10**9, dtype)
    _, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and "sliding window of 200" in block.reason, block.reason


def test_slice_to_the_static_end_of_a_stored_buffer_is_no_window():
    """A stored (256, 256) causal buffer sliced `[:, 0:256]` (its own length, written out) and then
    to the seq: 256 is the fixed dim's end, not a window; the model runs at any seq up to 256."""
    model = _block(window=None)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    c = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    m.graph.initializer.extend([c("buffer", np.tril(np.ones((256, 256), bool))), c("b0", np.array([0])),
                                c("b256", np.array([256])), c("b1", np.array([1])), c("b00", np.array([0, 0])),
                                c("b01", np.array([0, 1]))])
    where = next(n for n in m.graph.node if n.op_type == "Where")
    m.graph.node.insert(len(m.graph.node) - 6, helper.make_node("Slice", ["buffer", "b0", "b256", "b1"], ["full"]))
    m.graph.node.insert(len(m.graph.node) - 6, helper.make_node("Concat", ["seq_1d", "seq_1d"], ["ends"], axis=0))
    m.graph.node.insert(len(m.graph.node) - 6, helper.make_node("Slice", ["full", "b00", "ends", "b01"], ["keep_buf"]))
    where.input[0] = "keep_buf"
    onnx.checker.check_model(m)
    fused, report = fuse(m)
    (block,) = report.blocks
    assert block.fused and block.causal, block.reason
    np.testing.assert_allclose(_run(fused, 200), _run(m, 200), atol=1e-5)
