"""Attention inside If/Loop/Scan bodies: optimum's decoder_model_merged keeps every block in the
branches of one If, reading the main graph's inputs and weights from the outer scope."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attention_graphs import AttnSpec, build
from exporter_graphs import decoder_feeds, max_diff, merged_decoder, run
from fuse_attn import fuse

TOL = 1e-4


def _flash_in_bodies(model: onnx.ModelProto) -> dict[str, int]:
    (node,) = [n for n in model.graph.node if n.op_type == "If"]
    return {a.g.name: sum(n.op_type == "FlashFwd" for n in a.g.node) for a in node.attribute}


@pytest.fixture(scope="module")
def merged():
    return merged_decoder()


def test_merged_decoder_prefill_fuses_in_both_branches(merged):
    fused, report = fuse(merged, dims={"past_sequence_length": 0}, assume_no_padding=True)
    assert report.fused == 4, [b.reason for b in report.blocks]
    assert all("inside subgraph" in b.notes[-1] for b in report.blocks)
    assert _flash_in_bodies(fused) == {"then_branch": 2, "else_branch": 2}
    # The old attention nodes are gone from the bodies, and the weights they read stay.
    assert not any(n.op_type == "Softmax" for a in fused.graph.node[0].attribute for n in a.g.node)
    onnx.checker.check_model(fused, full_check=True)
    for use_cache in (False, True):
        feeds = decoder_feeds(fused, past=0)
        feeds["use_cache_branch"][:] = use_cache
        assert max_diff(run(merged, feeds), run(fused, feeds)) <= TOL
        assert max_diff(run(merged, feeds), run(mutate_flashfwd_in_bodies(fused), feeds)) > 100 * TOL


def mutate_flashfwd_in_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fused model with every FlashFwd node's causal flag flipped, in the bodies too."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for attr in out.graph.node[0].attribute:
        for n in attr.g.node:
            for a in n.attribute:
                if n.op_type == "FlashFwd" and a.name == "use_causal_mask":
                    a.i = 1 - a.i
    return out


def test_merged_decoder_without_specialization_names_the_causes(merged):
    _, report = fuse(merged, assume_no_padding=True)
    assert report.fused == 0
    reasons = {b.name: b.reason for b in report.blocks}
    assert len(reasons) == 4
    # With past: a KV cache. Without: the branch runs only with an empty past, which the pass
    # cannot know; the reason says how to tell it.
    assert all("seq_q" in r for n, r in reasons.items() if n.startswith("then_")), reasons
    assert all("--dim past_sequence_length=0" in r for n, r in reasons.items() if n.startswith("else_")), reasons


def _if_wrapped(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`'s graph moved into both branches of an If on a new bool input (names prefixed per
    branch); the weights and the input stay in the main graph, read from the outer scope."""
    bodies = {}
    for branch in ("then", "else"):
        nodes = []
        for n in model.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{branch}_{n.name}"
            del c.input[:]
            c.input.extend(i if i in {t.name for t in model.graph.initializer} | {"x"} else f"{branch}_{i}"
                           for i in n.input)
            del c.output[:]
            c.output.extend(f"{branch}_{o}" for o in n.output)
            nodes.append(c)
        outputs = [helper.make_tensor_value_info(f"{branch}_{o.name}", o.type.tensor_type.elem_type, None)
                   for o in model.graph.output]
        bodies[branch] = helper.make_graph(nodes, f"{branch}_branch", [], outputs)
    names = [o.name for o in model.graph.output]
    node = helper.make_node("If", ["flag"], names, name="if", then_branch=bodies["then"],
                            else_branch=bodies["else"])
    graph = helper.make_graph([node], "wrapped",
                              [*model.graph.input, helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              list(model.graph.output), initializer=list(model.graph.initializer))
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def test_if_branches_of_a_generic_block():
    built = build(AttnSpec(kv_heads=2, seq=16))
    model = _if_wrapped(built.model)
    onnx.checker.check_model(model, full_check=True)
    fused, report = fuse(model)
    assert report.fused == 2, [b.reason for b in report.blocks]
    onnx.checker.check_model(fused, full_check=True)
    for flag in (True, False):
        feeds = {**built.inputs(), "flag": np.array(flag)}
        assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL


def test_a_body_reading_an_outer_intermediate_keeps_the_block():
    """The scores of a main-graph block are also read inside an If body: another consumer, so
    the block is left alone (its intermediate must survive)."""
    built = build(AttnSpec(seq=16))
    model = onnx.ModelProto()
    model.CopyFrom(built.model)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    scores = softmax.input[0]
    body = helper.make_graph([helper.make_node("ReduceSum", [scores], ["inner_sum"], keepdims=0)], "peek", [],
                             [helper.make_tensor_value_info("inner_sum", TensorProto.FLOAT, None)])
    empty = helper.make_graph([helper.make_node("Constant", [], ["zero"], value_float=0.0)], "none", [],
                              [helper.make_tensor_value_info("zero", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["flag"], ["peeked"], then_branch=body, else_branch=empty))
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    model.graph.output.append(helper.make_tensor_value_info("peeked", TensorProto.FLOAT, None))
    _, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and "another consumer" in block.reason, block.reason


def test_loop_body_block_fuses():
    """A block in a Loop body (trip count 2), reading the input and weights from the outer scope;
    the body's result is a scan output."""
    built = build(AttnSpec(kv_heads=2, seq=16))
    inits = {t.name for t in built.model.graph.initializer}
    nodes = []
    for n in built.model.graph.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = f"body_{n.name}"
        del c.input[:]
        c.input.extend(i if i in inits | {"x"} else f"body_{i}" for i in n.input)
        del c.output[:]
        c.output.extend(f"body_{o}" for o in n.output)
        nodes.append(c)
    nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"))
    (y,) = built.model.graph.output
    body = helper.make_graph(
        nodes, "loop_body",
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"body_{y.name}", y.type.tensor_type.elem_type, None)])
    trips = helper.make_tensor("trips", TensorProto.INT64, [], [2])
    keep = helper.make_tensor("keep", TensorProto.BOOL, [], [True])
    loop = helper.make_node("Loop", ["trips", "keep"], ["stacked"], name="loop", body=body)
    graph = helper.make_graph([loop], "looped", list(built.model.graph.input),
                              [helper.make_tensor_value_info("stacked", y.type.tensor_type.elem_type, None)],
                              initializer=[*built.model.graph.initializer, trips, keep])
    model = helper.make_model(graph, opset_imports=list(built.model.opset_import))
    model.ir_version = built.model.ir_version
    fused, report = fuse(model)
    assert report.fused == 1, [b.reason for b in report.blocks]
    (body_out,) = [a.g for a in fused.graph.node[0].attribute if a.name == "body"]
    assert sum(n.op_type == "FlashFwd" for n in body_out.node) == 1
    feeds = built.inputs()
    assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL
