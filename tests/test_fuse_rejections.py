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
    REASON_WORDS,
    build,
    count_ops,
    describe,
    flash_nodes,
    fuse_model,
    fused_vs_original,
    node_attrs,
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


def test_assume_no_padding_fuses_padding_mask():
    built = build(NEAR_MISSES["padding_input"])
    fused, report = fuse_model(built.model, assume_no_padding=True)
    assert [b.fused for b in report.blocks] == [True], report.blocks
    assert report.blocks[0].causal is False or report.blocks[0].causal == 0
    (node,) = flash_nodes(fused)
    assert node_attrs(node)["use_causal_mask"] == 0
    diff = fused_vs_original(built, fused, built.inputs(padding=False))  # all-ones mask, as assumed
    assert diff <= FUSED_TOL, diff


def test_assume_no_padding_fuses_causal_plus_padding_as_causal():
    built = build(NEAR_MISSES["causal_plus_padding"])
    fused, report = fuse_model(built.model, assume_no_padding=True)
    assert [b.fused for b in report.blocks] == [True], report.blocks
    assert report.blocks[0].causal
    diff = fused_vs_original(built, fused, built.inputs(padding=False))
    assert diff <= FUSED_TOL, diff


def test_assume_no_padding_does_not_excuse_other_masks():
    """The flag declares the padding input all ones; it does not make an almost-causal mask causal."""
    for name in ("off_by_one", "sliding_window", "additive_bias"):
        _check_left_alone(name, NEAR_MISSES[name], assume_no_padding=True)


def test_two_blocks_one_near_miss_each_reported():
    spec = dataclasses.replace(NEAR_MISSES["probs_returned"], blocks=2)
    _check_left_alone("probs_returned x2", spec)
