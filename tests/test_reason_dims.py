"""Reasons quote the model's dims (issue 11, item 14): a symbolic model is proven at sample lengths
the pass picks itself (96, 104, ...); a reason names its dims (`seq`, `past_sequence_length +
sequence_length`) and never quotes those samples, while a fixed-shape model's reason keeps its numbers."""

import re

import pytest
from onnx import TensorProto, helper

import exporter_graphs
from attention_graphs import CAUSAL, NEAR_MISSES, _r, build, fuse_model
from fuse_attn.ir.evaluator import Evaluator
from fuse_attn.ir.graph import Graph


def _sample_numbers(model) -> set[int]:
    """Every seq length the pass samples or re-samples (its own binding, the varied one, their sums)."""
    evaluator = Evaluator.for_graph(Graph(model))
    seqs = [n for n in evaluator.binding.values() if n > 2]
    varied = [n for k, n in evaluator.varied().binding.items() if evaluator.binding[k] > 2]
    return {*seqs, *varied, sum(seqs), sum(varied)}


def _reasons(model) -> list[str]:
    report = fuse_model(model)[1]
    assert report.blocks and not any(b.fused for b in report.blocks), report.blocks
    return [b.reason for b in report.blocks]


def _quotes_no_samples(reason: str, model) -> None:
    quoted = [n for n in _sample_numbers(model) if re.search(rf"\b{n}\b", reason)]
    assert not quoted, (quoted, reason)


def _qkv_model(seq, head_dims=(16, 16, 32)):
    """q, k, v straight from the graph inputs, v with another head dim than q and k."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, seq, d]) for name, d in zip("qkv", head_dims)]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, seq, head_dims[2]])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.25])
    graph = helper.make_graph(nodes, "qkv", inputs, [output], initializer=[scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_kv_cache_seq_k_is_named_by_its_expression():
    model = exporter_graphs.kv_cache_decoder(mask_from="none")
    for reason in _reasons(model):
        assert "seq_q 'sequence_length' != seq_k 'past_sequence_length + sequence_length'" in reason, reason
        _quotes_no_samples(reason, model)


def test_cross_attention_names_both_seq_dims():
    model = build(NEAR_MISSES["bottom_right_computed_symbolic"]).model
    (reason,) = _reasons(model)
    assert "seq_q 'seq' != seq_k 'seq_kv'" in reason, reason
    _quotes_no_samples(reason, model)


@pytest.mark.parametrize("seq, words", [("seq", ("(1, 4, 16, 'seq')", "(1, 4, 'seq', 32)")),
                                        (128, ("(1, 4, 16, 128)", "(1, 4, 128, 32)"))])
def test_qkv_shape_mismatch_quotes_the_models_dims(seq, words):
    model = _qkv_model(seq)
    (reason,) = _reasons(model)
    assert reason.startswith("q, k, v shapes do not agree") and all(w in reason for w in words), reason
    _quotes_no_samples(reason, model)


@pytest.mark.parametrize("symbolic, words", [
    (True, ("(1, 1, 4, 'seq', 8)", "(1, 4, 'seq', 8)")),
    (False, ("(1, 1, 4, 16, 8)", "(1, 4, 16, 8)")),
])
def test_broadcast_output_shape_quotes_the_models_dims(symbolic, words):
    extra = {"symbolic_seq": True, "mask_form": "range"} if symbolic else {}
    model = build(_r(CAUSAL, scale_rank=5, extra_consumer="out", **extra)).model
    (reason,) = _reasons(model)
    assert "the attention output has shape" in reason and all(w in reason for w in words), reason
    _quotes_no_samples(reason, model)


def test_batched_heads_output_names_the_product():
    model = build(_r(CAUSAL, batched_heads=True, scale_form="mul", scale_rank=4, extra_consumer="out",
                     symbolic_seq=True, mask_form="range")).model
    (reason,) = _reasons(model)
    assert "(1, 4, 'seq', 8)" in reason and "(4, 'seq', 8)" in reason, reason
    _quotes_no_samples(reason, model)


def test_model_dims_names_what_follows_the_free_dims():
    """The mapping itself: fixed sizes stay numbers; a size that moves with the binding is named by
    a symbol, a declared expression, a sum of two symbols or a multiple of one; else "symbolic"."""
    model = exporter_graphs.kv_cache_decoder(mask_from="none")
    evaluator = Evaluator.for_graph(Graph(model))
    b, s, p = (evaluator.binding[k] for k in ("batch_size", "sequence_length", "past_sequence_length"))
    vb, vs, vp = (evaluator.varied().binding[k] for k in ("batch_size", "sequence_length", "past_sequence_length"))
    assert evaluator.model_dims((16, s, s + p, 4 * b, s + 1), (16, vs, vs + vp, 4 * vb, vs + 1)) == (
        "16", "'sequence_length'", "'past_sequence_length + sequence_length'", "'4*batch_size'", "symbolic")
    fixed = Evaluator.for_graph(Graph(_qkv_model(128)))
    assert fixed.model_dims((128, 96), None) == ("128", "96")


def test_a_mask_proven_again_at_a_longer_seq_says_which_dim_it_moved():
    """The longer length is the pass's own; the reason names the dim it moved to get there."""
    spec = NEAR_MISSES["sliding_window_symbolic_120"]
    (reason,) = _reasons(build(spec).model)
    assert reason.startswith("with seq 'seq' at ") and "sliding window of 120 keys" in reason, reason


def test_shape_words_quote_a_values_shape_in_the_models_dims():
    """What the mask-broadcast, softmax-input and layout-move reasons print for a graph value."""
    from fuse_attn.passes._graph import shape_words
    graph = Graph(exporter_graphs.kv_cache_decoder())
    evaluator = Evaluator.for_graph(graph)
    assert shape_words(evaluator, graph.value("past_key_values.0.key")) == "('batch_size', 4, 'past_sequence_length', 16)"
    assert shape_words(evaluator, graph.value("attention_mask")) == "('batch_size', 'past_sequence_length + sequence_length')"
    fixed = Graph(_qkv_model(128))
    assert shape_words(Evaluator.for_graph(fixed), fixed.value("v")) == "(1, 4, 128, 32)"
