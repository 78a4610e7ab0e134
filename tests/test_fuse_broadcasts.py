"""Near misses where broadcasting makes the block's output larger than the kernel's.

A mask with more batch entries than the scores, or a "scalar" scale of higher rank, broadcast
the scores: the original block's output grows while FlashFwd's would not. Left alone, with the
reason; the exact variants next to them still fuse.
"""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fuse_attn import fuse

S, D = 512, 16


def _block(mask: np.ndarray | None, scale: np.ndarray) -> onnx.ModelProto:
    """q, k, v graph inputs of shape (2, S, D) (heads batched) -> softmax(q kᵀ * scale + mask) v."""
    inits = [numpy_helper.from_array(scale, "scale")]
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
    ]
    last = "scaled"
    if mask is not None:
        inits.append(numpy_helper.from_array(mask, "mask"))
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"]))
        last = "masked"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, S, D]) for n in ("q", "k", "v")]
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", io, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _causal(leading: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.triu(np.full((S, S), -1e9, np.float32), 1), leading + (S, S)).copy()


def _run(model: onnx.ModelProto) -> np.ndarray:
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, S, D)).astype(np.float32) for n in ("q", "k", "v")}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_mask_with_more_batch_entries_than_the_scores_is_left_alone():
    model = _block(_causal((3, 2)), np.array(0.25, np.float32))
    assert _run(model).shape == (3, 2, S, D)  # the mask broadcast the block to 3 x 2
    _, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and "broadcasts" in block.reason


def test_scale_of_higher_rank_is_left_alone():
    model = _block(None, np.full((1, 1, 1, 1), 0.25, np.float32))
    assert _run(model).shape == (1, 2, S, D)
    _, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and "shape" in block.reason


def test_same_block_without_the_broadcast_fuses_exactly():
    model = _block(_causal((1,)), np.array(0.25, np.float32))
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.causal and block.heads == 1 and block.batch == 2, block
    np.testing.assert_allclose(_run(fused), _run(model), atol=1e-5)
