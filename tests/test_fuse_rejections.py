"""Each must-not-fuse case is left alone, with a reason that names its cause.

One test per case in `attention_graphs.NEAR_MISSES`. Mask near misses use seq 512 so that the
mask, not the seq tile, is the one thing wrong. A block left alone must also still compute what it
computed before (the pass may clean up around it, never change it).
"""

from __future__ import annotations

import dataclasses

import pytest

from attention_graphs import (
    FUSED_TOL,
    NEAR_MISSES,
    POSITIVE_VARIANTS,
    REASON_WORDS,
    build,
    count_ops,
    describe,
    flash_nodes,
    fuse_model,
    fused_vs_original,
    max_abs_diff,
    node_attrs,
    run_comparable,
)

# Near misses a pass may fuse exactly (see AttnSpec.may_fuse_exactly): then outputs must match.
MAY_FUSE_EXACTLY = {name for name, spec in NEAR_MISSES.items() if spec.may_fuse_exactly}


def _check_left_alone(name, spec, **fuse_kwargs):
    built = build(spec)
    fused, report = fuse_model(built.model, **fuse_kwargs)
    why = f"{name}: {describe(spec)}; report: {report.blocks}"
    assert len(report.blocks) == spec.blocks, why
    causes = spec.near_miss_causes()
    assert causes, name
    for block in report.blocks:
        if block.fused and name in MAY_FUSE_EXACTLY:
            continue
        assert not block.fused, why
        reason = (block.reason or "").lower()
        words = {w for c in causes for w in REASON_WORDS[c]}
        assert any(w in reason for w in words), f"{why}: reason {block.reason!r} names none of {sorted(words)}"
    if not any(b.fused for b in report.blocks):
        assert not flash_nodes(fused), why
    feeds = built.inputs(padding=True)
    diff = fused_vs_original(built, fused, feeds)
    assert diff <= FUSED_TOL, f"{why}: output changed by {diff:.3e}"


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_not_fused(name):
    _check_left_alone(name, NEAR_MISSES[name])


def test_softmax_consumer_named():
    """The classic one (Inductor's _test_pattern_fails_with_reuse): returned attention weights."""
    built = build(NEAR_MISSES["probs_returned"])
    fused, report = fuse_model(built.model)
    assert not report.blocks[0].fused
    assert "consumer" in report.blocks[0].reason.lower() or "output" in report.blocks[0].reason.lower()
    assert count_ops(fused, "Softmax") == 1


def test_assume_no_padding_fuses_what_the_column_cannot_carry():
    """At head dim 128 there is no room for the key-bias column: the flag's all-ones assumption is
    the only route, and the report says it was made."""
    built = build(NEAR_MISSES["padding_head_dim_128"])
    fused, report = fuse_model(built.model, assume_no_padding=True)
    assert [b.fused for b in report.blocks] == [True], report.blocks
    assert report.blocks[0].causal is False and report.blocks[0].key_mask_inputs == []
    assert any("attention_mask" in a and "--assume-no-padding" in a for a in report.assumptions), report.assumptions
    (node,) = flash_nodes(fused)
    assert node_attrs(node)["use_causal_mask"] == 0 and "key_bias_column" not in node_attrs(node)
    diff = fused_vs_original(built, fused, built.inputs(padding=False))  # all-ones mask, as assumed
    assert diff <= FUSED_TOL, diff


def test_assume_no_padding_leaves_the_column_where_it_fits():
    """With the flag, a padding mask the column carries is still carried exactly (no assumption made)."""
    for name, causal in (("padding_input", False), ("causal_plus_padding", True)):
        built = build(POSITIVE_VARIANTS[name])
        fused, report = fuse_model(built.model, assume_no_padding=True)
        assert [(b.fused, b.causal) for b in report.blocks] == [(True, causal)], report.blocks
        assert report.blocks[0].key_mask_inputs == ["attention_mask"] and report.assumptions == []
        diff = fused_vs_original(built, fused, built.inputs(padding=True))
        assert diff <= FUSED_TOL, diff


def test_assume_no_padding_does_not_excuse_other_masks():
    """The flag declares the padding input all ones; it does not make an almost-causal mask causal."""
    for name in ("off_by_one", "sliding_window", "additive_bias"):
        _check_left_alone(name, NEAR_MISSES[name], assume_no_padding=True)


@pytest.mark.parametrize("name", ["mask_more_batch_than_qkv", "mask_more_batch_where_swapped_out",
                                  "batched_heads_scale_rank4_out", "scale_rank5_out"])
