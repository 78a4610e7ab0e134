"""The test-graph builders are checked against the attention math itself (numpy, float64).

Each variant and near miss in `attention_graphs` is built, passes the ONNX checker, and its
onnxruntime output equals an independent numpy reference of what the spec means. Attention is
peaked, so a deliberately wrong scale, mask or kv-head mapping misses the reference by far more
than the 1e-4 tolerance the fusion tests use.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from attention_graphs import (
    NEAR_MISSES,
    POSITIVE_VARIANTS,
    AttnSpec,
    build,
    builder_tolerance,
    max_abs_diff,
    mutate_flashfwd,
    run_comparable,
    run_ort,
    wrong_scale_and_mask_diffs,
)

ALL = {**POSITIVE_VARIANTS, **NEAR_MISSES}
TOL = 1e-4  # the fused-vs-original tolerance of the fusion tests


@pytest.mark.parametrize("name", list(ALL))
def test_builder_matches_numpy_reference(name):
    spec = ALL[name]
    built = build(spec)
    onnx.checker.check_model(built.model, full_check=True)
    feeds = built.inputs(padding=True)
    if spec.dtype == "bfloat16":  # no bf16 MatMul/Softmax kernels on onnxruntime CPU: run upcast
        got = run_comparable(built.model, feeds)
    else:
        got = [np.asarray(o, np.float64) for o in run_ort(built.model, feeds)]
    want = built.reference(feeds)
    assert len(got) == 1 + len(built.extra_outputs)
    assert max_abs_diff(got, want) <= builder_tolerance(spec), name


@pytest.mark.parametrize("name", list(POSITIVE_VARIANTS))
def test_wrong_scale_or_mask_fails_the_comparison(name):
    built = build(POSITIVE_VARIANTS[name])
    diffs = wrong_scale_and_mask_diffs(built)
    assert diffs, name
    for what, diff in diffs.items():
        assert diff > 50 * TOL, f"{name}: a {what} moves the output only {diff:.2e}"


def test_near_uniform_attention_would_hide_a_wrong_scale():
    """Why the gain matters: at target_score_std 0.001 (near-uniform, like small random init) a 5% scale error is invisible."""
    flat = build(dataclasses.replace(POSITIVE_VARIANTS["kt_perm0132"], target_score_std=0.001))
    peaked = build(POSITIVE_VARIANTS["kt_perm0132"])
    assert wrong_scale_and_mask_diffs(flat)["scale x1.05"] < 1e-4
    assert wrong_scale_and_mask_diffs(peaked)["scale x1.05"] > 1e-2


def test_reported_scale_is_what_the_stored_constant_applies():
    for form in ("div", "mul", "sqrt_both"):
        built = build(dataclasses.replace(POSITIVE_VARIANTS["fp16"], scale_form=form))
        assert abs(built.effective_scale - 8 ** -0.5) < 1e-3  # fp16-rounded, close to nominal
    assert build(POSITIVE_VARIANTS["scale_none"]).effective_scale == 1.0


def test_every_near_miss_names_its_cause_and_positives_none():
    for name, spec in POSITIVE_VARIANTS.items():
        assert spec.should_fuse, (name, spec.near_miss_causes())
    for name, spec in NEAR_MISSES.items():
        assert not spec.should_fuse, name


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError):
        AttnSpec(heads=4, kv_heads=3)
    with pytest.raises(ValueError):
        AttnSpec(heads=8, kv_heads=1, kv_repeat="tile")  # tiling one kv head is repeat_kv
    with pytest.raises(ValueError):
        AttnSpec(k_transpose="untransposed")  # needs seq == head_dim


def test_mutate_flashfwd_changes_only_flashfwd_nodes():
    built = build(POSITIVE_VARIANTS["kt_perm0132"])
    same = mutate_flashfwd(built.model, scale_factor=2.0, flip_causal=True)
    assert same.SerializeToString() == built.model.SerializeToString()
