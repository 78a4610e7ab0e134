"""Models below opset 15 (no CastLike, no Shape start/end) are fused at their own opset: FlashFwd's
model-local function is written for the model's opset and dtype; below opset 12 (no Constant
value_int/value_float) one body per distinct attribute set, told apart by `overload`."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from attention_graphs import (AttnSpec, FUSED_TOL, build, flash_nodes, fuse_model, fused_vs_original,
                              mutate_flashfwd)
from fuse_attn.ir import contract
from fuse_attn.passes.cleanup import declare_flash_fwd


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


# Opsets 9-11: Softmax coerces to 2D, Unsqueeze/Squeeze/ReduceSum take axes as attributes, Dropout
# its ratio (no training mode), Range only from 11 (the builder's computed masks need it).
OLD_FORMS = {
    "causal_constant": AttnSpec(seq=16),
    "bidirectional": AttnSpec(mask="none", seq=512, heads=2),
    "gqa_repeat_kv": AttnSpec(seq=16, kv_heads=2),  # Unsqueeze(axes attribute) -> Expand -> Reshape
    "batched_heads": AttnSpec(seq=16, batched_heads=True),  # the rewrite's Unsqueeze/Squeeze
    "dropout_ratio_attribute": AttnSpec(seq=16, dropout="identity_ratio"),
    "float16": AttnSpec(seq=16, dtype="float16"),
}
OPSET_11_FORMS = {  # Range exists from opset 11; LessOrEqual is written Not(Greater)
    "computed_causal_symbolic_seq": AttnSpec(seq=16, symbolic_seq=True, mask_form="range"),
    "renormalised_reduce_sum_axes": AttnSpec(seq=16, mask_form="renorm_plain", symbolic_seq=True),
}


def _mutated(fused: onnx.ModelProto, dtype: int, **how) -> onnx.ModelProto:
    """A wrong scale or causal flag, with the bodies declared again for the mutated attributes
    (below opset 12 a body holds its node's attributes as literals)."""
    mutated = mutate_flashfwd(fused, **how)
    declare_flash_fwd(mutated, dtype)
    return mutated


@pytest.mark.parametrize("opset, form", [(opset, form) for opset in (9, 10, 11) for form in OLD_FORMS]
                         + [(11, form) for form in OPSET_11_FORMS])
def test_fused_below_opset_12(opset, form):
    spec = {**OLD_FORMS, **OPSET_11_FORMS}[form]
    built = build(AttnSpec(**{**spec.__dict__, "opset": opset}))
    fused, report = fuse_model(built.model)
    assert report.fused == 1, [b.reason for b in report.blocks]
    assert _default_opset(fused) == opset
    assert fused.ir_version >= contract.OVERLOAD_IR_VERSION
    onnx.checker.check_model(fused, full_check=True)
    (node,) = flash_nodes(fused)
    (function,) = [f for f in fused.functions if f.name == contract.OP_TYPE]
    assert node.overload == function.overload != ""
    assert [o.version for o in function.opset_import if o.domain == ""] == [opset]
    assert not any(a.ref_attr_name for n in function.node for a in n.attribute)  # literals only
    tol = FUSED_TOL * (100 if spec.dtype == "float16" else 1)
    assert fused_vs_original(built, fused) <= tol
    dtype = onnx.TensorProto.FLOAT16 if spec.dtype == "float16" else onnx.TensorProto.FLOAT
    assert fused_vs_original(built, _mutated(fused, dtype, scale_factor=1.05)) > 100 * FUSED_TOL
    assert fused_vs_original(built, _mutated(fused, dtype, flip_causal=True)) > 100 * FUSED_TOL
    again, report_again = fuse_model(fused)
    assert report_again.fused == 0 and report_again.already_fused == 1
    assert [f.overload for f in again.functions] == [function.overload]


def test_one_body_per_attribute_set_below_opset_12():
    """Two blocks alike at opset 11 share one body; once their scales differ, each has its own."""
    built = build(AttnSpec(opset=11, seq=16, blocks=2))
    fused, report = fuse_model(built.model)
    assert report.fused == 2, [b.reason for b in report.blocks]
    assert len({n.overload for n in flash_nodes(fused)}) == 1 and len(fused.functions) == 1
    first = next(n for n in fused.graph.node if n.op_type == contract.OP_TYPE)
    next(a for a in first.attribute if a.name == "softmax_scale").f *= 2
    declare_flash_fwd(fused, onnx.TensorProto.FLOAT)
    overloads = {n.overload for n in flash_nodes(fused)}
    assert len(overloads) == 2 and {f.overload for f in fused.functions} == overloads
    onnx.checker.check_model(fused, full_check=True)
    assert fused_vs_original(built, fused) > 100 * FUSED_TOL  # the doubled scale is in its body


@pytest.mark.parametrize("opset", [9, 11, 12])
def test_softmax_not_over_the_last_axis_before_opset_13(opset):
    """Softmax-1/11 normalises every axis from `axis` on together: only the last axis is a row."""
    built = build(AttnSpec(opset=opset, seq=16, softmax_axis=2))
    fused, report = fuse_model(built.model)
    assert report.fused == 0
    (block,) = report.blocks
    assert "axis 2" in block.reason and "coerces to 2D before opset 13" in block.reason


def test_overload_names_the_attributes_the_body_reads():
    attrs = contract.FlashFwdAttrs(softmax_scale=0.125, use_causal_mask=True, num_heads=8, num_kv_heads=2,
                                   seq_tile_size=512)
    name = contract.overload_for(attrs, onnx.TensorProto.FLOAT16)
    assert name == ("num_heads=8,num_kv_heads=2,softmax_scale=0.125,use_causal_mask=1,dropout_p=0.0,"
                    "dtype=float16")
    # seq_tile_size does not change the body: the same overload.
    assert contract.overload_for(dataclasses.replace(attrs, seq_tile_size=None), onnx.TensorProto.FLOAT16) == name
    with pytest.raises(ValueError, match="attributes"):
        contract.make_function(11, onnx.TensorProto.FLOAT)


def test_a_flashfwd_node_the_input_brought_without_its_attributes_is_left_as_it_came():
    """Below opset 12 every FlashFwd node is pointed at the body for its attributes; one that
    came with the input and lacks them is passed through, and the block beside it still fuses."""
    built = build(AttnSpec(opset=11, seq=16))
    model = built.model
    stray = onnx.helper.make_node(contract.OP_TYPE, ["x", "x", "x"], ["stray_out"], domain=contract.DOMAIN,
                                  name="stray")
    model.graph.node.append(stray)
    model.graph.output.append(onnx.helper.make_tensor_value_info("stray_out", onnx.TensorProto.FLOAT, None))
    model.opset_import.append(onnx.helper.make_opsetid(contract.DOMAIN, contract.VERSION))
    fused, report = fuse_model(model)
    assert report.fused == 1 and report.already_fused == 1
    (kept,) = [n for n in fused.graph.node if n.name == "stray"]
    assert kept.overload == "" and not kept.attribute
    assert len([f for f in fused.functions if f.name == contract.OP_TYPE]) == 1