def test_broadcasting_mask_or_scale_named(name):
    """The mask's extra batch entries or the scale's extra rank broadcast the scores: the original
    output is larger (or of higher rank) than the kernel's."""
    spec = NEAR_MISSES[name]
    built = build(spec)
    (block,) = fuse_model(built.model)[1].blocks
    assert not block.fused and "broadcast" in block.reason, block.reason
    if spec.mask_batch > spec.batch:
        y = run_comparable(built.model, built.inputs())[0]
        assert y.shape[0] == spec.mask_batch > spec.batch, y.shape


@pytest.mark.parametrize("name", ["sliding_window_symbolic_120", "sliding_window_symbolic_200_add",
                                  "op_sliding_window_symbolic_150", "sliding_window_symbolic_5"])
def test_symbolic_sliding_window_named_with_its_window(name):
    """A window computed from shapes under a symbolic seq is causal at every length up to it."""
    spec = NEAR_MISSES[name]
    built = build(spec)
    (block,) = fuse_model(built.model)[1].blocks
    assert not block.fused and f"window of {spec.window}" in block.reason, block.reason
    longer = built.inputs(seq=spec.window + 40)
    causal = build(dataclasses.replace(spec, mask="causal", window=0))
    assert max_abs_diff(run_comparable(built.model, longer), run_comparable(causal.model, longer)) > 1e-2
    if spec.window > 16:  # at the seq the other tests run, it is indistinguishable from causal
        short = built.inputs()
        assert max_abs_diff(run_comparable(built.model, short), run_comparable(causal.model, short)) == 0.0


@pytest.mark.parametrize("name, words", [
    ("boost_diagonal", ("bias",)), ("op_boost_float", ("bias",)),
    ("strict_causal", ("every key",)), ("strict_causal_trilu", ("every key",)),
    ("strict_causal_symbolic_range", ("every key",)),
    ("anti_causal", ("neither none nor top-left causal",)),
    ("anti_causal_where_swapped", ("neither none nor top-left causal",)),
    ("op_anti_causal_bool", ("neither none nor top-left causal",)),
    ("bottom_right_computed", ("seq",)), ("bottom_right_computed_symbolic", ("seq",)),
])
def test_contract_near_misses_name_their_cause(name, words):
    (block,) = fuse_model(build(NEAR_MISSES[name]).model)[1].blocks
    assert not block.fused and any(w in block.reason for w in words), block.reason


@pytest.mark.parametrize("name", ["v_scaled", "gqa_v_scaled"])
def test_scaled_values_fused_only_exactly(name):
    """V scaled before MatMul(P, V): the kernel may read the scaled V (exact) or leave the block."""
    built = build(NEAR_MISSES[name])
    fused, report = fuse_model(built.model)
    for block in report.blocks:
        if not block.fused:
            assert "scale" in block.reason, block.reason
    assert fused_vs_original(built, fused) <= FUSED_TOL
    assert max_abs_diff(built.reference(built.inputs()),
                        build(dataclasses.replace(built.spec, v_scale=None)).reference(built.inputs())) > 1e-2


def test_training_mode_dropout_is_carried_as_dropout_p():
    """onnxruntime ignores Dropout's training mode, so outputs cannot tell: a fused block must
    carry the ratio as dropout_p (the compile step then refuses it: inference mode asserts 0)."""
    built = build(NEAR_MISSES["dropout_training"])
    fused, report = fuse_model(built.model)
    assert len(flash_nodes(fused)) == sum(b.fused for b in report.blocks)
    for node in flash_nodes(fused):
        assert abs(node_attrs(node)["dropout_p"] - 0.1) < 1e-6, node_attrs(node)
    for block in report.blocks:
        if not block.fused:
            assert "dropout" in block.reason.lower(), block.reason


def test_two_blocks_one_near_miss_each_reported():
    spec = dataclasses.replace(NEAR_MISSES["probs_returned"], blocks=2)
    _check_left_alone("probs_returned x2", spec)


def test_scores_cast_to_an_integer_type_are_left_alone():
    """Cast(int32) truncates the scores: not the kernel's softmax. The reason names the type."""
    import onnx
    from onnx import TensorProto, helper

    from fuse_attn import fuse

    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Cast", ["scores"], ["truncated"], to=TensorProto.INT32),
             helper.make_node("Cast", ["truncated"], ["back"], to=TensorProto.FLOAT),
             helper.make_node("Softmax", ["back"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 512, 16]) for n in "qkv"]
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 512, 16])
    model = helper.make_model(helper.make_graph(nodes, "g", io, [out]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    _, report = fuse(model)
    (block,) = report.blocks
    assert not block.fused and "cast to int32" in block.reason, block.reason
