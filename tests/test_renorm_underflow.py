"""flax's renormalised softmax (jax2onnx: softmax over every key, Mul by the mask, divided by the
guarded row sum) equals the kernel's softmax over the visible keys only while the original's
softmax keeps some mass on the visible keys. The report line says where that ends; this shows
that it does end there: with score gaps past exp's range the original returns zeros."""

from __future__ import annotations

import numpy as np
import pytest

from attention_graphs import FUSED_TOL, AttnSpec, build, fuse_model, run_comparable


@pytest.mark.parametrize("dtype, imprecise, zero", [("float32", 87, 103), ("float16", 10, 17), ("bfloat16", 87, 92)])
def test_the_report_line_says_where_the_renormalisation_underflows(dtype, imprecise, zero):
    fused, report = fuse_model(build(AttnSpec(mask_form="renorm", dtype=dtype)).model)
    (block,) = report.blocks
    assert block.fused
    (note,) = [n for n in block.notes if n.startswith("renormalised softmax")]
    assert f"more than about {imprecise} in {dtype}" in note and f"to 0 beyond about {zero}" in note


def test_past_the_range_the_original_returns_zeros_and_the_kernel_does_not():
    built = build(AttnSpec(mask_form="renorm"))  # causal: row i keeps keys 0..i
    fused, report = fuse_model(built.model)
    assert report.fused == 1
    x = built.inputs()["x"]
    original, kernel = run_comparable(built.model, {"x": x})[0], run_comparable(fused, {"x": x})[0]
    assert np.abs(original - kernel).max() <= FUSED_TOL  # peaked scores, gaps well inside the range
    # Scores grow with x²: at 30x, masked keys beat the visible ones by hundreds in some rows.
    loud = {"x": (x * 30).astype(x.dtype)}
    original, kernel = run_comparable(built.model, loud)[0], run_comparable(fused, loud)[0]
    zero_rows = np.all(original == 0, axis=-1)  # a query whose every visible key underflowed
    assert zero_rows.any() and not np.all(kernel == 0, axis=-1).any()
