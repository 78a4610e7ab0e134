"""Every attention form issue 2 lists fuses into exactly one FlashFwd per block, exactly.

Parameterized over `attention_graphs.POSITIVE_VARIANTS`: causal blocks use seq 16 (the compile
step pads a causal block, so any seq fuses), non-causal blocks seq 512 or 1024 (a multiple of the
kernel tile) or a symbolic seq.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from attention_graphs import (
    FP16_NATIVE_TOL,
    FUSED_TOL,
    POSITIVE_VARIANTS,
    build,
    count_ops,
    describe,
    flash_nodes,
    fuse_model,
    fused_vs_original,
    max_abs_diff,
    mutate_flashfwd,
    node_attrs,
    run_ort,
)
from fuse_attn.ir.contract import seq_tile_size_for

VARIANTS = list(POSITIVE_VARIANTS)


@pytest.fixture(scope="module")
def fused_cache():
    return {}


def _fused(name, cache):
    if name not in cache:
        built = build(POSITIVE_VARIANTS[name])
        cache[name] = (built, *fuse_model(built.model))
    return cache[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_one_flashfwd_per_block_and_valid(name, fused_cache):
    built, fused, report = _fused(name, fused_cache)
    spec = built.spec
    why = f"{name}: {describe(spec)}; report: {report.blocks}"
    assert len(flash_nodes(fused)) == spec.blocks, why
    assert count_ops(fused, "Softmax") == 0, why
    assert count_ops(fused, "Attention", "") == 0, why
    onnx.checker.check_model(fused, full_check=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_report_and_attributes(name, fused_cache):
    built, fused, report = _fused(name, fused_cache)
    spec = built.spec
    why = f"{name}: {describe(spec)}; report: {report.blocks}"
    assert len(report.blocks) == spec.blocks, why
    # batched heads (b·h, s, d) run as h = 1 (kv heads already repeated in the graph)
    heads, kv_heads = (1, 1) if spec.batched_heads or spec.score_moves else (spec.heads, spec.kv)
    for block in report.blocks:
        assert block.fused, why
        assert block.heads == heads, why
        assert block.kv_heads == kv_heads, why
        assert block.head_dim == spec.head_dim, why
        assert bool(block.causal) == spec.kernel_causal, why
        assert math.isclose(block.scale, built.effective_scale, rel_tol=1e-6), (block.scale, built.effective_scale, why)
    # the report's figures are the graph's: the node's own scale, the Transposes each rewrite added
    nodes = {n.name: n for n in flash_nodes(fused)}
    for block in report.blocks:
        assert block.scale == node_attrs(nodes[block.node])["softmax_scale"], why
        added = [n for n in fused.graph.node if n.op_type == "Transpose" and n.name.startswith(f"{block.node}_")]
        assert block.transposes_added == len(added), (block.transposes_added, [n.name for n in added], why)
    assert report.transposes_added == sum(b.transposes_added for b in report.blocks), why
    assert report.transposes_net == count_ops(fused, "Transpose") - count_ops(built.model, "Transpose"), why
    for node in flash_nodes(fused):
        a = node_attrs(node)
        assert math.isclose(a["softmax_scale"], built.effective_scale, rel_tol=1e-6), (a, why)
        assert a["use_causal_mask"] == int(spec.kernel_causal), (a, why)
        assert a["num_heads"] == heads and a["num_kv_heads"] == kv_heads, (a, why)
        assert a.get("dropout_p", 0.0) == 0.0, (a, why)
        assert len(node.input) == 3 or (len(node.input) == 4 and node.input[3] == ""), (list(node.input), why)
        tile = seq_tile_size_for(spec.seq)
        if not spec.symbolic_seq and tile is not None:
            assert a.get("seq_tile_size") == tile, (a, why)
        elif "seq_tile_size" in a:
            assert a["seq_tile_size"] in (512, 1024, 2048), (a, why)


@pytest.mark.parametrize("name", VARIANTS)
def test_fused_matches_original(name, fused_cache):
    built, fused, report = _fused(name, fused_cache)
    spec = built.spec
    for seed in (1, 2):
        feeds = built.inputs(seed=seed)
        diff = fused_vs_original(built, fused, feeds)
        assert diff <= FUSED_TOL, f"{name}: max abs diff {diff:.3e} > {FUSED_TOL}; {describe(spec)}"
    if spec.dtype == "float16":  # and natively, at fp16 precision
        feeds = built.inputs()
        diff = max_abs_diff(run_ort(built.model, feeds), run_ort(fused, feeds))
        assert diff <= FP16_NATIVE_TOL, f"{name}: native fp16 diff {diff:.3e}"


SYMBOLIC = [name for name in VARIANTS if POSITIVE_VARIANTS[name].symbolic_seq]


@pytest.mark.parametrize("name", SYMBOLIC)
def test_symbolic_seq_matches_at_other_lengths(name, fused_cache):
    """A symbolic-seq block is proven at sample lengths; it must match at others too."""
    built, fused, _ = _fused(name, fused_cache)
    for seq in (5, 40, 130):
        feeds = built.inputs(seed=seq, seq=seq)
        diff = fused_vs_original(built, fused, feeds)
        assert diff <= FUSED_TOL, f"{name} at seq {seq}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("name", ["mask_from_input_ids_shape", "mask_trilu_from_input_ids_shape",
                                  "op_mask_from_input_ids_shape", "op_all_true_from_input_ids_512"])
def test_mask_from_the_shape_of_an_input_is_no_padding_mask(name, fused_cache):
    """A mask built from Shape(input_ids) depends on the input's shape only, not its contents:
    it fuses without --assume-no-padding, and the report assumes nothing."""
    built, fused, report = _fused(name, fused_cache)
    assert [b.fused for b in report.blocks] == [True] * built.spec.blocks, report.blocks
    assert not getattr(report, "assumptions", None), report.assumptions
    feeds = built.inputs()
    other = dict(feeds, input_ids=feeds["input_ids"][:, ::-1] * 7 % 1000)  # other contents, same shape
    assert fused_vs_original(built, fused, other) <= FUSED_TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_comparison_catches_a_wrong_fused_op(name, fused_cache):
    """The equivalence check is not vacuous: a FlashFwd with a 5% wrong scale or a flipped causal
    flag misses the original by far more than the tolerance."""
    built, fused, _ = _fused(name, fused_cache)
    feeds = built.inputs()
    for wrong in (mutate_flashfwd(fused, scale_factor=1.05), mutate_flashfwd(fused, flip_causal=True)):
        assert fused_vs_original(built, wrong, feeds) > 50 * FUSED_TOL, name


@pytest.mark.parametrize("name", VARIANTS)
def test_fusing_again_changes_nothing(name, fused_cache):
    built, fused, _ = _fused(name, fused_cache)
    again, _ = fuse_model(fused)
    assert [(n.op_type, n.domain) for n in again.graph.node] == [(n.op_type, n.domain) for n in fused.graph.node], name
    assert [node_attrs(n) for n in flash_nodes(again)] == [node_attrs(n) for n in flash_nodes(fused)], name
    assert sorted(i.name for i in again.graph.initializer) == sorted(i.name for i in fused.graph.initializer), name
    feeds = built.inputs()
    got = [np.asarray(o) for o in run_ort(again, feeds)] if built.spec.dtype != "bfloat16" else None
    if got is not None:
        want = run_ort(fused, feeds)
        assert all(np.array_equal(g, w, equal_nan=True) for g, w in zip(got, want)), name
