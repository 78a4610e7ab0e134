"""Models below opset 15 (no CastLike, no Shape start/end) are fused at their own opset: FlashFwd's
model-local function is written for the model's opset and dtype."""

from __future__ import annotations

import onnx
import pytest

from attention_graphs import (AttnSpec, FUSED_TOL, build, flash_nodes, fuse_model, fused_vs_original,
                              mutate_flashfwd)
from fuse_attn.ir import contract


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("opset", [13, 14, 17])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_at_the_models_own_opset(opset, dtype):
    built = build(AttnSpec(opset=opset, dtype=dtype, kv_heads=2, seq=16))
    fused, report = fuse_model(built.model)
    assert report.fused == 1, [b.reason for b in report.blocks]
    assert _default_opset(fused) == opset
    onnx.checker.check_model(fused, full_check=True)
    (function,) = [f for f in fused.functions if f.name == contract.OP_TYPE]
    assert [o.version for o in function.opset_import if o.domain == ""] == [opset]
    assert ("CastLike" in {n.op_type for n in function.node}) == (opset >= 15)
    assert fused_vs_original(built, fused) <= FUSED_TOL * (100 if dtype == "float16" else 1)
    # The comparison would notice a wrong scale or mask in the opset-specific body.
    assert fused_vs_original(built, mutate_flashfwd(fused, scale_factor=1.05)) > 100 * FUSED_TOL
    assert fused_vs_original(built, mutate_flashfwd(fused, flip_causal=True)) > 100 * FUSED_TOL


@pytest.mark.parametrize("mask", ["causal", "none"])
def test_opset_12_fuses(mask):
    """Opset 12: Unsqueeze takes attributes, Softmax coerces to 2D (the last axis is the same)."""
    built = build(AttnSpec(opset=12, mask=mask, seq=16 if mask == "causal" else 512))
    fused, report = fuse_model(built.model)
    assert report.fused == 1, [b.reason for b in report.blocks]
    assert _default_opset(fused) == 12
    onnx.checker.check_model(fused, full_check=True)
    assert fused_vs_original(built, fused) <= FUSED_TOL
    assert fused_vs_original(built, mutate_flashfwd(fused, flip_causal=True)) > 100 * FUSED_TOL


def test_function_dtype_is_the_blocks():
    """Below opset 15 the body casts to the nodes' dtype: a float16 model's function is float16."""
    built = build(AttnSpec(opset=14, dtype="float16", seq=16))
    fused, _ = fuse_model(built.model)
    (function,) = [f for f in fused.functions if f.name == contract.OP_TYPE]
    casts = {a.i for n in function.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert onnx.TensorProto.FLOAT16 in casts and onnx.TensorProto.FLOAT not in casts
    assert len(flash_nodes(fused)) == 1


def test_function_needs_a_dtype_below_15():
    with pytest.raises(ValueError, match="dtype"):
        contract.make_function(14)
    with pytest.raises(ValueError, match="opset"):
        contract.make_function(contract.MIN_OPSET - 1, onnx.TensorProto.FLOAT)


@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16])
def test_a_shipped_function_says_which_dtype_it_serves(dtype):
    """A model fused before at opset 14 carries a one-dtype body: fusing it again reads that dtype
    back from the body (`contract.function_dtype`); the generic body (CastLike) serves any."""
    assert contract.function_dtype(contract.make_function(14, dtype)) == dtype
    assert contract.function_dtype(contract.make_function(17)) is None
